"""Optimisers and learning-rate schedules from the config (optax)."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """``learning_rate``, scaled linearly by ``batch_size / learning_rate_batch_size`` if set."""
  lr = float(config.learning_rate)
  if config.get("learning_rate_batch_size"):
    lr *= config.batch_size / config.learning_rate_batch_size
  return lr


def total_and_warmup_steps(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> tuple[int, int]:
  """``(total_steps, warmup_steps)`` from either step or epoch counts in the config."""
  if config.num_train_steps is not None:
    total = int(config.num_train_steps)
  else:
    total = int(round(config.num_epochs * steps_per_epoch))
  if config.get("warmup_epochs") is not None:
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
  else:
    warmup = int(config.warmup_steps)
  return total, min(warmup, total)


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> optax.Schedule:
  """The per-step learning rate.

  ``warmup_linear`` is the paper's: linear from ``1e-4 * peak`` at step 0 to
  ``peak`` at the end of warm-up, then linear to 0 at the last step.
  ``warmup_cosine``: the same warm-up, then cosine decay to 0. ``constant``:
  ``peak`` throughout.
  """
  peak = peak_learning_rate(config)
  total, warmup = total_and_warmup_steps(config, steps_per_epoch)
  if config.schedule == "constant":
    return optax.constant_schedule(peak)
  warm = optax.linear_schedule(1e-4 * peak, peak, max(warmup, 1))
  decay_steps = max(total - warmup, 1)
  if config.schedule == "warmup_linear":
    decay = optax.linear_schedule(peak, 0.0, decay_steps)
  elif config.schedule == "warmup_cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps)
  else:
    raise ValueError(f"unknown schedule {config.schedule!r}")
  return optax.join_schedules([warm, decay], [warmup])


def weight_decay_mask(params: Any) -> Any:
  """True for weights that get decay: kernels and embeddings (ndim >= 2).

  Biases and normalisation scales/offsets (1-D) are excluded, as in the paper's
  recipe (no weight decay on BatchNorm parameters).
  """
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD with momentum (coupled, masked weight decay, as in PyTorch) or AdamW."""
  if config.optimizer == "sgd":
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask),
        optax.sgd(schedule, momentum=config.momentum),
    )
  if config.optimizer == "adamw":
    return optax.adamw(schedule, weight_decay=config.weight_decay, mask=weight_decay_mask)
  raise ValueError(f"unknown optimizer {config.optimizer!r}")
