"""Matryoshka-Adaptor losses: nested similarity preservation, reconstruction, ranking.

Source: Yoon, Sinha, Arik, Pfister, "Matryoshka-Adaptor: Unsupervised and Supervised
Tuning for Smaller Embedding Dimensions", EMNLP 2024 (arXiv:2407.20243), Sec. 3.
Notation: ``e_i`` the frozen model's embedding of corpus item ``i``, ``f`` the
adaptor (:class:`~mrl_jax.models.adaptor.MatryoshkaAdaptor`), ``M`` the nesting list,
``Sim`` the cosine similarity, and for a prefix size ``m``

  ``S[i, j] = Sim(e_i, e_j)``  (the full-size target, held fixed),
  ``S_m[i, j] = Sim(f(e_i)[:m], f(e_j)[:m])``  (truncate, then L2-normalise).

The paper's objectives (sums over the corpus):

* pairwise similarity loss ``L_pair = sum_i sum_j sum_m |S[i, j] - S_m[i, j]|``;
* top-k similarity loss ``L_topk = sum_i sum_{j in NN_k(i)} sum_m |S[i, j] - S_m[i, j]|``,
  ``NN_k(i)`` the ``k`` nearest neighbours of ``e_i`` in the full space;
* reconstruction loss ``L_rec = sum_i |f(e_i) - e_i|_1``, a regulariser;
* unsupervised: ``min_f L_topk + alpha * L_pair + beta * L_rec``;
* supervised, with (query, document) pairs: a ranking loss ``L_rank`` at every
  ``m`` plus the three above: ``min_f L_rank + alpha * L_topk + beta * L_pair +
  gamma * L_rec``.

Differences from the paper, on purpose:

* the sums over items become means over a mini-batch (over pairs ``i != j`` for
  ``L_pair``, over the ``B * k`` neighbour pairs for ``L_topk``, over rows for
  ``L_rec``), so that the weights do not depend on the batch size; a per-size
  weight ``w_m`` is allowed as in MRL (``sum_m w_m L_m``, all ones by default);
* ``NN_k(i)`` is taken within the batch (the ``k`` most similar other rows);
* ``gap="squared"`` optionally replaces ``|S - S_m|`` by ``(S - S_m)^2`` in
  ``L_pair`` and ``L_topk`` (default ``"abs"``, the paper's);
* ``L_rank`` is the in-batch softmax (:func:`mrl_jax.losses.nested_in_batch_softmax`,
  every other document of the batch a negative), not the paper's pairwise
  logistic loss over graded relevance (from Search-Adaptor, Yoon et al. 2023):
  the data here are positive (query, document) pairs with no grades;
* the weights are named after their loss (``topk_weight``, ``pair_weight``,
  ``reconstruction_weight``, ``rank_weight``) instead of the paper's ``alpha,
  beta, gamma`` whose meaning changes between its two objectives. The paper's
  unsupervised objective is ``topk_weight=1, pair_weight=alpha,
  reconstruction_weight=beta, rank_weight=0``; its supervised one is
  ``rank_weight=1, topk_weight=alpha, pair_weight=beta, reconstruction_weight=gamma``.

Every prefix is truncated, then normalised with :func:`mrl_jax.losses.l2_normalize`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mrl_jax.core.nesting import Nesting
from mrl_jax.losses import l2_normalize, nested_in_batch_softmax_per_dim


def _check_pair(embeddings: jax.Array, adapted: jax.Array) -> None:
  if embeddings.ndim != 2 or adapted.shape != embeddings.shape:
    raise ValueError("embeddings and adapted must both be [B, D] with the same shape, got "
                     f"{embeddings.shape} and {adapted.shape}")
  if embeddings.shape[0] < 2:
    raise ValueError(f"similarity losses need a batch of at least 2 rows, got {embeddings.shape}")


def _nesting(dims: Sequence[int], weights: Sequence[float] | None, embed_dim: int) -> Nesting:
  """The validated nesting list; ``ValueError`` for dims above ``D`` or out of order."""
  return Nesting(tuple(dims), None if weights is None else tuple(weights), embed_dim=embed_dim)


def cosine_similarity_matrix(x: jax.Array) -> jax.Array:
  """``Sim(x_i, x_j)`` for every pair of rows: ``n(x) @ n(x).T``, ``n`` = L2 normalisation.

  Args:
    x: ``[B, D]``.

  Returns:
    ``[B, B]`` float32 (a zero row has similarity 0 with everything).
  """
  x = l2_normalize(x)
  return x @ x.T


def nested_similarity_matrices(adapted: jax.Array, dims: Sequence[int]) -> jax.Array:
  """``S_m = Sim(f[:, :m], f[:, :m])`` at every nested size: ``[M, B, D] -> [M, B, B]``.

  Each prefix is truncated, then L2-normalised (:func:`cosine_similarity_matrix`).

  Args:
    adapted: ``[B, D]`` adapted embeddings ``f(e)``.
    dims: nested sizes, strictly increasing, ``<= D``.

  Returns:
    ``[M, B, B]`` float32.
  """
  if adapted.ndim != 2:
    raise ValueError(f"adapted must be [B, D], got shape {adapted.shape}")
  dims = _nesting(dims, None, adapted.shape[1]).dims
  return jnp.stack([cosine_similarity_matrix(adapted[:, :m]) for m in dims])


GAPS = ("abs", "squared")


def _similarity_gaps(embeddings, adapted, dims, gap: str = "abs"):
  """``S`` (gradient stopped) ``[B, B]`` and ``|S - S_m|`` (or its square) ``[M, B, B]``."""
  if gap not in GAPS:
    raise ValueError(f"gap must be one of {GAPS}, got {gap!r}")
  target = jax.lax.stop_gradient(cosine_similarity_matrix(embeddings))
  diff = target[None] - nested_similarity_matrices(adapted, dims)
  return target, jnp.abs(diff) if gap == "abs" else jnp.square(diff)


def _pair_per_dim(gaps: jax.Array) -> jax.Array:
  batch = gaps.shape[-1]
  off_diagonal = 1.0 - jnp.eye(batch, dtype=jnp.float32)
  return jnp.sum(gaps * off_diagonal, axis=(1, 2)) / (batch * (batch - 1))


def _neighbours(target: jax.Array, k: int) -> jax.Array:
  """``[B, k]`` ids of each row's ``k`` most similar other rows (self excluded)."""
  batch = target.shape[0]
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= batch - 1:
    raise ValueError(f"k must be an int in [1, B - 1] = [1, {batch - 1}], got {k!r}")
  masked = jnp.where(jnp.eye(batch, dtype=bool), -jnp.inf, target)
  return jax.lax.top_k(masked, k)[1]


