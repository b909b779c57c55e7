"""The one training loop: every task (``config.task``) runs through :class:`Experiment`.

The task (:mod:`mrl_jax.tasks`) supplies data, model, loss, evaluation and
export; this module owns the rest: the ``("data", "fsdp")`` mesh
(:mod:`mrl_jax.train.sharding`), the train state initialised straight into its
shardings, ONE ``jax.jit`` step with the state donated, Orbax checkpoints
(async, best-by-metric, retention), exact resume, ``SIGTERM`` preemption, the
NaN/inf stop, console + TensorBoard metrics per nested dim and a progress bar.
"""

from __future__ import annotations

import functools
import json
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from tqdm.auto import tqdm

from mrl_jax.bundle import artifact
from mrl_jax.train import config as config_lib
from mrl_jax.train import optim, preemption, specs
from mrl_jax.train import sharding as sharding_lib
from mrl_jax.train.checkpoints import Checkpointer
from mrl_jax.train.task import Task
from mrl_jax.train.writers import MetricWriter, expand_per_dim


class TrainState(train_state.TrainState):
  """Params, optimizer state and step (from flax), other variable collections, a PRNG key.

  Attributes:
    model_state: the non-trainable collections (e.g. ``{"batch_stats": ...}``); ``{}``
      when the model has none.
    rng: the run's key; step ``s`` uses ``fold_in(rng, s)``.
  """

  model_state: Any
  rng: jax.Array

  @property
  def variables(self) -> dict[str, Any]:
    """``{"params": ..., **model_state}``, what ``model.apply`` takes."""
    return {"params": self.params, **self.model_state}


class NonFiniteLossError(FloatingPointError):
  """Training stopped because the loss or the updated state became NaN or infinite."""


class WorkdirAheadError(ValueError):
  """The workdir's latest checkpoint is past the run's last step."""


def tree_all_finite(tree: Any) -> jax.Array:
  """A bool scalar: every floating-point leaf of ``tree`` is finite (one fused reduction)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def create_train_state(task: Task, rng: jax.Array, tx: optax.GradientTransformation,
                       mesh: jax.sharding.Mesh,
                       fsdp_min_size: int = sharding_lib.DEFAULT_FSDP_MIN_SIZE) -> TrainState:
  """Initialise the state directly into its shardings under ``jit`` (never on one device).

  Pretrained variables (``task.pretrained_variables()``) enter as arguments, not
  as constants baked into the program. The shardings are
  :func:`mrl_jax.train.sharding.state_shardings`: replicated, or split over ``"fsdp"``
  for arrays of at least ``fsdp_min_size`` elements.
  """
  pretrained = task.pretrained_variables()

  def init(rng, pretrained):
    init_rng, state_rng = jax.random.split(rng)
    variables = dict(task.init_variables(init_rng) if pretrained is None else pretrained)
    params = variables.pop("params")
    return TrainState.create(apply_fn=None, params=params, tx=tx, model_state=variables,
                             rng=state_rng)

  shardings = sharding_lib.state_shardings(jax.eval_shape(init, rng, pretrained), mesh,
                                           fsdp_min_size)
  return jax.jit(init, out_shardings=shardings)(rng, pretrained)


def train_step(state: TrainState, batch: Any, *, task: Task,
               learning_rate_fn: optax.Schedule) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on the task's loss.

  Args:
    state: the train state (replicated or FSDP-sharded).
    batch: the global batch, sharded over the mesh's ``"data"`` axis.

  Returns:
    The new state and metrics: the task's (``loss``, per-dim arrays ``[M]``),
    ``learning_rate`` and ``finite``: whether the loss AND every array of the
    new state are finite (checked here, so no non-finite state is ever saved).
  """
  rng = jax.random.fold_in(state.rng, state.step)
  (loss, (model_state, metrics)), grads = task.value_and_grad(
      state.params, state.model_state, batch, rng)
  new_state = state.apply_gradients(grads=grads, model_state=model_state)
  finite = jnp.isfinite(loss) & tree_all_finite((new_state.params, new_state.opt_state,
                                                  new_state.model_state))
  metrics = {**metrics, "loss": loss, "learning_rate": learning_rate_fn(state.step),
             "finite": finite}
  return new_state, metrics


