"""Optional FAISS backend for the shortlist stage (``pip install faiss-cpu``).

FAISS is imported only when a function here runs. The index holds the same
truncated-then-normalised prefix vectors the JAX search uses, and searches them by
inner product (= cosine similarity):

* ``"flat"``: ``faiss.IndexFlatIP``, exact; its ids equal the JAX search's up to
  ties.
* ``"hnsw"``: ``faiss.IndexHNSWFlat(dim, M, METRIC_INNER_PRODUCT)``, approximate;
  ``efSearch`` defaults to ``max(2 * k, 64)``.

Built FAISS indexes are cached on the :class:`~mrl_jax.evaluate.index.PrefixIndex`.
"""

from __future__ import annotations

import importlib

import jax
import numpy as np

from mrl_jax.evaluate.index import PrefixIndex, normalize_prefix

KINDS = ("flat", "hnsw")


def import_faiss():
  """The ``faiss`` module, or an ImportError that says how to install it."""
  try:
    return importlib.import_module("faiss")
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("backend='faiss' needs faiss: pip install 'mrl_jax[faiss]' "
                      "(or faiss-cpu)") from e


def get_index(index: PrefixIndex, dim: int, kind: str = "flat", *, hnsw_m: int = 32,
              ef_construction: int = 80):
  """The FAISS index over the normalised ``dim``-prefixes of ``index``'s rows (cached)."""
  if kind not in KINDS:
    raise ValueError(f"faiss index kind must be one of {KINDS}, got {kind!r}")
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
           hnsw_m: int = 32, ef_construction: int = 80,
           ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Top-``k`` by cosine similarity of the ``dim``-prefixes, with FAISS.

  Args:
    index: the database.
    queries: ``[Q, Dq]``, ``Dq >= dim``; truncated and normalised here.
    dim: prefix size; k: results per query (``<= N``).
    kind: ``"flat"`` or ``"hnsw"``; the other arguments tune HNSW.

  Returns:
    ``(scores [Q, k] float32, ids [Q, k] int32)``, best first.
  """
  if not 1 <= k <= index.n:
    raise ValueError(f"k={k} must be in [1, N={index.n}]")
  fi = get_index(index, dim, kind, hnsw_m=hnsw_m, ef_construction=ef_construction)
  if kind == "hnsw":
    fi.hnsw.efSearch = max(2 * k, 64) if ef_search is None else ef_search
  q = np.ascontiguousarray(np.asarray(normalize_prefix(np.asarray(queries, np.float32), dim)))
  scores, ids = fi.search(q, k)
  return scores.astype(np.float32), ids.astype(np.int32)
