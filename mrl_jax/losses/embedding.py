"""Embedding losses for sentence-embedding training, as pure functions of arrays.

Every loss here takes ``[B, D]`` embedding arrays (and, where named, ``[B, K, D]``
hard negatives) and returns a float32 scalar. Each declares which of its
arguments are embeddings in its ``embedding_args`` attribute (argument names),
so that :func:`mrl_jax.losses.matryoshka` truncates exactly those and nothing
else (never a score matrix that happens to be ``[B, D]``-shaped).

Sources: sentence-transformers' ``MultipleNegativesRankingLoss``,
``MultipleNegativesSymmetricRankingLoss``, ``CoSENTLoss`` and ``MSELoss``
(``sentence_transformers/losses/*.py``); each docstring gives the formula.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mrl_jax.core import ops
from mrl_jax.core.checks import check_positive

NORM_EPS = 1e-12


def l2_normalize(x: jax.Array, *, eps: float = NORM_EPS) -> jax.Array:
  """``x / ||x||`` along the last axis, computed in float32, scale-safe.

  Each row is first divided by its ``max |x|`` (:func:`mrl_jax.core.ops.max_abs_scale`,
  a constant to autodiff; exact, as the result does not depend on it), so rows
  scaled by 1e20 or 1e-25 give the same unit rows instead of overflowing or
  underflowing float32's squares.

  Args:
    x: ``[..., D]``.
    eps: floor of the rescaled norm (``> 0``; a nonzero rescaled row has norm >= 1),
      so that an all-zero row stays zero, with a finite gradient, instead of NaN.

  Returns:
    ``[..., D]`` float32 rows of unit norm (zero rows stay zero).
  """
  check_positive("eps", eps)
  x = jnp.asarray(x, jnp.float32)
  x = x / ops.max_abs_scale(x)
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def check_pair(a: jax.Array, b: jax.Array, name_a: str, name_b: str) -> None:
  """Both ``[B, D]`` with the same shape (no silent broadcasting), else ``ValueError``."""
  if np.ndim(a) != 2 or np.shape(b) != np.shape(a):
    raise ValueError(
        f"{name_a} and {name_b} must both be [B, D] with the same shape, "
        f"got {np.shape(a)} and {np.shape(b)}")


def candidates(positives: jax.Array, negatives: jax.Array | None) -> jax.Array:
  """``positives [B, D]`` then every hard negative ``[B, K, D]``: ``[B * (1 + K), D]``.

  Row ``B + i * K + k`` is ``negatives[i, k]``. Every candidate is scored against
  every anchor, so their order does not change any loss below.
  """
  if negatives is None:
    return positives
  batch, dim = np.shape(positives)
  if np.ndim(negatives) != 3 or np.shape(negatives)[0] != batch or np.shape(negatives)[2] != dim:
    raise ValueError(
        f"negatives must be [B, K, D] = [{batch}, K, {dim}], got {np.shape(negatives)}")
  negatives = jnp.asarray(negatives)
  return jnp.concatenate([jnp.asarray(positives), negatives.reshape(-1, dim)], axis=0)


def softmax_ce_diagonal(logits: jax.Array) -> jax.Array:
  """``[..., B, N]`` logits whose row ``i`` has its target at column ``i`` -> ``[...]``.

  ``mean_i (logsumexp_j logits[i, j] - logits[i, i])``.
  """
  batch = logits.shape[-2]
  target = jnp.diagonal(logits[..., :batch], axis1=-2, axis2=-1)
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - target, axis=-1)


def _scaled_cosines(anchors: jax.Array, positives: jax.Array, negatives: jax.Array | None,
                    scale: float) -> jax.Array:
  """``scale * cos(a_i, c_j)`` ``[B, B (1 + K)]``; candidates: positives, then negatives."""
  check_pair(anchors, positives, "anchors", "positives")
  check_positive("scale", scale)
  cands = l2_normalize(candidates(positives, negatives))
  return scale * (l2_normalize(anchors) @ cands.T)


def in_batch_softmax(
    anchors: jax.Array,
    positives: jax.Array,
    negatives: jax.Array | None = None,
    *,
    scale: float = 20.0,
) -> jax.Array:
  """In-batch negatives softmax (sentence-transformers' MultipleNegativesRankingLoss).

  With ``cos`` the cosine similarity, ``s = scale`` and candidates ``c`` = every
  positive of the batch followed by every hard negative of the batch,
  ``L = mean_i [ log sum_j exp(s * cos(a_i, c_j)) - s * cos(a_i, p_i) ]``:
  cross-entropy of each anchor against its own positive, the other positives
  and ALL hard negatives of the batch acting as negatives (sentence-transformers'
  convention; the order of the candidates does not change the value).

  Args:
    anchors: ``[B, D]``.
    positives: ``[B, D]``; ``positives[i]`` is the match of ``anchors[i]``.
    negatives: optional hard negatives ``[B, K, D]``, shared by every anchor.
    scale: inverse temperature ``s > 0``.

  Returns:
    A float32 scalar.

  Raises:
    ValueError: mismatched shapes, or ``scale`` not positive and finite.
  """
  logits = _scaled_cosines(anchors, positives, negatives, scale)
  return softmax_ce_diagonal(logits)


def symmetric_in_batch_softmax(
    anchors: jax.Array,
    positives: jax.Array,
    negatives: jax.Array | None = None,
    *,
    scale: float = 20.0,
) -> jax.Array:
  """Symmetric in-batch softmax (sentence-transformers' MultipleNegativesSymmetricRankingLoss).

  With ``S = scale * cos(a, c)`` over the candidates ``c`` of
  :func:`in_batch_softmax` (the positives, then every hard negative of the batch):

  ``L = 1/2 * mean_i [lse_j S[i, j] - S[i, i]] + 1/2 * mean_j [lse_i S[i, j] - S[j, j]]``

  where the first (anchor -> candidate) term is :func:`in_batch_softmax` and the
  second (positive -> anchor) term runs over the positive columns ``j < B``
  only: hard negatives take part in the forward direction only. This is
  ``(forward_loss + backward_loss) / 2`` of sentence-transformers'
  ``MultipleNegativesSymmetricRankingLoss.forward``
  (``sentence_transformers/losses/MultipleNegativesSymmetricRankingLoss.py``:
  ``backward_loss`` is the cross-entropy of ``scores[:, :B].T``); without
  negatives it is the CLIP loss.

  Args:
    anchors: ``[B, D]``.
    positives: ``[B, D]``.
    negatives: optional hard negatives ``[B, K, D]`` (forward direction only).
    scale: inverse temperature ``> 0``.

  Returns:
    A float32 scalar.

  Raises:
    ValueError: mismatched shapes, or ``scale`` not positive and finite.
  """
  logits = _scaled_cosines(anchors, positives, negatives, scale)
  batch = logits.shape[0]
  return 0.5 * (softmax_ce_diagonal(logits) + softmax_ce_diagonal(logits[:, :batch].T))


def cosent(a: jax.Array, b: jax.Array, scores: jax.Array, *, scale: float = 20.0) -> jax.Array:
  """CoSENT: every pair ranked above another by its gold score must have a larger cosine.

  With ``s_i = scale * cos(a_i, b_i)`` and gold scores ``y``:
  ``L = log(1 + sum_{i, j : y_i > y_j} exp(s_j - s_i))`` (sentence-transformers' CoSENTLoss).

  Args:
    a: ``[B, D]``.
    b: ``[B, D]``.
    scores: ``[B]`` gold similarity of each pair (any real scale, finite: a NaN
      score is never ranked, so it would drop its pairs silently).
    scale: inverse temperature ``> 0``.

  Returns:
    A float32 scalar.

  Raises:
    ValueError: mismatched shapes, ``scores`` not ``[B]``, (concrete) scores
      with a NaN or inf, or a bad ``scale``.
  """
  check_pair(a, b, "a", "b")
  check_positive("scale", scale)
  if np.shape(scores) != (np.shape(a)[0],):
    raise ValueError(f"scores must be [B] = [{np.shape(a)[0]}], got shape {np.shape(scores)}")
  if not isinstance(scores, jax.core.Tracer):
    bad = np.flatnonzero(~np.isfinite(np.asarray(scores, np.float64)))
    if bad.size:
      raise ValueError(f"scores must be finite; {bad.size} are NaN/inf (first at index "
                       f"{bad[0]})")
  scores = jnp.asarray(scores, jnp.float32)
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

  Raises:
    ValueError: mismatched shapes.
  """
  check_pair(student, teacher, "student", "teacher")
  diff = jnp.asarray(student, jnp.float32) - jnp.asarray(teacher, jnp.float32)
  return jnp.mean(jnp.square(diff))


def layer_kl_divergence(
    layer: jax.Array, last: jax.Array, *, temperature: float,
) -> jax.Array:
  """KL from the last layer's embeddings to an earlier layer's, the last layer held fixed.

  With ``p = softmax(stop_gradient(last) / T)`` and ``q = softmax(layer / T)``
  over the embedding axis, ``KL = (1 / R) sum_r sum_d p_rd (log p_rd - log q_rd)``
  over the ``R`` rows (PyTorch's ``kl_div(log q, p, reduction="batchmean")``, as in
  sentence-transformers' AdaptiveLayerLoss). No gradient reaches ``last``: it is
  the teacher (sentence-transformers #3880 fixed the same).

  Args:
    layer: ``[..., D]`` embeddings of an earlier layer.
    last: ``[..., D]`` embeddings of the last layer, same shape.
    temperature: ``T > 0``.

  Returns:
    A float32 scalar.

  Raises:
    ValueError: different shapes, or ``temperature`` not positive and finite.
  """
  if np.shape(layer) != np.shape(last) or np.ndim(layer) < 1:
    raise ValueError(f"layer and last must have the same shape [..., D], got "
                     f"{np.shape(layer)} and {np.shape(last)}")
  check_positive("temperature", temperature)
  dim = np.shape(layer)[-1]
  log_p = jax.nn.log_softmax(jax.lax.stop_gradient(
      jnp.asarray(last, jnp.float32).reshape(-1, dim)) / temperature, axis=-1)
  log_q = jax.nn.log_softmax(jnp.asarray(layer, jnp.float32).reshape(-1, dim) / temperature,
                             axis=-1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q)) / log_p.shape[0]


in_batch_softmax.embedding_args = ("anchors", "positives", "negatives")
symmetric_in_batch_softmax.embedding_args = ("anchors", "positives", "negatives")
cosent.embedding_args = ("a", "b")
mse_distillation.embedding_args = ("student", "teacher")
