"""Retrieval metrics over ranked neighbour lists, each defined once (the paper's).

Notation, for query ``q`` with label ``y_q`` and ranked neighbours ``n_1, n_2, ...``
(database ids, best first):

* ``rel_i = [label(n_i) == y_q]``, the relevance of rank ``i``;
* ``R_q = |{database items with label y_q}|``, the number of relevant items;
* ``P@i = (1/i) * sum_{j<=i} rel_j``, precision at rank ``i``.

Every function returns the mean over queries (float64) of the per-query value below.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAP_DENOMINATORS = ("k", "hits", "relevant")


def relevance(neighbors: np.ndarray, database_labels: np.ndarray,
              query_labels: np.ndarray) -> np.ndarray:
  """``rel[q, i] = database_labels[neighbors[q, i]] == query_labels[q]``.

  Args:
    neighbors: ``[Q, K]`` integer database ids, best first.
    database_labels: ``[N]`` integer labels.
    query_labels: ``[Q]`` integer labels.

  Returns:
    ``[Q, K]`` bool.
  """
  neighbors = np.asarray(neighbors)
  database_labels, query_labels = np.asarray(database_labels), np.asarray(query_labels)
  if neighbors.ndim != 2 or database_labels.ndim != 1 or query_labels.ndim != 1:
    raise ValueError(f"need neighbors [Q, K], database_labels [N], query_labels [Q]; got "
                     f"{neighbors.shape}, {database_labels.shape}, {query_labels.shape}")
  if neighbors.shape[0] != query_labels.shape[0]:
    raise ValueError(f"{neighbors.shape[0]} neighbour lists for {query_labels.shape[0]} queries")
  if not np.issubdtype(neighbors.dtype, np.integer):
    raise ValueError(f"neighbors must be integer ids, got {neighbors.dtype}")
  if neighbors.size and (neighbors.min() < 0 or neighbors.max() >= database_labels.shape[0]):
    raise ValueError(f"neighbour ids must be in [0, {database_labels.shape[0]})")
  return database_labels[neighbors] == query_labels[:, None]


def count_relevant(database_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
  """``R_q``: how many database items share each query's label. ``[Q]`` int."""
  db, qs = np.asarray(database_labels), np.asarray(query_labels)
  if db.ndim != 1 or qs.ndim != 1:
    raise ValueError(f"need database_labels [N] and query_labels [Q], got {db.shape} and "
                     f"{qs.shape}")
  classes, counts = np.unique(db, return_counts=True)
  pos = np.clip(np.searchsorted(classes, qs), 0, len(classes) - 1)
  return np.where(classes[pos] == qs, counts[pos], 0)


def _check_k(rel: np.ndarray, k: int) -> None:
  if rel.ndim != 2:
    raise ValueError(f"relevance must be [Q, K], got shape {rel.shape}")
  if rel.dtype != np.bool_ and not (np.issubdtype(rel.dtype, np.number)
                                    and np.all((rel == 0) | (rel == 1))):
    raise ValueError(f"relevance must be bool (or 0/1), got dtype {rel.dtype}")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be a positive int, got {k!r}")
  if k > rel.shape[1]:
    raise ValueError(f"k={k} is larger than the {rel.shape[1]} neighbours retrieved per query")


def one_nn_accuracy(rel: np.ndarray) -> float:
  """1-NN accuracy: ``mean_q rel_1`` (the nearest neighbour has the query's label)."""
  _check_k(rel, 1)
  return float(np.mean(rel[:, 0]))


def precision_at_k(rel: np.ndarray, k: int) -> float:
  """``precision@k = mean_q (1/k) * sum_{i<=k} rel_i``."""
  _check_k(rel, k)
  return float(np.mean(np.sum(rel[:, :k], axis=1) / k))


