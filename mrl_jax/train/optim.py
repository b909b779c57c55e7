"""Optimisers and learning-rate schedules from the typed run spec (optax)."""

from __future__ import annotations

from typing import Any

import jax
import optax

from mrl_jax.train.specs import OptimSpec, RunSpec


def peak_learning_rate(spec: RunSpec) -> float:
  """``optim.learning_rate``, scaled by ``batch_size / optim.learning_rate_batch_size`` if set."""
  lr = spec.optim.learning_rate
  if spec.optim.learning_rate_batch_size:
    lr *= spec.batch_size / spec.optim.learning_rate_batch_size
  return lr


def total_and_warmup_steps(spec: RunSpec, steps_per_epoch: int) -> tuple[int, int]:
  """``(total_steps, warmup_steps)`` from either step or epoch counts of the spec."""
  if spec.loop.num_train_steps is not None:
    total = spec.loop.num_train_steps
  else:
    total = int(round(spec.loop.num_epochs * steps_per_epoch))
  if spec.optim.warmup_epochs is not None:
    warmup = int(round(spec.optim.warmup_epochs * steps_per_epoch))
  else:
    warmup = spec.optim.warmup_steps
  return total, min(warmup, total)


def learning_rate_schedule(spec: RunSpec, steps_per_epoch: int) -> optax.Schedule:
  """The per-step learning rate.

  ``warmup_linear`` is the paper's: linear from ``1e-4 * peak`` at step 0 to
  ``peak`` at the end of warm-up, then linear to 0 at the last step.
  ``warmup_cosine``: the same warm-up, then cosine decay to 0. ``constant``:
  ``peak`` throughout.
  """
  peak = peak_learning_rate(spec)
  total, warmup = total_and_warmup_steps(spec, steps_per_epoch)
  schedule = spec.optim.schedule
  if schedule == "constant":
    return optax.constant_schedule(peak)
  warm = optax.linear_schedule(1e-4 * peak, peak, max(warmup, 1))
  decay_steps = max(total - warmup, 1)
  if schedule == "warmup_linear":
    decay = optax.linear_schedule(peak, 0.0, decay_steps)
  else:  # "warmup_cosine": the spec admits no other value
    decay = optax.cosine_decay_schedule(peak, decay_steps)
  return optax.join_schedules([warm, decay], [warmup])


def weight_decay_mask(params: Any) -> Any:
  """True for weights that get decay: kernels and embeddings (ndim >= 2).

  Biases and normalisation scales/offsets (1-D) are excluded, as in the paper's
  recipe (no weight decay on BatchNorm parameters).
  """
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim: OptimSpec, schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD with momentum (coupled, masked weight decay, as in PyTorch) or AdamW."""
  if optim.optimizer == "sgd":
    return optax.chain(
        optax.add_decayed_weights(optim.weight_decay, mask=weight_decay_mask),
        optax.sgd(schedule, momentum=optim.momentum),
    )
  if optim.optimizer == "adamw":
    return optax.adamw(schedule, weight_decay=optim.weight_decay, mask=weight_decay_mask)
  raise ValueError(f"unknown optimizer {optim.optimizer!r}")
