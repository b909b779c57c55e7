"""Classification heads over nested prefixes of an embedding (flax.linen).

* :class:`MRLHead` with ``tied=False`` (the paper's MRL): a separate linear
  classifier ``W_m [m, C]`` with bias ``b_m`` per nested size ``m``; ``sum(M) x C``
  extra weights.
* :class:`MRLHead` with ``tied=True`` (MRL-E): one kernel ``W [D, C]`` and one
  bias ``b``; ``logits_m = z[:, :m] @ W[:m] + b``, all of them computed with one
  blocked matmul and a cumulative sum (:mod:`mrl_jax.prefix_matmul`).
* :class:`FixedFeatureHead` (FF-k): an ordinary classifier that reads only
  ``z[:, :k]``; with ``k = D`` it is the ordinary (non-nested) model's head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mrl_jax.nesting import Nesting
from mrl_jax.prefix_matmul import prefix_matmul

Dtype = Any


def _check_classes(num_classes) -> None:
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or (
      num_classes < 1):
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


def _check_dtype(dtype) -> None:
  try:
    ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
  except TypeError:
    ok = False
  if not ok:
    raise ValueError(f"dtype must be a floating dtype (e.g. jnp.bfloat16), got {dtype!r}")


def _check_embedding(z: jax.Array, largest: int) -> None:
  if z.ndim != 2:
    raise ValueError(f"heads take an embedding z[B, D], got shape {z.shape}")
  if not jnp.issubdtype(z.dtype, jnp.floating):
    raise ValueError(f"heads take a floating embedding z, got dtype {z.dtype}")
  if largest > z.shape[-1]:
    raise ValueError(
        f"head reads the first {largest} dims but the embedding has only {z.shape[-1]}")


class MRLHead(nn.Module):
  """Nested linear classifiers, one per prefix size.

  Attributes:
    num_classes: ``C``.
    dims: distinct prefix sizes ``<= D``, in any order; the logits follow their
      ascending order (validated by :class:`~mrl_jax.nesting.Nesting`).
    tied: ``False`` for MRL (a classifier per size), ``True`` for MRL-E (one
      weight-tied classifier, one shared bias).
    dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
  """

  num_classes: int
  dims: Sequence[int]
  tied: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    """``z [B, D] -> logits [M, B, C]``, ``M`` = the sizes in ascending order.

    Raises:
      ValueError: ``z`` not ``[B, D]`` or narrower than the largest size; bad
        ``num_classes``, ``dims`` or ``dtype``.
    """
    _check_classes(self.num_classes)
    _check_dtype(self.dtype)
    dims = Nesting(tuple(self.dims)).dims
    _check_embedding(z, dims[-1])
    z = z.astype(self.dtype)
    if self.tied:
      kernel = self.param("kernel", nn.initializers.lecun_normal(),
                          (z.shape[-1], self.num_classes), jnp.float32)
      bias = self.param("bias", nn.initializers.zeros_init(), (self.num_classes,), jnp.float32)
      logits = prefix_matmul(z, kernel.astype(self.dtype), dims)
      return logits + bias.astype(self.dtype)
    return jnp.stack([
        nn.Dense(self.num_classes, dtype=self.dtype, name=f"head_{m}")(z[:, :m])
        for m in dims
    ])


class FixedFeatureHead(nn.Module):
  """FF-k: an ordinary linear classifier on the first ``dim`` features only.

  Attributes:
    num_classes: ``C``.
    dim: ``k``, how many leading embedding dims the classifier reads.
    dtype: compute dtype.
  """

  num_classes: int
  dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    """``z [B, D] -> logits [B, C]``.

    Raises:
      ValueError: ``z`` not ``[B, D]`` or narrower than ``dim``; bad
        ``num_classes``, ``dim`` or ``dtype``.
    """
    _check_classes(self.num_classes)
    _check_dtype(self.dtype)
    if isinstance(self.dim, bool) or not isinstance(self.dim, (int, np.integer)) or self.dim < 1:
      raise ValueError(f"dim must be a positive int, got {self.dim!r}")
    _check_embedding(z, self.dim)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(
        z[:, : self.dim].astype(self.dtype))
