"""Train state, the jitted train/eval steps, and the training loop.

One backbone forward per step; every nested head reads a slice of the same
embedding. The step is one ``jax.jit`` over a ``("data", "fsdp")`` mesh of all
devices (:mod:`mrl_jax.sharding`): the batch is sharded, the state replicated
(or split over ``"fsdp"``) and donated.
"""

from __future__ import annotations

import functools
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from mrl_jax import config_lib, models, optim, preemption
from mrl_jax import sharding as sharding_lib
from mrl_jax.checkpoints import Checkpointer
from mrl_jax.data import images, pipeline
from mrl_jax.losses import nested_loss_per_dim, softmax_cross_entropy_per_dim
from mrl_jax.metric_writers import MetricWriter, expand_per_dim


class TrainState(train_state.TrainState):
  """Params, optimizer state and step (from flax), BatchNorm statistics, a PRNG key."""

  batch_stats: Any
  rng: jax.Array


class NonFiniteLossError(FloatingPointError):
  """Training stopped because the loss became NaN or infinite."""


def create_train_state(rng: jax.Array, model: models.Classifier,
                       tx: optax.GradientTransformation, input_shape: tuple[int, ...],
                       mesh: jax.sharding.Mesh,
                       fsdp_min_size: int = sharding_lib.DEFAULT_FSDP_MIN_SIZE) -> TrainState:
  """Initialise the state directly into its shardings under ``jit`` (never on one device).

  The shardings are :func:`mrl_jax.sharding.state_shardings`: replicated, or
  split over ``"fsdp"`` for arrays of at least ``fsdp_min_size`` elements.
  """

  def init(rng):
    init_rng, state_rng = jax.random.split(rng)
    variables = model.init(init_rng, jnp.zeros((1, *input_shape), jnp.float32), train=False)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}), rng=state_rng)

  shardings = sharding_lib.state_shardings(jax.eval_shape(init, rng), mesh, fsdp_min_size)
  return jax.jit(init, out_shardings=shardings)(rng)


def _variables(state: TrainState, params: Any) -> dict:
  return {"params": params, "batch_stats": state.batch_stats}


