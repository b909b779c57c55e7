"""Every nested prefix product ``x[:, :m] @ w[:m]`` for the cost of one matmul.

This is the kernel behind the MRL-E head (``logits_m = z[:, :m] @ W[:m] + b``)
and the fused nested contrastive loss (``sim_m = a[:, :m] @ b[:, :m].T``).

Done naively, the ``M`` products cost ``sum(M)`` columns of work. Split the
inner dimension into the consecutive blocks ``[0:m_1], [m_1:m_2], ...``; the
block products summed cumulatively give every prefix product, for the cost of
one ``m_M``-wide matmul. The backward pass is written by hand
(``jax.custom_vjp``): the prefix cotangents are reverse-cumsummed per block, so
the gradient costs one ``m_M``-wide matmul for each input as well, instead of
autodiff's slices, pads and per-dim transposes.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp


def _bounds(dims: tuple[int, ...]) -> list[tuple[int, int]]:
  starts = (0,) + dims[:-1]
  return list(zip(starts, dims, strict=True))


def naive_prefix_matmul(x: jax.Array, w: jax.Array, dims: Sequence[int]) -> jax.Array:
  """Reference: one matmul per nested size. ``[B, D] x [D, C] -> [M, B, C]``."""
  return jnp.stack([x[:, :m] @ w[:m] for m in dims])


def prefix_matmul(x: jax.Array, w: jax.Array, dims: Sequence[int]) -> jax.Array:
  """Nested prefix products via block matmuls and a cumulative sum.

  Args:
    x: ``[B, D]``.
    w: ``[D, C]``.
    dims: strictly increasing sizes ``m_1 < ... < m_M <= D`` (static).

  Returns:
    ``[M, B, C]`` with ``out[i] = x[:, :dims[i]] @ w[:dims[i]]``, accumulated in
    float32 and returned in the promoted dtype of ``x`` and ``w``.
  """
  dims = tuple(int(m) for m in dims)
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f"prefix_matmul needs x[B, D] and w[D, C], got {x.shape} and {w.shape}")
  if dims[-1] > x.shape[1]:
    raise ValueError(f"largest nesting dim {dims[-1]} exceeds the inner size {x.shape[1]}")
  return _prefix_matmul(x, w, dims)


def _forward(x, w, dims):
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  acc = None
  outs = []
  for s, e in _bounds(dims):
    block = jnp.matmul(x[:, s:e], w[s:e], preferred_element_type=jnp.float32)
    acc = block if acc is None else acc + block
    outs.append(acc)
  return jnp.stack(outs).astype(out_dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _prefix_matmul(x, w, dims):
  return _forward(x, w, dims)


def _prefix_matmul_fwd(x, w, dims):
  return _forward(x, w, dims), (x, w)


def _prefix_matmul_bwd(dims, res, g):
  x, w = res
  # Block j contributes to every prefix i >= j, so its cotangent is the sum of
  # the prefix cotangents from j to the end: a reverse cumulative sum.
  g = g.astype(jnp.float32)
  acc = None
  dx_blocks, dw_blocks = [], []
  for j, (s, e) in reversed(list(enumerate(_bounds(dims)))):
    acc = g[j] if acc is None else acc + g[j]
    gj = acc.astype(x.dtype)
    dx_blocks.append(jnp.matmul(gj, w[s:e].T.astype(x.dtype),
                                preferred_element_type=jnp.float32))
    dw_blocks.append(jnp.matmul(x[:, s:e].T, acc.astype(w.dtype),
                                preferred_element_type=jnp.float32))
  dx = jnp.concatenate(dx_blocks[::-1], axis=1).astype(x.dtype)
  dw = jnp.concatenate(dw_blocks[::-1], axis=0).astype(w.dtype)
  rest = x.shape[1] - dims[-1]
  if rest:
    dx = jnp.pad(dx, ((0, 0), (0, rest)))
    dw = jnp.pad(dw, ((0, rest), (0, 0)))
  return dx, dw


_prefix_matmul.defvjp(_prefix_matmul_fwd, _prefix_matmul_bwd)
