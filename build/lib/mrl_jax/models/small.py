"""Small encoders for small data (digits, MNIST-sized images) and tests.

Each encoder maps a batch of inputs to an embedding ``[B, embed_dim]``; the MRL
heads read nested prefixes of that embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class MLP(nn.Module):
  """Flatten, ``len(hidden)`` ReLU layers, then a linear embedding layer.

  Attributes:
    embed_dim: ``D``, the size of the returned embedding.
    hidden: widths of the hidden layers.
    dtype: compute dtype.
  """

  embed_dim: int = 64
  hidden: Sequence[int] = (256, 256)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """``x [B, ...] -> z [B, embed_dim]``."""
    del train  # no dropout or normalisation statistics
    x = x.reshape((x.shape[0], -1)).astype(self.dtype)
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
    return nn.Dense(self.embed_dim, dtype=self.dtype, name="embedding")(x)


class CNN(nn.Module):
  """Conv-BN-ReLU stages with 2x2 average pooling, global pooling, a linear embedding.

  Attributes:
    embed_dim: ``D``.
    features: channels of each conv stage.
    dtype: compute dtype.
  """

  embed_dim: int = 64
  features: Sequence[int] = (32, 64)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """``x [B, H, W, C] -> z [B, embed_dim]``."""
    if x.ndim != 4:
      raise ValueError(f"CNN takes images [B, H, W, C], got shape {x.shape}")
    x = x.astype(self.dtype)
    for i, ch in enumerate(self.features):
      x = nn.Conv(ch, (3, 3), use_bias=False, dtype=self.dtype, name=f"conv_{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                       name=f"bn_{i}")(x)
      x = nn.relu(x)
      if min(x.shape[1:3]) >= 2:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.embed_dim, dtype=self.dtype, name="embedding")(x)
