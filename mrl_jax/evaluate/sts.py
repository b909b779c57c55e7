"""Semantic textual similarity per nested size: Spearman correlation of cosine scores.

The standard STS evaluation (sentence-transformers' ``EmbeddingSimilarityEvaluator``
with cosine similarity) at every Matryoshka size: truncate both embeddings to
their first ``m`` dims, L2-normalise, take the cosine of each pair, and
correlate the cosines with the gold scores by Spearman's rank correlation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.stats

from mrl_jax.core.nesting import Nesting


def spearman(x: np.ndarray, y: np.ndarray) -> float:
  """Spearman's rho of two samples: ``scipy.stats.spearmanr`` (ties get their mean rank).

  ``rho = cov(r_x, r_y) / (std(r_x) * std(r_y))`` with ``r`` the tie-averaged
  ranks. NaN (documented, not an error) when either sample is constant.

  Args:
    x: ``[N]`` finite numbers, ``N >= 2``.
    y: ``[N]`` finite numbers.

  Raises:
    ValueError: different lengths, ``N < 2``, or a NaN/inf in ``x`` or ``y``
      (ranking them would give a finite, meaningless rho).
  """
  x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
  if x.shape != y.shape or len(x) < 2:
    raise ValueError(f"spearman needs two sequences of one length >= 2, got {x.shape}, {y.shape}")
  for name, v in (("x", x), ("y", y)):
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
      raise ValueError(f"spearman: {name} has {bad.size} non-finite values (first at index "
                       f"{bad[0]}: {v[bad[0]]})")
  if np.all(x == x[0]) or np.all(y == y[0]):
    return float("nan")
  return float(scipy.stats.spearmanr(x, y).statistic)


def cosine_per_dim(a: np.ndarray, b: np.ndarray, dims: Sequence[int]) -> np.ndarray:
  """``[M, N]``: ``cos(a_n[:m], b_n[:m])`` for each nested size, truncation before normalisation.

  Args:
    a: ``[N, D]`` embeddings of the first texts.
    b: ``[N, D]`` embeddings of the second texts.
    dims: nested sizes, strictly increasing, ``<= D``.

  Raises:
    ValueError: shapes that differ or are not 2-D, bad ``dims``, or a NaN/inf
      in ``a`` or ``b`` (naming the first bad row).
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f"a and b must both be [N, D] with the same shape, got {a.shape}, {b.shape}")
  for name, x in (("a", a), ("b", b)):
    bad = np.flatnonzero(~np.all(np.isfinite(x), axis=1))
    if bad.size:
      raise ValueError(f"embeddings {name} have {bad.size} rows with NaN or inf (first: row "
                       f"{bad[0]}); refusing to score them")
  dims = Nesting(tuple(dims), embed_dim=a.shape[1]).dims
  out = []
  for m in dims:
    # float64 on the host: float32 rows of any finite scale (1e20, 1e-25) square safely
    x, y = np.asarray(a[:, :m], np.float64), np.asarray(b[:, :m], np.float64)
    norms = np.maximum(np.linalg.norm(x, axis=1), 1e-300) * np.maximum(np.linalg.norm(y, axis=1),
                                                                      1e-300)
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
    ``{m: rho_m}`` for every ``m`` in ``dims`` (NaN where the cosines are constant).

  Raises:
    ValueError: a NaN/inf gold score or embedding (see :func:`cosine_per_dim`),
      or ``scores`` not ``[N]``.
  """
  scores = np.asarray(scores, np.float64)
  cos = cosine_per_dim(a, b, dims)
  if scores.shape != (cos.shape[1],):
    raise ValueError(f"scores must be [N] = [{cos.shape[1]}], got {scores.shape}")
  bad = np.flatnonzero(~np.isfinite(scores))
  if bad.size:
    raise ValueError(f"gold scores have {bad.size} NaN/inf values (first at index {bad[0]}); "
                     "Spearman would rank them as numbers")
  return {int(m): spearman(c, scores) for m, c in zip(dims, cos, strict=True)}
