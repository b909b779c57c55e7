"""Orbax checkpoints of the train state, with JSON metadata (never pickles).

A checkpoint step folder holds the ``state`` item (Orbax arrays of the train
state as a nested dict, its PRNG key included), Orbax's own ``metrics`` item
(when metrics were passed) and the step's JSON metadata, stored through Orbax's
``save(..., custom_metadata=...)`` in ``<step>/_CHECKPOINT_METADATA`` and read
back with ``CheckpointManager.metadata(step)``: the config, nesting dims, class
count, the data position, the library version, a copy of the step's metrics
and a SHA-256 of every saved array. Loading one runs no code, and a checkpoint
made by a different model config is refused with a message that names the
difference.

Saves are atomic: Orbax writes into ``<step>.orbax-checkpoint-tmp-*`` and
renames the folder when the save is complete, so a save cut short by a crash
or ``SIGKILL`` is never listed (the next run that opens the directory for
writing removes it in the background). With ``async_save`` the arrays are
copied to host memory before :meth:`Checkpointer.save` returns and written in
a background thread, so the training step may donate (and so invalidate) the
saved state's buffers at once.

Integrity: Orbax 0.12 stores arrays as zarr chunks in an OCDBT database whose
B-tree nodes and manifest carry checksums, but the chunk bytes themselves carry
none (its zarr3 layout puts a ``crc32c`` codec on the shard index only, and
there is no public option to add one to the data), so a flipped bit in an
array's data file restores silently with changed values. :class:`Checkpointer`
therefore records a SHA-256 of each array's bytes (computed on the host from
the arrays being saved) in the step's metadata and checks every array it
restores against it (``checksums=True``, the default).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

from mrl_jax.core.version import __version__
from mrl_jax.train import specs

# Config fields that decide the structure and shapes in a checkpoint; resuming with any of
# them changed cannot work, so it is refused up front.
MODEL_FIELDS = ("dataset", "encoder", "head", "nesting", "ff_dim")
BEST_MODES = ("max", "min")
# Shape records of the model that tasks store with each step (compared on restore).
MODEL_RECORDS = ("bert_config",)
_HINTS = {"max_position_embeddings": " (set by config.max_length: the rows of the position "
                                     "embeddings; resume with the max_length of the run)",
          "vocab_size": " (the vocabulary: workdir/assets/tokenizer.json or config.model_dir "
                        "changed since the checkpoint)"}
HASH = "sha256"
# Orbax's names inside a step folder; used only to name files in error messages and to
# find a corrupt metrics file Orbax cannot say the name of.
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
METRICS_ITEM = "metrics"
STATE_ITEM = "state"
_LEGACY_METADATA_ITEM = "metadata"  # mrl_jax <= 0.1 stored the metadata as a JSON item


class CheckpointError(ValueError):
  """A checkpoint that cannot be used: corrupt, partial or from another model."""


def model_signature(config_dict: dict) -> dict:
  """The part of a (JSON-able) config dict that fixes the model's and optimiser's shapes.

  Configs stored before the namespaces (flat ``optimizer``) read as if namespaced,
  so their checkpoints resume.
  """
  config_dict = specs.migrate_flat(config_dict)
  return {**{k: config_dict.get(k) for k in MODEL_FIELDS},
          "optimizer": (config_dict.get("optim") or {}).get("optimizer")}


class Checkpointer:
  """Saves and restores the train state under ``directory``.

  Args:
    directory: where step folders go (created if missing).
    metadata: JSON-able dict stored with every step; its ``"config"`` entry is
      compared with the stored one on restore.
    max_to_keep: how many recent steps to keep, an int >= 1: the newest
      complete step is never deleted.
    best_metric: if set, the name of a scalar passed as ``metrics`` to
      :meth:`save` (e.g. ``"top1/dim_64"``); the best step by it is kept as
      well as the ``max_to_keep`` latest, and :meth:`best_step` returns it.
      Non-finite values are never ranked. On open, a step whose Orbax
      ``metrics`` file is gone is reported with a warning that names the step
      and the file: it is ranked by the copy of its metrics in its metadata, or,
      without one, kept (never deleted by this process). A corrupt metrics
      file is a :class:`CheckpointError` (Orbax cannot list the directory).
    best_mode: ``"max"`` or ``"min"``: which value of ``best_metric`` is best.
    async_save: write arrays in a background thread (see the module docstring).
    read_only: only read (export, inspection): never save, delete or clean up,
      so it is safe next to a run that is still writing.
    checksums: store a SHA-256 of every array with each step and check the
      arrays read by :meth:`restore` / :meth:`restore_subtree` against it.
      Arrays split over several processes are not hashed (no host holds them).
    allow_unverified: restore a step whose metadata has no ``checksums`` record
      (saved with ``checksums=False``, or the record removed) without checking its
      arrays. Off by default: such a step is refused, naming this option
      (``config.checkpoint.allow_unverified`` in training configs).

  Raises:
    ValueError: a bad argument (naming it).
    CheckpointError: a step's metrics file is corrupt.
  """

  def __init__(self, directory: str, metadata: dict[str, Any] | None = None, *,
               max_to_keep: int = 2, best_metric: str | None = None,
               best_mode: str = "max", async_save: bool = False, read_only: bool = False,
               checksums: bool = True, allow_unverified: bool = False):
    if not isinstance(directory, str | os.PathLike) or not os.fspath(directory):
      raise ValueError(f"directory={directory!r}; pass the folder for the step folders")
    if (isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int | np.integer)
        or max_to_keep < 1):
      raise ValueError(f"max_to_keep={max_to_keep!r}; it must be an int >= 1 (the newest "
                       "checkpoint is always kept; 0 or less would delete each one as it is "
                       "written)")
    if best_metric is not None and (not isinstance(best_metric, str) or not best_metric):
      raise ValueError(f"best_metric={best_metric!r}; pass a metric name or None")
    if best_mode not in BEST_MODES:
      raise ValueError(f"best_mode={best_mode!r}; choose one of {BEST_MODES}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.metadata = {**(metadata or {}), "mrl_jax_version": __version__}
    self.best_metric = best_metric
    self.best_mode = best_mode
    self.checksums = bool(checksums)
    self.allow_unverified = bool(allow_unverified)
    self._metrics: dict[int, Mapping[str, float]] = {}  # step -> metrics ranked by best_step
    self._keep: set[int] = set()  # steps that lost their metrics and cannot be ranked
    policy: Any = ocp.checkpoint_managers.LatestN(n=int(max_to_keep))
    if best_metric:
      policy = ocp.checkpoint_managers.AnyPreservationPolicy(
          [policy, _BestAndKept(self._value, self._keep)])
    try:
      self._manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(
              create=not read_only, read_only=read_only,
              save_interval_steps=int(not read_only), enable_async_checkpointing=async_save,
              cleanup_tmp_directories=not read_only, preservation_policy=policy,
              # best_fn makes Orbax write the metrics; ranking is _BestAndKept's.
              best_fn=(lambda metrics: 0.0) if best_metric else None, best_mode=best_mode),
          item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                         _LEGACY_METADATA_ITEM: ocp.JsonCheckpointHandler()},
      )
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
      raise CheckpointError(_describe_unlistable(self.directory, e)) from e
    if best_metric:
      self._scan_metrics()

  def _scan_metrics(self) -> None:
    """Read every step's metrics; report (and protect) steps whose metrics file is gone."""
    for step in self._manager.all_steps():
      metrics = self._manager.metrics(step)
      if metrics is not None:
        self._metrics[step] = metrics
        continue
      step_metadata = _step_metadata(self.directory, step)
      copy = (step_metadata.custom_metadata or {}).get("metrics")
      if copy is None and METRICS_ITEM not in (step_metadata.item_handlers or {}):
        continue  # saved without metrics (e.g. on preemption): not a candidate
      path = os.path.join(self.directory, str(step), METRICS_ITEM, METRICS_ITEM)
      if copy is not None:
        self._metrics[step] = copy
        warnings.warn(
            f"checkpoint step {step}: its metrics file {path} is missing; ranking the step by "
            f"the copy in its metadata ({self.best_metric}={copy.get(self.best_metric)})",
            stacklevel=3)
      else:
        self._keep.add(step)
        warnings.warn(
            f"checkpoint step {step}: its metrics file {path} is missing and no copy of "
            f"{self.best_metric!r} was saved with it, so it cannot be ranked; it is kept (never "
            "deleted by this run) and never returned by best_step()", stacklevel=3)

  def _value(self, step: int, metrics: Mapping[str, Any] | None) -> float | None:
    """``best_metric`` of ``step`` (None: not rankable), signed so that larger is better."""
    metrics = self._metrics.get(step) if metrics is None else metrics
    if metrics is None or self.best_metric not in metrics:
      return None
    try:
      value = float(metrics[self.best_metric])
    except (TypeError, ValueError):
      return None
    if not math.isfinite(value):
      return None
    return value if self.best_mode == "max" else -value

  def latest_step(self) -> int | None:
    """The newest complete step (orbax never lists a partial, uncommitted save)."""
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the best finite ``best_metric`` (ties: the later step).

    Without ``best_metric``, or when no kept step has a finite value of it: the
    latest step (None if there is none).
    """
    if self.best_metric:
      scored = [(value, step) for step in self.all_steps()
                if (value := self._value(step, None)) is not None]
      if scored:
        return max(scored)[1]
    return self.latest_step()

  def all_steps(self) -> list[int]:
    """Every complete step kept in the directory, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, *, metrics: Mapping[str, float] | None = None,
           extra_metadata: dict[str, Any] | None = None) -> bool:
    """Save ``state`` at ``step``; returns False (and writes nothing) if it is saved already.

    With ``checksums``, a SHA-256 of every array is computed on the host before
    this returns (~0.06 s per 100 MB here, plus the device-to-host copy).

    Args:
      metrics: scalars stored with the step (``best_metric`` among them for
        the step to compete for "best"); Orbax's ``metrics`` item, with a copy
        in the step's metadata.
      extra_metadata: JSON-able entries added to this step's metadata (e.g.
        the data position).
    """
    if step in self._manager.all_steps():
      return False
    if self.best_metric and metrics is not None and self.best_metric not in metrics:
      raise ValueError(f"best_metric={self.best_metric!r} is not among the metrics "
                       f"{sorted(metrics)} passed to save step {step}")
    state_dict = flax.serialization.to_state_dict(state)
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    meta = {**self.metadata, **(extra_metadata or {}), "step": int(step)}
    if metrics is not None:
      meta["metrics"] = metrics
    if self.checksums:
      meta["checksums"] = {"algorithm": HASH, "arrays": array_checksums(state_dict)}
    saved = self._manager.save(
        step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state_dict)}),
        metrics=metrics, force=True, custom_metadata=meta)
    if saved and metrics is not None:
      self._metrics[step] = metrics
    return saved

  def read_metadata(self, step: int) -> dict:
    """The JSON metadata of ``step``.

    Raises:
      CheckpointError: ``step`` is not a complete step, or its metadata file is
        missing, not UTF-8 or not JSON (naming the file).
    """
    if step not in self._manager.all_steps():
      raise CheckpointError(f"no complete checkpoint step {step} in {self.directory} "
                            f"(steps: {self.all_steps()})")
    path = os.path.join(self.directory, str(step), STEP_METADATA_FILE)
    try:
      step_metadata = _step_metadata(self.directory, step)
      stored = dict(step_metadata.custom_metadata or {})
      if not stored and _LEGACY_METADATA_ITEM in (step_metadata.item_handlers or {}):
        path = os.path.join(self.directory, str(step), _LEGACY_METADATA_ITEM,
                            _LEGACY_METADATA_ITEM)
        stored = self._manager.restore(step, args=ocp.args.Composite(**{
            _LEGACY_METADATA_ITEM: ocp.args.JsonRestore()}))[_LEGACY_METADATA_ITEM]
    except (OSError, ValueError, UnicodeDecodeError) as e:
      raise CheckpointError(f"checkpoint metadata {path} is missing or corrupt: "
                            f"{type(e).__name__}: {e}") from e
    if not isinstance(stored, dict) or "step" not in stored:
      # Orbax logs an unreadable metadata file and returns no custom metadata.
      problem = _json_problem(path) or "it holds no mrl_jax metadata"
      raise CheckpointError(f"checkpoint metadata {path} is missing or corrupt: {problem}")
    if stored["step"] != step:
      folder = os.path.join(self.directory, str(step))
      raise CheckpointError(
          f"checkpoint folder {folder} disagrees with the step inside it: its metadata "
          f"({path}) says step {stored['step']!r}; was the folder renamed? Rename it back to "
          f"{stored['step']!r} (a step's optimizer state and data position belong to it)")
    return stored

  def check_model(self, step: int) -> dict:
    """The stored metadata of ``step``, after checking it was written by this model config.

    Raises:
      CheckpointError: naming the path and the differing config fields.
    """
    stored = self.read_metadata(step)
    want = model_signature(self.metadata.get("config", {}))
    have = model_signature(stored.get("config", {}))
    if want != have:
      diff = {k: {"checkpoint": have[k], "now": want[k]} for k in want if have[k] != want[k]}
      raise CheckpointError(
          f"checkpoint {os.path.join(self.directory, str(step))} was written by a different "
          f"model config: {json.dumps(diff)}")
    # The model's own shape record (a task's checkpoint_metadata), where both have one: it
    # holds what the config fields above do not fix (text: max_length, the vocabulary).
    for record in MODEL_RECORDS:
      now, then = self.metadata.get(record), stored.get(record)
      if isinstance(now, dict) and isinstance(then, dict) and now != then:
        diff = [f"{k}: checkpoint {then.get(k)!r}, now {now.get(k)!r}{_HINTS.get(k, '')}"
                for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)]
        raise CheckpointError(
            f"checkpoint {os.path.join(self.directory, str(step))} holds a model of another "
            f"shape ({record}): {'; '.join(diff)}")
    return stored

  def restore(self, step: int, target: Any) -> Any:
    """Restore ``step`` into the structure, shapes and shardings of ``target``.

    ``target`` may live on another mesh or device count than the one that
    saved the step: each array is read straight into ``target``'s sharding.

    Raises:
      CheckpointError: the stored model config differs from this one; the
        arrays are missing, truncated or of other shapes; or (``checksums``)
        an array's bytes differ from those saved (naming the step and the array).
    """
    stored = self.check_model(step)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        flax.serialization.to_state_dict(target))
    restored = self._restore_state(step, abstract, stored)
    return flax.serialization.from_state_dict(target, restored)

  def restore_subtree(self, step: int, abstract: dict) -> dict:
    """Read only the arrays named by ``abstract`` (a subtree of the state dict).

    For example ``{"params": {"encoder": ...}}`` with ``jax.ShapeDtypeStruct``
    leaves reads the encoder weights and no optimizer state. Raises
    :class:`CheckpointError` like :meth:`restore`.
    """
    return self._restore_state(step, abstract, self.read_metadata(step), partial=True)

  def _restore_state(self, step: int, abstract: Any, stored: dict,
                     partial: bool = False) -> Any:
    path = os.path.join(self.directory, str(step))
    state_dir = os.path.join(path, STATE_ITEM)
    # Refuse an array store without its index before Orbax starts reading (see
    # _ignore_abandoned_read_reports for what a failure half-way through prints).
    if not os.path.isdir(state_dir):
      raise CheckpointError(f"checkpoint {path} could not be restored: its arrays "
                            f"({state_dir}) are missing")
    if not ocp.type_handlers.is_ocdbt_checkpoint(state_dir):
      raise CheckpointError(f"checkpoint {path} could not be restored: its array index "
                            f"{os.path.join(state_dir, 'manifest.ocdbt')} is missing")
    if self.checksums and not self.allow_unverified and not isinstance(
        stored.get("checksums"), dict):
      raise CheckpointError(
          f"checkpoint {path} has no checksums record in its metadata (saved with "
          "checksums=False, or the record was removed), so a changed array byte would restore "
          "silently; refusing it. To restore it unchecked, opt in: "
          "Checkpointer(allow_unverified=True) / --config.checkpoint.allow_unverified=True")
    records = stored.get("checksums", {}).get("arrays", {}) if self.checksums else {}
    # Read each array as saved; a target of another dtype is cast after the check.
    saved_dtype = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.ShapeDtypeStruct(x.shape, records[_key(p)]["dtype"], sharding=x.sharding)
        if _key(p) in records and str(x.dtype) != records[_key(p)]["dtype"] else x, abstract)
    _ignore_abandoned_read_reports()
    failure = None
    try:
      if partial:  # orbax restores a subtree only through the PyTree handler
        restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
            item=saved_dtype,
            restore_args=ocp.checkpoint_utils.construct_restore_args(saved_dtype),
            partial_restore=True))
      else:
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardRestore(saved_dtype)}))[STATE_ITEM]
    except Exception as e:  # orbax raises many types; name the path and the cause
      failure = e
    if failure is not None:
      message = (f"checkpoint {path} could not be restored: "
                 f"{type(failure).__name__}: {failure}")
      _collect_abandoned_reads(failure)
      raise CheckpointError(message) from failure
    if records:
      _verify(restored, records, f"checkpoint {path} (step {step})", state_dir)
    return jax.tree.map(lambda x, want: x if x.dtype == want.dtype else x.astype(want.dtype),
                        restored, abstract)

  def wait(self) -> None:
    """Block until an asynchronous save has been written and committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class _BestAndKept:
  """Orbax preservation policy: the best step by ``value`` and the steps in ``keep``.

  Orbax's ``BestN`` ranks a step by the metrics file alone; this one also ranks
  a step by the copy of its metrics in its metadata (see ``Checkpointer``).
  """

  def __init__(self, value, keep: set[int]):
    self._value, self._keep = value, keep

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
    del context
    scored = [(value, info.step) for info in checkpoints
              if (value := self._value(info.step, info.metrics)) is not None]
    best = max(scored)[1] if scored else None
    return [info.step == best or info.step in self._keep for info in checkpoints]


def _step_metadata(directory: str, step: int) -> Any:
  """Orbax's ``StepMetadata`` of ``step`` (custom metadata, item handlers), arrays untouched.

  A missing or unreadable file gives empty fields (Orbax logs why).
  """
  try:
    return ocp.metadata.get_step_metadata(os.path.join(directory, str(step)))
  except ValueError:  # not found or not readable
    return ocp.metadata.StepMetadata()


def _key(path: tuple) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _host_array(x: Any) -> np.ndarray | None:
  """The host copy of ``x`` that was saved, or None if no process holds all of it."""
  if isinstance(x, jax.Array):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if not x.is_fully_addressable:
      if not x.sharding.is_fully_replicated:
        return None
      x = x.addressable_shards[0].data  # every process holds the whole array
  return np.ascontiguousarray(jax.device_get(x))


def _digest(array: np.ndarray) -> str:
  return hashlib.new(HASH, array.reshape(-1).view(np.uint8)).hexdigest()


def array_checksums(state_dict: Any) -> dict[str, dict[str, Any]]:
  """``{"params/w": {"dtype", "shape", "sha256"}}`` for every array leaf of ``state_dict``.

  The hash is over the array's bytes in C order (little-endian, as held in
  memory); arrays split over several processes are left out.
  """
  records = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state_dict)[0]:
    array = _host_array(leaf)
    if array is not None:
      records[_key(path)] = {"dtype": str(array.dtype), "shape": list(array.shape),
                             HASH: _digest(array)}
  return records


def _verify(restored: Any, records: Mapping[str, Mapping[str, Any]], name: str,
            state_dir: str) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]:
    record = records.get(_key(path))
    array = None if record is None else _host_array(leaf)
    if array is None:
      continue
    if (str(array.dtype), list(array.shape)) != (record["dtype"], list(record["shape"])):
      raise CheckpointError(
          f"{name} is corrupt: array {_key(path)!r} read from {state_dir} is {array.dtype}"
          f"{list(array.shape)}, saved as {record['dtype']}{list(record['shape'])}")
    digest = _digest(array)
    if digest != record[HASH]:
      raise CheckpointError(
          f"{name} is corrupt: array {_key(path)!r} read from {state_dir} differs from the "
          f"array saved ({HASH} {digest[:16]}... != {record[HASH][:16]}...): its stored bytes "
          "changed after the save; restore another step")


def _json_problem(path: str) -> str | None:
  """Why ``path`` is not a UTF-8 JSON file (for an error message); None if it is one."""
  try:
    with open(path, "rb") as f:
      json.loads(f.read().decode("utf-8"))
  except FileNotFoundError:
    return "the file does not exist"
  except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    return f"{type(e).__name__}: {e}"
  return None


def _describe_unlistable(directory: str, error: Exception) -> str:
  """The message for a directory Orbax cannot list: name each corrupt metrics file."""
  bad = []
  names = os.listdir(directory) if os.path.isdir(directory) else []
  for name in sorted((n for n in names if n.isdigit()), key=int):
    path = os.path.join(directory, name, METRICS_ITEM, METRICS_ITEM)
    if os.path.exists(path):
      problem = _json_problem(path)
      if problem is not None:
        bad.append(f"checkpoint step {name}: its metrics file {path} is corrupt ({problem})")
  if not bad:
    return f"checkpoints in {directory} cannot be listed: {type(error).__name__}: {error}"
  return ("; ".join(bad) + f". Orbax cannot list {directory} with it: repair the file (the "
          f"step's metrics are copied under \"metrics\" in its {STEP_METADATA_FILE}) or delete "
          "the step's folder")


# What a failed Orbax restore leaves behind. Orbax runs a restore on a fresh asyncio loop
# (``asyncio_utils.run_sync``) and closes it as soon as one array fails; the other arrays'
# TensorStore reads are still in flight. As each finishes, (1) its thread calls
# ``loop.call_soon_threadsafe`` on the closed loop and TensorStore reports the
# ``RuntimeError('Event loop is closed')`` through ``sys.unraisablehook``; (2) the asyncio
# tasks and futures that held a failed read log "Task/Future exception was never retrieved"
# with a traceback when collected, and read coroutines closed unfinished report the read's
# error as unraisable; (3) unstarted coroutines warn "was never awaited". Measured
# here: 0 to ~100 tracebacks (timing-dependent) on stderr after the one real error (a missing or
# truncated array file; 64 arrays). The hooks below drop exactly these reports and pass every
# other one on.


def _is_orbax_code(code: Any) -> bool:
  return code is not None and f"orbax{os.sep}checkpoint" in code.co_filename


def _is_abandoned_read_report(unraisable: Any) -> bool:
  """(1) above, or an Orbax read coroutine that raised as it was closed unfinished."""
  tb = unraisable.exc_traceback
  if (unraisable.exc_type is RuntimeError and unraisable.object is None
      and str(unraisable.exc_value) == "Event loop is closed" and tb is not None
      and tb.tb_frame.f_code.co_name == "call_soon_threadsafe"):
    return True
  return _is_orbax_code(getattr(unraisable.object, "cr_code", None))


def _is_abandoned_read(record: logging.LogRecord) -> bool:
  """An asyncio "exception was never retrieved" record of an Orbax/TensorStore read."""
  if not str(record.msg).startswith(("Task exception was never retrieved",
                                     "Future exception was never retrieved")):
    return False
  error = record.exc_info[1] if record.exc_info else None
  if error is None:
    return False
  if "tensorstore" in str(error).lower():
    return True
  tb = error.__traceback__
  while tb is not None:
    if _is_orbax_code(tb.tb_frame.f_code):
      return True
    tb = tb.tb_next
  return False


class _DropAbandonedReads(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not _is_abandoned_read(record)


def _ignore_abandoned_read_reports() -> None:
  """Install (once per process) the filters for the reports (1) and (2) above."""
  previous = sys.unraisablehook
  if not getattr(previous, "_drops_abandoned_read_reports", False):
    def hook(unraisable):
      if not _is_abandoned_read_report(unraisable):
        previous(unraisable)

    hook._drops_abandoned_read_reports = True
    sys.unraisablehook = hook
  asyncio_logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _DropAbandonedReads) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_DropAbandonedReads())


def _collect_abandoned_reads(failure: BaseException) -> None:
  """Collect a failed restore's abandoned tasks now, (3) silenced.

  The failure's tracebacks hold the tasks, so they are dropped (the message
  keeps the cause).
  """
  seen = set()
  while failure is not None and id(failure) not in seen:
    seen.add(id(failure))
    failure.__traceback__ = None
    failure = failure.__cause__ or failure.__context__
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                            category=RuntimeWarning)
    gc.collect()
