"""Orbax checkpoints of the train state, with JSON metadata (never pickles).

A checkpoint step folder holds two items: ``state`` (Orbax arrays of the train
state as a nested dict, its PRNG key included) and ``metadata`` (JSON: the
config, nesting dims, class count, the data position, library version).
Loading one runs no code, and a checkpoint made by a different model config is
refused with a message that names the difference.

Saves are atomic: Orbax writes into ``<step>.orbax-checkpoint-tmp-*`` and
renames the folder when the save is complete, so a save cut short by a crash
or ``SIGKILL`` is never listed (the next run that opens the directory for
writing removes it in the background). With ``async_save`` the arrays are
copied to host memory before :meth:`Checkpointer.save` returns and written in
a background thread, so the training step may donate (and so invalidate) the
saved state's buffers at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import flax.serialization
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

import mrl_jax

# Config fields that decide the structure and shapes in a checkpoint; resuming with any of
# them changed cannot work, so it is refused up front.
MODEL_FIELDS = ("dataset", "encoder", "head", "nesting", "ff_dim", "optimizer")
BEST_MODES = ("max", "min")


class CheckpointError(ValueError):
  """A checkpoint that cannot be used: corrupt, partial or from another model."""


def model_signature(config_dict: dict) -> dict:
  """The part of a (JSON-able) config dict that fixes the model's shapes."""
  return {k: config_dict.get(k) for k in MODEL_FIELDS}


class Checkpointer:
  """Saves and restores the train state under ``directory``.

  Args:
    directory: where step folders go (created if missing).
    metadata: JSON-able dict stored with every step; its ``"config"`` entry is
      compared with the stored one on restore.
    max_to_keep: how many recent steps to keep.
    best_metric: if set, the name of a scalar passed as ``metrics`` to
      :meth:`save` (e.g. ``"top1/dim_64"``); the best step by it is kept as
      well as the ``max_to_keep`` latest, and :meth:`best_step` returns it.
    best_mode: ``"max"`` or ``"min"``: which value of ``best_metric`` is best.
    async_save: write arrays in a background thread (see the module docstring).
    read_only: only read (export, inspection): never save, delete or clean up,
      so it is safe next to a run that is still writing.
  """

  def __init__(self, directory: str, metadata: dict[str, Any] | None = None, *,
               max_to_keep: int = 2, best_metric: str | None = None,
               best_mode: str = "max", async_save: bool = False, read_only: bool = False):
    if best_mode not in BEST_MODES:
      raise ValueError(f"best_mode={best_mode!r}; choose one of {BEST_MODES}")
    self.directory = os.path.abspath(directory)
    self.metadata = {**(metadata or {}), "mrl_jax_version": mrl_jax.__version__}
    self.best_metric = best_metric
    policy: Any = checkpoint_managers.LatestN(n=max_to_keep)
    best_fn = None
    if best_metric:
      best_fn = lambda metrics: float(metrics[best_metric])
      policy = checkpoint_managers.AnyPreservationPolicy([policy, checkpoint_managers.BestN(
          get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False)])
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            create=not read_only, read_only=read_only, save_interval_steps=int(not read_only),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only, preservation_policy=policy, best_fn=best_fn,
            best_mode=best_mode),
        item_names=("state", "metadata"),
    )

  def latest_step(self) -> int | None:
    """The newest complete step (orbax never lists a partial, uncommitted save)."""
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the best ``best_metric`` (the latest step without one)."""
    return self._manager.best_step()

  def all_steps(self) -> list[int]:
    """Every complete step kept in the directory, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, *, metrics: Mapping[str, float] | None = None,
           extra_metadata: dict[str, Any] | None = None) -> bool:
    """Save ``state`` at ``step``; returns False (and writes nothing) if it is saved already.

    Args:
      metrics: scalars stored with the step (``best_metric`` among them for
        the step to compete for "best").
      extra_metadata: JSON-able entries added to this step's metadata (e.g.
        the data position).
    """
    if step in self._manager.all_steps():
      return False
    if self.best_metric and metrics is not None and self.best_metric not in metrics:
      raise ValueError(f"best_metric={self.best_metric!r} is not among the metrics "
                       f"{sorted(metrics)} passed to save step {step}")
    meta = {**self.metadata, **(extra_metadata or {}), "step": int(step)}
    return self._manager.save(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
            metadata=ocp.args.JsonSave(meta)),
        metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
        force=True)

  def read_metadata(self, step: int) -> dict:
    """The JSON metadata of ``step``; :class:`CheckpointError` if unreadable."""
    path = os.path.join(self.directory, str(step), "metadata", "metadata")
    try:
      with open(path) as f:
        return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise CheckpointError(f"checkpoint metadata {path} is missing or corrupt: {e}") from e

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
    return stored

  def restore(self, step: int, target: Any) -> Any:
    """Restore ``step`` into the structure, shapes and shardings of ``target``.

    ``target`` may live on another mesh or device count than the one that
    saved the step: each array is read straight into ``target``'s sharding.

    Raises:
      CheckpointError: the stored model config differs from this one, or the
        arrays are missing, truncated or of other shapes.
    """
    self.check_model(step)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        flax.serialization.to_state_dict(target))
    restored = self._restore_state(step, abstract)
    return flax.serialization.from_state_dict(target, restored)

  def restore_subtree(self, step: int, abstract: dict) -> dict:
    """Read only the arrays named by ``abstract`` (a subtree of the state dict).

    For example ``{"params": {"encoder": ...}}`` with ``jax.ShapeDtypeStruct``
    leaves reads the encoder weights and no optimizer state.
    """
    return self._restore_state(step, abstract, partial=True)

  def _restore_state(self, step: int, abstract: Any, partial: bool = False) -> Any:
    path = os.path.join(self.directory, str(step))
    try:
      if partial:  # orbax restores a subtree only through the PyTree handler
        return ocp.PyTreeCheckpointer().restore(
            os.path.join(path, "state"), args=ocp.args.PyTreeRestore(
                item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                partial_restore=True))
      return self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:  # orbax raises many types; name the path and the cause
      raise CheckpointError(f"checkpoint {path} could not be restored: "
                            f"{type(e).__name__}: {e}") from e

  def wait(self) -> None:
    """Block until an asynchronous save has been written and committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
