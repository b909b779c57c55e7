"""Evaluate dimension reductions of frozen embeddings: truncation, PCA, Matryoshka-Adaptor.

Every method maps embeddings ``[N, D]`` to a representation ``[N, D]`` whose prefix
``[:, :m]`` (truncated, then L2-normalised: the search of
:class:`~mrl_jax.evaluate.index.PrefixIndex`) is the ``m``-dimensional embedding:

* raw truncation: the identity;
* PCA (:func:`fit_pca`): the coordinates on the principal axes, sorted by
  variance, so that the ``m``-prefix is the projection on the top ``m`` axes
  (PCA to ``m`` dims for every ``m`` at once);
* the adaptor: ``f(e)`` (:class:`~mrl_jax.models.adaptor.MatryoshkaAdaptor`).

Two measures per nested size ``m`` (Yoon et al. 2024, arXiv:2407.20243, evaluate
retrieval at reduced sizes; the unsupervised measure below needs no labels):

* :func:`neighbor_recall`: ``recall@k`` of the full-size exact cosine neighbours,
  ``mean_q |N_k^m(q) & N_k^D(q)| / k``, ``N_k^m(q)`` the ``k`` nearest database items
  of query ``q`` by the cosine of ``m``-prefixes, ``N_k^D`` those of the original
  embeddings at full size; the query itself is excluded from both lists;
* :func:`pair_metrics` (supervised): ``recall@k`` and ``nDCG@k`` of held-out
  (query, document) pairs, binary relevance.

``recall@k`` is :func:`mrl_jax.evaluate.metrics.recall_at_k`, ``nDCG@k``
:func:`mrl_jax.evaluate.metrics.ndcg_at_k`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from mrl_jax.core.nesting import Nesting
from mrl_jax.evaluate.index import PrefixIndex
from mrl_jax.evaluate.metrics import ndcg_at_k, recall_at_k

Transform = Callable[[np.ndarray], np.ndarray]


# -- input validation -------------------------------------------------------------------


def check_embeddings(x, name: str = "embeddings", *, embed_dim: int | None = None) -> np.ndarray:
  """``x`` as a float32 ``[N, D]`` numpy array, or a ``ValueError`` saying what is wrong.

  Args:
    x: array-like ``[N, D]`` of floats.
    name: the argument's name, for the message.
    embed_dim: the required ``D``, if known.

  Raises:
    ValueError: not 2-D, empty, not floating point, the wrong ``D``, or rows with
      NaN or infinite values (their ids are listed, the first 10).
  """
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{name} must be [N, D], got shape {x.shape}")
  if x.shape[0] < 1 or x.shape[1] < 1:
    raise ValueError(f"{name} is empty: shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):  # bfloat16 too
    raise ValueError(f"{name} must be floating point, got {x.dtype}")
  if embed_dim is not None and x.shape[1] != embed_dim:
    raise ValueError(f"{name} has D={x.shape[1]}, expected {embed_dim}")
  bad = np.flatnonzero(~np.all(np.isfinite(x), axis=1))
  if bad.size:
    shown = ", ".join(str(i) for i in bad[:10]) + (", ..." if bad.size > 10 else "")
    raise ValueError(f"{name} has {bad.size} rows with NaN or infinite values: rows {shown}")
  return x.astype(np.float32, copy=False)


def check_dims(dims: Sequence[int], embed_dim: int) -> tuple[int, ...]:
  """``dims`` as strictly increasing ints in ``[1, embed_dim]``, else ``ValueError``."""
  return Nesting(tuple(dims), embed_dim=embed_dim).dims


def check_pairs(pairs, num_queries: int, num_documents: int) -> np.ndarray:
  """``pairs`` as an int64 ``[P, 2]`` array of (query id, document id), checked in range.

  Raises:
    ValueError: not ``[P, 2]`` integers, empty, or ids outside ``[0, num_queries)``
      / ``[0, num_documents)`` (the first offending rows are named).
  """
  pairs = np.asarray(pairs)
  if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.shape[0] < 1:
    raise ValueError(f"pairs must be [P, 2] (query id, document id), got shape {pairs.shape}")
  if not np.issubdtype(pairs.dtype, np.integer):
    raise ValueError(f"pairs must be integer ids, got {pairs.dtype}")
  for col, n, what in ((0, num_queries, "query"), (1, num_documents, "document")):
    bad = np.flatnonzero((pairs[:, col] < 0) | (pairs[:, col] >= n))
    if bad.size:
      raise ValueError(f"pairs rows {bad[:10].tolist()} have {what} ids "
                       f"{pairs[bad[:10], col].tolist()} outside [0, {n})")
  return pairs.astype(np.int64)


# -- PCA ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PCA:
  """Principal axes fit on training embeddings.

  Attributes:
    mean: ``[D]`` subtracted before projecting (zeros when fit with ``center=False``).
    components: ``[D, D]``; row ``i`` is the ``i``-th principal axis (unit norm),
      sorted by decreasing variance; each axis's largest-magnitude entry is positive
      (a fixed sign, so refits on the same data agree).
    explained_variance: ``[D]`` the (uncentred when ``center=False``) second moment
      of the data along each axis.
  """

  mean: np.ndarray
  components: np.ndarray
  explained_variance: np.ndarray

  def __call__(self, x: np.ndarray, dim: int | None = None) -> np.ndarray:
    """``(x - mean) @ components[:dim].T``: ``[N, D] -> [N, dim or D]`` float32."""
    x = check_embeddings(x, "x", embed_dim=self.mean.shape[0])
    comps = self.components if dim is None else self.components[:dim]
    return ((x - self.mean) @ comps.T).astype(np.float32)


def fit_pca(train, *, center: bool = True) -> PCA:
  """PCA of training embeddings by SVD (``numpy.linalg.svd`` of the ``[N, D]`` data).

  With ``X = train - mean`` (``mean = 0`` when ``center=False``) and
  ``X = U diag(s) V^T``, the axes are the rows of ``V^T`` and the variances
  ``s^2 / N``. ``PCA(x)[:, :m]`` is PCA to ``m`` dims for every ``m``. Without
  centring the projection keeps inner products (and so cosines of unit-norm
  embeddings) best: the uncentred SVD minimises ``sum ||x - V_m V_m^T x||^2``.

  Args:
    train: ``[N, D]`` finite embeddings, ``N >= 2``.
    center: subtract the training mean first (classical PCA).

  Returns:
    A :class:`PCA` with all ``min(N, D)`` axes completed to ``D`` (zero variance).
  """
  x = check_embeddings(train, "train").astype(np.float64)
  n, d = x.shape
  if n < 2:
    raise ValueError(f"PCA needs at least 2 training rows, got {n}")
  mean = x.mean(axis=0) if center else np.zeros(d)
  # Only V is needed: the thin SVD when N >= D (never the [N, N] factor U), the full
  # one when N < D to complete the axes to D (then U is [N, N], small).
  _, s, vt = np.linalg.svd(x - mean, full_matrices=n < d)
  var = np.zeros(d)
  var[: s.shape[0]] = s**2 / n
  signs = np.sign(vt[np.arange(d), np.argmax(np.abs(vt), axis=1)])
  vt = vt * np.where(signs == 0, 1.0, signs)[:, None]
  return PCA(mean.astype(np.float32), vt.astype(np.float32), var.astype(np.float32))


# -- metrics ------------------------------------------------------------------------------


def _search(index: PrefixIndex, queries: np.ndarray, k: int, dim: int,
            exclude: np.ndarray | None) -> np.ndarray:
  """``[Q, k]`` top-``k`` cosine neighbour ids by ``dim``-prefixes, ``exclude[q]`` dropped."""
  extra = 0 if exclude is None else 1
  if k + extra > index.n:
    raise ValueError(f"k={k} needs at least {k + extra} database items, got {index.n}")
  _, ids = index.search(queries, k + extra, dim)
  ids = np.asarray(ids)
  if exclude is None:
    return ids
  keep = ids != exclude[:, None]
  # Keep the first k ids that are not the query itself (the last one goes if it is absent).
  order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(ids, order, axis=1)


def neighbor_recall(database, reduced_database, dims: Sequence[int], *, queries=None,
                    reduced_queries=None, query_ids=None, k: int = 10,
                    truth: np.ndarray | None = None) -> dict[int, float]:
  """``recall@k`` of the full-size exact cosine neighbours, per prefix size.

  ``recall@k(m) = mean_q |N_k^m(q) & N_k(q)| / k`` where ``N_k(q)`` are the ``k``
  database items most cosine-similar to query ``q`` with the ORIGINAL full-size
  embeddings and ``N_k^m(q)`` those found with the cosine of the ``m``-prefixes of
  the reduced representation (:func:`~mrl_jax.evaluate.metrics.recall_at_k` with
  ``R_q = k``). The query itself (``query_ids[q]``) is excluded from both lists.

  Args:
    database: ``[N, D]`` original embeddings (define the true neighbours).
    reduced_database: ``[N, D']`` the reduced representation of ``database``
      (``D' >= max(dims)``).
    dims: prefix sizes to evaluate, strictly increasing, ``<= D'``.
    queries: ``[Q, D]`` original query embeddings; default: ``database[query_ids]``
      or the whole database.
    reduced_queries: ``[Q, D']``; default: ``reduced_database[query_ids]`` (or all).
    query_ids: ``[Q]`` the database row of each query (excluded from its own
      neighbours); default ``arange(N)`` when ``queries`` is ``None``, else none.
    k: neighbours per query.
    truth: ``[Q, k]`` precomputed true neighbour ids (skips the full-size search).

  Returns:
    ``{m: recall}``.
  """
  database = check_embeddings(database, "database")
  reduced_database = check_embeddings(reduced_database, "reduced_database")
  if reduced_database.shape[0] != database.shape[0]:
    raise ValueError(f"reduced_database has {reduced_database.shape[0]} rows, "
                     f"database {database.shape[0]}")
  dims = check_dims(dims, reduced_database.shape[1])
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"k must be a positive int, got {k!r}")
  n = database.shape[0]
  if query_ids is None and queries is None:
    query_ids = np.arange(n)
  if query_ids is not None:
    query_ids = np.asarray(query_ids)
    if query_ids.ndim != 1 or not np.issubdtype(query_ids.dtype, np.integer):
      raise ValueError(f"query_ids must be [Q] integer ids, got {query_ids.shape} "
                       f"{query_ids.dtype}")
    if query_ids.size and (query_ids.min() < 0 or query_ids.max() >= n):
      raise ValueError(f"query_ids must be in [0, {n})")
  if queries is None:
    queries = database[query_ids]
  if reduced_queries is None:
    if query_ids is None:
      raise ValueError("give reduced_queries with queries, or query_ids")
    reduced_queries = reduced_database[query_ids]
  queries = check_embeddings(queries, "queries", embed_dim=database.shape[1])
  reduced_queries = check_embeddings(reduced_queries, "reduced_queries",
                                     embed_dim=reduced_database.shape[1])
  if reduced_queries.shape[0] != queries.shape[0]:
    raise ValueError(f"{reduced_queries.shape[0]} reduced queries for {queries.shape[0]} queries")
  if query_ids is not None and query_ids.shape[0] != queries.shape[0]:
    raise ValueError(f"{query_ids.shape[0]} query_ids for {queries.shape[0]} queries")
  if truth is None:
    truth = _search(PrefixIndex(database), queries, k, database.shape[1], query_ids)
  truth = np.asarray(truth)
  if truth.shape != (queries.shape[0], k):
    raise ValueError(f"truth must be [Q, k] = {(queries.shape[0], k)}, got {truth.shape}")
  index = PrefixIndex(reduced_database)
  out = {}
  for m in dims:
    found = _search(index, reduced_queries, k, m, query_ids)
    rel = (found[:, :, None] == truth[:, None, :]).any(axis=2)
    out[m] = recall_at_k(rel, k, np.full(rel.shape[0], k))
  return out


def pair_metrics(reduced_queries, reduced_documents, pairs, dims: Sequence[int], *,
                 k: int = 10) -> dict[int, dict[str, float]]:
  """``recall@k`` and ``nDCG@k`` of (query, document) pairs, per prefix size.

  For each query with at least one pair, its documents in ``pairs`` are the
  relevant ones (binary relevance, ``R_q`` of them); the ranking is the cosine of
  the ``m``-prefixes against every document. ``recall@k`` is
  :func:`~mrl_jax.evaluate.metrics.recall_at_k`, ``nDCG@k`` :func:`ndcg_at_k`.

  Args:
    reduced_queries: ``[Q, D']`` query representations.
    reduced_documents: ``[N, D']`` document representations.
    pairs: ``[P, 2]`` (query id, document id).
    dims: prefix sizes, strictly increasing, ``<= D'``.
    k: cut-off, ``<= N``.

  Returns:
    ``{m: {"recall@k": ..., "ndcg@k": ...}}``.
  """
  q = check_embeddings(reduced_queries, "reduced_queries")
  docs = check_embeddings(reduced_documents, "reduced_documents", embed_dim=q.shape[1])
  pairs = check_pairs(pairs, q.shape[0], docs.shape[0])
  dims = check_dims(dims, q.shape[1])
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= docs.shape[0]:
    raise ValueError(f"k must be an int in [1, {docs.shape[0]}], got {k!r}")
  asked = np.unique(pairs[:, 0])
  relevant = np.zeros((q.shape[0], docs.shape[0]), bool)
  relevant[pairs[:, 0], pairs[:, 1]] = True
  relevant = relevant[asked]
  num_rel = relevant.sum(axis=1)
  index = PrefixIndex(docs)
  out = {}
  for m in dims:
    ids = _search(index, q[asked], k, m, None)
    rel = np.take_along_axis(relevant, ids, axis=1)
    out[m] = {f"recall@{k}": recall_at_k(rel, k, num_rel),
              f"ndcg@{k}": ndcg_at_k(rel, k, num_rel)}
  return out


# -- the comparison table -------------------------------------------------------------------


def compare_reductions(transforms: Mapping[str, Transform], database, dims: Sequence[int], *,
                       query_ids=None, k: int = 10, pair_queries=None, pair_documents=None,
                       pairs=None) -> dict[str, dict]:
  """Every reduction method on the same evaluation data: the table of the adaptor task.

  Args:
    transforms: ``{name: fn}``, ``fn`` mapping original embeddings ``[N, D]`` to the
      representation ``[N, D']`` whose prefixes are evaluated (e.g.
      ``{"truncate": lambda x: x, "pca": fit_pca(train), "adaptor": f}``).
    database: ``[N, D]`` original evaluation embeddings.
    dims: prefix sizes.
    query_ids: database rows used as queries (default: all).
    k: the cut-off of every metric.
    pair_queries, pair_documents, pairs: held-out ``[Q, D]`` query and ``[N', D]``
      document embeddings and their ``[P, 2]`` pairs, for the supervised metrics.

  Returns:
    ``{"neighbor_recall@k": {name: {m: value}}}`` plus, with pairs,
    ``"pair_recall@k"`` and ``"pair_ndcg@k"`` in the same layout.
  """
  database = check_embeddings(database, "database")
  dims = check_dims(dims, database.shape[1])
  n = database.shape[0]
  query_ids = np.arange(n) if query_ids is None else np.asarray(query_ids)
  truth = _search(PrefixIndex(database), database[query_ids], k, database.shape[1], query_ids)
  with_pairs = pairs is not None
  if with_pairs != (pair_queries is not None) or with_pairs != (pair_documents is not None):
    raise ValueError("give all of pair_queries, pair_documents and pairs, or none")
  results: dict[str, dict] = {f"neighbor_recall@{k}": {}}
  if with_pairs:
    pair_queries = check_embeddings(pair_queries, "pair_queries", embed_dim=database.shape[1])
    pair_documents = check_embeddings(pair_documents, "pair_documents",
                                      embed_dim=database.shape[1])
    pairs = check_pairs(pairs, pair_queries.shape[0], pair_documents.shape[0])
    results[f"pair_recall@{k}"] = {}
    results[f"pair_ndcg@{k}"] = {}
  for name, fn in transforms.items():
    reduced = check_embeddings(np.asarray(fn(database)), f"{name}(database)")
    if reduced.shape[0] != n:
      raise ValueError(f"{name} returned {reduced.shape[0]} rows for {n}")
    results[f"neighbor_recall@{k}"][name] = neighbor_recall(
        database, reduced, dims, query_ids=query_ids, k=k, truth=truth)
    if with_pairs:
      per_dim = pair_metrics(np.asarray(fn(pair_queries)), np.asarray(fn(pair_documents)),
                             pairs, dims, k=k)
      results[f"pair_recall@{k}"][name] = {m: v[f"recall@{k}"] for m, v in per_dim.items()}
      results[f"pair_ndcg@{k}"][name] = {m: v[f"ndcg@{k}"] for m, v in per_dim.items()}
  return results


def format_reduction_table(results: Mapping[str, Mapping[str, Mapping[int, float]]]) -> str:
  """A plain-text table per metric of :func:`compare_reductions`: one row per dim."""
  lines = []
  for metric, by_method in results.items():
    names = list(by_method)
    widths = [max(10, len(n) + 2) for n in names]
    dims = sorted({m for v in by_method.values() for m in v})
    lines.append(metric)
    header = "".join(f"{n:>{w}}" for n, w in zip(names, widths, strict=True))
    lines.append("  " + f"{'dim':>5}" + header)
    for m in dims:
      row = "".join(f"{by_method[n].get(m, float('nan')):>{w}.4f}"
                    for n, w in zip(names, widths, strict=True))
      lines.append("  " + f"{m:>5}" + row)
  return "\n".join(lines)
