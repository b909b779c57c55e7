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
import numpy as np


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

  Raises:
    ValueError: operands that are not ``[B, D]`` and ``[D, C]``, or bad ``dims``.

  Returns:
    ``[M, B, C]`` with ``out[i] = x[:, :dims[i]] @ w[:dims[i]]``, accumulated in
    float32 and returned in the promoted dtype of ``x`` and ``w``.
  """
  dims = _checked(x, w, dims, w_t=False)
  return _prefix_matmul(x, w, dims, False)


def prefix_matmul_nt(x: jax.Array, y: jax.Array, dims: Sequence[int]) -> jax.Array:
  """:func:`prefix_matmul` against a transposed right operand: ``x[:, :m] @ y[:, :m].T``.

  The nested similarity matrices of two embedding batches (fused contrastive
  losses). Same blocked forward and hand-written backward, but ``y`` is read
  as ``[N, D]`` and never transposed: passing ``y.T`` to :func:`prefix_matmul`
  makes XLA copy a transposed slice of ``y`` per block (and transpose the
  gradient back), which costs about a third of the loss on a CPU.

  Args:
    x: ``[B, D]``.
    y: ``[N, D]``.
    dims: strictly increasing sizes ``m_1 < ... < m_M <= D`` (static).

  Raises:
    ValueError: operands that are not ``[B, D]`` and ``[N, D]``, or bad ``dims``.

  Returns:
    ``[M, B, N]`` with ``out[i] = x[:, :dims[i]] @ y[:, :dims[i]].T``.
  """
  dims = _checked(x, y, dims, w_t=True)
  return _prefix_matmul(x, y, dims, True)


def _checked(x, w, dims, w_t: bool) -> tuple[int, ...]:
  """``dims`` as ints after checking the operands' shapes (``w`` is ``[N, D]`` when ``w_t``)."""
  if isinstance(dims, np.ndarray):
    dims = dims.tolist()
  if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or not dims or any(
      isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1 for m in dims):
    raise ValueError(f"dims must be a non-empty sequence of positive ints, got {dims!r}")
  dims = tuple(int(m) for m in dims)
  if any(b <= a for a, b in zip(dims, dims[1:], strict=False)):
    raise ValueError(f"dims must be strictly increasing (the output follows their order), "
                     f"got {list(dims)}")
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1 if w_t else 0]:
    want = ("prefix_matmul_nt needs x[B, D] and y[N, D]" if w_t
            else "prefix_matmul needs x[B, D] and w[D, C]")
    raise ValueError(f"{want}, got {x.shape} and {w.shape}")
  if dims[-1] > x.shape[1]:
    raise ValueError(f"largest nesting dim {dims[-1]} exceeds the inner size {x.shape[1]}")
  return dims


def _dot(a, b, contract_a: int, contract_b: int):
  """A 2-D matmul contracting ``a``'s axis ``contract_a`` with ``b``'s, accumulated in float32."""
  dtype = jnp.result_type(a.dtype, b.dtype)
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype),
                             (((contract_a,), (contract_b,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _w_block(w, s, e, w_t: bool):
  """Block ``[s:e]`` of the inner axis of ``w``: rows of ``w[D, C]``, columns of ``w[N, D]``."""
  return w[:, s:e] if w_t else w[s:e]


def _forward(x, w, dims, w_t):
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  acc = None
  outs = []
  for s, e in _bounds(dims):
    block = _dot(x[:, s:e], _w_block(w, s, e, w_t), 1, 1 if w_t else 0)
    acc = block if acc is None else acc + block
    outs.append(acc)
  return jnp.stack(outs).astype(out_dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _prefix_matmul(x, w, dims, w_t):
  return _forward(x, w, dims, w_t)


def _prefix_matmul_fwd(x, w, dims, w_t):
  return _forward(x, w, dims, w_t), (x, w)


def _prefix_matmul_bwd(dims, w_t, res, g):
  x, w = res
  # Block j contributes to every prefix i >= j, so its cotangent is the sum of
  # the prefix cotangents from j to the end: a reverse cumulative sum.
  g = g.astype(jnp.float32)
  acc = None
  dx_blocks, dw_blocks = [], []
  for j, (s, e) in reversed(list(enumerate(_bounds(dims)))):
    acc = g[j] if acc is None else acc + g[j]
    w_blk = _w_block(w, s, e, w_t).astype(x.dtype)
    dx_blocks.append(_dot(acc.astype(x.dtype), w_blk, 1, 0 if w_t else 1))
    if w_t:  # d y[:, s:e] = acc.T @ x[:, s:e]  [N, e - s]
      dw_blocks.append(_dot(acc.astype(w.dtype), x[:, s:e].astype(w.dtype), 0, 0))
    else:  # d w[s:e] = x[:, s:e].T @ acc  [e - s, C]
      dw_blocks.append(_dot(x[:, s:e], acc.astype(w.dtype), 0, 0))
  w_axis = 1 if w_t else 0
  dx = jnp.concatenate(dx_blocks[::-1], axis=1).astype(x.dtype)
  dw = jnp.concatenate(dw_blocks[::-1], axis=w_axis).astype(w.dtype)
  rest = x.shape[1] - dims[-1]
  if rest:
    dx = jnp.pad(dx, ((0, 0), (0, rest)))
    dw = jnp.pad(dw, ((0, 0), (0, rest)) if w_t else ((0, rest), (0, 0)))
  return dx, dw


_prefix_matmul.defvjp(_prefix_matmul_fwd, _prefix_matmul_bwd)
