"""The fused nested in-batch softmax: every nested size for the cost of about one.

``matryoshka(in_batch_softmax, dims)`` computes one similarity matmul, one
softmax and one backward per size. Here the dot products of every prefix come
from one blocked matmul and a cumulative sum
(:func:`~mrl_jax.core.prefix_matmul.prefix_matmul_nt`), the prefix norms from
cumulative block sums of squares, and the backward of the cosine softmax is
written by hand (``jax.custom_vjp``): letting autodiff differentiate the block
cumulative sum keeps most of the per-dim cost in the backward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mrl_jax.core import ops
from mrl_jax.core.checks import check_bool, check_positive
from mrl_jax.core.nesting import Nesting
from mrl_jax.core.prefix_matmul import prefix_matmul_nt
from mrl_jax.losses.embedding import NORM_EPS, candidates, check_pair


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _prefix_sq_norms(x: jax.Array, dims: tuple[int, ...]) -> jax.Array:
  """``[N, D] -> [M, N]``: ``||x[n, :m]||^2`` for every nested size, by block sums + cumsum.

  The hand-written backward (``d/dx[n, d] = 2 x[n, d] * sum_{m > d} g[m, n]``)
  is one elementwise pass, where autodiff would pad every block's gradient back
  to ``[N, D]``.
  """
  return _prefix_sq_norms_fwd(x, dims)[0]


def _prefix_sq_norms_fwd(x, dims):
  starts = (0,) + dims[:-1]
  blocks = [jnp.sum(jnp.square(x[:, s:e]), axis=1) for s, e in zip(starts, dims, strict=True)]
  return jnp.cumsum(jnp.stack(blocks), axis=0), x


def _prefix_sq_norms_bwd(dims, x, g):
  # Block j feeds every prefix i >= j: its cotangent is a reverse cumsum over sizes.
  per_block = jnp.flip(jnp.cumsum(jnp.flip(g, 0), axis=0), 0)  # [M, N]
  sizes = np.diff((0,) + dims)
  per_dim = jnp.repeat(per_block, sizes, axis=0, total_repeat_length=dims[-1])  # [m_M, N]
  dx = 2.0 * x[:, : dims[-1]] * per_dim.T
  return (jnp.pad(dx, ((0, 0), (0, x.shape[1] - dims[-1]))),)


_prefix_sq_norms.defvjp(_prefix_sq_norms_fwd, _prefix_sq_norms_bwd)


def _cosine_logits(dots, sq_a, sq_c, scale):
  """Cosine logits ``s * dots / (||a|| ||c||)`` and the inverse norms ``[M, B]``, ``[M, N]``."""
  floor = NORM_EPS * NORM_EPS
  inv_a = jax.lax.rsqrt(jnp.maximum(sq_a, floor))
  inv_c = jax.lax.rsqrt(jnp.maximum(sq_c, floor))
  return (scale * dots) * inv_a[:, :, None] * inv_c[:, None, :], inv_a, inv_c


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _cosine_softmax_ce(dots, sq_a, sq_c, scale, symmetric: bool) -> jax.Array:
  """Per-size in-batch cross-entropy ``[M]`` from prefix dot products and squared norms.

  ``dots [M, B, N]`` against ``N = B (1 + K)`` candidates whose first ``B`` are
  the positives. Rows: anchor -> every candidate; with ``symmetric``, also the
  columns ``j < B``: positive -> every anchor.

  The backward is written by hand: with ``G = dL/dlogits`` (softmax minus the
  target, per row and, when ``symmetric``, per positive column) and
  ``H = G * logits``, ``dL/ddots = G * s / (||a|| ||c||)``,
  ``dL/d||a||^2 = -sum_n H / (2 ||a||^2)`` (the same over rows for ``c``) and
  ``dL/ds = sum H / s``: one pass over the ``[M, B, N]`` logits instead of
  autodiff's several.
  """
  return _cosine_softmax_ce_fwd(dots, sq_a, sq_c, scale, symmetric)[0]


def _cosine_softmax_ce_fwd(dots, sq_a, sq_c, scale, symmetric):
  logits, _, _ = _cosine_logits(dots, sq_a, sq_c, scale)
  batch = logits.shape[1]
  diag = jnp.diagonal(logits[:, :, :batch], axis1=1, axis2=2)  # [M, B]
  lse_rows = jax.nn.logsumexp(logits, axis=2)  # [M, B]
  per_dim = jnp.mean(lse_rows - diag, axis=1)
  lse_cols = None
  if symmetric:  # positive j against every anchor: the first B columns only
    lse_cols = jax.nn.logsumexp(logits[:, :, :batch], axis=1)  # [M, B]
    per_dim = 0.5 * (per_dim + jnp.mean(lse_cols - diag, axis=1))
  return per_dim, (dots, sq_a, sq_c, scale, lse_rows, lse_cols)


def _cosine_softmax_ce_bwd(symmetric, res, g):
  dots, sq_a, sq_c, scale, lse_rows, lse_cols = res
  logits, inv_a, inv_c = _cosine_logits(dots, sq_a, sq_c, scale)
  _, batch, num = logits.shape
  target = jnp.arange(batch)[:, None] == jnp.arange(num)[None, :]
  per_row = (g / batch * (0.5 if symmetric else 1.0))[:, None, None]
  grad = (jnp.exp(logits - lse_rows[:, :, None]) - target) * per_row
  if symmetric:
    cols = (jnp.exp(logits[:, :, :batch] - lse_cols[:, None, :]) - target[:, :batch]) * per_row
    grad = grad + (cols if num == batch else jnp.pad(cols, ((0, 0), (0, 0), (0, num - batch))))
  h = grad * logits
  floor = NORM_EPS * NORM_EPS
  d_sq_a = jnp.where(sq_a > floor, -0.5 * jnp.square(inv_a) * jnp.sum(h, axis=2), 0.0)
  d_sq_c = jnp.where(sq_c > floor, -0.5 * jnp.square(inv_c) * jnp.sum(h, axis=1), 0.0)
  d_dots = grad * (scale * inv_a)[:, :, None] * inv_c[:, None, :]
  return d_dots, d_sq_a, d_sq_c, jnp.sum(h) / scale


_cosine_softmax_ce.defvjp(_cosine_softmax_ce_fwd, _cosine_softmax_ce_bwd)


def nested_in_batch_softmax_per_dim(
    anchors: jax.Array,
    positives: jax.Array,
    dims: Sequence[int],
    *,
    negatives: jax.Array | None = None,
    scale: float = 20.0,
    symmetric: bool = False,
) -> jax.Array:
  """:func:`~mrl_jax.losses.in_batch_softmax` at every nested size, fused: ``[M]`` float32.

  ``loss[k] = in_batch_softmax(a[:, :m_k], p[:, :m_k], n[..., :m_k])`` with
  ``m_k`` the ``k``-th smallest size (or
  :func:`~mrl_jax.losses.symmetric_in_batch_softmax` when ``symmetric``: the
  positive -> anchor direction uses the positives only, as in
  sentence-transformers' MultipleNegativesSymmetricRankingLoss). Every hard
  negative of the batch is a candidate for every anchor. Instead of one
  similarity matmul per size, the dot products of every prefix come from one
  blocked matmul and a cumulative sum, the prefix norms from cumulative block
  sums of squares:
  ``cos_m(a_i, c_j) = (sum_{d < m} a_id c_jd) / (||a_i[:m]|| * ||c_j[:m]||)``.

  Args:
    anchors: ``[B, D]``.
    positives: ``[B, D]``.
    dims: nested sizes in any order (sorted ascending), distinct, ``<= D``.
    negatives: optional hard negatives ``[B, K, D]``.
    scale: inverse temperature ``> 0`` (may be a traced, learnable scalar).
    symmetric: add the positive -> anchor cross-entropy and average the two.

  Returns:
    ``[M]`` float32, in ascending order of ``dims``.

  Raises:
    ValueError: mismatched shapes, bad ``dims`` or ``scale``.
  """
  check_pair(anchors, positives, "anchors", "positives")
  dims = Nesting(tuple(dims), embed_dim=np.shape(anchors)[1]).dims
  check_positive("scale", scale)
  check_bool("symmetric", symmetric)
  a = jnp.asarray(anchors, jnp.float32)
  c = jnp.asarray(candidates(positives, negatives), jnp.float32)
  # Cosines ignore each row's scale: divide it out (max |x|, out of autodiff, exact) so
  # the squared norms neither overflow nor underflow float32 (rows of 1e20 or 1e-25).
  a, c = a / ops.max_abs_scale(a), c / ops.max_abs_scale(c)
  dots = prefix_matmul_nt(a, c, dims)  # [M, B, N]
  return _cosine_softmax_ce(dots, _prefix_sq_norms(a, dims), _prefix_sq_norms(c, dims),
                            jnp.asarray(scale, jnp.float32), bool(symmetric))


def nested_in_batch_softmax(
    anchors: jax.Array,
    positives: jax.Array,
    dims: Sequence[int],
    weights: Sequence[float] | None = None,
    *,
    negatives: jax.Array | None = None,
    scale: float = 20.0,
    symmetric: bool = False,
) -> jax.Array:
  """Fused ``matryoshka(in_batch_softmax, dims, weights)``: ``sum_m w_m * L_m``.

  Same value and gradients as the unfused wrapper (with
  ``symmetric_in_batch_softmax`` when ``symmetric``), with
  ``L_m = mean_i [lse_j (s * cos_m(a_i, c_j)) - s * cos_m(a_i, p_i)]`` over the
  candidates ``c`` = the positives then every hard negative of the batch,
  computed for all sizes at the cost of about one ``D``-wide similarity matmul
  (forward and backward); see :func:`nested_in_batch_softmax_per_dim`.

  Args:
    anchors: ``[B, D]``.
    positives: ``[B, D]``.
    dims: nested sizes in any order (e.g. sentence-transformers' ``[768, 512, 256]``).
    weights: ``w_m`` per size, aligned with ``dims`` as given; all ones by default.
    negatives: optional hard negatives ``[B, K, D]``.
    scale: inverse temperature ``> 0``.
    symmetric: the symmetric loss (MultipleNegativesSymmetricRankingLoss) at every size.

  Returns:
    A float32 scalar.

  Raises:
    ValueError: see :func:`nested_in_batch_softmax_per_dim`; bad weights.
  """
  nesting = Nesting(tuple(dims), None if weights is None else tuple(weights))
  per_dim = nested_in_batch_softmax_per_dim(anchors, positives, nesting.dims,
                                            negatives=negatives, scale=scale,
                                            symmetric=symmetric)
  return jnp.sum(jnp.asarray(nesting.weights, jnp.float32) * per_dim)