def neighbour_mask(embeddings: jax.Array, k: int) -> jax.Array:
  """``[B, B]`` bool: ``[i, j]`` True for the ``k`` rows ``j != i`` most similar to row ``i``.

  ``NN_k(i)`` of the top-k loss (:func:`topk_similarity_loss_per_dim`), by full-size
  cosine, as a mask (not symmetric): the positives of the unsupervised adaptor's
  binary-aware terms.

  Args:
    embeddings: ``[B, D]``, ``B >= 2``.
    k: ``1 <= k <= B - 1``.

  Raises:
    ValueError: bad shape or ``k``.
  """
  _check_pair(embeddings, embeddings)
  ids = _neighbours(cosine_similarity_matrix(embeddings), k)
  batch = embeddings.shape[0]
  return jnp.zeros((batch, batch), bool).at[jnp.arange(batch)[:, None], ids].set(True)


def _topk_per_dim(target: jax.Array, gaps: jax.Array, k: int) -> jax.Array:
  ids = _neighbours(target, k)
  picked = jnp.take_along_axis(gaps, jnp.broadcast_to(ids, (gaps.shape[0], *ids.shape)), axis=2)
  return jnp.mean(picked, axis=(1, 2))


def pairwise_similarity_loss_per_dim(
    embeddings: jax.Array, adapted: jax.Array, dims: Sequence[int], *, gap: str = "abs",
) -> jax.Array:
  """Pairwise similarity preservation at every nested size (the paper's ``L_pair``).

  ``L_pair[m] = 1 / (B (B - 1)) * sum_{i != j} |S[i, j] - S_m[i, j]|`` with
  ``S = Sim(e_i, e_j)`` (full size, no gradient) and ``S_m = Sim(f_i[:m], f_j[:m])``
  (see the module docstring; the paper sums over all pairs).

  Args:
    embeddings: ``[B, D]`` frozen embeddings ``e`` (the target).
    adapted: ``[B, D]`` adapted embeddings ``f(e)``.
    dims: nested sizes, strictly increasing, ``<= D``.
    gap: ``"abs"`` (the paper's ``|S - S_m|``) or ``"squared"`` (``(S - S_m)^2``).

  Returns:
    ``[M]`` float32.

  Raises:
    ValueError: shapes differ or are not ``[B, D]`` with ``B >= 2``; bad ``dims``.
  """
  _check_pair(embeddings, adapted)
  return _pair_per_dim(_similarity_gaps(embeddings, adapted, dims, gap)[1])


