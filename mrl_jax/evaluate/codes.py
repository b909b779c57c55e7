"""Binary and int8 codes of nested embeddings, and exact search over them.

Vector databases store Matryoshka prefixes as codes (Vespa's binary + Matryoshka
embedder, sentence-transformers' ``quantize_embeddings``): one sign bit per dim, or
one int8 per dim. :func:`quantize_embeddings` is the one definition of the codes in
mrl_jax, applied to prefixes that are already truncated and L2-normalised
(``z = x[:m] / |x[:m]|``):

The names are sentence-transformers' ``quantize_embeddings`` precisions
(:data:`mrl_jax.core.ops.QUANTIZATIONS`); the two kinds searched here need no calibration:

* ``"ubinary"``: the sign bits ``z > 0`` packed big-endian into bytes, as
  ``np.packbits(z > 0, axis=-1)``: ``uint8 [B, ceil(m / 8)]``; the unused low bits
  of the last byte are 0. Similarity: the Hamming distance
  ``popcount(a XOR b)`` (smaller is closer), equivalently the ``+-1`` inner product
  ``m - 2 * hamming``.
* ``"int8_symmetric"``: ``clip(round(127 * z), -127, 127)``: ``int8 [B, m]``. Similarity:
  the integer dot product (larger is closer). (sentence-transformers' ``"int8"``
  calibrates a range per dimension instead: :func:`mrl_jax.core.ops.quantize`.)

:func:`hamming_search` and :func:`int8_search` are exact top-``k`` searches over codes
(one device; :class:`~mrl_jax.evaluate.index.PrefixIndex` uses the same kernels for
a code shortlist over a sharded database). Ties are broken by id: among equal
distances the smaller database id comes first. For the Hamming scan the packed
bytes are read as the widest unsigned lanes that divide the code width
(``uint32``, ``uint16`` or ``uint8``; :func:`to_words`), each scored with
``lax.population_count`` of the XOR.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mrl_jax.core import ops
from mrl_jax.evaluate import knn

CODE_KINDS = ("ubinary", "int8_symmetric")
# knn kernel used to score each kind of code.
KNN_KIND = {"ubinary": "hamming", "int8_symmetric": "int8"}
_EXACT_F32 = float(2**24)


def check_kind(kind: str | None, *, allow_none: bool = False) -> None:
  """Raise a ValueError unless ``kind`` is one of :data:`CODE_KINDS` (or ``None``)."""
  if kind is None and allow_none:
    return
  if kind not in CODE_KINDS:
    extra = " or None" if allow_none else ""
    raise ValueError(f"code kind must be one of {CODE_KINDS}{extra}, got {kind!r}")


def nonfinite_rows(x) -> np.ndarray:
  """Indices of the rows of a concrete ``[N, ...]`` array holding a NaN or an inf."""
  bad = ~np.asarray(_all_finite_rows(jnp.asarray(x)))
  return np.flatnonzero(bad)


@jax.jit
def _all_finite_rows(x):
  return jnp.all(jnp.isfinite(x).reshape(x.shape[0], -1), axis=1)


def refuse_nonfinite(x, name: str) -> None:
  """Raise a ValueError naming up to 10 rows of ``x`` that hold a NaN or an inf.

  ``x`` is a concrete array ``[N, ...]`` (numpy or JAX); non-float arrays pass.
  """
  dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
  if not jnp.issubdtype(dtype, jnp.inexact):
    return
  if bool(_all_finite(jnp.asarray(x))):
    return
  rows = nonfinite_rows(x)
  shown = ", ".join(str(int(r)) for r in rows[:10]) + (", ..." if len(rows) > 10 else "")
  raise ValueError(f"{name} has non-finite values (NaN or inf) in {len(rows)} of "
                   f"{np.shape(x)[0]} rows: [{shown}]; remove or repair them (they would "
                   f"otherwise be ranked arbitrarily)")


@jax.jit
def _all_finite(x):
  return jnp.all(jnp.isfinite(x))


def code_width(dim: int, kind: str) -> int:
  """Bytes per vector of a ``dim``-dim code: ``ceil(dim / 8)`` (binary) or ``dim`` (int8)."""
  check_kind(kind)
  if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
    raise ValueError(f"dim must be a positive int, got {dim!r}")
  return -(-int(dim) // 8) if kind == "ubinary" else int(dim)


def quantize_embeddings(z, kind: str) -> jax.Array:
  """Codes of truncated-then-normalised embeddings (see the module docstring).

  The rule of :func:`mrl_jax.core.ops.quantize`, which :class:`mrl_jax.bundle.encoder.Encoder`
  serves. Works under ``jit``; called on a concrete array it refuses non-finite rows
  (a NaN row would otherwise become an all-zero code).

  Args:
    z: ``[..., m]`` float embeddings, each row truncated then L2-normalised.
    kind: ``"ubinary"`` or ``"int8_symmetric"``.

  Returns:
    ``uint8 [..., ceil(m / 8)]`` packed sign bits (big-endian within a byte, as
    ``np.packbits``) for ``"ubinary"``; ``int8 [..., m]`` for ``"int8_symmetric"``.

  Raises:
    ValueError: for an unknown ``kind``, a non-float or 0-d ``z``, or (outside
      ``jit``) rows with a NaN or an inf.
  """
  check_kind(kind)
  dtype = z.dtype if hasattr(z, "dtype") else np.asarray(z).dtype
  if not jnp.issubdtype(dtype, jnp.floating) or np.ndim(z) < 1 or np.shape(z)[-1] < 1:
    raise ValueError(f"z must be float embeddings [..., m] with m >= 1, got dtype {dtype} "
                     f"and shape {np.shape(z)}")
  z = jnp.asarray(z).astype(jnp.float32)
  if not isinstance(z, jax.core.Tracer):
    refuse_nonfinite(jnp.reshape(z, (-1, z.shape[-1])), "z")
  return ops.quantize(z, kind, check_finite=False)  # the rule Encoder serves, once


def lane_bytes(width: int) -> int:
  """Bytes per lane for a ``width``-byte code: 4, 2 or 1 (the widest that divides it)."""
  return 4 if width % 4 == 0 else 2 if width % 2 == 0 else 1


def to_words(codes: jax.Array) -> jax.Array:
  """``uint8 [..., W]`` packed bytes -> ``[..., W / L]`` unsigned lanes of ``L`` bytes.

  ``L = lane_bytes(W)``. The lanes reinterpret the bytes (no bit is moved), so the
  popcount of ``a XOR b`` summed over lanes is the Hamming distance of the bytes.
  """
  codes = jnp.asarray(codes)
  width = codes.shape[-1]
  lane = lane_bytes(width)
  if lane == 1:
    return codes
  dtype = {2: jnp.uint16, 4: jnp.uint32}[lane]
  return jax.lax.bitcast_convert_type(
      codes.reshape(codes.shape[:-1] + (width // lane, lane)), dtype)


def _check_codes(queries, database, kind: str, k: int):
  want = np.uint8 if kind == "ubinary" else np.int8
  for name, x in (("queries", queries), ("database", database)):
    if np.ndim(x) != 2 or 0 in np.shape(x):
      hint = " (for one query pass codes[None, :])" if name == "queries" else ""
      raise ValueError(f"{name} must be {kind} codes [rows, width] with rows, width >= 1, "
                       f"got shape {np.shape(x)}{hint}")
    if np.dtype(x.dtype) != want:
      raise ValueError(f"{kind} codes must be {np.dtype(want).name} (see quantize_embeddings), "
                       f"got {name} of dtype {x.dtype}")
  if np.shape(queries)[1] != np.shape(database)[1]:
    raise ValueError(f"queries and database codes differ in width: {np.shape(queries)[1]} vs "
                     f"{np.shape(database)[1]}")
  n = np.shape(database)[0]
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
    raise ValueError(f"k must be an int in [1, {n}] (the database size), got {k!r}")


def check_int8_exact(queries, database) -> None:
  """Refuse int8 codes whose dot products could leave float32's exact integer range.

  Every partial sum of ``<q, x>`` is bounded by ``|q| * |x|`` (Cauchy-Schwarz); the
  search is exact when ``max |q| * max |x| < 2**24``: always for ``width <= 1040``,
  and at any width for codes of unit vectors (``|code| <= 127 + sqrt(width) / 2``).
  """
  if np.shape(database)[1] <= 1040:
    return
  norm = lambda x: float(jnp.sqrt(jnp.max(jnp.sum(jnp.square(
      jnp.asarray(x, jnp.float32)), axis=1))))
  bound = norm(queries) * norm(database)
  if bound >= 0.999 * _EXACT_F32:
    raise ValueError(f"int8 codes too large for exact float32 dot products (max |q| * max |x| "
                     f"= {bound:.4g} >= 2**24); use codes of unit vectors (quantize_embeddings)")


def _search(queries, database, k: int, kind: str, *, query_batch: int, block_size: int,
            group_size: int, sub_batch: int) -> tuple[np.ndarray, np.ndarray]:
  _check_codes(queries, database, kind, k)
  for name, v in (("query_batch", query_batch), ("block_size", block_size),
                  ("group_size", group_size), ("sub_batch", sub_batch)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}")
  if kind == "int8_symmetric":
    check_int8_exact(queries, database)
  db = jnp.asarray(database)
  if kind == "ubinary":
    db = to_words(db)
  n, width = db.shape
  plan = knn.block_plan(n, max(group_size, min(block_size, (1 << 20) // width)), group_size)
  query_batch = -(-query_batch // sub_batch) * sub_batch
  program = _code_program(plan, int(k), KNN_KIND[kind], width, sub_batch)
  out_s, out_i = [], []
  queries = np.asarray(queries)
  for lo in range(0, queries.shape[0], query_batch):
    q = queries[lo:lo + query_batch]
    q = np.pad(q, [(0, query_batch - q.shape[0]), (0, 0)]) if q.shape[0] < query_batch else q
    q = jnp.asarray(q)
    s, i = program(to_words(q) if kind == "ubinary" else q, db)
    out_s.append(s)
    out_i.append(i)
  num_q = queries.shape[0]
  scores = np.concatenate([np.asarray(s) for s in out_s])[:num_q]
  ids = np.concatenate([np.asarray(i) for i in out_i])[:num_q]
  return scores, ids.astype(np.int32)


@functools.lru_cache(maxsize=64)
def _code_program(plan, k, kind, width, sub_batch):
  def run(q, db):
    return knn.local_top_k(q, db, None, plan.n, k, plan, width, sub_batch, kind)
  return jax.jit(run)


def hamming_search(queries, database, k: int, *, query_batch: int = 256,
                   block_size: int = 4096, group_size: int = 32,
                   sub_batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-``k`` nearest binary codes by Hamming distance (one device).

  Args:
    queries: ``uint8 [Q, W]`` packed sign bits (:func:`quantize_embeddings`).
    database: ``uint8 [N, W]``.
    k: results per query, in ``[1, N]``.
    query_batch, block_size, group_size, sub_batch: kernel tiling
      (:mod:`~mrl_jax.evaluate.knn`); they change speed, never results.

  Returns:
    ``(distances int32 [Q, k], ids int32 [Q, k])``, by increasing distance, ties by
    increasing id. The reference: ``np.unpackbits`` both sides, count differing bits,
    ``np.argsort(distance, kind="stable")[:k]``.

  Raises:
    ValueError: for codes that are not ``uint8 [rows, W]`` with equal ``W``, or
      ``k`` outside ``[1, N]``.
  """
  scores, ids = _search(queries, database, k, "ubinary", query_batch=query_batch,
                        block_size=block_size, group_size=group_size, sub_batch=sub_batch)
  return (-scores).astype(np.int32), ids


def int8_search(queries, database, k: int, *, query_batch: int = 256, block_size: int = 4096,
                group_size: int = 32, sub_batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-``k`` int8 codes by integer dot product (one device).

  Args:
    queries: ``int8 [Q, W]`` (:func:`quantize_embeddings`); database: ``int8 [N, W]``.
    k, query_batch, block_size, group_size, sub_batch: as in :func:`hamming_search`.

  Returns:
    ``(dots int32 [Q, k], ids int32 [Q, k])``, by decreasing dot product, ties by
    increasing id (reference: ``np.argsort(-(q @ x.T), kind="stable")[:, :k]`` in int64).

  Raises:
    ValueError: as :func:`hamming_search`, and for codes whose dot products float32
      cannot hold exactly (:func:`check_int8_exact`).
  """
  scores, ids = _search(queries, database, k, "int8_symmetric", query_batch=query_batch,
                        block_size=block_size, group_size=group_size, sub_batch=sub_batch)
  return np.rint(scores).astype(np.int32), ids
