"""Batch normalisation with an explicit choice of where the statistics come from.

The train step is one ``jax.jit`` over the whole global batch, so a plain
:class:`flax.linen.BatchNorm` normalises with statistics of the GLOBAL batch,
all devices together (PyTorch's ``SyncBatchNorm``). The paper's reference run
(PyTorch DDP, 2 GPUs x 512) used per-GPU statistics instead.
:class:`SubBatchNorm` reproduces that: in training it normalises each
consecutive group of ``group_size`` examples with that group's own statistics.
With ``group_size = batch_size // num_devices`` the groups are exactly the
devices' shards (the batch is split over the mesh in contiguous blocks).

Both modules have the same variables (params ``scale``/``bias``, batch_stats
``mean``/``var``), so checkpoints, weight-decay masks and parameter counts do
not depend on the choice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class SubBatchNorm(nn.Module):
  """BatchNorm whose training statistics are per sub-batch of ``group_size`` examples.

  In eval (``use_running_average=True``) it is an ordinary BatchNorm. The
  running averages are updated with the mean over groups of the group means
  and (biased) variances, so every device keeps the same replicated copy.

  Attributes:
    group_size: examples per statistics group; must divide the batch.
    use_running_average: eval mode.
    momentum: running average decay, as in :class:`flax.linen.BatchNorm`.
    epsilon: added to the variance.
    dtype: output dtype; statistics are always computed in float32.
    scale_init: initialiser of ``scale`` (zeros for a zero-init residual branch).
  """

  group_size: int
  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``x [B, ..., C] -> [B, ..., C]``, normalised over all axes but the last."""
    features = x.shape[-1]
    scale = self.param("scale", self.scale_init, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
      y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.epsilon)
      return (y * scale + bias).astype(self.dtype)
    batch = x.shape[0]
    if batch % self.group_size:
      raise ValueError(
          f"a batch of {batch} does not split into BatchNorm groups of {self.group_size}")
    xg = x.astype(jnp.float32).reshape(batch // self.group_size, self.group_size, *x.shape[1:])
    axes = tuple(range(1, xg.ndim - 1))
    mean = jnp.mean(xg, axis=axes, keepdims=True)  # [G, 1, ..., C]
    var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    if not self.is_initializing():
      group_axes = tuple(range(xg.ndim - 1))
      ra_mean.value = (self.momentum * ra_mean.value
                       + (1 - self.momentum) * jnp.mean(mean, axis=group_axes))
      ra_var.value = (self.momentum * ra_var.value
                      + (1 - self.momentum) * jnp.mean(var, axis=group_axes))
    return (y * scale + bias).astype(self.dtype)


def batch_norm(*, train: bool, group_size: int | None, dtype: Dtype, momentum: float = 0.9,
               epsilon: float = 1e-5) -> Callable[..., nn.Module]:
  """A factory ``norm(name=..., scale_init=...)`` for the chosen statistics.

  Args:
    train: use batch statistics (and update the running averages).
    group_size: ``None`` for global-batch statistics (:class:`flax.linen.BatchNorm`),
      else statistics per group of that many examples (:class:`SubBatchNorm`).
  """
  if group_size is None:
    return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=momentum,
                             epsilon=epsilon, dtype=dtype)
  if group_size < 1:
    raise ValueError(f"bn_group_size must be None or a positive int, got {group_size}")
  return functools.partial(SubBatchNorm, group_size=group_size, use_running_average=not train,
                           momentum=momentum, epsilon=epsilon, dtype=dtype)
