"""Text-embedding metrics per nested dim: pair retrieval (recall@k, MRR@10) and STS Spearman.

Both evaluators see only an ``embed(texts) -> [N, D]`` function (big_vision's
evaluator pattern), so they serve a training run and an exported
:class:`~mrl_jax.inference.Encoder` alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from mrl_jax import sts
from mrl_jax.nesting import Nesting

Embed = Callable[[Sequence[str]], np.ndarray]


def pair_retrieval_per_dim(anchors: np.ndarray, positives: np.ndarray,
                           dims: Sequence[int]) -> dict[str, np.ndarray]:
  """Anchor-to-positive retrieval over ``N`` pairs at each nested size.

  For size ``m`` both sides are truncated to ``[:, :m]`` and then L2-normalised;
  anchor ``i`` ranks all ``N`` positives by cosine. Its rank is
  ``r_i = 1 + #{j != i : cos(a_i, p_j) >= cos(a_i, p_i)}`` (ties count
  against the match). Then

  * ``recall_at_k = mean_i [r_i <= k]`` (one relevant item per query, so this is
    also the hit rate / accuracy@k), for ``k`` in 1 and 10;
  * ``mrr_at_10 = mean_i (1 / r_i if r_i <= 10 else 0)`` (MS MARCO's MRR@10).

  Args:
    anchors: ``[N, D]``; positives: ``[N, D]``, ``positives[i]`` the match of ``anchors[i]``.
    dims: nested sizes ``<= D``.

  Returns:
    ``{"recall_at_1_per_dim", "recall_at_10_per_dim", "mrr_at_10_per_dim"}``,
    each ``[M]`` float64. Uses ``O(N^2)`` memory per size.

  Raises:
    ValueError: shapes differ, are not 2-D, or hold NaN/inf.
  """
  anchors, positives = np.asarray(anchors, np.float64), np.asarray(positives, np.float64)
  if anchors.ndim != 2 or anchors.shape != positives.shape or not len(anchors):
    raise ValueError(f"anchors and positives must both be [N, D] with N >= 1, got "
                     f"{anchors.shape} and {positives.shape}")
  if not (np.isfinite(anchors).all() and np.isfinite(positives).all()):
    raise ValueError("anchors/positives hold NaN or inf embeddings")
  dims = Nesting(tuple(dims), embed_dim=anchors.shape[1]).dims
  out: dict[str, list[float]] = {"recall_at_1_per_dim": [], "recall_at_10_per_dim": [],
                                 "mrr_at_10_per_dim": []}
  # float64 (above): float32 rows of any finite scale square safely; the floor only
  # keeps zero rows zero (a fixed 1e-12 would shrink rows scaled by 1e-25)
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
  for m in dims:
    sims = unit(anchors[:, :m]) @ unit(positives[:, :m]).T
    own = np.diagonal(sims)[:, None]
    beaten = (sims >= own) & ~np.eye(len(sims), dtype=bool)
    rank = 1 + beaten.sum(axis=1)
    out["recall_at_1_per_dim"].append(float(np.mean(rank <= 1)))
    out["recall_at_10_per_dim"].append(float(np.mean(rank <= 10)))
    out["mrr_at_10_per_dim"].append(float(np.mean(np.where(rank <= 10, 1.0 / rank, 0.0))))
  return {k: np.asarray(v) for k, v in out.items()}


def evaluate_text(embed: Embed, dims: Sequence[int], *,
                  scored: tuple[Sequence[str], Sequence[str], np.ndarray] | None = None,
                  pairs: tuple[Sequence[str], Sequence[str]] | None = None,
                  ) -> dict[str, np.ndarray]:
  """Spearman of cosine vs gold scores and pair retrieval, per nested size.

  Args:
    embed: texts -> raw (or normalised) embeddings ``[N, D]``; truncation and
      renormalisation per dim happen here.
    scored: ``(texts_a, texts_b, gold_scores [N])`` for Spearman.
    pairs: ``(anchors, positives)`` for :func:`pair_retrieval_per_dim`.

  Returns:
    ``spearman_per_dim`` ``[M]`` when ``scored`` is given, and the
    :func:`pair_retrieval_per_dim` entries when ``pairs`` is given.
  """
  out: dict[str, np.ndarray] = {}
  if scored is not None:
    texts_a, texts_b, scores = scored
    rho = sts.spearman_per_dim(embed(texts_a), embed(texts_b), scores, dims)
    out["spearman_per_dim"] = np.asarray([rho[m] for m in dims])
  if pairs is not None:
    out.update(pair_retrieval_per_dim(embed(pairs[0]), embed(pairs[1]), dims))
  return out