def topk_similarity_loss_per_dim(
    embeddings: jax.Array, adapted: jax.Array, dims: Sequence[int], *, k: int = 10,
    gap: str = "abs",
) -> jax.Array:
  """Top-k (local) similarity preservation at every nested size (the paper's ``L_topk``).

  ``L_topk[m] = 1 / (B k) * sum_i sum_{j in NN_k(i)} |S[i, j] - S_m[i, j]|`` where
  ``NN_k(i)`` are the ``k`` rows ``j != i`` of the batch with the largest full-size
  similarity ``S[i, j]`` (ties broken by ``lax.top_k``).

  Args:
    embeddings: ``[B, D]`` frozen embeddings ``e``.
    adapted: ``[B, D]`` adapted embeddings ``f(e)``.
    dims: nested sizes, strictly increasing, ``<= D``.
    k: neighbours per row, ``1 <= k <= B - 1``.
    gap: ``"abs"`` (the paper's) or ``"squared"``.

  Returns:
    ``[M]`` float32.
  """
  _check_pair(embeddings, adapted)
  target, gaps = _similarity_gaps(embeddings, adapted, dims, gap)
  return _topk_per_dim(target, gaps, k)


def reconstruction_loss(embeddings: jax.Array, adapted: jax.Array) -> jax.Array:
  """The paper's reconstruction regulariser, batch mean: ``mean_i sum_d |f(e_i)_d - e_i,d|``.

  Keeps ``f(e)`` close to ``e`` (the L1 distance, as the paper's ``|f(ce_i) - ce_i|``).

  Args:
    embeddings: ``[B, D]``.
    adapted: ``[B, D]``.

  Returns:
    A float32 scalar.
  """
  _check_pair(embeddings, adapted)
  diff = jnp.asarray(adapted, jnp.float32) - jnp.asarray(embeddings, jnp.float32)
  return jnp.mean(jnp.sum(jnp.abs(diff), axis=-1))


def ranking_loss_per_dim(
    adapted_queries: jax.Array, adapted_documents: jax.Array, dims: Sequence[int], *,
    scale: float = 20.0,
) -> jax.Array:
  """Supervised ranking loss at every nested size: the in-batch softmax on adapted pairs.

  ``L_rank[m] = mean_i [log sum_j exp(s * Sim(q_i[:m], d_j[:m])) - s * Sim(q_i[:m], d_i[:m])]``
  with ``q = f(query embeddings)``, ``d = f(document embeddings)``, ``d_i`` the
  document paired with ``q_i``, and every other document of the batch a negative:
  :func:`mrl_jax.losses.nested_in_batch_softmax_per_dim` (the fused kernel). The
  paper uses a pairwise logistic ranking loss over graded relevance instead (see
  the module docstring).

  Args:
    adapted_queries: ``[P, D]``.
    adapted_documents: ``[P, D]``; row ``i`` is the match of query ``i``.
    dims: nested sizes, strictly increasing, ``<= D``.
    scale: inverse temperature ``s > 0``.

  Returns:
    ``[M]`` float32.
  """
  return nested_in_batch_softmax_per_dim(adapted_queries, adapted_documents, dims, scale=scale)