def recall_at_k(rel: np.ndarray, k: int, num_relevant: np.ndarray) -> float:
  """``recall@k = mean_q (1/R_q) * sum_{i<=k} rel_i``, over queries with ``R_q > 0``.

  The denominator is the number of database items of the query's class (not a
  constant). Queries whose class is absent from the database are left out of the
  mean; ``nan`` if every query is.

  Args:
    rel: ``[Q, K]`` relevance.
    k: cut-off, ``<= K``.
    num_relevant: ``[Q]`` ``R_q`` (:func:`count_relevant`).
  """
  _check_k(rel, k)
  num_relevant = _check_num_relevant(num_relevant, rel)
  keep = num_relevant > 0
  if not keep.any():
    return float("nan")
  return float(np.mean(np.sum(rel[keep, :k], axis=1) / num_relevant[keep]))


def average_precision_at_k(rel: np.ndarray, k: int, *, denominator: str = "k",
                           num_relevant: np.ndarray | None = None) -> np.ndarray:
  """Per-query ``AP@k = (1/den) * sum_{i<=k} P@i * rel_i``.

  ``denominator``:

  * ``"k"`` (default, the paper's "corrected" mAP): ``den = k``;
  * ``"hits"``: ``den = sum_{i<=k} rel_i``, the relevant items retrieved (AP = 0 with
    no hits);
  * ``"relevant"``: ``den = min(k, R_q)``, the most hits possible (needs
    ``num_relevant``; AP = 0 when ``R_q = 0``).

  Returns:
    ``[Q]`` float64.
  """
  _check_k(rel, k)
  if denominator not in MAP_DENOMINATORS:
    raise ValueError(f"denominator must be one of {MAP_DENOMINATORS}, got {denominator!r}")
  r = rel[:, :k].astype(np.float64)
  prec = np.cumsum(r, axis=1) / np.arange(1, k + 1)
  total = np.sum(prec * r, axis=1)
  if denominator == "k":
    den = np.full(r.shape[0], float(k))
  elif denominator == "hits":
    den = np.sum(r, axis=1)
  else:
    if num_relevant is None:
      raise ValueError("denominator='relevant' needs num_relevant")
    den = np.minimum(k, _check_num_relevant(num_relevant, rel)).astype(np.float64)
  return np.where(den > 0, total / np.where(den > 0, den, 1.0), 0.0)


def ndcg_at_k(rel: np.ndarray, k: int, num_relevant: np.ndarray) -> float:
  """``nDCG@k = mean_q DCG@k / IDCG@k`` with binary relevance, over queries with ``R_q > 0``.

  ``DCG@k = sum_{i<=k} rel_i / log2(i + 1)`` (rank ``i`` from 1) and
  ``IDCG@k = sum_{i<=min(k, R_q)} 1 / log2(i + 1)``, the DCG of a perfect ranking
  (Jarvelin and Kekalainen 2002; the BEIR / pytrec_eval ``ndcg_cut_k`` for 0/1
  relevance; sentence-transformers' ``InformationRetrievalEvaluator`` ``ndcg@k``).

  Args:
    rel: ``[Q, K]`` relevance of the ranked results, best first.
    k: cut-off, ``<= K``.
    num_relevant: ``[Q]`` ``R_q``, the relevant items of each query.

  Returns:
    The mean over queries with ``R_q > 0`` (float); ``nan`` if there are none.
  """
  _check_k(rel, k)
  num_relevant = np.asarray(num_relevant)
  if num_relevant.shape != (rel.shape[0],):
    raise ValueError(f"num_relevant must be [Q]={rel.shape[0]}, got {num_relevant.shape}")
  discount = 1.0 / np.log2(np.arange(2, k + 2))
  dcg = np.sum(rel[:, :k] * discount, axis=1)
  ideal = np.cumsum(discount)[np.clip(np.minimum(num_relevant, k) - 1, 0, k - 1)]
  keep = num_relevant > 0
  if not keep.any():
    return float("nan")
  return float(np.mean(dcg[keep] / ideal[keep]))