def train_step(state: TrainState, batch: dict[str, jax.Array], *, weights: jax.Array,
               label_smoothing: float,
               learning_rate_fn: optax.Schedule) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on the summed, weighted nested loss.

  Args:
    state: the train state (replicated or FSDP-sharded).
    batch: ``{"image": [B, ...], "label": [B]}``, sharded over the mesh.
    weights: ``[M]`` nesting weights ``c_m``.

  Returns:
    The new state and metrics: ``loss`` (scalar), ``loss_per_dim`` ``[M]``,
    ``top1_per_dim`` ``[M]``, ``learning_rate``.
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        _variables(state, params), batch["image"], train=True, mutable=["batch_stats"],
        rngs={"dropout": dropout_rng})
    per_dim = nested_loss_per_dim(logits, batch["label"], label_smoothing=label_smoothing)
    return jnp.sum(weights * per_dim), (per_dim, logits, updates)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (per_dim, logits, updates)), grads = grad_fn(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", {}))
  top1 = jnp.mean(jnp.argmax(logits, -1) == batch["label"][None], axis=1)
  metrics = {"loss": loss, "loss_per_dim": per_dim, "top1_per_dim": top1,
             "learning_rate": learning_rate_fn(state.step - 1)}
  return state, metrics


def jit_train_step(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                   mesh: jax.sharding.Mesh, state_sharding: Any) -> Callable:
  """:func:`train_step` for a validated ``config``, jitted over ``mesh``; donates the state.

  Args:
    state_sharding: the state's shardings (a ``TrainState`` of ``NamedSharding``).

  Returns:
    ``step(state, global_batch) -> (state, metrics)``; metrics are replicated.
  """
  return jax.jit(
      functools.partial(train_step, weights=jnp.asarray(config_lib.loss_weights(config)),
                        label_smoothing=config.label_smoothing, learning_rate_fn=schedule),
      in_shardings=(state_sharding, sharding_lib.batch_sharding(mesh)),
      out_shardings=(state_sharding, sharding_lib.replicated(mesh)), donate_argnums=0)


def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Masked sums over one eval batch: ``loss_per_dim``/``correct_per_dim`` ``[M]``, ``count``."""
  logits = state.apply_fn(_variables(state, state.params), batch["image"], train=False)
  mask = batch["mask"]
  ce = softmax_cross_entropy_per_dim(logits, batch["label"])
  correct = (jnp.argmax(logits, -1) == batch["label"][None]).astype(jnp.float32)
  return {"loss_per_dim": jnp.sum(ce * mask, 1), "correct_per_dim": jnp.sum(correct * mask, 1),
          "count": jnp.sum(mask)}


def predict_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """``(logits [M, B, C], embedding [B, D])`` for one batch, in eval mode."""
  return state.apply_fn(_variables(state, state.params), batch["image"], train=False,
                        return_embedding=True)


def evaluate(eval_fn: Callable, state: TrainState, batches: Iterable[dict],
             to_global: Callable) -> dict[str, np.ndarray]:
  """Mean loss and top-1 per nested dim over a padded, masked pass of a split."""
  totals = None
  for batch in batches:
    sums = jax.device_get(eval_fn(state, to_global(batch)))
    totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  count = max(float(totals["count"]), 1.0)
  return {"loss_per_dim": totals["loss_per_dim"] / count,
          "top1_per_dim": totals["correct_per_dim"] / count,
          "loss": float(np.sum(totals["loss_per_dim"]) / count),
          "num_examples": float(totals["count"])}


def predict(state: TrainState, batches: Iterable[dict], mesh: jax.sharding.Mesh) -> dict:
  """Embeddings, nested logits and labels of every (unpadded) example of a split.

  Returns:
    ``{"embedding": [N, D], "logits": [M, N, C], "label": [N]}`` as numpy arrays,
    gathered from all processes.
  """
  to_global = functools.partial(pipeline.as_global, sharding=sharding_lib.batch_sharding(mesh))
  fn = jax.jit(predict_step)
  zs, logits, labels = [], [], []
  for batch in batches:
    gbatch = to_global(batch)
    out = multihost_utils.process_allgather(fn(state, gbatch), tiled=True)
    meta = multihost_utils.process_allgather(
        {"label": gbatch["label"], "mask": gbatch["mask"]}, tiled=True)
    keep = np.asarray(meta["mask"]) > 0
    logits.append(np.asarray(out[0])[:, keep])
    zs.append(np.asarray(out[1])[keep])
    labels.append(np.asarray(meta["label"])[keep])
  return {"embedding": np.concatenate(zs), "logits": np.concatenate(logits, axis=1),
          "label": np.concatenate(labels)}


def check_finite(pending: list[tuple[int, jax.Array]], checkpointer: Checkpointer) -> None:
  """Raise :class:`NonFiniteLossError` naming the first ``(step, loss)`` that is NaN/inf.

  Called before every save, so no checkpoint is written after a bad step; the
  message says which checkpoint in ``checkpointer`` survives.
  """
  for step, loss in pending:
    value = float(loss)
    if not np.isfinite(value):
      latest = checkpointer.latest_step()
      kept = (f"the last good checkpoint (step {latest}) in {checkpointer.directory} "
              "is untouched" if latest is not None else "no checkpoint had been saved yet")
      raise NonFiniteLossError(
          f"loss became {value} at step {step}; training stopped and {kept}. "
          "Lower the learning rate, enable label smoothing or check the inputs.")


def mean_metrics(history: list[dict]) -> dict[str, np.ndarray]:
  """Per-key mean over a list of per-step metric pytrees (fetched from the devices)."""
  return jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *jax.device_get(history))


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """``workdir/config.json``: the validated config a run trains with (for humans and tools)."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config_lib.to_json(config))


def write_final_metrics(workdir: str, result: dict[str, Any]) -> dict[str, Any]:
  """``workdir/final_metrics.json``; returns ``result``."""
  with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
    json.dump(result, f, indent=1)
  return result


def eval_metric_names(dims: tuple[int, ...]) -> list[str]:
  """The scalar names of :func:`evaluate`'s metrics once expanded per dim (``top1/dim_8``, ...)."""
  return ["loss", *(f"{name}/dim_{m}" for name in ("loss", "top1") for m in dims)]


def _check_best_metric(name: str | None, dims: tuple[int, ...]) -> str | None:
  if name is not None and name not in eval_metric_names(dims):
    raise ValueError(f"config.best_metric={name!r}; choose one of {eval_metric_names(dims)}")
  return name


def _warn_if_data_order_changed(stored: dict | None, now: dict, directory: str) -> None:
  """Resuming is exact only when the things that fix the batch order are unchanged."""
  if stored is None:
    return
  changed = {k: (stored.get(k), v) for k, v in now.items() if stored.get(k) != v}
  if changed:
    warnings.warn(f"resuming from {directory} with a different data order, so the run will not "
                  f"repeat an uninterrupted one exactly; (checkpoint, now): {changed}",
                  stacklevel=3)


class Experiment:
  """Everything built from a validated config: mesh, data, model, optimiser, state.

  ``Experiment(config, workdir)`` restores the latest checkpoint in
  ``workdir/checkpoints`` when there is one (onto this run's mesh, whatever
  mesh saved it); :meth:`train` then runs the loop from that step.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.mesh = sharding_lib.make_mesh(config.get("mesh_shape"))
    self.config = config = config_lib.validate_config(config, num_devices=self.mesh.size)
    self.workdir = workdir
    self.dims = config_lib.eval_dims(config)
    self.best_metric = _check_best_metric(config.get("best_metric"), self.dims)
    self.builder = pipeline.get_builder(config.dataset, config.data_dir)
    self.spec = pipeline.dataset_spec(self.builder, config.train_split, config.eval_split)
    self.input = images.ImageInput.from_config(config)
    self.steps_per_epoch = max(self.spec.num_train_examples // config.batch_size, 1)
    self.total_steps, _ = optim.total_and_warmup_steps(config, self.steps_per_epoch)
    self.model = models.build_classifier(config, self.spec.num_classes)
    self.schedule = optim.learning_rate_schedule(config, self.steps_per_epoch)
    self.state = create_train_state(
        jax.random.PRNGKey(config.seed), self.model, optim.make_optimizer(config, self.schedule),
        self.input.model_input_shape(self.spec.image_shape), self.mesh,
        config.get("fsdp_min_size", sharding_lib.DEFAULT_FSDP_MIN_SIZE))
    config_json = json.loads(config_lib.to_json(config))
    self.checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        {"config": config_json, "dims": list(self.dims), "num_classes": self.spec.num_classes,
         "image_shape": list(self.spec.image_shape)},
        max_to_keep=config.max_to_keep, best_metric=self.best_metric,
        best_mode=config.get("best_mode") or "max",
        async_save=bool(config.get("async_checkpointing")))
    latest = self.checkpointer.latest_step()
    if latest is not None:
      self.state = self.checkpointer.restore(latest, self.state)
      _warn_if_data_order_changed(self.checkpointer.read_metadata(latest).get("data_position"),
                                  self._data_position(latest), self.checkpointer.directory)
    self._to_global = functools.partial(
        pipeline.as_global, sharding=sharding_lib.batch_sharding(self.mesh))
    self._train_step = jit_train_step(config, self.schedule, self.mesh,
                                      jax.tree.map(lambda x: x.sharding, self.state))
    self._eval_step = jax.jit(eval_step, out_shardings=sharding_lib.replicated(self.mesh))

  def _data_position(self, step: int) -> dict[str, Any]:
    """Where the train iterator stands after ``step`` batches, and what fixes its order."""
    c = self.config
    return {"batches_consumed": int(step), "batch_size": c.batch_size, "seed": c.seed,
            "train_split": c.train_split, "shuffle_buffer": c.shuffle_buffer,
            "process_count": jax.process_count()}

  @property
  def step(self) -> int:
    return int(jax.device_get(self.state.step))

  def eval_batches(self, split: str | None = None) -> Iterable[dict]:
    """A padded, masked pass over ``split`` (default: the config's eval split)."""
    return self.input.eval_batches(self.builder, split or self.config.eval_split,
                                   batch_size=self.config.batch_size)

  def evaluate(self) -> dict[str, np.ndarray]:
    return evaluate(self._eval_step, self.state, self.eval_batches(), self._to_global)

  def predict(self, split: str) -> dict[str, np.ndarray]:
    return predict(self.state, self.eval_batches(split), self.mesh)

  def train(self, *, progress: bool = True,
            on_step: Callable[[int, dict[str, jax.Array]], None] | None = None) -> dict[str, Any]:
    """Run the loop to ``total_steps``; returns the final eval metrics (also in JSON).

    Checkpoints are written every ``checkpoint_every_steps``, at every eval
    when ``best_metric`` is set, at the last step, and when a preemption notice
    (``SIGTERM``) arrives.

    Args:
      on_step: called as ``on_step(step, metrics)`` after every train step.

    Raises:
      NonFiniteLossError: naming the first step whose loss was NaN/inf; no
        checkpoint is written after that step, so the last good one survives.
      mrl_jax.preemption.Preempted: after a preemption notice, once the
        checkpoint of the current step is written.
    """
    config, main = self.config, jax.process_index() == 0
    writer = MetricWriter(self.workdir, enabled=main, echo=tqdm.write if progress else None)
    os.makedirs(self.workdir, exist_ok=True)
    if main:
      write_config(self.workdir, config)
    start = self.step
    batches = pipeline.prefetch_to_device(self.input.train_batches(
        self.builder, config.train_split, batch_size=config.batch_size, seed=config.seed,
        shuffle_buffer=config.shuffle_buffer, steps_per_epoch=self.steps_per_epoch,
        start_step=start), self._to_global)
    pending: list[tuple[int, jax.Array]] = []
    history: list[dict] = []
    bar = tqdm(total=self.total_steps, initial=start, disable=not (progress and main),
               desc="train", unit="step")
    watch = preemption.PreemptionWatch()
    watch.install()
    tick = time.perf_counter()
    try:
      for step in range(start + 1, self.total_steps + 1):
        self.state, metrics = self._train_step(self.state, next(batches))
        if on_step is not None:
          on_step(step, metrics)
        pending.append((step, metrics["loss"]))
        history.append(metrics)
        bar.update(1)
        last = step == self.total_steps
        if step % config.log_every_steps == 0 or last:
          check_finite(pending, self.checkpointer)
          pending = []
          scalars = expand_per_dim(mean_metrics(history), self.dims)
          scalars["examples_per_sec"] = (
              len(history) * config.batch_size / (time.perf_counter() - tick))
          writer.write_scalars(step, scalars, prefix="train/")
          history, tick = [], time.perf_counter()
        eval_scalars = None
        if step % config.eval_every_steps == 0 or last:
          eval_scalars = expand_per_dim(self.evaluate(), self.dims)
          writer.write_scalars(step, eval_scalars, prefix="eval/")
        preempted = watch.reached(step)
        if (step % config.checkpoint_every_steps == 0 or last or preempted
            or (self.best_metric and eval_scalars is not None)):
          check_finite(pending, self.checkpointer)
          pending = []
          self.checkpointer.save(step, self.state, metrics=eval_scalars,
                                 extra_metadata={"data_position": self._data_position(step)})
        if preempted:
          raise preemption.Preempted(step, self.checkpointer.directory)
    finally:
      watch.uninstall()
      bar.close()
      writer.close()
      self.checkpointer.close()
    return self._final_metrics(main)

  def _final_metrics(self, main: bool) -> dict[str, Any]:
    ev = self.evaluate()
    result = {"step": self.step, "dims": list(self.dims), "head": self.config.head,
              "eval": {k: np.asarray(v).tolist() for k, v in ev.items()}}
    return write_final_metrics(self.workdir, result) if main else result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       progress: bool = True) -> dict[str, Any]:
  """Train ``config`` in ``workdir`` (resuming from its latest checkpoint) and evaluate.

  Returns:
    ``{"step", "dims", "head", "eval": {"loss", "loss_per_dim", "top1_per_dim",
    "num_examples"}}``, also written to ``workdir/final_metrics.json``.
  """
  return Experiment(config, workdir).train(progress=progress)
