"""A database of nested embeddings, stored once at full size, searched at any prefix.

:class:`PrefixIndex` holds the database ``[N, D]`` once; a prefix ``x[:m]`` is a slice
of it. Every score is ``<q[:m] / |q[:m]|, x[:m]> / |x[:m]|``: prefixes are truncated
THEN L2-normalised (cosine similarity of the prefixes). The inverse norms
``1 / |x[:m]|`` (``[N]`` per prefix size) are computed once and cached. For the small
prefix a shortlist scans (``m <= max_cached_dim``) a contiguous normalised copy
``[N, m]`` is cached as well, built once: a scan reading ``m`` floats out of every
``D``-float row would be bound by memory traffic rather than arithmetic.

Searches run as one jitted program per batch of queries and per cascade
``(dims, keeps)``: stage 0 is an exact top-``keeps[0]`` search over the whole
database with the first ``dims[0]`` dims (:mod:`mrl_jax.evaluate.knn`); each later
stage re-ranks the survivors with the first ``dims[i]`` dims and keeps the best
``keeps[i]``. Exact search is the one-stage cascade, adaptive retrieval the two-stage
one, funnel retrieval the many-stage one.

Stage 0 can also scan *codes* of the ``dims[0]``-prefix instead of floats
(``shortlist_codes="ubinary"`` or ``"int8_symmetric"``, :mod:`mrl_jax.evaluate.codes`): the
index builds them once from the normalised prefix (``ceil(dims[0] / 8)`` or
``dims[0]`` bytes per vector, cached), the queries are coded the same way inside the
search, and the scan ranks by Hamming distance or int8 dot product. Later stages
re-rank with float prefixes as before.

Ties: stage 0 ranks equal scores by increasing id (the smaller id wins); a re-rank
stage keeps the previous stage's order among equal scores (a stable sort).

Non-finite values are refused: building an index over a database with a NaN or an
inf raises a ValueError naming the rows (they would otherwise be ranked
arbitrarily, e.g. first), and so does a search whose queries hold one in the prefix
the search reads (``queries[:, :max(dims)]``). A zero row (or query) has no
direction: its prefix stays zero and scores 0 against everything.

With several devices, over a one-axis :class:`jax.sharding.Mesh`, either

* ``shard="database"``: the rows are sharded (``NamedSharding(mesh, P(axis))``);
  each device scans its rows, the per-device top-k lists are all-gathered and
  merged, and re-ranking gathers each candidate on the device that holds it (a
  ``psum`` assembles the scores). For accelerators and databases too large for one.
* ``shard="queries"``: the database is replicated and each device answers its share
  of every query batch, with no communication. On a CPU host the replicas alias the
  same host buffer (no copy), so this is the default when the devices are CPUs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mrl_jax.core import ops
from mrl_jax.evaluate import codes as codes_lib
from mrl_jax.evaluate import knn

Array = jax.Array | np.ndarray
SHARD_MODES = ("database", "queries")


def normalize_prefix(x: jax.Array, dim: int) -> jax.Array:
  """``x[:, :dim] / |x[:, :dim]|`` (truncate, then L2-normalise); zero rows stay zero.

  Args:
    x: ``[B, D]`` with ``D >= dim``.
    dim: prefix size, in ``[1, D]``.

  Returns:
    ``[B, dim]`` float32.

  Raises:
    ValueError: if ``x`` is not 2-D or ``dim`` is not an int in ``[1, D]``.
  """
  if np.ndim(x) != 2:
    raise ValueError(f"x must be [B, D], got shape {np.shape(x)}")
  if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not (
      1 <= dim <= np.shape(x)[1]):
    raise ValueError(f"dim must be an int in [1, {np.shape(x)[1]}], got {dim!r}")
  return ops.unit_rows(x[:, :dim])  # scale-safe: max-abs rescaled before squaring


def check_cascade(dims: Sequence[int], keeps: Sequence[int], n: int, embed_dim: int) -> None:
  """Check a cascade: ``dims`` non-decreasing in ``[1, D]``; ``keeps`` non-increasing in ``[1, N]``.

  Raises:
    ValueError: naming the offending value.
  """
  if isinstance(dims, (str, bytes)) or isinstance(keeps, (str, bytes)):
    raise ValueError(f"dims and keeps must be sequences of ints, got {dims!r}, {keeps!r}")
  dims, keeps = list(np.atleast_1d(dims)), list(np.atleast_1d(keeps))
  if not dims or len(dims) != len(keeps):
    raise ValueError(f"need one keep per stage, got dims={dims}, keeps={keeps}")
  for d in dims:
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 1 <= d <= embed_dim:
      raise ValueError(f"dims must be ints in [1, {embed_dim}] (the embedding size), got {dims}")
  for a, b in zip(dims, dims[1:], strict=False):
    if b < a:
      raise ValueError(f"stage dims must not decrease, got {b} after {a} in {dims}")
  for k in keeps:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
      raise ValueError(f"shortlist sizes and k must be positive ints, got {keeps}")
  if keeps[0] > n:
    what = "k" if len(keeps) == 1 else "the shortlist size"
    raise ValueError(f"{what}={keeps[0]} is larger than the database ({n} items)")
  for a, b in zip(keeps, keeps[1:], strict=False):
    if b > a:
      raise ValueError(f"each stage keeps at most as many items as the one before, got {keeps}")


class PrefixIndex:
  """Exact cosine search over prefixes of one stored database.

  Args:
    database: ``[N, D]`` float embeddings (numpy or JAX). On one device a 64-byte
      aligned float32 numpy array is used in place (no copy; do not modify it).
    mesh: a one-axis mesh; default: all devices when there are several
      (``Mesh(jax.devices(), (axis,))``), none otherwise.
    axis: the mesh axis name.
    shard: ``"database"`` or ``"queries"`` (see the module docstring); default
      ``"queries"`` when the mesh's devices are CPUs, else ``"database"``.
    query_batch: queries per jitted call (the last batch is padded).
    block_size: database rows scored per step of the scan (see :mod:`knn`).
    group_size: rows per group in the two-pass top-k (see :mod:`knn`).
    sub_batch: queries whose gathered rows are scored at once.
    max_cached_dim: prefixes up to this size get a normalised contiguous copy when
      they are a first (whole-database) stage; default ``min(64, D // 8)``. Larger
      prefixes are read from the stored rows and scaled by cached inverse norms.

  Raises:
    ValueError: for a database that is not a float ``[N, D]`` array with ``N, D >= 1``,
      one with NaN or inf values (the message names the rows), or an option outside
      its domain.
  """

  def __init__(self, database: Array, *, mesh: Mesh | None = None, axis: str = "db",
               shard: str | None = None, query_batch: int = 256, block_size: int = 4096,
               group_size: int = 32, sub_batch: int = 8, max_cached_dim: int | None = None):
    if not hasattr(database, "ndim"):
      database = np.asarray(database)
    if database.ndim != 2 or database.shape[0] < 1 or database.shape[1] < 1:
      raise ValueError(f"database must be [N, D] with N, D >= 1, got shape {database.shape}"
                       + (" (one vector? pass x[None, :])" if database.ndim == 1 else ""))
    if not jnp.issubdtype(database.dtype, jnp.floating):  # bfloat16 too (stored as float32)
      raise ValueError(f"database must be floating point, got {database.dtype} (for binary "
                       f"or int8 codes use mrl_jax.evaluate.codes.hamming_search / int8_search,"
                       f" or shortlist_codes= on a float index)")
    for name, v in (("query_batch", query_batch), ("block_size", block_size),
                    ("group_size", group_size), ("sub_batch", sub_batch)):
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    if max_cached_dim is not None and (isinstance(max_cached_dim, bool) or not isinstance(
        max_cached_dim, (int, np.integer)) or max_cached_dim < 0):
      raise ValueError(f"max_cached_dim must be a non-negative int or None, got "
                       f"{max_cached_dim!r}")
    if mesh is None and len(jax.devices()) > 1:
      mesh = Mesh(np.array(jax.devices()), (axis,))
    if mesh is not None and mesh.axis_names != (axis,):
      raise ValueError(f"mesh must have the single axis {axis!r}, got {mesh.axis_names}")
    if shard is None:
      cpu = mesh is None or all(d.platform == "cpu" for d in mesh.devices.flat)
      shard = "queries" if cpu else "database"
    if shard not in SHARD_MODES:
      raise ValueError(f"shard must be one of {SHARD_MODES}, got {shard!r}")
    self.n, self.embed_dim = int(database.shape[0]), int(database.shape[1])
    self.mesh, self.axis, self.shard = mesh, axis, shard
    self.num_shards = 1 if mesh is None or shard == "queries" else mesh.size
    per_call = sub_batch * (mesh.size if mesh is not None and shard == "queries" else 1)
    self.query_batch = -(-query_batch // per_call) * per_call
    self.block_size, self.group_size, self.sub_batch = block_size, group_size, sub_batch
    self.max_cached_dim = (min(64, self.embed_dim // 8) if max_cached_dim is None
                           else max_cached_dim)
    self.rows_per_shard = -(-self.n // self.num_shards)
    self._db = self._place(database, self.embed_dim)
    codes_lib.refuse_nonfinite(self._db, "the database")
    self._inv_norm: dict[int, jax.Array] = {}
    self._normalised: dict[int, jax.Array] = {}
    self._codes: dict[tuple[str, int], jax.Array] = {}
    self.faiss_indexes: dict[tuple, object] = {}  # filled by mrl_jax.evaluate.faiss_backend

  # -- storage -------------------------------------------------------------------------

  def _row_sharding(self) -> NamedSharding | None:
    if self.mesh is None:
      return None
    return NamedSharding(self.mesh, P() if self.shard == "queries" else P(self.axis, None))

  def _place(self, x: Array, dim: int) -> jax.Array:
    """Put ``x [N, dim]`` on the device(s), padding rows to a multiple of the shards."""
    pad = self.rows_per_shard * self.num_shards - self.n
    if pad:
      x = jnp.concatenate([jnp.asarray(x, jnp.float32), jnp.zeros((pad, dim), jnp.float32)])
    if isinstance(x, np.ndarray):
      x = np.asarray(x, np.float32)
      sharding = self._row_sharding() or jax.devices()[0]
      return jax.device_put(x, sharding, may_alias=True)
    x = x.astype(jnp.float32)
    return x if self.mesh is None else jax.device_put(x, self._row_sharding())

  @property
  def database(self) -> jax.Array:
    """The stored ``[N_padded, D]`` database (rows past ``N`` are zero padding)."""
    return self._db

  def inv_norm(self, dim: int) -> jax.Array:
    """``[N_padded]``: ``1 / |x[:dim]|`` for every row (0 for zero rows), cached."""
    if dim not in self._inv_norm:
      self._inv_norm[dim] = _inverse_norms(self._db, dim)
    return self._inv_norm[dim]

  def normalised(self, dim: int) -> jax.Array | None:
    """The cached ``[N_padded, dim]`` normalised prefix, or ``None`` for large ``dim``."""
    if dim > self.max_cached_dim:
      return None
    if dim not in self._normalised:
      self._normalised[dim] = _scale_prefix(self._db, self.inv_norm(dim), dim)
    return self._normalised[dim]

  def codes(self, kind: str, dim: int) -> jax.Array:
    """``[N_padded, W]`` codes of the normalised ``dim``-prefixes, cached.

    ``uint8`` packed sign bits (``W = ceil(dim / 8)``) for ``"ubinary"``, ``int8``
    (``W = dim``) for ``"int8_symmetric"``: :func:`~mrl_jax.evaluate.codes.quantize_embeddings`
    of :func:`normalize_prefix`, exactly as the queries are coded.
    """
    codes_lib.check_kind(kind)
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not (
        1 <= dim <= self.embed_dim):
      raise ValueError(f"dim must be an int in [1, {self.embed_dim}], got {dim!r}")
    key = (kind, int(dim))
    if key not in self._codes:
      self._codes[key] = _code_prefix(self._db, int(dim), kind)
    return self._codes[key]

  def scan_codes(self, kind: str, dim: int) -> jax.Array:
    """What the scan reads: :func:`~mrl_jax.evaluate.codes.to_words` lanes for binary."""
    key = (kind + "-words", int(dim))
    if key not in self._codes:
      c = self.codes(kind, dim)
      self._codes[key] = jax.jit(codes_lib.to_words)(c) if kind == "ubinary" else c
    return self._codes[key]

  def shortlist_bytes_per_vector(self, dim: int, codes: str | None = None) -> int:
    """Bytes per database vector that a stage-0 scan at ``dim`` reads.

    ``4 * dim`` for floats (the cached normalised prefix, or the prefix of each stored
    row), ``ceil(dim / 8)`` for binary codes, ``dim`` for int8 codes.
    """
    codes_lib.check_kind(codes, allow_none=True)
    return 4 * int(dim) if codes is None else codes_lib.code_width(int(dim), codes)

  def prepare(self, dims: Sequence[int], *, first_stage: bool = True,
              shortlist_codes: str | None = None) -> None:
    """Build the caches a cascade needs now (else they are built on first use)."""
    codes_lib.check_kind(shortlist_codes, allow_none=True)
    for i, d in enumerate(dims):
      self.inv_norm(d)
      if i == 0 and first_stage:
        if shortlist_codes is None:
          self.normalised(d)
        else:
          self.scan_codes(shortlist_codes, d)

  # -- search --------------------------------------------------------------------------

  def cascade(self, queries: Array, dims: Sequence[int], keeps: Sequence[int], *,
              shortlist: tuple[np.ndarray, np.ndarray] | None = None,
              shortlist_codes: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Shortlist then re-rank: stage ``i`` scores with ``dims[i]`` dims, keeps ``keeps[i]``.

    Stage 0 is an exact search over the whole database (unless ``shortlist`` is
    given: then stage 0's ``(scores, ids)`` come from elsewhere, e.g. FAISS, and
    only the later stages run here). Later stages re-score the survivors of the
    previous stage at their own prefix size.

    Args:
      queries: ``[Q, Dq]`` float with ``Dq >= max(dims)``; prefixes are normalised
        here. NaN or inf in ``queries[:, :max(dims)]`` is refused.
      dims: non-decreasing prefix sizes, one per stage.
      keeps: non-increasing counts, ``keeps[0] <= N``.
      shortlist: optional ``(scores [Q, keeps[0]], ids [Q, keeps[0]])`` for stage 0.
      shortlist_codes: ``None`` (float stage 0), ``"ubinary"`` or ``"int8_symmetric"`` (stage 0
        scans codes of the ``dims[0]``-prefixes, see the module docstring).

    Returns:
      ``(scores [Q, keeps[-1]], ids [Q, keeps[-1]])`` as numpy, best first; scores are
      the cosine similarities at ``dims[-1]`` (for a one-stage code search: the code
      similarity, ``dims[0] - 2 * hamming`` or the int8 dot product).

    Raises:
      ValueError: for a bad cascade (:func:`check_cascade`), queries that are not
        ``[Q, Dq]`` floats with ``Dq >= max(dims)``, non-finite queries, or an
        unknown ``shortlist_codes``.
    """
    codes_lib.check_kind(shortlist_codes, allow_none=True)
    dims, keeps = as_ints(dims, "dims"), as_ints(keeps, "keeps")
    check_cascade(dims, keeps, self.n, self.embed_dim)
    queries = check_queries(queries, dims[-1])
    if shortlist is not None and len(dims) == 1:
      return tuple(np.asarray(a) for a in shortlist)
    external = shortlist is not None
    codes = None if external else shortlist_codes
    self.prepare(dims, first_stage=not external, shortlist_codes=codes)
    program = self._program(dims, keeps, external=external, codes=codes)
    caches = self._caches(dims, external=external, codes=codes)
    num_q = queries.shape[0]
    out_s, out_i = [], []
    for lo in range(0, num_q, self.query_batch):
      q = _pad_rows(queries[lo:lo + self.query_batch], self.query_batch)
      args = (q,)
      if shortlist is not None:
        args += (_pad_rows(shortlist[1][lo:lo + self.query_batch], self.query_batch),)
      s, i = program(*args, *caches)
      out_s.append(s)
      out_i.append(i)
    scores = np.concatenate([np.asarray(s) for s in out_s])[:num_q]
    ids = np.concatenate([np.asarray(i) for i in out_i])[:num_q]
    return scores, ids

  def search(self, queries: Array, k: int, dim: int | None = None, *,
             codes: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` cosine search with the first ``dim`` dims (default: all).

    With ``codes="ubinary"`` / ``"int8_symmetric"`` the search ranks codes of the prefixes
    (Hamming distance / int8 dot product) instead.

    Returns:
      ``(scores [Q, k], ids [Q, k])``, best first (ties: smaller id first).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
      raise ValueError(f"k must be an int >= 1, got {k!r}")  # named k, not the cascade's keeps
    return self.cascade(queries, (self.embed_dim if dim is None else dim,), (k,),
                        shortlist_codes=codes)

  def _caches(self, dims: tuple[int, ...], external: bool,
              codes: str | None = None) -> tuple[jax.Array, ...]:
    out = [self._db]
    for i, d in enumerate(dims):
      out.append(self.inv_norm(d))
      if i == 0 and not external and codes is not None:
        out.append(self.scan_codes(codes, d))
        continue
      cached = self.normalised(d) if (i == 0 and not external) else None
      out.append(self._db if cached is None else cached)
    return tuple(out)

  def block_plan(self, dim: int, codes: str | None = None) -> knn.BlockPlan:
    """How a stage-0 scan at ``dim`` (of floats or codes) cuts this device's rows."""
    width = dim if codes is None else int(self.scan_codes(codes, dim).shape[1])
    return knn.block_plan(self.rows_per_shard, self._block_rows(width), self.group_size)

  def _program(self, dims: tuple[int, ...], keeps: tuple[int, ...], external: bool,
               codes: str | None = None) -> Callable:
    width = None if codes is None else int(self.scan_codes(codes, dims[0]).shape[1])
    plan = self.block_plan(dims[0], codes)
    return _cascade_program(dims, keeps, external,
                            (not external) and dims[0] <= self.max_cached_dim, plan, self.n,
                            self.rows_per_shard, self.sub_batch, self.mesh, self.axis,
                            self.shard, codes, width)

  def _block_rows(self, dim: int) -> int:
    """Rows per scan block: ``block_size`` at small dims, ~4 MB of rows at large ones."""
    return max(self.group_size, min(self.block_size, (1 << 20) // max(dim, 1)))


@functools.partial(jax.jit, static_argnums=1)
def _inverse_norms(x: jax.Array, dim: int) -> jax.Array:
  return ops.inverse_norms(x[:, :dim])  # scale-safe: max-abs rescaled before squaring


@functools.partial(jax.jit, static_argnums=2)
def _scale_prefix(x: jax.Array, inv: jax.Array, dim: int) -> jax.Array:
  return x[:, :dim] * inv[:, None]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _code_prefix(x: jax.Array, dim: int, kind: str) -> jax.Array:
  return codes_lib.quantize_embeddings(normalize_prefix(x, dim), kind)


def _query_codes(q: jax.Array, dim: int, kind: str) -> jax.Array:
  """Queries coded as the database is (:meth:`PrefixIndex.codes`), as the scan reads them."""
  c = codes_lib.quantize_embeddings(normalize_prefix(q, dim), kind)
  return codes_lib.to_words(c) if kind == "ubinary" else c


@functools.lru_cache(maxsize=256)
def _cascade_program(dims, keeps, external, stage0_cached, plan, n, rows, sub_batch, mesh, axis,
                     shard, codes=None, width=None):
  """The jitted program for one cascade configuration (shared by indexes of one shape)."""
  by_rows = mesh is not None and shard == "database"
  local = functools.partial(_local_cascade, dims=dims, keeps=keeps, external=external,
                            stage0_cached=stage0_cached, plan=plan, n=n, rows=rows,
                            sub_batch=sub_batch, axis=axis if by_rows else None, codes=codes,
                            width=width)
  if mesh is not None:
    per_query = 1 + int(external)  # queries (and an external shortlist)
    stored = 1 + 2 * len(dims)  # database, then (inverse norms, matrix) per stage
    q_spec, db_spec = (P(), P(axis)) if by_rows else (P(axis), P())
    local = jax.shard_map(local, mesh=mesh, in_specs=(q_spec,) * per_query + (db_spec,) * stored,
                          out_specs=(q_spec, q_spec), check_vma=False)
  return jax.jit(local)


def _local_cascade(q, *args, dims, keeps, external, stage0_cached, plan, n, rows, sub_batch,
                   axis, codes=None, width=None):
  """One device's part of a cascade on a batch of queries (see :meth:`PrefixIndex.cascade`)."""
  if external:
    ids, args = args[0], args[1:]
  db, caches = args[0], args[1:]
  offset = 0 if axis is None else jax.lax.axis_index(axis) * rows
  n_valid = jnp.clip(n - offset, 0, rows)
  if not external and codes is not None:
    scores, ids = knn.local_top_k(_query_codes(q, dims[0], codes), caches[1], None, n_valid,
                                  min(keeps[0], rows), plan, width, sub_batch,
                                  codes_lib.KNN_KIND[codes])
    if codes == "ubinary":  # -hamming -> the +-1 inner product dims[0] - 2 * hamming
      scores = dims[0] + 2.0 * scores
    ids = ids + offset
    if axis is not None:
      scores, ids = _merge_top_k(scores, ids, keeps[0], axis)
  elif not external:
    inv, mat = caches[0], caches[1]
    scale = None if stage0_cached else inv
    scores, ids = knn.local_top_k(normalize_prefix(q, dims[0]), mat, scale, n_valid,
                                  min(keeps[0], rows), plan, dims[0], sub_batch)
    ids = ids + offset
    if axis is not None:
      scores, ids = _merge_top_k(scores, ids, keeps[0], axis)
  for i in range(1, len(dims)):
    inv = caches[2 * i]
    local_ids = ids - offset
    owned = (local_ids >= 0) & (local_ids < n_valid)
    s = knn.gather_scores(normalize_prefix(q, dims[i]), db, inv,
                          jnp.where(owned, local_ids, 0), dims[i], sub_batch)
    s = jnp.where(owned, s, 0.0)
    if axis is not None:
      s = jax.lax.psum(s, axis)
    scores, pos = jax.lax.top_k(s, keeps[i])
    ids = jnp.take_along_axis(ids, pos, axis=-1)
  return scores, ids


def _merge_top_k(scores, ids, k, axis):
  """Merge the per-device top-k lists into the global one."""
  all_s = jax.lax.all_gather(scores, axis, axis=1, tiled=True)  # [Qb, devices * k]
  all_i = jax.lax.all_gather(ids, axis, axis=1, tiled=True)
  scores, pos = jax.lax.top_k(all_s, k)
  return scores, jnp.take_along_axis(all_i, pos, axis=-1)


def as_ints(values: Sequence[int], name: str) -> tuple[int, ...]:
  """``values`` as a tuple of ints; a ValueError naming ``name`` for anything else."""
  if isinstance(values, (str, bytes)) or np.ndim(values) > 1:
    raise ValueError(f"{name} must be a sequence of ints, got {values!r}")
  out = []
  for v in np.atleast_1d(values).tolist():
    if isinstance(v, bool) or not isinstance(v, int):
      raise ValueError(f"{name} must be ints, got {values!r}")
    out.append(v)
  return tuple(out)


def check_queries(queries: Array, dim: int) -> Array:
  """Shape, dtype and finiteness of the part of ``queries`` a search reads."""
  if not hasattr(queries, "ndim"):
    queries = np.asarray(queries)
  if queries.ndim != 2:
    hint = " (one query? pass q[None, :])" if queries.ndim == 1 else ""
    raise ValueError(f"queries must be [Q, D], got shape {queries.shape}{hint}")
  if not jnp.issubdtype(queries.dtype, jnp.floating):
    raise ValueError(f"queries must be floating point embeddings, got {queries.dtype}")
  if queries.shape[1] < dim:
    raise ValueError(f"queries have {queries.shape[1]} dims, the search needs {dim}")
  if queries.shape[0] < 1:
    raise ValueError("no queries")
  codes_lib.refuse_nonfinite(queries[:, :dim], f"queries[:, :{dim}]")
  return queries


def _pad_rows(x: Array, rows: int) -> Array:
  if x.shape[0] == rows:
    return x
  pad = [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
  return np.pad(np.asarray(x), pad) if isinstance(x, np.ndarray) else jnp.pad(x, pad)
