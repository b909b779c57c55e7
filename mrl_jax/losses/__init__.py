"""Nested (Matryoshka) losses, as pure functions over arrays.

The Matryoshka objective is a weighted **sum** over the nested sizes of an
ordinary loss computed on each prefix: ``L = sum_m c_m * L(head_m(z[:, :m]), y)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from mrl_jax.nesting import Nesting
from mrl_jax.prefix_matmul import prefix_matmul_nt


def softmax_cross_entropy_per_dim(
    logits: jax.Array,
    labels: jax.Array,
    *,
    label_smoothing: float = 0.0,
) -> jax.Array:
  """Per-example cross-entropy at every nested size.

  With ``eps = label_smoothing`` the target is ``(1 - eps) * onehot(y) + eps / C``
  (PyTorch's ``nn.CrossEntropyLoss(label_smoothing=eps)``), and
  ``CE[m, b] = -sum_c target[b, c] * log_softmax(logits[m, b])[c]``.
  The log-softmax is computed in float32 whatever the logits' dtype.

  Args:
    logits: ``[M, B, C]`` (any float dtype, e.g. bfloat16).
    labels: ``[B]`` integer class ids.
    label_smoothing: ``eps`` in ``[0, 1)``.

  Returns:
    ``[M, B]`` float32 losses.
  """
  chex.assert_rank(logits, 3)
  chex.assert_rank(labels, 1)
  chex.assert_equal(logits.shape[1], labels.shape[0])
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[None, :, None].astype(jnp.int32), axis=-1)[..., 0]
  if not label_smoothing:
    return nll
  smooth = -jnp.mean(logp, axis=-1)
  return (1.0 - label_smoothing) * nll + label_smoothing * smooth


def nested_softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    weights: jax.Array | None = None,
    label_smoothing: float = 0.0,
    mask: jax.Array | None = None,
) -> jax.Array:
  """The Matryoshka classification loss: ``sum_m w_m * mean_b CE(logits[m, b], y_b)``.

  The same value as the PyTorch reference's ``Matryoshka_CE_Loss`` over
  ``nn.CrossEntropyLoss(label_smoothing=...)``: a sum over nested sizes, a mean
  over the batch.

  Args:
    logits: ``[M, B, C]``.
    labels: ``[B]`` integer class ids.
    weights: ``[M]`` relative importance per size; all ones when ``None``.
    label_smoothing: see :func:`softmax_cross_entropy_per_dim`.
    mask: optional ``[B]`` 0/1 weights (padding rows get 0); the batch mean is
      then over the unmasked rows.

  Returns:
    A float32 scalar.
  """
  per_dim = nested_loss_per_dim(logits, labels, label_smoothing=label_smoothing, mask=mask)
  if weights is None:
    return jnp.sum(per_dim)
  weights = jnp.asarray(weights, jnp.float32)
  chex.assert_shape(weights, per_dim.shape)
  return jnp.sum(weights * per_dim)


def nested_loss_per_dim(
    logits: jax.Array,
    labels: jax.Array,
    *,
    label_smoothing: float = 0.0,
    mask: jax.Array | None = None,
) -> jax.Array:
  """Batch-mean cross-entropy at each nested size, ``[M, B, C] -> [M]`` float32."""
  ce = softmax_cross_entropy_per_dim(logits, labels, label_smoothing=label_smoothing)
  if mask is None:
    return jnp.mean(ce, axis=-1)
  mask = jnp.asarray(mask, jnp.float32)
  chex.assert_shape(mask, ce.shape[1:])
  return jnp.sum(ce * mask, axis=-1) / jnp.maximum(jnp.sum(mask), 1.0)


# -----------------------------------------------------------------------------
# Embedding losses (sentence-embedding training) and the Matryoshka wrapper.
#
# Every embedding loss below is a pure function of embedding arrays that returns
# a float32 scalar; :func:`matryoshka` turns any of them into its nested version,
# :func:`nested_in_batch_softmax` is the fused nested version of
# :func:`in_batch_softmax`, and :func:`adaptive_layer` / :func:`matryoshka_2d`
# add the layer axis (2-D Matryoshka).

EmbeddingLoss = Callable[..., jax.Array]

_NORM_EPS = 1e-12


def l2_normalize(x: jax.Array, *, eps: float = _NORM_EPS) -> jax.Array:
  """``x / max(||x||, eps)`` along the last axis, computed in float32.

  Args:
    x: ``[..., D]``.
    eps: floor of the norm, so that an all-zero row stays zero instead of NaN.

  Returns:
    ``[..., D]`` float32 rows of unit norm (zero rows stay zero).
  """
  x = jnp.asarray(x, jnp.float32)
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _check_pair(a: jax.Array, b: jax.Array, name_a: str, name_b: str) -> None:
  if a.ndim != 2 or b.shape != a.shape:
    raise ValueError(
        f"{name_a} and {name_b} must both be [B, D] with the same shape, "
        f"got {a.shape} and {b.shape}")


def _candidates(positives: jax.Array, negatives: jax.Array | None) -> jax.Array:
  """``positives [B, D]`` then every hard negative ``[B, K, D]``: ``[B * (1 + K), D]``."""
  if negatives is None:
    return positives
  batch, dim = positives.shape
  if negatives.ndim != 3 or negatives.shape[0] != batch or negatives.shape[2] != dim:
    raise ValueError(f"negatives must be [B, K, D] = [{batch}, K, {dim}], got {negatives.shape}")
  return jnp.concatenate([positives, negatives.reshape(-1, dim)], axis=0)


def _softmax_ce_diagonal(logits: jax.Array) -> jax.Array:
  """``[..., B, N]`` logits whose row ``i`` has its target at column ``i`` -> ``[...]``.

  ``mean_i (logsumexp_j logits[i, j] - logits[i, i])``.
  """
  batch = logits.shape[-2]
  target = jnp.diagonal(logits[..., :batch], axis1=-2, axis2=-1)
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target, axis=-1)


def in_batch_softmax(
    anchors: jax.Array,
    positives: jax.Array,
    negatives: jax.Array | None = None,
    *,
    scale: float = 20.0,
) -> jax.Array:
  """In-batch negatives softmax (sentence-transformers' MultipleNegativesRankingLoss).

  With ``cos`` the cosine similarity, ``s = scale`` and candidates ``c`` = every
  positive of the batch followed by every hard negative,
  ``L = mean_i [ log sum_j exp(s * cos(a_i, c_j)) - s * cos(a_i, p_i) ]``:
  cross-entropy of each anchor against its own positive, the other positives
  and all hard negatives acting as negatives.

  Args:
    anchors: ``[B, D]``.
    positives: ``[B, D]``; ``positives[i]`` is the match of ``anchors[i]``.
    negatives: optional hard negatives ``[B, K, D]``, shared by every anchor.
    scale: inverse temperature ``s``.

  Returns:
    A float32 scalar.
  """
  _check_pair(anchors, positives, "anchors", "positives")
  cands = l2_normalize(_candidates(positives, negatives))
  logits = scale * (l2_normalize(anchors) @ cands.T)
  return _softmax_ce_diagonal(logits)


def symmetric_in_batch_softmax(
    anchors: jax.Array,
    positives: jax.Array,
    *,
    scale: float = 20.0,
) -> jax.Array:
  """CLIP-style symmetric in-batch softmax (MultipleNegativesSymmetricRankingLoss).

  With ``S[i, j] = scale * cos(a_i, p_j)``:
  ``L = 1/2 * mean_i [lse_j S[i, j] - S[i, i]] + 1/2 * mean_j [lse_i S[i, j] - S[j, j]]``,
  the anchor-to-positive and positive-to-anchor cross-entropies averaged.

  Args:
    anchors: ``[B, D]``.
    positives: ``[B, D]``.
    scale: inverse temperature.

  Returns:
    A float32 scalar.
  """
  _check_pair(anchors, positives, "anchors", "positives")
  logits = scale * (l2_normalize(anchors) @ l2_normalize(positives).T)
  return 0.5 * (_softmax_ce_diagonal(logits) + _softmax_ce_diagonal(logits.T))


def cosent(a: jax.Array, b: jax.Array, scores: jax.Array, *, scale: float = 20.0) -> jax.Array:
  """CoSENT: every pair ranked above another by its gold score must have a larger cosine.

  With ``s_i = scale * cos(a_i, b_i)`` and gold scores ``y``:
  ``L = log(1 + sum_{i, j : y_i > y_j} exp(s_j - s_i))``.

  Args:
    a: ``[B, D]``.
    b: ``[B, D]``.
    scores: ``[B]`` gold similarity of each pair (any real scale).
    scale: inverse temperature.

  Returns:
    A float32 scalar.
  """
  _check_pair(a, b, "a", "b")
  scores = jnp.asarray(scores, jnp.float32)
  chex.assert_shape(scores, (a.shape[0],))
  s = scale * jnp.sum(l2_normalize(a) * l2_normalize(b), axis=-1)
  diff = s[None, :] - s[:, None]  # [i, j] = s_j - s_i
  ranked = scores[:, None] > scores[None, :]
  terms = jnp.where(ranked, diff, -jnp.inf).reshape(-1)
  return jax.nn.logsumexp(jnp.concatenate([jnp.zeros((1,), jnp.float32), terms]))


def mse_distillation(student: jax.Array, teacher: jax.Array) -> jax.Array:
  """Mean squared error to a teacher's embeddings (sentence-transformers' MSELoss).

  ``L = mean_{b, d} (student[b, d] - teacher[b, d])^2``.

  Args:
    student: ``[B, D]``.
    teacher: ``[B, D]``, the target embeddings (no gradient flows to a constant).

  Returns:
    A float32 scalar.
  """
  _check_pair(student, teacher, "student", "teacher")
  diff = jnp.asarray(student, jnp.float32) - jnp.asarray(teacher, jnp.float32)
  return jnp.mean(jnp.square(diff))


def _is_float_array(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def _named_slots(spec: tuple[int | str, ...], args: tuple, kwargs: dict, what: str,
                 ) -> tuple[list[int], list[str]]:
  """Split an explicit argument spec into positions and keyword names present in this call."""
  pos = [i for i in spec if isinstance(i, int)]
  names = [k for k in spec if isinstance(k, str)]
  missing = [i for i in pos if i >= len(args)] + [k for k in names if k not in kwargs]
  if missing:
    raise ValueError(f"{what} {missing} are not in this call")
  return pos, names


def _embedding_slots(
    args: tuple, kwargs: dict, embedding_args: tuple[int | str, ...] | None,
) -> tuple[int, list[int], list[str]]:
  """Which arguments of a base-loss call are embeddings, and their size ``D``.

  Auto-detection (``embedding_args=None``): the first positional argument is an
  embedding ``[..., D]``; so is every floating array argument (positional or
  keyword) with at least 2 axes whose last axis is ``D`` (positives ``[B, D]``,
  hard negatives ``[B, K, D]``, distillation teachers ``[B, D]``). Scores ``[B]``
  and Python scalars are passed through untouched.
  """
  if embedding_args is not None:
    pos, names = _named_slots(embedding_args, args, kwargs, "embedding_args")
    chosen = [args[i] for i in pos] + [kwargs[k] for k in names]
  else:
    if not args or not _is_float_array(args[0]) or args[0].ndim < 2:
      raise ValueError(
          "the first positional argument of a Matryoshka loss must be an embedding "
          f"[B, D] array, got {getattr(args[0], 'shape', args[0]) if args else 'nothing'}")
    dim = args[0].shape[-1]
    is_emb = lambda x: _is_float_array(x) and x.ndim >= 2 and x.shape[-1] == dim
    pos = [i for i, x in enumerate(args) if is_emb(x)]
    names = [k for k, x in kwargs.items() if is_emb(x)]
    chosen = [args[i] for i in pos] + [kwargs[k] for k in names]
  dims = {x.shape[-1] for x in chosen}
  if len(dims) != 1:
    raise ValueError(f"embedding arguments disagree on their size D: {sorted(dims)}")
  return dims.pop(), pos, names


def _truncated_call(base_loss: EmbeddingLoss, m: int, normalize: bool, pos: list[int],
                    names: list[str], args: tuple, kwargs: dict) -> jax.Array:
  """``base_loss`` on every embedding argument cut to its first ``m`` dims (then normalised)."""
  cut = lambda x: l2_normalize(x[..., :m]) if normalize else x[..., :m]
  args = tuple(cut(x) if i in pos else x for i, x in enumerate(args))
  kwargs = {k: cut(x) if k in names else x for k, x in kwargs.items()}
  out = base_loss(*args, **kwargs)
  if jnp.ndim(out) != 0:
    raise ValueError(f"the base loss must return a scalar, got shape {jnp.shape(out)}")
  return jnp.asarray(out, jnp.float32)


def sample_nested_indices(
    rng: jax.Array, num_dims: int, k: int, *, always_include_largest: bool = False,
) -> jax.Array:
  """``k`` distinct indices into a nesting list of ``num_dims`` sizes, drawn inside jit.

  Uniform without replacement; with ``always_include_largest`` the last index
  ``num_dims - 1`` is always one of them (the other ``k - 1`` drawn from the
  rest). Static output shape ``[k]`` int32, so a jitted step never recompiles.
  """
  if not 1 <= k <= num_dims:
    raise ValueError(f"cannot sample {k} of {num_dims} nested sizes")
  if always_include_largest:
    rest = jax.random.permutation(rng, num_dims - 1)[: k - 1]
    return jnp.concatenate([rest, jnp.full((1,), num_dims - 1)]).astype(jnp.int32)
  return jax.random.permutation(rng, num_dims)[:k].astype(jnp.int32)


def matryoshka(
    base_loss: EmbeddingLoss,
    dims: Sequence[int],
    weights: Sequence[float] | None = None,
    *,
    n_dims_per_step: int | None = None,
    always_include_largest: bool = False,
    normalize: bool = True,
    embedding_args: Sequence[int | str] | None = None,
) -> EmbeddingLoss:
  """The Matryoshka version of any embedding loss (sentence-transformers' MatryoshkaLoss).

  ``L(e_1, ..., y) = sum_{m in dims} w_m * base_loss(n(e_1[..., :m]), ..., y)``
  with ``n`` the L2 normalisation (identity when ``normalize=False``): every
  embedding argument, teachers included, is first truncated to its first ``m``
  dims and only then renormalised. The wrapper never runs an encoder: the
  embeddings are computed once by the caller and every size is a slice of them.

  With ``n_dims_per_step=k`` the returned loss takes a keyword ``rng`` and sums
  over ``k`` sizes drawn without replacement at each call (inside jit, with
  static shapes: one ``lax.switch`` over the sizes per drawn slot, so only the
  drawn sizes are computed and nothing recompiles), ``sum_{m in S} w_m L_m``,
  unscaled as in sentence-transformers. It works with every base loss.

  Args:
    base_loss: ``base_loss(*args, **kwargs) -> scalar``; its embedding arguments
      are ``[..., D]`` arrays.
    dims: nested sizes, strictly increasing, ``dims[-1] <= D`` (validated by
      :class:`~mrl_jax.nesting.Nesting`).
    weights: ``w_m`` per size; all ones by default.
    n_dims_per_step: ``None`` for every size at each step, or ``k`` in
      ``[1, len(dims)]`` sizes drawn per step.
    always_include_largest: with ``n_dims_per_step``, always draw the largest size.
    normalize: L2-renormalise each truncated embedding before the base loss.
    embedding_args: positions (ints) and/or keyword names (strs) of the
      arguments to truncate. ``None`` detects them: the first positional
      argument and every floating array with >= 2 axes and the same last-axis
      size ``D`` (so ``[B]`` scores pass through, ``[B, D]`` teachers and
      ``[B, K, D]`` negatives are truncated).

  Returns:
    ``loss(*args, **kwargs) -> float32 scalar`` with ``base_loss``'s arguments,
    plus a required keyword ``rng`` when ``n_dims_per_step`` is set.
  """
  nesting = Nesting(tuple(dims), None if weights is None else tuple(weights))
  dims = nesting.dims
  weight_values = nesting.weights
  if n_dims_per_step is not None and (
      isinstance(n_dims_per_step, bool) or not isinstance(n_dims_per_step, int)
      or not 1 <= n_dims_per_step <= len(dims)):
    raise ValueError(
        f"n_dims_per_step must be None or an int in [1, {len(dims)}], got {n_dims_per_step!r}")
  if always_include_largest and n_dims_per_step is None:
    raise ValueError("always_include_largest only applies with n_dims_per_step")
  if embedding_args is not None:
    embedding_args = tuple(embedding_args)

  def prepare(args, kwargs):
    dim, pos, names = _embedding_slots(args, kwargs, embedding_args)
    if dims[-1] > dim:
      raise ValueError(f"nesting dim {dims[-1]} exceeds the embedding size D={dim}")
    return functools.partial(_truncated_call, base_loss, pos=pos, names=names, args=args,
                             kwargs=kwargs, normalize=normalize)

  if n_dims_per_step is None:

    def loss(*args, **kwargs):
      call = prepare(args, kwargs)
      w = jnp.asarray(weight_values, jnp.float32)
      return sum(w[i] * call(m=m) for i, m in enumerate(dims))

  else:

    def loss(*args, rng: jax.Array, **kwargs):
      call = prepare(args, kwargs)
      w = jnp.asarray(weight_values, jnp.float32)
      picked = sample_nested_indices(rng, len(dims), n_dims_per_step,
                                     always_include_largest=always_include_largest)
      branches = [functools.partial(call, m=m) for m in dims]
      per_slot = jax.lax.map(lambda i: w[i] * jax.lax.switch(i, branches), picked)
      return jnp.sum(per_slot)

  loss.__name__ = f"matryoshka_{getattr(base_loss, '__name__', 'loss')}"
  return loss


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


def nested_in_batch_softmax_per_dim(
    anchors: jax.Array,
    positives: jax.Array,
    dims: Sequence[int],
    *,
    negatives: jax.Array | None = None,
    scale: float = 20.0,
    symmetric: bool = False,
) -> jax.Array:
  """:func:`in_batch_softmax` at every nested size, fused: ``[M]`` float32 losses.

  ``loss[k] = in_batch_softmax(a[:, :m_k], p[:, :m_k], n[..., :m_k])`` (or
  :func:`symmetric_in_batch_softmax` when ``symmetric``; hard negatives are then
  used in the anchor-to-candidate direction only). Instead of one similarity
  matmul per size, the dot products of every prefix come from one blocked matmul
  and a cumulative sum (:func:`~mrl_jax.prefix_matmul.prefix_matmul_nt`), and the
  prefix norms from cumulative block sums of squares:
  ``cos_m(a_i, c_j) = (sum_{d < m} a_id c_jd) / (||a_i[:m]|| * ||c_j[:m]||)``.

  Args:
    anchors: ``[B, D]``.
    positives: ``[B, D]``.
    dims: nested sizes, strictly increasing, ``dims[-1] <= D``.
    negatives: optional hard negatives ``[B, K, D]``.
    scale: inverse temperature.
    symmetric: average with the positive-to-anchor cross-entropy (CLIP-style).

  Returns:
    ``[M]`` float32.
  """
  _check_pair(anchors, positives, "anchors", "positives")
  dims = Nesting(tuple(dims), embed_dim=anchors.shape[1]).dims
  if symmetric and negatives is not None:
    raise ValueError("symmetric=True takes no hard negatives")
  if isinstance(scale, (int, float)) and not scale > 0:
    raise ValueError(f"scale must be positive, got {scale!r}")
  a = jnp.asarray(anchors, jnp.float32)
  c = jnp.asarray(_candidates(positives, negatives), jnp.float32)
  dots = prefix_matmul_nt(a, c, dims)  # [M, B, N]
  return _cosine_softmax_ce(dots, _prefix_sq_norms(a, dims), _prefix_sq_norms(c, dims),
                            jnp.asarray(scale, jnp.float32), symmetric)


def _cosine_logits(dots, sq_a, sq_c, scale):
  """Cosine logits ``s * dots / (||a|| ||c||)`` and the inverse norms ``[M, B]``, ``[M, N]``."""
  floor = _NORM_EPS * _NORM_EPS
  inv_a = jax.lax.rsqrt(jnp.maximum(sq_a, floor))
  inv_c = jax.lax.rsqrt(jnp.maximum(sq_c, floor))
  return (scale * dots) * inv_a[:, :, None] * inv_c[:, None, :], inv_a, inv_c


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _cosine_softmax_ce(dots, sq_a, sq_c, scale, symmetric: bool) -> jax.Array:
  """Per-size in-batch cross-entropy ``[M]`` from prefix dot products and squared norms.

  The backward is written by hand: with ``G = dL/dlogits`` (softmax minus the
  target, per row and, when ``symmetric``, per column) and ``H = G * logits``,
  ``dL/ddots = G * s / (||a|| ||c||)``, ``dL/d||a||^2 = -sum_n H / (2 ||a||^2)``
  (the same over rows for ``c``) and ``dL/ds = sum H / s``: one pass over the
  ``[M, B, N]`` logits instead of autodiff's several.
  """
  return _cosine_softmax_ce_fwd(dots, sq_a, sq_c, scale, symmetric)[0]


def _cosine_softmax_ce_fwd(dots, sq_a, sq_c, scale, symmetric):
  logits, _, _ = _cosine_logits(dots, sq_a, sq_c, scale)
  batch = logits.shape[1]
  diag = jnp.diagonal(logits[:, :, :batch], axis1=1, axis2=2)  # [M, B]
  lse_rows = jax.nn.logsumexp(logits, axis=2)  # [M, B]
  per_dim = jnp.mean(lse_rows - diag, axis=1)
  lse_cols = None
  if symmetric:  # then N == B
    lse_cols = jax.nn.logsumexp(logits, axis=1)
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
    grad = grad + (jnp.exp(logits - lse_cols[:, None, :]) - target) * per_row
  h = grad * logits
  floor = _NORM_EPS * _NORM_EPS
  d_sq_a = jnp.where(sq_a > floor, -0.5 * jnp.square(inv_a) * jnp.sum(h, axis=2), 0.0)
  d_sq_c = jnp.where(sq_c > floor, -0.5 * jnp.square(inv_c) * jnp.sum(h, axis=1), 0.0)
  d_dots = grad * (scale * inv_a)[:, :, None] * inv_c[:, None, :]
  return d_dots, d_sq_a, d_sq_c, jnp.sum(h) / scale


_cosine_softmax_ce.defvjp(_cosine_softmax_ce_fwd, _cosine_softmax_ce_bwd)


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

  Same value and gradients as the unfused wrapper, with
  ``L_m = mean_i [lse_j (s * cos_m(a_i, c_j)) - s * cos_m(a_i, p_i)]`` computed
  for all sizes at the cost of about one ``D``-wide similarity matmul (forward
  and backward); see :func:`nested_in_batch_softmax_per_dim`.

  Args:
    anchors: ``[B, D]``.
    positives: ``[B, D]``.
    dims: nested sizes, strictly increasing, ``dims[-1] <= D``.
    weights: ``w_m`` per size; all ones by default.
    negatives: optional hard negatives ``[B, K, D]``.
    scale: inverse temperature.
    symmetric: use the symmetric (CLIP-style) loss at every size.

  Returns:
    A float32 scalar.
  """
  nesting = Nesting(tuple(dims), None if weights is None else tuple(weights))
  per_dim = nested_in_batch_softmax_per_dim(anchors, positives, nesting.dims,
                                            negatives=negatives, scale=scale,
                                            symmetric=symmetric)
  return jnp.sum(jnp.asarray(nesting.weights, jnp.float32) * per_dim)


def layer_kl_divergence(
    layer: jax.Array, last: jax.Array, *, temperature: float,
) -> jax.Array:
  """KL from the last layer's embeddings to an earlier layer's, the last layer held fixed.

  With ``p = softmax(stop_gradient(last) / T)`` and ``q = softmax(layer / T)``
  over the embedding axis, ``KL = (1 / R) sum_r sum_d p_rd (log p_rd - log q_rd)``
  over the ``R`` rows (PyTorch's ``kl_div(log q, p, reduction="batchmean")``).
  No gradient reaches ``last``: it is the teacher.

  Args:
    layer: ``[..., D]`` embeddings of an earlier layer.
    last: ``[..., D]`` embeddings of the last layer, same shape.
    temperature: ``T > 0``.

  Returns:
    A float32 scalar.
  """
  chex.assert_equal_shape([layer, last])
  dim = layer.shape[-1]
  log_p = jax.nn.log_softmax(jax.lax.stop_gradient(
      jnp.asarray(last, jnp.float32).reshape(-1, dim)) / temperature, axis=-1)
  log_q = jax.nn.log_softmax(jnp.asarray(layer, jnp.float32).reshape(-1, dim) / temperature,
                             axis=-1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q)) / log_p.shape[0]


def _layer_slots(args: tuple, kwargs: dict, layer_args: tuple[int | str, ...] | None,
                 ) -> tuple[int, list[int], list[str]]:
  """Which arguments carry a leading layer axis ``[L, ...]``, and ``L``.

  Auto-detection: the first positional argument is per-layer ``[L, B, D]``; so
  is every floating array argument with >= 3 axes, leading size ``L`` and last
  size ``D``. Pass ``layer_args`` when a non-layer argument could match that.
  """
  if not args or not _is_float_array(args[0]) or args[0].ndim < 3:
    raise ValueError(
        "the first positional argument of a 2-D Matryoshka loss must be per-layer "
        f"embeddings [L, B, D], got {getattr(args[0], 'shape', None) if args else 'nothing'}")
  num_layers, dim = args[0].shape[0], args[0].shape[-1]
  if layer_args is not None:
    pos, names = _named_slots(layer_args, args, kwargs, "layer_args")
    for x in [args[i] for i in pos] + [kwargs[k] for k in names]:
      if x.shape[0] != num_layers:
        raise ValueError(f"per-layer arguments disagree on L: {x.shape[0]} vs {num_layers}")
    return num_layers, pos, names
  is_layered = lambda x: (_is_float_array(x) and x.ndim >= 3 and x.shape[0] == num_layers
                          and x.shape[-1] == dim)
  pos = [i for i, x in enumerate(args) if is_layered(x)]
  names = [k for k, x in kwargs.items() if is_layered(x)]
  return num_layers, pos, names


def adaptive_layer(
    base_loss: EmbeddingLoss,
    *,
    n_layers_per_step: int | None = 1,
    last_layer_weight: float = 1.0,
    prior_layers_weight: float = 1.0,
    kl_div_weight: float = 1.0,
    kl_temperature: float = 0.3,
    layer_args: Sequence[int | str] | None = None,
    base_loss_takes_rng: bool = False,
) -> EmbeddingLoss:
  """A loss over every layer of an encoder (sentence-transformers' AdaptiveLayerLoss).

  The embedding arguments carry a leading layer axis ``[L, ...]`` (pooled
  embeddings after each Transformer layer; layer ``L - 1`` is the last). With
  ``S`` a set of ``k`` earlier layers drawn per step from ``{0, ..., L - 2}``
  (all of them when ``n_layers_per_step`` is ``None`` or ``>= L - 1``):

  ``L = last_layer_weight * base(e[L-1])
      + sum_{l in S} [ prior_layers_weight / ((1 + l) * |S|) * base(e[l])
                       + kl_div_weight * T * KL(e[L-1] -> e[l]) ]``

  where ``KL`` is :func:`layer_kl_divergence` at temperature ``T =
  kl_temperature`` over the rows of every per-layer argument, with the last
  layer as a stop-gradient teacher (``kl_temperature = 0`` disables it).
  Layers are drawn inside jit with static shapes.

  Args:
    base_loss: an embedding loss on one layer's arguments (e.g. a
      :func:`matryoshka` loss).
    n_layers_per_step: ``k >= 1`` earlier layers per step, or ``None`` for all.
    last_layer_weight: weight of the last layer's loss.
    prior_layers_weight: weight of the earlier layers' losses.
    kl_div_weight: weight of the KL terms.
    kl_temperature: ``T >= 0``; ``0`` turns the KL terms off.
    layer_args: positions / keyword names of the per-layer arguments; ``None``
      detects them (see :func:`_layer_slots`).
    base_loss_takes_rng: pass each call of ``base_loss`` its own ``rng``
      (needed when it samples nested sizes).

  Returns:
    ``loss(*args, rng=None, **kwargs) -> float32 scalar``; ``rng`` is required
    when layers are sampled or ``base_loss_takes_rng``.
  """
  if n_layers_per_step is not None and (
      isinstance(n_layers_per_step, bool) or not isinstance(n_layers_per_step, int)
      or n_layers_per_step < 1):
    raise ValueError(f"n_layers_per_step must be None or a positive int, got {n_layers_per_step!r}")
  for name, value in (("last_layer_weight", last_layer_weight),
                      ("prior_layers_weight", prior_layers_weight),
                      ("kl_div_weight", kl_div_weight), ("kl_temperature", kl_temperature)):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
      raise ValueError(f"{name} must be a non-negative number, got {value!r}")
  if layer_args is not None:
    layer_args = tuple(layer_args)

  def loss(*args, rng: jax.Array | None = None, **kwargs):
    num_layers, pos, names = _layer_slots(args, kwargs, layer_args)
    num_prior = num_layers - 1
    k = num_prior if n_layers_per_step is None else min(n_layers_per_step, num_prior)
    sampled = k < num_prior
    if rng is None and (base_loss_takes_rng or sampled):
      raise ValueError("this 2-D Matryoshka loss samples layers or sizes: pass rng=")
    layer_rng = last_rng = layer_keys = None
    if rng is not None:
      layer_rng, last_rng, keys_rng = jax.random.split(rng, 3)
      layer_keys = jax.random.split(keys_rng, max(k, 1))

    def at(select):
      """The call's arguments with every per-layer argument replaced by ``select(x)``."""
      new_args = tuple(select(jnp.asarray(x)) if i in pos else x for i, x in enumerate(args))
      new_kwargs = {n: select(jnp.asarray(x)) if n in names else x for n, x in kwargs.items()}
      return new_args, new_kwargs

    def base(call_args, call_kwargs, key):
      extra = {"rng": key} if base_loss_takes_rng else {}
      return jnp.asarray(base_loss(*call_args, **call_kwargs, **extra), jnp.float32)

    last_args, last_kwargs = at(lambda x: x[-1])
    total = last_layer_weight * base(last_args, last_kwargs, last_rng)
    if k == 0:
      return total
    if sampled:
      layers = jax.random.permutation(layer_rng, num_prior)[:k].astype(jnp.int32)
    else:
      layers = jnp.arange(num_prior, dtype=jnp.int32)
    teachers = [x[-1] for x in (*[args[i] for i in pos], *[kwargs[n] for n in names])]

    def one_layer(carry):
      layer, key = carry
      layer_args_, layer_kwargs = at(lambda x: x[layer])
      term = prior_layers_weight / ((1.0 + layer) * k) * base(layer_args_, layer_kwargs, key)
      if kl_temperature > 0:
        students = [layer_args_[i] for i in pos] + [layer_kwargs[n] for n in names]
        kl = layer_kl_divergence(
            jnp.concatenate([s.reshape(-1, s.shape[-1]) for s in students]),
            jnp.concatenate([t.reshape(-1, t.shape[-1]) for t in teachers]),
            temperature=kl_temperature)
        term = term + kl_div_weight * kl_temperature * kl
      return term

    return total + jnp.sum(jax.lax.map(one_layer, (layers, layer_keys)))

  loss.__name__ = f"adaptive_layer_{getattr(base_loss, '__name__', 'loss')}"
  return loss


def matryoshka_2d(
    base_loss: EmbeddingLoss,
    dims: Sequence[int],
    weights: Sequence[float] | None = None,
    *,
    n_layers_per_step: int | None = 1,
    n_dims_per_step: int | None = 1,
    last_layer_weight: float = 1.0,
    prior_layers_weight: float = 1.0,
    kl_div_weight: float = 1.0,
    kl_temperature: float = 0.3,
    normalize: bool = True,
    layer_args: Sequence[int | str] | None = None,
    embedding_args: Sequence[int | str] | None = None,
) -> EmbeddingLoss:
  """2-D Matryoshka (sentence-transformers' Matryoshka2dLoss): nested sizes x layers.

  ``adaptive_layer(matryoshka(base_loss, dims, weights, n_dims_per_step=...), ...)``:
  at every used layer the loss is the :func:`matryoshka` sum over (sampled)
  nested sizes; see :func:`adaptive_layer` for the layer terms. The defaults
  (one layer and one size per step) are the 2DMSE paper's.

  Args:
    base_loss: an embedding loss on one layer's, full-size arguments.
    dims, weights, n_dims_per_step, normalize, embedding_args: as in :func:`matryoshka`.
    n_layers_per_step, last_layer_weight, prior_layers_weight, kl_div_weight,
    kl_temperature, layer_args: as in :func:`adaptive_layer`.

  Returns:
    ``loss(*args, rng, **kwargs) -> float32 scalar`` over ``[L, ...]`` embeddings.
  """
  nested = matryoshka(base_loss, dims, weights, n_dims_per_step=n_dims_per_step,
                      normalize=normalize, embedding_args=embedding_args)
  return adaptive_layer(
      nested, n_layers_per_step=n_layers_per_step, last_layer_weight=last_layer_weight,
      prior_layers_weight=prior_layers_weight, kl_div_weight=kl_div_weight,
      kl_temperature=kl_temperature, layer_args=layer_args,
      base_loss_takes_rng=n_dims_per_step is not None)
