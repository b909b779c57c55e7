"""The task protocol: what one training loop needs from a task.

A task (classification, text pairs, adaptor, ...) owns its data, model, loss,
evaluation and export; :mod:`mrl_jax.train.loop` owns everything else (mesh,
train state, the jitted step, checkpoints, preemption, metrics, the NaN stop).
This is the split of scenic's trainers and big_vision's evaluators: the loop
never looks inside a batch, and an evaluator sees only the variables.

A new task is one module: subclass :class:`Task`, set ``name``, and register
it with :func:`mrl_jax.tasks.register`; ``config.task = name`` then selects it.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import Any, ClassVar

import jax
import ml_collections
import numpy as np

from mrl_jax.train import specs

Variables = dict[str, Any]  # {"params": ..., "batch_stats": ..., ...}
Batch = dict[str, Any]  # a pytree of host-local numpy arrays with a leading batch axis


class Task(abc.ABC):
  """One kind of training run, as a plugin of :class:`mrl_jax.train.loop.Experiment`.

  Construction gets the task's typed spec of the VALIDATED config (see
  :meth:`validate` and :meth:`parse_spec`; never the ConfigDict itself), the
  run's workdir (for assets a resume must reuse, e.g. a vocabulary) and the mesh.

  Attributes:
    name: the value of ``config.task`` that selects this task.
    spec_class: the task's frozen spec dataclass (a :class:`~mrl_jax.train.specs.TaskSpec`).
    config: the task's spec (``self.config.batch_size``, ``self.config.nesting.dims``, ...).
    dims: the nested dims of the per-dim metrics (``loss_per_dim`` ...), ascending.
    steps_per_epoch: training batches per pass over the data.
  """

  name: ClassVar[str]
  spec_class: ClassVar[type[specs.TaskSpec]] = specs.TaskSpec
  dims: tuple[int, ...]
  steps_per_epoch: int

  def __init__(self, config: specs.TaskSpec, *, workdir: str, mesh: jax.sharding.Mesh):
    self.config = config
    self.workdir = workdir
    self.mesh = mesh

  # --- configuration -------------------------------------------------------------

  @classmethod
  @abc.abstractmethod
  def validate(cls, config: ml_collections.ConfigDict) -> None:
    """Check the task's own fields of a mutable config and fill derived ones in place.

    Called by :func:`mrl_jax.train.config.validate_config` after the shared fields
    are checked; must set ``config.encoder.embed_dim`` and ``config.nesting.dims``
    / ``weights`` when they are derived.

    Raises:
      ValueError: naming the field (``config.NAME=value``) and what is allowed.
    """

  @classmethod
  def parse_spec(cls, config: ml_collections.ConfigDict) -> specs.TaskSpec:
    """The typed :attr:`spec_class` of a config passed through :meth:`validate`.

    Raises:
      mrl_jax.train.specs.SpecError: naming ``config.FIELD``: a field the spec does
        not have, a value of the wrong type, a choice out of its values.
    """
    return specs.parse(cls.spec_class, config.to_dict(), "config")

  # --- model -----------------------------------------------------------------------

  @abc.abstractmethod
  def init_variables(self, rng: jax.Array) -> Variables:
    """Freshly initialised variables (traced under ``jit``; shapes must not depend on data)."""

  def pretrained_variables(self) -> Variables | None:
    """Variables to start from instead of :meth:`init_variables` (e.g. a local BERT), or None."""
    return None

  @abc.abstractmethod
  def loss_and_metrics(self, params: Any, model_state: Variables, batch: Batch,
                       rng: jax.Array) -> tuple[jax.Array, tuple[Variables, dict[str, jax.Array]]]:
    """The training loss of one global batch, pure and jittable.

    Args:
      params: the trainable parameters.
      model_state: the other variable collections (e.g. ``{"batch_stats": ...}``).
      batch: the global batch (sharded over the mesh's ``"data"`` axis).
      rng: this step's key (dropout, sampled dims).

    Returns:
      ``(loss, (new_model_state, metrics))``: a float32 scalar, the updated
      collections and monitoring metrics (per-dim arrays ``[M]`` named ``*_per_dim``).
    """

  def value_and_grad(self, params: Any, model_state: Variables, batch: Batch, rng: jax.Array):
    """``((loss, (model_state, metrics)), grads)``; override for e.g. a cached (GradCache) step."""
    return jax.value_and_grad(self.loss_and_metrics, has_aux=True)(params, model_state, batch, rng)

  # --- data ------------------------------------------------------------------------

  @abc.abstractmethod
  def train_batches(self, start_step: int) -> Iterator[Batch]:
    """This process's share of every global batch from ``start_step`` on (endless).

    Batch ``s`` must depend only on the config (seed, data) and ``s``, so that a
    resumed run sees what an uninterrupted one would.
    """

  def data_position(self, step: int) -> dict[str, Any]:
    """What fixes the batch order, stored with each checkpoint to warn when it changes."""
    return {"batches_consumed": int(step), "batch_size": self.config.batch_size,
            "seed": self.config.seed, "process_count": jax.process_count()}

  # --- evaluation and export ---------------------------------------------------------

  @abc.abstractmethod
  def evaluate(self, variables: Variables) -> dict[str, np.ndarray | float]:
    """Eval metrics of the current variables: per-dim arrays ``[M]`` named ``*_per_dim``."""

  @abc.abstractmethod
  def eval_metric_names(self) -> list[str]:
    """The scalar names :meth:`evaluate` produces once expanded per dim (``top1/dim_8``)."""

  @abc.abstractmethod
  def export(self, variables: Variables, out_dir: str, *, step: int) -> None:
    """Write the inference bundle of ``variables`` into the NEW folder ``out_dir`` (process 0).

    The loop writes into a temporary folder and swaps it into place
    atomically (:func:`mrl_jax.bundle.artifact.write_atomically`).
    """

  def checkpoint_metadata(self) -> dict[str, Any]:
    """JSON-able facts stored with every checkpoint (e.g. class count, input shape)."""
    return {}

  def describe(self, result: dict[str, Any]) -> str:
    """Console lines for the final result of a run."""
    lines = []
    for name, values in result["eval"].items():
      if name.endswith("_per_dim"):
        cells = ", ".join(f"{m}: {v:.4f}" for m, v in zip(self.dims, values, strict=True))
        lines.append(f"final eval {name.removesuffix('_per_dim')} per dim: {cells}")
    return "\n".join(lines)
