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

Stage 0 may scan binary or int8 *codes* of the ``dims[0]``-prefix instead of floats
(``shortlist_codes="ubinary" | "int8_symmetric"``; :mod:`mrl_jax.evaluate.codes`): a binary
16-d shortlist stores 2 bytes per vector instead of 64, and the float stages re-rank
its survivors as before.

Cost, counted as the paper does (multiply-adds per query; top-k selection, norms
and gathers not counted)::

  FLOPs/query = dims[0] * N + sum_{i >= 1} dims[i] * keeps[i - 1]

(adaptive: ``D_s * N + D_r * K``; exact: ``D * N``). With a code shortlist the
first term moves to ``code_ops_per_query = dims[0] * N`` (bits compared, or int8
multiply-adds) and ``bytes_per_vector`` is the code size. Wall and process-CPU time
are measured around the whole batched run after a warm-up call that compiles it.

Ties are broken by id (smaller first) in stage 0 and by the previous stage's order
in a re-rank stage. Non-finite databases and queries are refused
(:class:`~mrl_jax.evaluate.index.PrefixIndex`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from mrl_jax.evaluate import codes as codes_lib
from mrl_jax.evaluate import faiss_backend
from mrl_jax.evaluate.index import Array, PrefixIndex, as_ints, check_cascade

BACKENDS = ("jax", "faiss")


@dataclasses.dataclass(frozen=True)
class RetrievalResult:
  """Neighbours found by a cascade, and what they cost.

  Attributes:
    ids: ``[Q, k]`` database ids, best first.
    scores: ``[Q, k]`` cosine similarities at ``dims[-1]``.
    dims: prefix size of each stage.
    keeps: items kept by each stage (``keeps[-1] = k``).
    flops_per_query: float multiply-adds, the paper's count (:func:`cascade_flops`).
    seconds_per_query: measured wall time / number of queries (``None`` if not timed).
    backend: ``"jax"``, ``"faiss-flat"``, ``"faiss-hnsw"`` or ``"faiss-binary-flat"``
      (stage 0's engine).
    shortlist_codes: ``None`` (float stage 0), ``"ubinary"`` or ``"int8_symmetric"``.
    bytes_per_vector: bytes per database vector that stage 0 scans (``4 * dims[0]``
      for floats, ``ceil(dims[0] / 8)`` binary, ``dims[0]`` int8).
    code_ops_per_query: ``dims[0] * N`` bits compared (binary) or int8 multiply-adds
      (int8) by a code stage 0; 0 for a float stage 0.
    cpu_seconds_per_query: process CPU time / number of queries (``None`` if not timed);
      above ``seconds_per_query`` when several cores work.
  """

  ids: np.ndarray
  scores: np.ndarray
  dims: tuple[int, ...]
  keeps: tuple[int, ...]
  flops_per_query: float
  seconds_per_query: float | None
  backend: str
  shortlist_codes: str | None = None
  bytes_per_vector: int = 0
  code_ops_per_query: float = 0.0
  cpu_seconds_per_query: float | None = None

  @property
  def mflops_per_query(self) -> float:
    return self.flops_per_query / 1e6


def cascade_flops(n: int, dims: Sequence[int], keeps: Sequence[int], *,
                  shortlist_codes: str | None = None) -> float:
  """``dims[0] * n + sum_{i>=1} dims[i] * keeps[i-1]`` float multiply-adds per query.

  With ``shortlist_codes`` stage 0 does no float work: the first term is dropped (it
  is counted as ``code_ops_per_query`` instead).
  """
  codes_lib.check_kind(shortlist_codes, allow_none=True)
  if len(dims) != len(keeps) or not len(dims):
    raise ValueError(f"need one keep per stage, got dims={dims}, keeps={keeps}")
  first = 0.0 if shortlist_codes is not None else float(dims[0]) * n
  return first + sum(float(d) * k for d, k in zip(dims[1:], keeps[:-1], strict=True))


def as_index(database: Array | PrefixIndex, **index_kwargs) -> PrefixIndex:
  """``database`` itself if it is a :class:`PrefixIndex`, else a new index over it."""
  if isinstance(database, PrefixIndex):
    if index_kwargs:
      raise ValueError(f"index options {sorted(index_kwargs)} given with a built PrefixIndex")
    return database
  return PrefixIndex(database, **index_kwargs)


def _positive_int(v, name: str, minimum: int = 1) -> int:
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
  return int(v)


def cascade_retrieval(queries: Array, database: Array | PrefixIndex, dims: Sequence[int],
                      keeps: Sequence[int], *, shortlist_codes: str | None = None,
                      backend: str = "jax", faiss_index: str = "flat", hnsw_m: int = 32,
                      ef_search: int | None = None, timed: bool = True,
                      **index_kwargs) -> RetrievalResult:
  """Run a cascade (see the module docstring) and measure it.

  Args:
    queries: ``[Q, Dq]`` float embeddings, ``Dq >= max(dims)``, finite.
    database: ``[N, D]`` embeddings or a :class:`PrefixIndex` (reuse one to keep its
      caches: normalised prefixes, codes, inverse norms, compiled programs, FAISS
      indexes).
    dims: non-decreasing prefix sizes, one per stage.
    keeps: non-increasing numbers of items kept per stage, ``keeps[0] <= N``.
    shortlist_codes: ``None``, ``"ubinary"`` or ``"int8_symmetric"``: what stage 0 scans.
    backend: ``"jax"``, or ``"faiss"`` for stage 0 (later stages always run in JAX):
      ``IndexFlatIP`` / ``IndexHNSWFlat`` for floats, ``IndexBinaryFlat`` for binary
      codes (``faiss_index="flat"`` only); FAISS has no int8 peer here.
    faiss_index: ``"flat"`` (exact) or ``"hnsw"`` (approximate), for ``backend="faiss"``.
    hnsw_m, ef_search: HNSW parameters (``hnsw_m >= 2``; ``ef_search >= 1`` or None).
    timed: measure the wall and CPU time (after one warm-up batch that compiles).
    **index_kwargs: options for a new :class:`PrefixIndex`.

  Returns:
    A :class:`RetrievalResult`.

  Raises:
    ValueError: for any argument outside its domain (named in the message).
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  codes_lib.check_kind(shortlist_codes, allow_none=True)
  queries = queries if hasattr(queries, "ndim") else np.asarray(queries)
  if backend == "faiss":
    if faiss_index not in faiss_backend.KINDS:
      raise ValueError(f"faiss_index must be one of {faiss_backend.KINDS}, got {faiss_index!r}")
    if shortlist_codes == "int8_symmetric":
      raise ValueError("backend='faiss' has no int8 shortlist here; use backend='jax'")
    if shortlist_codes == "ubinary" and faiss_index != "flat":
      raise ValueError(f"binary codes use faiss.IndexBinaryFlat: faiss_index must be 'flat', "
                       f"got {faiss_index!r}")
  _positive_int(hnsw_m, "hnsw_m", 2)
  if ef_search is not None:
    _positive_int(ef_search, "ef_search")
  if not isinstance(timed, bool):
    raise ValueError(f"timed must be a bool, got {timed!r}")
  index = as_index(database, **index_kwargs)
  dims, keeps = as_ints(dims, "dims"), as_ints(keeps, "keeps")
  check_cascade(dims, keeps, index.n, index.embed_dim)

  def run(q):
    if backend == "jax":
      return index.cascade(q, dims, keeps, shortlist_codes=shortlist_codes)
    first = faiss_backend.search(index, q, dims[0], keeps[0], faiss_index, hnsw_m=hnsw_m,
                                 ef_search=ef_search, codes=shortlist_codes)
    return index.cascade(q, dims, keeps, shortlist=first)

  seconds = cpu = None
  if timed:
    run(queries[:index.query_batch])  # compile, build caches
    start, cpu_start = time.perf_counter(), time.process_time()
  scores, ids = run(queries)
  if timed:
    seconds = (time.perf_counter() - start) / queries.shape[0]
    cpu = (time.process_time() - cpu_start) / queries.shape[0]
  if backend == "jax":
    name = "jax"
  else:
    name = "faiss-binary-flat" if shortlist_codes == "ubinary" else f"faiss-{faiss_index}"
  return RetrievalResult(
      ids=ids, scores=scores, dims=dims, keeps=keeps,
      flops_per_query=cascade_flops(index.n, dims, keeps, shortlist_codes=shortlist_codes),
      seconds_per_query=seconds, backend=name, shortlist_codes=shortlist_codes,
      bytes_per_vector=index.shortlist_bytes_per_vector(dims[0], shortlist_codes),
      code_ops_per_query=0.0 if shortlist_codes is None else float(dims[0]) * index.n,
      cpu_seconds_per_query=cpu)


def exact_search(queries: Array, database: Array | PrefixIndex, k: int, *,
                 dim: int | None = None, **kwargs) -> RetrievalResult:
  """Exact top-``k`` cosine search with the first ``dim`` dims (default: all).

  The one-stage cascade; ``kwargs`` as in :func:`cascade_retrieval` (with
  ``shortlist_codes="ubinary"`` it is an exact Hamming search of the prefix codes).

  Raises:
    ValueError: for a database that is not ``[N, D]`` (e.g. 1-D), ``k`` outside
      ``[1, N]``, ``dim`` outside ``[1, D]``, or as :func:`cascade_retrieval`.
  """
  k = _positive_int(k, "k")  # named as k, not as the cascade's keeps
  index_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key not in _CASCADE_OPTIONS}
  index = as_index(database, **index_kwargs)
  full = index.embed_dim if dim is None else dim
  return cascade_retrieval(queries, index, (full,), (k,), **kwargs)


def adaptive_retrieval(queries: Array, database: Array | PrefixIndex, *, shortlist_dim: int,
                       rerank_dim: int, shortlist_k: int = 200, k: int = 10,
                       shortlist_codes: str | None = None, **kwargs) -> RetrievalResult:
  """Adaptive retrieval: shortlist ``K`` with ``D_s`` dims, re-rank them with ``D_r``.

  ``D_s = shortlist_dim`` scans the whole database (exactly with the JAX backend;
  as binary or int8 codes with ``shortlist_codes``); ``D_r = rerank_dim`` re-scores
  only the ``K = shortlist_k`` survivors with float prefixes and keeps ``k``.
  FLOPs/query ``= D_s * N + D_r * K`` (``D_r * K`` and ``D_s * N`` code ops with
  codes). ``kwargs`` as in :func:`cascade_retrieval` (``backend="faiss"``,
  ``faiss_index="hnsw"``, ...).

  Raises:
    ValueError: naming the argument: ``k < 1``, ``shortlist_k < k``, ``shortlist_k``
      larger than the database, dims outside ``[1, D]`` or ``rerank_dim <
      shortlist_dim``, or as :func:`cascade_retrieval`.
  """
  k = _positive_int(k, "k")
  shortlist_k = _positive_int(shortlist_k, "shortlist_k")
  if shortlist_k < k:
    raise ValueError(f"shortlist_k={shortlist_k} is smaller than k={k}")
  index_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key not in _CASCADE_OPTIONS}
  index = as_index(database, **index_kwargs)
  if shortlist_k > index.n:
    raise ValueError(f"shortlist_k={shortlist_k} is larger than the database ({index.n} "
                     f"items); pass shortlist_k <= {index.n}")
  for name, d in (("shortlist_dim", shortlist_dim), ("rerank_dim", rerank_dim)):
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not (
        1 <= d <= index.embed_dim):
      raise ValueError(f"{name} must be an int in [1, {index.embed_dim}] (the embedding "
                       f"size), got {d!r}")
  if rerank_dim < shortlist_dim:
    raise ValueError(f"rerank_dim={rerank_dim} is smaller than shortlist_dim={shortlist_dim}")
  return cascade_retrieval(queries, index, (shortlist_dim, rerank_dim), (shortlist_k, k),
                           shortlist_codes=shortlist_codes, **kwargs)


def funnel_retrieval(queries: Array, database: Array | PrefixIndex,
                     dims: Sequence[int] = (16, 32, 64, 128, 256, 2048),
                     shortlist: Sequence[int] = (200, 100, 50, 25, 10), *,
                     shortlist_codes: str | None = None, **kwargs) -> RetrievalResult:
  """Funnel retrieval: shortlist, then re-rank with growing dims and shrinking lists.

  Stage ``i`` ranks the survivors with ``dims[i]`` dims and keeps ``shortlist[i]``.
  ``shortlist`` may be one shorter than ``dims``: then the last stage re-orders the
  final ``shortlist[-1]`` items (the paper's 16 -> ... -> 256 -> 2048 funnel with
  shortlists 200 -> ... -> 10). ``k = shortlist[-1]``. ``shortlist_codes`` makes
  stage 0 scan binary or int8 codes. ``kwargs`` as in :func:`cascade_retrieval`.

  Raises:
    ValueError: for lengths that do not match, or as :func:`cascade_retrieval`
      (the defaults need ``D >= 2048`` and ``N >= 200``).
  """
  dims, shortlist = as_ints(dims, "dims"), as_ints(shortlist, "shortlist")
  if len(shortlist) == len(dims) - 1 and shortlist:
    shortlist = shortlist + (shortlist[-1],)
  if len(shortlist) != len(dims):
    raise ValueError(f"funnel needs len(shortlist) == len(dims) or len(dims) - 1, got "
                     f"dims={dims}, shortlist={shortlist}")
  return cascade_retrieval(queries, database, dims, shortlist, shortlist_codes=shortlist_codes,
                           **kwargs)


_CASCADE_OPTIONS = ("shortlist_codes", "backend", "faiss_index", "hnsw_m", "ef_search", "timed")
