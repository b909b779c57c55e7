"""Optional FAISS backend for the shortlist stage (``pip install faiss-cpu``).

FAISS is imported only when a function here runs. The index holds the same
truncated-then-normalised prefix vectors the JAX search uses, and searches them by
inner product (= cosine similarity):

* ``"flat"``: ``faiss.IndexFlatIP``, exact; its ids equal the JAX search's up to
  ties.
* ``"hnsw"``: ``faiss.IndexHNSWFlat(dim, M, METRIC_INNER_PRODUCT)``, approximate;
  ``efSearch`` defaults to ``max(2 * k, 64)``.
* binary codes (``codes="ubinary"``): ``faiss.IndexBinaryFlat(8 * ceil(dim / 8))``
  over the packed sign bits of :meth:`PrefixIndex.codes` (the unused low bits of the
  last byte are 0 on both sides, so the Hamming distance is that of the ``dim``
  bits), exact. Its results are re-ordered by (distance, id) and reported as the
  ``+-1`` inner product ``dim - 2 * hamming``, as the JAX kernel does.

Built FAISS indexes are cached on the :class:`~mrl_jax.evaluate.index.PrefixIndex`.
"""

from __future__ import annotations

import importlib

import jax
import numpy as np

from mrl_jax.evaluate import codes as codes_lib
from mrl_jax.evaluate.index import PrefixIndex, check_queries, normalize_prefix

KINDS = ("flat", "hnsw")


def import_faiss():
  """The ``faiss`` module, or an ImportError that says how to install it."""
  try:
    return importlib.import_module("faiss")
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("backend='faiss' needs faiss: pip install 'mrl_jax[faiss]' "
                      "(or faiss-cpu)") from e


def get_binary_index(index: PrefixIndex, dim: int):
  """``faiss.IndexBinaryFlat`` over the binary codes of the ``dim``-prefixes (cached)."""
  key = ("binary-flat", int(dim))
  if key not in index.faiss_indexes:
    faiss = import_faiss()
    codes = np.ascontiguousarray(np.asarray(index.codes("ubinary", dim))[:index.n], np.uint8)
    fi = faiss.IndexBinaryFlat(8 * codes.shape[1])
    fi.add(codes)
    index.faiss_indexes[key] = fi
  return index.faiss_indexes[key]


def get_index(index: PrefixIndex, dim: int, kind: str = "flat", *, hnsw_m: int = 32,
              ef_construction: int = 80):
  """The FAISS index over the normalised ``dim``-prefixes of ``index``'s rows (cached)."""
  if kind not in KINDS:
    raise ValueError(f"faiss index kind must be one of {KINDS}, got {kind!r}")
  if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not (
      1 <= dim <= index.embed_dim):
    raise ValueError(f"dim must be an int in [1, {index.embed_dim}], got {dim!r}")
  for name, v in (("hnsw_m", hnsw_m), ("ef_construction", ef_construction)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 2:
      raise ValueError(f"{name} must be an int >= 2, got {v!r}")
  key = (kind, dim, hnsw_m, ef_construction) if kind == "hnsw" else (kind, dim)
  if key not in index.faiss_indexes:
    faiss = import_faiss()
    cached = index.normalised(dim)
    vectors = cached if cached is not None else jax.jit(normalize_prefix, static_argnums=1)(
        index.database, dim)
    vectors = np.ascontiguousarray(np.asarray(vectors)[:index.n], np.float32)
    if kind == "flat":
      fi = faiss.IndexFlatIP(dim)
    else:
      fi = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
      fi.hnsw.efConstruction = ef_construction
    fi.add(vectors)
    index.faiss_indexes[key] = fi
  return index.faiss_indexes[key]


def search(index: PrefixIndex, queries, dim: int, k: int, kind: str = "flat", *,
           hnsw_m: int = 32, ef_construction: int = 80, ef_search: int | None = None,
           codes: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Top-``k`` by cosine similarity of the ``dim``-prefixes (or Hamming distance of their
  binary codes), with FAISS.

  Args:
    index: the database.
    queries: ``[Q, Dq]`` float, ``Dq >= dim``; truncated and normalised here.
    dim: prefix size; k: results per query (``<= N``).
    kind: ``"flat"`` or ``"hnsw"``; the other arguments tune HNSW.
    codes: ``None`` (float vectors) or ``"ubinary"`` (``IndexBinaryFlat``; ``kind``
      must be ``"flat"``).

  Returns:
    ``(scores [Q, k] float32, ids [Q, k] int32)``, best first; for binary codes the
    scores are ``dim - 2 * hamming``, ties by increasing id.

  Raises:
    ValueError: for ``k`` outside ``[1, N]``, an unknown ``kind`` or ``codes``, or
      queries that are not finite ``[Q, Dq]`` floats.
  """
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= index.n:
    raise ValueError(f"k={k!r} must be an int in [1, N={index.n}]")
  if codes is not None:
    if codes != "ubinary" or kind != "flat":
      raise ValueError(f"FAISS searches binary codes with IndexBinaryFlat only (codes='binary',"
                       f" kind='flat'), got codes={codes!r}, kind={kind!r}")
    queries = check_queries(queries, dim)
    fi = get_binary_index(index, dim)
    q = np.ascontiguousarray(np.asarray(codes_lib.quantize_embeddings(
        normalize_prefix(np.asarray(queries, np.float32), dim), "ubinary")), np.uint8)
    dist, ids = fi.search(q, k)
    order = np.lexsort((ids, dist), axis=-1)  # by distance, then id
    dist, ids = np.take_along_axis(dist, order, -1), np.take_along_axis(ids, order, -1)
    return (dim - 2.0 * dist).astype(np.float32), ids.astype(np.int32)
  queries = check_queries(queries, dim)
  fi = get_index(index, dim, kind, hnsw_m=hnsw_m, ef_construction=ef_construction)
  if kind == "hnsw":
    fi.hnsw.efSearch = max(2 * k, 64) if ef_search is None else ef_search
  q = np.ascontiguousarray(np.asarray(normalize_prefix(np.asarray(queries, np.float32), dim)))
  scores, ids = fi.search(q, k)
  return scores.astype(np.float32), ids.astype(np.int32)