def adaptor_loss(
    embeddings: jax.Array,
    adapted: jax.Array,
    dims: Sequence[int],
    weights: Sequence[float] | None = None,
    *,
    k: int = 10,
    topk_weight: float = 1.0,
    pair_weight: float = 1.0,
    reconstruction_weight: float = 0.0,
    rank_weight: float = 1.0,
    adapted_queries: jax.Array | None = None,
    adapted_documents: jax.Array | None = None,
    scale: float = 20.0,
    gap: str = "abs",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The Matryoshka-Adaptor objective on one batch, and its parts.

  ``L = sum_m w_m (topk_weight * L_topk[m] + pair_weight * L_pair[m]
                   + rank_weight * L_rank[m]) + reconstruction_weight * L_rec``

  (each term as in :func:`topk_similarity_loss_per_dim`,
  :func:`pairwise_similarity_loss_per_dim`, :func:`ranking_loss_per_dim`,
  :func:`reconstruction_loss`; ``L_rank`` only when ``adapted_queries`` and
  ``adapted_documents`` are given). With ``topk_weight=1, pair_weight=alpha,
  reconstruction_weight=beta`` and no pairs this is the paper's unsupervised
  objective; for its supervised one see the module docstring. A weight of 0
  drops its term from the computation.

  Args:
    embeddings: ``[B, D]`` frozen corpus embeddings ``e`` (the targets).
    adapted: ``[B, D]`` ``f(e)``, the adaptor's output on ``embeddings``.
    dims: nested sizes, strictly increasing, ``<= D``.
    weights: ``w_m`` per size (positive); all ones by default.
    k: neighbours per row for ``L_topk``, ``1 <= k <= B - 1``.
    topk_weight, pair_weight, reconstruction_weight, rank_weight: non-negative.
    adapted_queries: ``[P, D]`` adapted query embeddings (supervised mode).
    adapted_documents: ``[P, D]`` adapted embeddings of their documents.
    scale: inverse temperature of ``L_rank``.
    gap: ``"abs"`` (the paper's ``|S - S_m|``) or ``"squared"`` in ``L_topk``, ``L_pair``.

  Returns:
    ``(loss, metrics)``: a float32 scalar, and float32 scalars ``"loss"``,
    ``"topk"``, ``"pair"``, ``"reconstruction"`` (and ``"rank"``), the unweighted
    ``sum_m w_m L[m]`` of each term, plus ``"topk/dim_m"``, ``"pair/dim_m"``
    (``"rank/dim_m"``) per nested size ``m``.

  Raises:
    ValueError: bad shapes, dims, ``k`` or weights; only one of the pair arrays.
  """
  _check_pair(embeddings, adapted)
  nesting = _nesting(dims, weights, embeddings.shape[1])
  for name, value in (("topk_weight", topk_weight), ("pair_weight", pair_weight),
                      ("reconstruction_weight", reconstruction_weight),
                      ("rank_weight", rank_weight)):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
      raise ValueError(f"{name} must be a non-negative number, got {value!r}")
  supervised = adapted_queries is not None or adapted_documents is not None
  if supervised and (adapted_queries is None or adapted_documents is None):
    raise ValueError("the ranking loss needs both adapted_queries and adapted_documents")
  if supervised and adapted_queries.shape[-1] != embeddings.shape[1]:
    raise ValueError(f"adapted_queries have {adapted_queries.shape[-1]} dims, "
                     f"the embeddings {embeddings.shape[1]}")
  w = jnp.asarray(nesting.weights, jnp.float32)
  metrics: dict[str, jax.Array] = {}
  total = jnp.zeros((), jnp.float32)
  terms = []
  if topk_weight or pair_weight:
    target, gaps = _similarity_gaps(embeddings, adapted, nesting.dims, gap)
    if topk_weight:
      terms.append(("topk", topk_weight, _topk_per_dim(target, gaps, k)))
    if pair_weight:
      terms.append(("pair", pair_weight, _pair_per_dim(gaps)))
  if supervised and rank_weight:
    terms.append(("rank", rank_weight,
                  ranking_loss_per_dim(adapted_queries, adapted_documents, nesting.dims,
                                       scale=scale)))
  for name, weight, per_dim in terms:
    value = jnp.sum(w * per_dim)
    total = total + weight * value
    metrics[name] = value
    for m, v in zip(nesting.dims, per_dim, strict=True):
      metrics[f"{name}/dim_{m}"] = v
  rec = reconstruction_loss(embeddings, adapted)
  metrics["reconstruction"] = rec
  if reconstruction_weight:
    total = total + reconstruction_weight * rec
  metrics["loss"] = total
  return total, metrics
