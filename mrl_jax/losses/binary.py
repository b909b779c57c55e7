"""Binary-aware nested terms: keep the sign bits of every Matryoshka prefix useful.

Vector engines store nested prefixes as sign bits (sentence-transformers'
``ubinary``, :func:`mrl_jax.core.ops.quantize`); a model trained only with the float
loss gives no guarantee that those bits rank well. Two per-dim terms, added to the
nested loss with their own weights (``config.spread_out_weight`` /
``config.binary_weight`` of every task that trains embeddings: pairs,
classification, adaptor):

* :func:`spread_out_regularizer`: the global orthogonal regularizer of Zhang et al.
  2017 ("Learning Spread-out Local Feature Descriptors", eq. 4; used by
  jina-embeddings-v5 so that binary codes lose little), at every nested dim, on the
  non-matching pairs of a batch;
* a contrastive loss on a relaxed sign of every prefix (``tanh`` or sign with a
  straight-through estimator): :func:`binary_relaxed_in_batch_softmax` where rows
  come in (anchor, positive) pairs (the pairs task, the adaptor's query-document
  pairs), :func:`binary_relaxed_supervised_contrastive` where a mask says which rows
  match (classification: same label; the unsupervised adaptor: full-size neighbours).

Each returns ``[M]`` float32, one value per nested dim in ascending order (as
:func:`~mrl_jax.losses.nested_in_batch_softmax_per_dim`), and is pure and jittable;
:class:`BinaryAware` weights and sums them for a task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from mrl_jax.core import ops
from mrl_jax.core.checks import check_positive
from mrl_jax.core.nesting import Nesting
from mrl_jax.losses.embedding import check_pair, softmax_ce_diagonal

ESTIMATORS = ("tanh", "ste")


def _checked_dims(anchors, positives, dims) -> tuple[int, ...]:
  check_pair(anchors, positives, "anchors", "positives")
  if np.shape(anchors)[0] < 2:
    raise ValueError(f"anchors and positives need B >= 2 rows (the other rows are the "
                     f"non-matching pairs), got B = {np.shape(anchors)[0]}")
  return Nesting(tuple(dims), embed_dim=np.shape(anchors)[1]).dims


def _checked_mask(mask, batch: int, name: str) -> jax.Array:
  if np.shape(mask) != (batch, batch):
    raise ValueError(f"{name} must be [B, B] = [{batch}, {batch}], got {np.shape(mask)}")
  if not jnp.issubdtype(jnp.asarray(mask).dtype, jnp.bool_):
    raise ValueError(f"{name} must be a bool array, got dtype {jnp.asarray(mask).dtype}")
  return jnp.asarray(mask)


def spread_out_regularizer(anchors: jax.Array, positives: jax.Array,
                           dims: Sequence[int], *,
                           non_matching: jax.Array | None = None) -> jax.Array:
  """Global orthogonal regularizer (Zhang et al. 2017, eq. 4) at every nested dim: ``[M]``.

  At size ``m`` both sides are truncated to ``[:, :m]`` then L2-normalised
  (:func:`mrl_jax.core.ops.truncate_normalize`); the non-matching pairs ``N`` are
  the ``B (B - 1)`` pairs ``(a_i, p_j)``, ``i != j`` (default), or those where
  ``non_matching[i, j]`` is True; with inner products ``s_ij``:

  ``GOR_m = M1^2 + max(0, M2 - 1/m)``, ``M1 = mean_{(i, j) in N} s_ij``,
  ``M2 = mean_{(i, j) in N} s_ij^2`` (0 when ``N`` is empty).

  Two independent uniform unit vectors of ``R^m`` have ``E[s] = 0`` and
  ``E[s^2] = 1/m``: the term pushes non-matching descriptors to spread over the
  sphere like that, which keeps their sign bits apart.

  Args:
    anchors: ``[B, D]`` float embeddings (any scale), ``B >= 2``.
    positives: ``[B, D]``; ``positives[i]`` is the match of ``anchors[i]`` (pass the
      same array twice, with ``non_matching``, for one set of rows).
    dims: nested sizes in any order (sorted ascending), distinct, ``<= D``.
    non_matching: optional ``[B, B]`` bool: which pairs ``(i, j)`` count (e.g.
      different labels); default every ``i != j``.

  Returns:
    ``[M]`` float32, in ascending order of ``dims``.

  Raises:
    ValueError: mismatched shapes, ``B < 2``, bad ``dims``, a ``non_matching`` that
      is not ``[B, B]`` bool.
  """
  dims = _checked_dims(anchors, positives, dims)
  batch = np.shape(anchors)[0]
  if non_matching is None:
    off = 1.0 - jnp.eye(batch, dtype=jnp.float32)
  else:
    off = _checked_mask(non_matching, batch, "non_matching").astype(jnp.float32)
  pairs = jnp.maximum(jnp.sum(off), 1.0)
  out = []
  for m in dims:
    s = ops.truncate_normalize(anchors, m) @ ops.truncate_normalize(positives, m).T
    m1 = jnp.sum(s * off) / pairs
    m2 = jnp.sum(jnp.square(s) * off) / pairs
    out.append(jnp.square(m1) + jnp.maximum(0.0, m2 - 1.0 / m))  # an empty N gives 0
  return jnp.stack(out).astype(jnp.float32)


def relaxed_sign(v: jax.Array, estimator: str) -> jax.Array:
  """A differentiable stand-in for the sign bits ``+1 if v > 0 else -1``.

  * ``"tanh"``: ``tanh(v)``;
  * ``"ste"``: forward exactly ``where(v > 0, 1, -1)`` (the bits of
    :func:`mrl_jax.core.ops.quantize`'s ``ubinary``), backward the straight-through
    estimator of ``hardtanh``: gradient 1 where ``|v| <= 1``, 0 outside (Hubara et al.
    2016, "Binarized Neural Networks").

  Raises:
    ValueError: ``estimator`` not in :data:`ESTIMATORS`.
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator={estimator!r}; choose one of {ESTIMATORS}")
  if estimator == "tanh":
    return jnp.tanh(v)
  clipped = jnp.clip(v, -1.0, 1.0)
  return clipped + jax.lax.stop_gradient(jnp.where(v > 0, 1.0, -1.0) - clipped)


def binary_relaxed_in_batch_softmax(anchors: jax.Array, positives: jax.Array,
                                    dims: Sequence[int], *, scale: float = 20.0,
                                    temperature: float = 1.0,
                                    estimator: str = "tanh") -> jax.Array:
  """In-batch softmax (MultipleNegativesRankingLoss) on relaxed sign codes, per dim: ``[M]``.

  At size ``m`` each row's prefix is truncated, L2-normalised and multiplied by
  ``sqrt(m)`` (unit RMS per coordinate, so ``temperature`` means the same at every
  dim): ``u = sqrt(m) x[:m] / ||x[:m]||``; its relaxed code is
  ``b = relaxed_sign(u / temperature)`` (:func:`relaxed_sign`). The similarity of
  two codes is ``<b_a, b_p> / m`` in ``[-1, 1]``: for sign codes exactly
  ``1 - 2 * hamming / m`` (the ranking of a Hamming scan over ``ubinary`` codes),
  and the ``tanh`` codes tend to it as ``temperature -> 0``. Then, as
  :func:`~mrl_jax.losses.in_batch_softmax`,
  ``L_m = mean_i [lse_j (scale * sim(a_i, p_j)) - scale * sim(a_i, p_i)]``.

  Args:
    anchors: ``[B, D]`` float embeddings, ``B >= 2``.
    positives: ``[B, D]``; ``positives[i]`` is the match of ``anchors[i]``.
    dims: nested sizes in any order (sorted ascending), distinct, ``<= D``.
    scale: inverse temperature of the softmax, ``> 0``.
    temperature: of the relaxation, ``> 0`` (smaller: closer to the sign).
    estimator: ``"tanh"`` or ``"ste"`` (sign forward, straight-through backward).

  Returns:
    ``[M]`` float32, in ascending order of ``dims``.

  Raises:
    ValueError: mismatched shapes, ``B < 2``, bad ``dims``, ``scale``,
      ``temperature`` or ``estimator``.
  """
  dims = _checked_dims(anchors, positives, dims)
  _check_relaxation(scale, temperature, estimator)
  out = []
  for m in dims:
    sims = (relaxed_code(anchors, m, temperature, estimator)
            @ relaxed_code(positives, m, temperature, estimator).T / m)
    out.append(softmax_ce_diagonal(scale * sims))
  return jnp.stack(out).astype(jnp.float32)


def _check_relaxation(scale: float, temperature: float, estimator: str) -> None:
  check_positive("scale", scale)
  check_positive("temperature", temperature)
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator={estimator!r}; choose one of {ESTIMATORS}")


def relaxed_code(x: jax.Array, m: int, temperature: float, estimator: str) -> jax.Array:
  """``relaxed_sign(sqrt(m) x[:, :m] / ||x[:, :m]|| / temperature)``: ``[B, D] -> [B, m]``.

  The relaxed sign code of each row's ``m``-prefix (unit RMS per coordinate before
  the relaxation, so ``temperature`` means the same at every dim).
  """
  return relaxed_sign(np.sqrt(m) * ops.truncate_normalize(x, m) / temperature, estimator)


def binary_relaxed_supervised_contrastive(embeddings: jax.Array, positive_mask: jax.Array,
                                          dims: Sequence[int], *, scale: float = 20.0,
                                          temperature: float = 1.0,
                                          estimator: str = "tanh") -> jax.Array:
  """Supervised contrastive loss on relaxed sign codes, per nested dim: ``[M]``.

  Khosla et al. 2020 ("Supervised Contrastive Learning", eq. 2, ``L_out``) with the
  code similarity of :func:`binary_relaxed_in_batch_softmax`,
  ``sim_ij = <b_i, b_j> / m`` (``1 - 2 hamming / m`` for sign codes): with
  ``P(i) = {j != i : positive_mask[i, j]}``,

  ``L_m = mean_{i : P(i) != {}} -1/|P(i)| sum_{p in P(i)}
  [scale * sim_ip - lse_{j != i} (scale * sim_ij)]``.

  Rows without a positive in the batch are left out of the mean (0 when no row
  has one). With labels, ``positive_mask = labels[:, None] == labels[None, :]``
  (:func:`same_label_mask`).

  Args:
    embeddings: ``[B, D]`` float embeddings, ``B >= 2``.
    positive_mask: ``[B, B]`` bool, which rows match (the diagonal is ignored).
    dims: nested sizes in any order (sorted ascending), distinct, ``<= D``.
    scale: inverse temperature of the softmax, ``> 0``.
    temperature: of the relaxation, ``> 0``.
    estimator: ``"tanh"`` or ``"ste"``.

  Returns:
    ``[M]`` float32, in ascending order of ``dims``.

  Raises:
    ValueError: ``embeddings`` not ``[B, D]`` with ``B >= 2``, ``positive_mask`` not
      ``[B, B]`` bool, bad ``dims``, ``scale``, ``temperature`` or ``estimator``.
  """
  dims = _checked_dims(embeddings, embeddings, dims)
  _check_relaxation(scale, temperature, estimator)
  batch = np.shape(embeddings)[0]
  others = ~jnp.eye(batch, dtype=bool)
  positive = _checked_mask(positive_mask, batch, "positive_mask") & others
  count = jnp.sum(positive, axis=1)
  has = count > 0
  out = []
  for m in dims:
    code = relaxed_code(embeddings, m, temperature, estimator)
    logits = jnp.where(others, scale * (code @ code.T) / m, -jnp.inf)
    log_prob = logits - jax.nn.logsumexp(logits, axis=1, keepdims=True)
    per_row = -jnp.sum(jnp.where(positive, log_prob, 0.0), axis=1) / jnp.maximum(count, 1)
    out.append(jnp.sum(jnp.where(has, per_row, 0.0)) / jnp.maximum(jnp.sum(has), 1))
  return jnp.stack(out).astype(jnp.float32)


def same_label_mask(labels: jax.Array) -> jax.Array:
  """``labels [B]`` int -> ``[B, B]`` bool, True where two rows share a label."""
  chex.assert_rank(labels, 1)
  return labels[:, None] == labels[None, :]


@dataclasses.dataclass(frozen=True)
class BinaryAware:
  """The binary-aware terms of one task, weighted: ``sum_m w_m (a GOR_m + b B_m)``.

  ``GOR_m`` is :func:`spread_out_regularizer` (weight ``a = spread_out_weight``),
  ``B_m`` the relaxed-code contrastive loss (weight ``b = binary_weight``),
  ``w_m`` the nesting weights. Build it with :meth:`create`, which returns None
  when both weights are 0 so that a task then computes nothing extra (its loss
  stays bit-identical to the float loss). Every dim counts each step.

  Attributes:
    dims: nested sizes, ascending.
    weights: ``w_m`` per size.
    spread_out_weight, binary_weight: ``>= 0``.
    scale, temperature, estimator: of the relaxed-code softmax.
  """

  dims: tuple[int, ...]
  weights: tuple[float, ...]
  spread_out_weight: float
  binary_weight: float
  scale: float = 20.0
  temperature: float = 1.0
  estimator: str = "tanh"

  @classmethod
  def create(cls, dims: Sequence[int], weights: Sequence[float], *, spread_out_weight: float,
             binary_weight: float, scale: float = 20.0, temperature: float = 1.0,
             estimator: str = "tanh") -> BinaryAware | None:
    """The terms, or None when both weights are 0.

    Raises:
      ValueError: a negative weight, a bad ``scale``, ``temperature`` or ``estimator``,
        ``weights`` not one per dim.
    """
    for name, value in (("spread_out_weight", spread_out_weight),
                        ("binary_weight", binary_weight)):
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name}={value!r} must be a number >= 0")
    _check_relaxation(scale, temperature, estimator)
    if len(weights) != len(dims):
      raise ValueError(f"{len(weights)} weights for {len(dims)} dims")
    if spread_out_weight == 0 and binary_weight == 0:
      return None
    return cls(tuple(int(m) for m in dims), tuple(float(w) for w in weights),
               float(spread_out_weight), float(binary_weight), float(scale),
               float(temperature), estimator)

  def _total(self, spread, binary):
    w = jnp.asarray(self.weights, jnp.float32)
    total, metrics = jnp.zeros((), jnp.float32), {}
    if self.spread_out_weight > 0:
      per_dim = spread()
      total = total + self.spread_out_weight * jnp.sum(w * per_dim)
      metrics["spread_out_per_dim"] = jax.lax.stop_gradient(per_dim)
    if self.binary_weight > 0:
      per_dim = binary()
      total = total + self.binary_weight * jnp.sum(w * per_dim)
      metrics["binary_loss_per_dim"] = jax.lax.stop_gradient(per_dim)
    return total, metrics

  def pairs(self, anchors: jax.Array, positives: jax.Array) -> tuple[jax.Array, dict]:
    """Rows in (anchor, positive) pairs ``[B, D]`` each: GOR on ``i != j``,
    :func:`binary_relaxed_in_batch_softmax`.

    Returns:
      ``(float32 scalar, metrics)``; ``metrics`` holds ``spread_out_per_dim`` /
      ``binary_loss_per_dim`` ``[M]`` (gradient stopped) for the terms that are on.
    """
    return self._total(
        lambda: spread_out_regularizer(anchors, positives, self.dims),
        lambda: binary_relaxed_in_batch_softmax(
            anchors, positives, self.dims, scale=self.scale, temperature=self.temperature,
            estimator=self.estimator))

  def grouped(self, embeddings: jax.Array, positive_mask: jax.Array) -> tuple[jax.Array, dict]:
    """One set of rows ``[B, D]`` and which match ``[B, B]`` bool: GOR on the pairs that
    do not (nor ``i == j``), :func:`binary_relaxed_supervised_contrastive`.

    Returns:
      As :meth:`pairs`.
    """
    batch = np.shape(embeddings)[0]
    non_matching = ~_checked_mask(positive_mask, batch, "positive_mask") & ~jnp.eye(
        batch, dtype=bool)
    return self._total(
        lambda: spread_out_regularizer(embeddings, embeddings, self.dims,
                                       non_matching=non_matching),
        lambda: binary_relaxed_supervised_contrastive(
            embeddings, positive_mask, self.dims, scale=self.scale,
            temperature=self.temperature, estimator=self.estimator))
