"""Typed run specs: the shared config fields, parsed once into frozen dataclasses.

The entry point hands the loop a validated ``ml_collections`` config; the loop
parses its shared, namespaced fields here once (:func:`run_spec`), and below
that nothing reads them from the ConfigDict again: the optimiser gets an
:class:`OptimSpec`, the mesh a :class:`MeshSpec`, checkpoints a
:class:`CheckpointSpec`, the step counter a :class:`LoopSpec`. Closed choices are
``Literal`` types, checked by value; a bool must be a bool, an int an int (not a
bool, not a float), and a field the spec does not have is refused by name.

The namespaces (big_vision's ``config.optim``, ``config.evals`` style)::

  config.optim       optimizer, learning_rate, learning_rate_batch_size, momentum,
                     weight_decay, schedule, warmup_steps, warmup_epochs
  config.loop        num_train_steps, num_epochs, log_every_steps, eval_every_steps,
                     eval_at_start
  config.mesh        shape, fsdp_min_size
  config.checkpoint  every_steps, max_to_keep, async_save, best_metric, best_mode

:data:`MOVED` maps each earlier flat name (``config.learning_rate``) to its
place; an old name anywhere (a config file, ``--config.X``, an override) is a
one-line error naming the new place (:func:`check_no_moved_fields`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from mrl_jax.core.nesting import Nesting

# The typed parser lives in core (data parses config.input with it too).
from mrl_jax.core.typed import (  # noqa: F401  (re-exported: specs.parse, specs.SpecError)
  SpecError,
  as_json,
  parse,
  typed_value,
)

MOVED = {
    "optimizer": "optim.optimizer", "learning_rate": "optim.learning_rate",
    "learning_rate_batch_size": "optim.learning_rate_batch_size",
    "momentum": "optim.momentum", "weight_decay": "optim.weight_decay",
    "schedule": "optim.schedule", "warmup_steps": "optim.warmup_steps",
    "warmup_epochs": "optim.warmup_epochs",
    "num_train_steps": "loop.num_train_steps", "num_epochs": "loop.num_epochs",
    "log_every_steps": "loop.log_every_steps", "eval_every_steps": "loop.eval_every_steps",
    "mesh_shape": "mesh.shape", "fsdp_min_size": "mesh.fsdp_min_size",
    "checkpoint_every_steps": "checkpoint.every_steps", "max_to_keep": "checkpoint.max_to_keep",
    "async_checkpointing": "checkpoint.async_save", "best_metric": "checkpoint.best_metric",
    "best_mode": "checkpoint.best_mode",
    "allow_unverified_checkpoints": "checkpoint.allow_unverified",
}


@dataclasses.dataclass(frozen=True)
class OptimSpec:
  """``config.optim``: the optimiser and its learning-rate schedule (:mod:`mrl_jax.train.optim`).

  Attributes:
    optimizer: ``"sgd"`` (with momentum, decoupled weight decay) or ``"adamw"``.
    learning_rate: the peak rate, >= 0.
    learning_rate_batch_size: if set, the rate scales by ``batch_size / this``
      (the paper's 0.425 per 1024 images).
    momentum: SGD momentum in [0, 1).
    weight_decay: >= 0, never applied to biases or normalisation scales.
    schedule: ``"warmup_linear"`` (the paper's), ``"warmup_cosine"`` or ``"constant"``.
    warmup_steps: linear warm-up steps, >= 0.
    warmup_epochs: if set, overrides ``warmup_steps``.
  """

  optimizer: Literal["sgd", "adamw"] = "adamw"
  learning_rate: float = 1e-3
  learning_rate_batch_size: int | None = None
  momentum: float = 0.9
  weight_decay: float = 1e-4
  schedule: Literal["warmup_linear", "warmup_cosine", "constant"] = "warmup_cosine"
  warmup_steps: int = 100
  warmup_epochs: float | None = None

  def __post_init__(self):
    _at_least(self, "learning_rate", 0.0)
    _at_least(self, "weight_decay", 0.0)
    _at_least(self, "warmup_steps", 0)
    if not 0.0 <= self.momentum < 1.0:
      raise SpecError(f"config.optim.momentum={self.momentum!r} must be in [0, 1)")
    if self.learning_rate_batch_size is not None:
      _at_least(self, "learning_rate_batch_size", 1)
    if self.warmup_epochs is not None:
      _at_least(self, "warmup_epochs", 0.0)


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  """``config.loop``: how long to train and how often to log and evaluate.

  Attributes:
    num_train_steps: total steps; when set it wins over ``num_epochs``.
    num_epochs: passes over the training data (used when ``num_train_steps`` is None).
    log_every_steps: steps between console / TensorBoard lines.
    eval_every_steps: steps between evaluations (also at the last step).
    eval_at_start: also evaluate the initial state (step 0) of a fresh run and, with
      ``checkpoint.best_metric``, save it as a candidate, so the best step can be the
      initialisation itself (the adaptor's fallback to its PCA start).
  """

  num_train_steps: int | None = None
  num_epochs: float | None = None
  log_every_steps: int = 100
  eval_every_steps: int = 1000
  eval_at_start: bool = False

  def __post_init__(self):
    if self.num_train_steps is None and self.num_epochs is None:
      raise SpecError("set config.loop.num_train_steps or config.loop.num_epochs")
    if self.num_train_steps is not None:
      _at_least(self, "num_train_steps", 1)
    elif not self.num_epochs > 0:
      raise SpecError(f"config.loop.num_epochs={self.num_epochs!r} must be a positive number")
    _at_least(self, "log_every_steps", 1)
    _at_least(self, "eval_every_steps", 1)


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """``config.mesh``: the ``("data", "fsdp")`` device mesh (:mod:`mrl_jax.train.sharding`).

  Attributes:
    shape: ``(data, fsdp)`` sizes; one may be -1 (the remaining devices).
    fsdp_min_size: with ``fsdp > 1``, arrays of at least this many elements are split.
  """

  shape: tuple[int, ...] = (-1, 1)
  fsdp_min_size: int = 2**16

  def __post_init__(self):
    _at_least(self, "fsdp_min_size", 1)


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
  """``config.checkpoint``: Orbax checkpoints (:mod:`mrl_jax.train.checkpoints`).

  Attributes:
    every_steps: steps between checkpoints (also at the last step and on SIGTERM).
    max_to_keep: >= 1, the latest checkpoints kept (plus the best one).
    async_save: write checkpoints in the background.
    best_metric: an eval metric (e.g. ``"top1/dim_8"``): also keep, and export,
      the best step by it.
    best_mode: ``"max"`` or ``"min"`` (for a loss).
    allow_unverified: restore steps that have no checksums record, unchecked
      (default: such a step is refused, naming this field).
  """

  every_steps: int = 1000
  max_to_keep: int = 2
  async_save: bool = True
  allow_unverified: bool = False
  best_metric: str | None = None
  best_mode: Literal["max", "min"] = "max"

  def __post_init__(self):
    _at_least(self, "every_steps", 1)
    _at_least(self, "max_to_keep", 1)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """Everything the loop reads of a validated config, typed.

  Attributes:
    task: ``config.task``, the registered task's name.
    seed: the PRNG seed of initialisation, dropout and data order.
    half_precision: bfloat16 compute (float32 parameters and optimiser state).
    batch_size: the global batch over all devices and hosts.
    embed_dim: ``config.encoder.embed_dim``, the embedding width.
    nesting: the validated nesting dims and weights.
    optim, loop, mesh, checkpoint: the namespaced specs above.
  """

  task: str
  seed: int
  half_precision: bool
  batch_size: int
  embed_dim: int
  nesting: Nesting
  optim: OptimSpec
  loop: LoopSpec
  mesh: MeshSpec
  checkpoint: CheckpointSpec

  def to_json(self) -> dict[str, Any]:
    """A JSON-able dict (checkpoint metadata): the nesting as its dims and weights."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    out["nesting"] = {"dims": list(self.nesting.dims), "weights": list(self.nesting.weights)}
    for name in ("optim", "loop", "mesh", "checkpoint"):
      out[name] = {k: list(v) if isinstance(v, tuple) else v
                   for k, v in dataclasses.asdict(out[name]).items()}
    return out


@dataclasses.dataclass(frozen=True)
class NestingSpec:
  """``config.nesting``: the nested dims (validated and ascending once past the boundary).

  Attributes:
    dims: the nested dims ``m``, ascending; None (before validation only): powers
      of two from ``start`` up to ``encoder.embed_dim``.
    start: the smallest default dim.
    weights: the loss weight of each dim (None: all 1).
  """

  dims: tuple[int, ...] | None = None
  start: int = 8
  weights: tuple[float, ...] | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskSpec:
  """The shared fields every task's spec has (:func:`mrl_jax.train.config.base_config`).

  A task's spec (``ClassificationSpec``, ``PairsSpec``, ...) subclasses this with
  its own fields (its data, its ``encoder`` section) and is what the task is
  built from: :meth:`mrl_jax.train.task.Task.parse_spec`.

  Attributes:
    task: ``config.task``, the registered task's name.
    seed: the PRNG seed of initialisation, dropout and data order.
    half_precision: bfloat16 compute (float32 parameters and optimiser state).
    batch_size: the global batch over all devices and hosts.
    nesting: the nested dims and weights.
    optim, loop, mesh, checkpoint: the namespaced specs above.
  """

  task: str
  seed: int = 0
  half_precision: bool = False
  batch_size: int = 128
  nesting: NestingSpec = dataclasses.field(default_factory=NestingSpec)
  optim: OptimSpec = dataclasses.field(default_factory=OptimSpec)
  loop: LoopSpec
  mesh: MeshSpec = dataclasses.field(default_factory=MeshSpec)
  checkpoint: CheckpointSpec = dataclasses.field(default_factory=CheckpointSpec)


def _at_least(spec: Any, name: str, low: float) -> None:
  value = getattr(spec, name)
  if value < low:
    section = {OptimSpec: "optim", LoopSpec: "loop", MeshSpec: "mesh",
               CheckpointSpec: "checkpoint"}[type(spec)]
    where = f"config.{section}.{name}"
    if isinstance(low, float):
      raise SpecError(f"{where} must be a finite number >= {low:g}, got {value!r}")
    if low == 1:
      raise SpecError(f"{where} must be a positive int, got {value!r}")
    raise SpecError(f"{where}={value!r} must be an int >= {low}")


def check_no_moved_fields(names: Any, where: str = "config") -> None:
  """Refuse an earlier flat field name (``learning_rate``), naming its new place.

  Raises:
    SpecError: e.g. ``config.learning_rate moved to config.optim.learning_rate``.
  """
  for name in names:
    if name in MOVED:
      raise SpecError(f"{where}.{name} moved to config.{MOVED[name]}")


def migrate_flat(config: dict[str, Any]) -> dict[str, Any]:
  """A config dict written before the namespaces, with each flat field moved to its place.

  For reading earlier workdirs (their ``config.json``) only; configs and command
  lines must use the new names (:func:`check_no_moved_fields`).
  """
  out = {k: v for k, v in config.items() if k not in MOVED}
  for old, new in MOVED.items():
    if old in config:
      section, field = new.split(".")
      out.setdefault(section, {})[field] = config[old]
  return out


def run_spec(config: Mapping[str, Any], nesting: Nesting) -> RunSpec:
  """The :class:`RunSpec` of a validated config (see :func:`mrl_jax.train.config.validate_config`).

  Raises:
    SpecError: naming the field whose value does not fit.
  """
  check_no_moved_fields(config.keys())
  return RunSpec(
      task=typed_value(config["task"], str, "config.task"),
      seed=typed_value(config["seed"], int, "config.seed"),
      half_precision=typed_value(config["half_precision"], bool, "config.half_precision"),
      batch_size=typed_value(config["batch_size"], int, "config.batch_size"),
      embed_dim=typed_value(config["encoder"]["embed_dim"], int, "config.encoder.embed_dim"),
      nesting=nesting,
      optim=parse(OptimSpec, dict(config.get("optim") or {}), "config.optim"),
      loop=parse(LoopSpec, dict(config.get("loop") or {}), "config.loop"),
      mesh=parse(MeshSpec, dict(config.get("mesh") or {}), "config.mesh"),
      checkpoint=parse(CheckpointSpec, dict(config.get("checkpoint") or {}),
                       "config.checkpoint"))
