"""Semantic textual similarity per nested size: Spearman correlation of cosine scores.

The standard STS evaluation (sentence-transformers' ``EmbeddingSimilarityEvaluator``
with cosine similarity) at every Matryoshka size: truncate both embeddings to
their first ``m`` dims, L2-normalise, take the cosine of each pair, and
correlate the cosines with the gold scores by Spearman's rank correlation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mrl_jax.nesting import Nesting


def rankdata(x: np.ndarray) -> np.ndarray:
  """Ranks ``1..N`` of a 1-D array, ties given the mean of the ranks they span."""
  x = np.asarray(x)
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.arange(1, len(x) + 1)
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  sums = np.bincount(inverse, weights=ranks)
  return sums[inverse] / counts[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  """Spearman's rho: the Pearson correlation of the (tie-averaged) ranks of ``x`` and ``y``.

  ``rho = cov(r_x, r_y) / (std(r_x) * std(r_y))``; NaN when either is constant.
  """
  x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
  if x.shape != y.shape or len(x) < 2:
    raise ValueError(f"spearman needs two sequences of one length >= 2, got {x.shape}, {y.shape}")
  rx, ry = rankdata(x) - (len(x) + 1) / 2, rankdata(y) - (len(y) + 1) / 2
  denom = np.sqrt(np.sum(rx * rx) * np.sum(ry * ry))
  return float(np.sum(rx * ry) / denom) if denom > 0 else float("nan")


def cosine_per_dim(a: np.ndarray, b: np.ndarray, dims: Sequence[int]) -> np.ndarray:
  """``[M, N]``: ``cos(a_n[:m], b_n[:m])`` for each nested size, truncation before normalisation.

  Args:
    a: ``[N, D]`` embeddings of the first texts.
    b: ``[N, D]`` embeddings of the second texts.
    dims: nested sizes, strictly increasing, ``<= D``.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f"a and b must both be [N, D] with the same shape, got {a.shape}, {b.shape}")
  dims = Nesting(tuple(dims), embed_dim=a.shape[1]).dims
  out = []
  for m in dims:
    x, y = a[:, :m], b[:, :m]
    norms = np.maximum(np.linalg.norm(x, axis=1), 1e-12) * np.maximum(np.linalg.norm(y, axis=1),
                                                                     1e-12)
    out.append(np.sum(x * y, axis=1) / norms)
  return np.stack(out)


def spearman_per_dim(
    a: np.ndarray, b: np.ndarray, scores: np.ndarray, dims: Sequence[int],
) -> dict[int, float]:
  """Spearman's rho between gold ``scores [N]`` and the cosine of each pair, per nested size.

  Args:
    a: ``[N, D]`` embeddings of the first sentence of each pair.
    b: ``[N, D]`` embeddings of the second sentence.
    scores: ``[N]`` gold similarity scores.
    dims: nested sizes to evaluate.

  Returns:
    ``{m: rho_m}`` for every ``m`` in ``dims``.
  """
  scores = np.asarray(scores, np.float64)
  cos = cosine_per_dim(a, b, dims)
  if scores.shape != (cos.shape[1],):
    raise ValueError(f"scores must be [N] = [{cos.shape[1]}], got {scores.shape}")
  return {int(m): spearman(c, scores) for m, c in zip(dims, cos, strict=True)}