def _check_num_relevant(num_relevant, rel: np.ndarray) -> np.ndarray:
  num_relevant = np.asarray(num_relevant)
  if num_relevant.shape != (rel.shape[0],):
    raise ValueError(f"num_relevant must be [Q]={rel.shape[0]}, got {num_relevant.shape}")
  if not np.issubdtype(num_relevant.dtype, np.integer) or (num_relevant < 0).any():
    raise ValueError("num_relevant must hold non-negative ints (count_relevant)")
  return num_relevant


def overlap_at_k(ids: np.ndarray, reference_ids: np.ndarray, k: int) -> float:
  """Recall@k against a reference ranking (e.g. exact search): the mean over queries of
  ``|ids[q, :k] ∩ reference_ids[q, :k]| / k``.

  The usual quality figure of an approximate or cascaded search: 1.0 when it finds
  every one of the reference's top ``k``. Needs no labels.

  Args:
    ids: ``[Q, K]`` database ids, best first, ``K >= k``.
    reference_ids: ``[Q, K']`` ids of the reference search, ``K' >= k``.
    k: cut-off, a positive int.
  """
  ids, ref = np.asarray(ids), np.asarray(reference_ids)
  if ids.ndim != 2 or ref.ndim != 2 or ids.shape[0] != ref.shape[0]:
    raise ValueError(f"need ids [Q, K] and reference_ids [Q, K'], got {ids.shape} and "
                     f"{ref.shape}")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not (
      1 <= k <= min(ids.shape[1], ref.shape[1])):
    raise ValueError(f"k must be an int in [1, {min(ids.shape[1], ref.shape[1])}], got {k!r}")
  found = [len(np.intersect1d(a[:k], b[:k])) for a, b in zip(ids, ref, strict=True)]
  return float(np.mean(found)) / k


def map_at_k(rel: np.ndarray, k: int, *, denominator: str = "k",
             num_relevant: np.ndarray | None = None) -> float:
  """``mAP@k = mean_q AP@k`` (:func:`average_precision_at_k`; the paper divides by ``k``)."""
  return float(np.mean(average_precision_at_k(rel, k, denominator=denominator,
                                              num_relevant=num_relevant)))


def retrieval_metrics(neighbors: np.ndarray, database_labels: np.ndarray,
                      query_labels: np.ndarray, ks: Sequence[int] = (10, 25, 50, 100), *,
                      map_denominator: str = "k") -> dict[str, float]:
  """1-NN accuracy and precision/recall/mAP at each ``k`` in ``ks``.

  Args:
    neighbors: ``[Q, K]`` database ids, best first, ``K >= max(ks)``.
    database_labels: ``[N]``; query_labels: ``[Q]``.
    ks: cut-offs.
    map_denominator: see :func:`average_precision_at_k`.

  Returns:
    ``{"1nn": ..., "precision@k": ..., "recall@k": ..., "map@k": ...}`` (fractions).
  """
  if isinstance(ks, (str, bytes)):
    raise ValueError(f"ks must be positive ints, got {ks!r}")
  rel = relevance(neighbors, database_labels, query_labels)
  num_rel = count_relevant(database_labels, query_labels)
  out = {"1nn": one_nn_accuracy(rel)}
  for k in ks:
    out[f"precision@{k}"] = precision_at_k(rel, k)
    out[f"recall@{k}"] = recall_at_k(rel, k, num_rel)
    out[f"map@{k}"] = map_at_k(rel, k, denominator=map_denominator, num_relevant=num_rel)
  return out


def mrr_at_k(rel: np.ndarray, k: int) -> float:
  """``MRR@k = mean_q 1 / (rank of the first relevant item)``, 0 when none is in the top ``k``
  (MS MARCO's MRR@10 at ``k = 10``).

  Args:
    rel: ``[Q, K]`` relevance, best first.
    k: cut-off, ``<= K``.
  """
  _check_k(rel, k)
  hit = np.asarray(rel[:, :k], bool)
  first = np.argmax(hit, axis=1)
  return float(np.mean(np.where(hit.any(axis=1), 1.0 / (first + 1), 0.0)))