def jit_train_step(task: Task, schedule: optax.Schedule, mesh: jax.sharding.Mesh,
                   state_sharding: Any) -> Callable:
  """:func:`train_step` jitted over ``mesh``; donates the state.

  Returns:
    ``step(state, global_batch) -> (state, metrics)``; metrics are replicated.
  """
  return jax.jit(functools.partial(train_step, task=task, learning_rate_fn=schedule),
                 in_shardings=(state_sharding, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(state_sharding, sharding_lib.replicated(mesh)),
                 donate_argnums=0)


def mean_metrics(history: list[dict]) -> dict[str, np.ndarray]:
  """Per-key mean over a list of per-step metric pytrees (fetched from the devices)."""
  return jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *jax.device_get(history))


def write_json(workdir: str, name: str, payload: Any) -> None:
  """``workdir/name`` as indented JSON, written to a temporary file and renamed into place."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, name)
  with open(path + ".tmp", "w") as f:
    json.dump(payload, f, indent=1)
  os.replace(path + ".tmp", path)


def _warn_if_data_order_changed(stored: dict | None, now: dict, directory: str) -> None:
  """Resuming is exact only when the things that fix the batch order are unchanged."""
  if stored is None:
    return
  changed = {k: (stored.get(k), v) for k, v in now.items()
             if k != "batches_consumed" and stored.get(k) != v}
  if changed:
    warnings.warn(f"resuming from {directory} with a different data order, so the run will not "
                  f"repeat an uninterrupted one exactly; (checkpoint, now): {changed}",
                  stacklevel=3)


class Experiment:
  """The run of any task: mesh, task, optimiser, state, checkpoints.

  ``Experiment(config, workdir, task)`` validates ``config``, builds ``task``
  (the :class:`~mrl_jax.train.task.Task` class that ``config.task`` names; the loop
  never looks tasks up: :func:`mrl_jax.experiments.create` does) and restores the
  latest checkpoint in ``workdir/checkpoints`` when there is one (onto this run's
  mesh, whatever mesh saved it); :meth:`train` then runs the loop from that step
  and :meth:`export` writes the encoder bundle.

  Raises:
    ValueError: the config is invalid (naming the field).
    WorkdirAheadError: the workdir is already past ``num_train_steps``.
    mrl_jax.train.checkpoints.CheckpointError: a checkpoint that cannot be used.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, task: type[Task]):
    if not workdir:
      raise ValueError("workdir must be a non-empty path")
    self.mesh = sharding_lib.make_mesh(config_lib.mesh_spec_of(config).shape)
    self.config = config = config_lib.validate_config(config, task, num_devices=self.mesh.size)
    self.spec = spec = config_lib.spec_of(config)
    self.workdir = os.path.abspath(workdir)
    self.task_spec = task.parse_spec(config)
    self.task = task(self.task_spec, workdir=self.workdir, mesh=self.mesh)
    self.dims = self.task.dims
    self.total_steps, _ = optim.total_and_warmup_steps(spec, self.task.steps_per_epoch)
    self.schedule = optim.learning_rate_schedule(spec, self.task.steps_per_epoch)
    self.best_metric = spec.checkpoint.best_metric
    if self.best_metric is not None and self.best_metric not in self.task.eval_metric_names():
      raise ValueError(f"config.checkpoint.best_metric={self.best_metric!r}; choose one of "
                       f"{self.task.eval_metric_names()}")
    self.state = create_train_state(self.task, jax.random.PRNGKey(spec.seed),
                                    optim.make_optimizer(spec.optim, self.schedule), self.mesh,
                                    spec.mesh.fsdp_min_size)
    self.checkpointer = Checkpointer(
        os.path.join(self.workdir, "checkpoints"),
        {"config": json.loads(config_lib.to_json(config)), "spec": spec.to_json(),
         "task_spec": specs.as_json(self.task_spec),
         "task": spec.task, "dims": list(self.dims), **self.task.checkpoint_metadata()},
        max_to_keep=spec.checkpoint.max_to_keep, best_metric=self.best_metric,
        best_mode=spec.checkpoint.best_mode, async_save=spec.checkpoint.async_save,
        allow_unverified=spec.checkpoint.allow_unverified)
    try:
      self._resume()
    except BaseException:
      self.checkpointer.close()  # else Orbax's threads print a traceback after the error
      raise
    self._to_global = functools.partial(sharding_lib.as_global,
                                        sharding=sharding_lib.batch_sharding(self.mesh))
    self.train_step_fn = jit_train_step(self.task, self.schedule, self.mesh,
                                      jax.tree.map(lambda x: x.sharding, self.state))

  def _resume(self) -> None:
    """Restore the latest checkpoint, if any, into ``self.state``."""
    latest = self.checkpointer.latest_step()
    if latest is None:
      return
    if latest > self.total_steps:
      raise WorkdirAheadError(
          f"{self.workdir} already holds step {latest}, past this run's last step "
          f"{self.total_steps}: use another workdir, or raise config.loop.num_train_steps "
          "(or num_epochs) to continue it")
    self.state = self.checkpointer.restore(latest, self.state)
    _warn_if_data_order_changed(self.checkpointer.read_metadata(latest).get("data_position"),
                                self.task.data_position(latest), self.checkpointer.directory)

  @property
  def step(self) -> int:
    return int(jax.device_get(self.state.step))

  def evaluate(self) -> dict[str, Any]:
    """The task's eval metrics of the current state."""
    return self.task.evaluate(self.state.variables)

  def train(self, *, progress: bool = True,
            on_step: Callable[[int, dict[str, jax.Array]], None] | None = None) -> dict[str, Any]:
    """Run the loop to the last step; returns the final eval metrics (also in JSON).

    Checkpoints are written every ``checkpoint_every_steps``, at every eval
    when ``best_metric`` is set, at the last step, and when a preemption notice
    (``SIGTERM``) arrives. With ``config.loop.eval_at_start`` a fresh run also
    evaluates step 0 (and, with ``best_metric``, saves it as a candidate).

    Args:
      on_step: called as ``on_step(step, metrics)`` after every train step.

    Returns:
      ``{"task", "step", "dims", "eval": {name: value or per-dim list}}``, also
      written to ``workdir/final_metrics.json``.

    Raises:
      NonFiniteLossError: naming the first step whose loss or state was NaN/inf;
        no checkpoint is written from that step on, so the newest checkpoint is
        the last one with finite parameters.
      mrl_jax.train.preemption.Preempted: after a preemption notice, once the
        checkpoint of the current step is written.
    """
    config, spec, main = self.config, self.spec, jax.process_index() == 0
    writer = MetricWriter(self.workdir, enabled=main, echo=tqdm.write if progress else None)
    if main:
      write_json(self.workdir, "config.json", json.loads(config_lib.to_json(config)))
    start = self.step
    batches = sharding_lib.prefetch_to_device(self.task.train_batches(start), self._to_global)
    pending: list[tuple[int, jax.Array, jax.Array]] = []
    history: list[dict] = []
    bar = tqdm(total=self.total_steps, initial=start, disable=not (progress and main),
               desc=f"train {spec.task}", unit="step")
    watch = preemption.PreemptionWatch()
    watch.install()
    tick = time.perf_counter()
    try:
      if spec.loop.eval_at_start and start == 0 and self.checkpointer.latest_step() is None:
        self._evaluate_start(writer)
      for step in range(start + 1, self.total_steps + 1):
        self.state, metrics = self.train_step_fn(self.state, next(batches))
        if on_step is not None:
          on_step(step, metrics)
        pending.append((step, metrics.pop("finite"), metrics["loss"]))
        history.append(metrics)
        bar.update(1)
        last = step == self.total_steps
        if step % spec.loop.log_every_steps == 0 or last:
          pending = self._check_finite(pending)
          scalars = expand_per_dim(mean_metrics(history), self.dims)
          scalars["examples_per_sec"] = (
              len(history) * spec.batch_size / (time.perf_counter() - tick))
          writer.write_scalars(step, scalars, prefix="train/")
          history, tick = [], time.perf_counter()
        eval_scalars = None
        if step % spec.loop.eval_every_steps == 0 or last:
          eval_scalars = expand_per_dim(self.evaluate(), self.dims)
          writer.write_scalars(step, eval_scalars, prefix="eval/")
        preempted = watch.reached(step)
        if (step % spec.checkpoint.every_steps == 0 or last or preempted
            or (self.best_metric and eval_scalars is not None)):
          pending = self._check_finite(pending)
          self.checkpointer.save(step, self.state, metrics=eval_scalars,
                                 extra_metadata={"data_position": self.task.data_position(step)})
        if preempted:
          raise preemption.Preempted(step, self.checkpointer.directory)
    finally:
      watch.uninstall()
      bar.close()
      writer.close()
      self.checkpointer.wait()
    return self._final_metrics(main)

  def _evaluate_start(self, writer: MetricWriter) -> None:
    """Step 0 of a fresh run: evaluate the initial state (with best_metric: a candidate)."""
    eval_scalars = expand_per_dim(self.evaluate(), self.dims)
    writer.write_scalars(0, eval_scalars, prefix="eval/")
    if self.best_metric:
      self.checkpointer.save(0, self.state, metrics=eval_scalars,
                             extra_metadata={"data_position": self.task.data_position(0)})

  def _check_finite(self, pending: list[tuple[int, jax.Array, jax.Array]]) -> list:
    """Raise :class:`NonFiniteLossError` at the first pending step with a non-finite state."""
    for step, finite, loss in pending:
      if not bool(finite):
        self.checkpointer.wait()
        latest = self.checkpointer.latest_step()
        kept = (f"the newest checkpoint (step {latest}, finite parameters) in "
                f"{self.checkpointer.directory} is untouched" if latest is not None
                else "no checkpoint had been saved yet")
        raise NonFiniteLossError(
            f"the loss ({float(loss)}) or the parameters became NaN/inf at step {step}; "
            f"training stopped and {kept}. Lower config.optim.learning_rate, add warm-up "
            "(config.optim.warmup_steps) or check the inputs for NaN/inf.")
    return []

  def _final_metrics(self, main: bool) -> dict[str, Any]:
    ev = self.evaluate()
    result = {"task": self.spec.task, "step": self.step, "dims": list(self.dims),
              "eval": {k: np.asarray(v).tolist() for k, v in ev.items()}}
    if main:
      write_json(self.workdir, "final_metrics.json", result)
    return result

  def export(self, out_dir: str | None = None, *, step: int | None = None) -> str:
    """Write the encoder of ``step`` (default: the best, else the latest) to ``out_dir``.

    The bundle is written beside ``out_dir`` and swapped in atomically, so the
    previous export stays complete until the new one is (see
    :func:`mrl_jax.bundle.artifact.write_atomically`). Call on every process.

    Returns:
      ``out_dir`` (default ``workdir/encoder``).

    Raises:
      FileNotFoundError: there is no complete checkpoint to export.
    """
    out_dir = os.path.abspath(out_dir or os.path.join(self.workdir, "encoder"))
    self.checkpointer.wait()
    if step is None:
      step = self.checkpointer.best_step()
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint to export in {self.checkpointer.directory}")
    if step != self.step:
      self.state = self.checkpointer.restore(step, self.state)
    variables = jax.tree.map(artifact.to_numpy, self.state.variables)
    artifact.write_atomically(out_dir,
                            lambda tmp: self.task.export(variables, tmp, step=step))
    return out_dir

  def close(self) -> None:
    self.checkpointer.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, task: type[Task], *,
                       progress: bool = True, export_dir: str | None = None) -> dict[str, Any]:
  """Train ``task`` on ``config`` in ``workdir`` (resuming), evaluate, export the encoder.

  Returns:
    The :meth:`Experiment.train` result plus ``"export_dir"`` (``workdir/encoder``
    unless ``export_dir`` is given; ``""`` skips the export).
  """
  experiment = Experiment(config, workdir, task)
  try:
    result = experiment.train(progress=progress)
    if export_dir != "":
      result["export_dir"] = experiment.export(export_dir)
  finally:
    experiment.close()
  return result
