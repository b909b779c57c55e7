"""Exact, adaptive and funnel retrieval over nested embeddings, with their cost.

All three are one *cascade* (:meth:`PrefixIndex.cascade`): stage 0 shortlists
``keeps[0]`` items from the whole database with the first ``dims[0]`` dims; stage
``i`` re-ranks the survivors with the first ``dims[i]`` dims and keeps ``keeps[i]``.

* exact search: ``dims = (D,)``, ``keeps = (k,)``;
* adaptive retrieval (paper): shortlist dim ``D_s``, re-rank dim ``D_r``:
  ``dims = (D_s, D_r)``, ``keeps = (K, k)`` (paper: ``D_s = 16``, ``K = 200``,
  ``D_r = 2048``);
* funnel retrieval (paper): ``dims = (16, 32, 64, 128, 256, 2048)``,
  ``keeps = (200, 100, 50, 25, 10, 10)``.

Cost, counted as the paper does (multiply-adds per query; top-k selection, norms
and gathers not counted)::

  FLOPs/query = dims[0] * N + sum_{i >= 1} dims[i] * keeps[i - 1]

(adaptive: ``D_s * N + D_r * K``; exact: ``D * N``). Wall time is measured around
the whole batched run after a warm-up call that compiles it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from mrl_jax.evaluate import faiss_backend
from mrl_jax.evaluate.index import Array, PrefixIndex, check_cascade

BACKENDS = ("jax", "faiss")


@dataclasses.dataclass(frozen=True)
class RetrievalResult:
  """Neighbours found by a cascade, and what they cost.

  Attributes:
    ids: ``[Q, k]`` database ids, best first.
    scores: ``[Q, k]`` cosine similarities at ``dims[-1]``.
    dims: prefix size of each stage.
    keeps: items kept by each stage (``keeps[-1] = k``).
    flops_per_query: the paper's count, see :func:`cascade_flops`.
    seconds_per_query: measured wall time / number of queries (``None`` if not timed).
    backend: ``"jax"``, ``"faiss-flat"`` or ``"faiss-hnsw"`` (stage 0's engine).
  """

  ids: np.ndarray
  scores: np.ndarray
  dims: tuple[int, ...]
  keeps: tuple[int, ...]
  flops_per_query: float
  seconds_per_query: float | None
  backend: str

  @property
  def mflops_per_query(self) -> float:
    return self.flops_per_query / 1e6


def cascade_flops(n: int, dims: Sequence[int], keeps: Sequence[int]) -> float:
  """``dims[0] * n + sum_{i>=1} dims[i] * keeps[i-1]`` multiply-adds per query."""
  return float(dims[0]) * n + sum(float(d) * k for d, k in zip(dims[1:], keeps[:-1], strict=True))


def as_index(database: Array | PrefixIndex, **index_kwargs) -> PrefixIndex:
  """``database`` itself if it is a :class:`PrefixIndex`, else a new index over it."""
  if isinstance(database, PrefixIndex):
    if index_kwargs:
      raise ValueError(f"index options {sorted(index_kwargs)} given with a built PrefixIndex")
    return database
  return PrefixIndex(database, **index_kwargs)


def cascade_retrieval(queries: Array, database: Array | PrefixIndex, dims: Sequence[int],
                      keeps: Sequence[int], *, backend: str = "jax", faiss_index: str = "flat",
                      hnsw_m: int = 32, ef_search: int | None = None, timed: bool = True,
                      **index_kwargs) -> RetrievalResult:
  """Run a cascade (see the module docstring) and measure it.

  Args:
    queries: ``[Q, Dq]`` embeddings, ``Dq >= max(dims)``.
    database: ``[N, D]`` embeddings or a :class:`PrefixIndex` (reuse one to keep its
      caches: normalised prefixes, inverse norms, compiled programs, FAISS indexes).
    dims: non-decreasing prefix sizes, one per stage.
    keeps: non-increasing numbers of items kept per stage, ``keeps[0] <= N``.
    backend: ``"jax"``, or ``"faiss"`` for stage 0 (later stages always run in JAX).
    faiss_index: ``"flat"`` (exact) or ``"hnsw"`` (approximate), for ``backend="faiss"``.
    hnsw_m, ef_search: HNSW parameters.
    timed: measure the wall time (after one warm-up batch that compiles).
    **index_kwargs: options for a new :class:`PrefixIndex`.

  Returns:
    A :class:`RetrievalResult`.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  index = as_index(database, **index_kwargs)
  dims, keeps = tuple(int(d) for d in dims), tuple(int(k) for k in keeps)
  check_cascade(dims, keeps, index.n, index.embed_dim)

  def run(q):
    if backend == "jax":
      return index.cascade(q, dims, keeps)
    first = faiss_backend.search(index, q, dims[0], keeps[0], faiss_index, hnsw_m=hnsw_m,
                                 ef_search=ef_search)
    return index.cascade(q, dims, keeps, shortlist=first)

  seconds = None
  if timed:
    run(queries[:index.query_batch])  # compile, build caches
    start = time.perf_counter()
  scores, ids = run(queries)
  if timed:
    seconds = (time.perf_counter() - start) / queries.shape[0]
  name = "jax" if backend == "jax" else f"faiss-{faiss_index}"
  return RetrievalResult(ids=ids, scores=scores, dims=dims, keeps=keeps,
                         flops_per_query=cascade_flops(index.n, dims, keeps),
                         seconds_per_query=seconds, backend=name)


def exact_search(queries: Array, database: Array | PrefixIndex, k: int, *,
                 dim: int | None = None, **kwargs) -> RetrievalResult:
  """Exact top-``k`` cosine search with the first ``dim`` dims (default: all).

  The one-stage cascade; ``kwargs`` as in :func:`cascade_retrieval`.
  """
  index = database if isinstance(database, PrefixIndex) else None
  full = (index.embed_dim if index is not None else np.shape(database)[1])
  return cascade_retrieval(queries, database, (full if dim is None else dim,), (k,), **kwargs)


def adaptive_retrieval(queries: Array, database: Array | PrefixIndex, *, shortlist_dim: int,
                       rerank_dim: int, shortlist_k: int = 200, k: int = 10,
                       **kwargs) -> RetrievalResult:
  """Adaptive retrieval: shortlist ``K`` with ``D_s`` dims, re-rank them with ``D_r``.

  ``D_s = shortlist_dim`` scans the whole database (exactly with the JAX backend);
  ``D_r = rerank_dim`` re-scores only the ``K = shortlist_k`` survivors and keeps
  ``k``. FLOPs/query ``= D_s * N + D_r * K``. ``kwargs`` as in
  :func:`cascade_retrieval` (``backend="faiss"``, ``faiss_index="hnsw"``, ...).
  """
  if shortlist_k < k:
    raise ValueError(f"shortlist_k={shortlist_k} is smaller than k={k}")
  return cascade_retrieval(queries, database, (shortlist_dim, rerank_dim), (shortlist_k, k),
                           **kwargs)


def funnel_retrieval(queries: Array, database: Array | PrefixIndex,
                     dims: Sequence[int] = (16, 32, 64, 128, 256, 2048),
                     shortlist: Sequence[int] = (200, 100, 50, 25, 10),
                     **kwargs) -> RetrievalResult:
  """Funnel retrieval: shortlist, then re-rank with growing dims and shrinking lists.

  Stage ``i`` ranks the survivors with ``dims[i]`` dims and keeps ``shortlist[i]``.
  ``shortlist`` may be one shorter than ``dims``: then the last stage re-orders the
  final ``shortlist[-1]`` items (the paper's 16 -> ... -> 256 -> 2048 funnel with
  shortlists 200 -> ... -> 10). ``k = shortlist[-1]``. ``kwargs`` as in
  :func:`cascade_retrieval`.
  """
  dims, shortlist = tuple(dims), tuple(shortlist)
  if len(shortlist) == len(dims) - 1 and shortlist:
    shortlist = shortlist + (shortlist[-1],)
  if len(shortlist) != len(dims):
    raise ValueError(f"funnel needs len(shortlist) == len(dims) or len(dims) - 1, got "
                     f"dims={dims}, shortlist={shortlist}")
  return cascade_retrieval(queries, database, dims, shortlist, **kwargs)
