"""Exact top-k search kernels in JAX (one device's share of the work).

Three kinds of score (``kind``), larger is better:

* ``"float"``: inner products ``s[q, n] = <queries[q], database[n, :dim]> * scale[n]``;
  with L2-normalised queries and ``scale[n] = 1 / ||database[n, :dim]||`` (or a
  database that is already normalised, ``scale=None``) they are cosine similarities.
* ``"hamming"``: ``s[q, n] = -popcount(queries[q] XOR database[n])`` summed over the
  ``dim`` words of packed sign bits (unsigned integer lanes, see
  :mod:`mrl_jax.evaluate.codes`): minus the Hamming distance.
* ``"int8"``: ``s[q, n] = <queries[q], database[n, :dim]>`` of int8 codes. The
  products are formed in float32, which is exact while every partial sum stays below
  ``2**24`` in magnitude (always true for ``dim <= 1040``, and for codes of unit
  vectors at any size; :mod:`mrl_jax.evaluate.codes` checks it).

Code scores are small integers held exactly in float32, so they share the float
machinery below (``lax.top_k`` on integers is a slow sort on CPU).

Top-k selection is the expensive part of a low-dimensional scan (a 16-d score costs
16 multiply-adds; a heap or ``lax.top_k`` over every score costs more). So the scan is
done in two passes, and the full ``[Q, N]`` score matrix never materialises:

1. The database is read in blocks of ``block`` rows; each block's scores
   ``[Qb, block]`` are reduced to the maximum of every group of ``group`` consecutive
   rows, giving ``[Qb, N / group]`` group maxima.
2. ``lax.top_k`` picks the ``k`` groups with the largest maxima. Every item
   of the true top ``k`` lies in one of them (each group ranked above the group of a
   top-``k`` item holds a distinct item that ranks above it, so there are fewer than
   ``k`` such groups). Only those ``k * group`` rows are scored again, and
   ``lax.top_k`` over them gives the answer.

The result is exact: the ``k`` largest scores and their ids, ranked by decreasing
score and, among equal scores, by increasing id (the smaller id wins). The tie rule
holds because groups are consecutive ids and ``lax.top_k`` puts the lower index first
among equal values: the chosen groups are put back in id order before pass 2. (With
float scores, two values that differ only by rounding between the passes may swap;
code scores are exact integers.)

The last block is shifted back to end at row ``N`` (``dynamic_slice`` semantics) and
the rows it shares with the previous block are masked, so no padding copy of the
database is made. Rows at or after ``n_valid`` (padding added for sharding) are
masked too.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

KINDS = ("float", "hamming", "int8")


@dataclasses.dataclass(frozen=True)
class BlockPlan:
  """How an ``n``-row database is cut for the two-pass scan.

  Attributes:
    n: rows stored on this device.
    group: rows per group (pass 1 keeps one maximum per group).
    block: rows per block, a multiple of ``group``, ``<= n``.
    num_blocks: ``ceil(n / block)``; the last block starts at ``n - block``.
  """

  n: int
  group: int
  block: int
  num_blocks: int

  @property
  def groups_per_block(self) -> int:
    return self.block // self.group

  @property
  def num_groups(self) -> int:
    return self.num_blocks * self.groups_per_block


def block_plan(n: int, block: int, group: int) -> BlockPlan:
  """A :class:`BlockPlan` for ``n`` rows with blocks and groups at most the given sizes.

  A database of at most ``block`` rows is one block with groups of one row.
  """
  if n < 1:
    raise ValueError(f"the database is empty (n={n})")
  if block < 1 or group < 1:
    raise ValueError(f"block and group sizes must be positive, got block={block}, group={group}")
  if n <= block:  # one block: top-k straight from its scores, no group pass
    return BlockPlan(n=n, group=1, block=n, num_blocks=1)
  g = min(group, block)
  nb = block // g * g
  return BlockPlan(n=n, group=g, block=nb, num_blocks=-(-n // nb))


def cross_scores(q: jax.Array, rows: jax.Array, kind: str = "float") -> jax.Array:
  """``[Qb, W] x [R, W] -> [Qb, R]`` float32 scores of one ``kind`` (module docstring)."""
  if kind == "hamming":
    bits = jax.lax.population_count(q[:, None, :] ^ rows[None, :, :]).astype(jnp.int32)
    return (-jnp.sum(bits, axis=-1)).astype(jnp.float32)
  if kind == "int8":
    return jnp.dot(q.astype(jnp.float32), rows.astype(jnp.float32).T)
  return jnp.dot(q, rows.T, preferred_element_type=jnp.float32)


def batched_scores(q: jax.Array, rows: jax.Array, kind: str = "float") -> jax.Array:
  """``[B, W] x [B, ..., W] -> [B, ...]``: each query against its own rows."""
  if kind == "hamming":
    qb = q.reshape(q.shape[:1] + (1,) * (rows.ndim - 2) + q.shape[1:])
    bits = jax.lax.population_count(rows ^ qb).astype(jnp.int32)
    return (-jnp.sum(bits, axis=-1)).astype(jnp.float32)
  if kind == "int8":
    q, rows = q.astype(jnp.float32), rows.astype(jnp.float32)
  return jnp.einsum("q...d,qd->q...", rows, q, preferred_element_type=jnp.float32)


def _block_scores(q, db, scale, start, plan: BlockPlan, dim: int, kind: str):
  """Scores ``[Qb, block]`` of the queries against rows ``start : start + block``."""
  blk = jax.lax.dynamic_slice(db, (start, 0), (plan.block, dim))
  s = cross_scores(q, blk, kind)
  if scale is not None:
    s = s * jax.lax.dynamic_slice(scale, (start,), (plan.block,))[None, :]
  return s


def group_maxima(q: jax.Array, db: jax.Array, scale: jax.Array | None, n_valid: jax.Array,
                 plan: BlockPlan, dim: int, kind: str = "float") -> jax.Array:
  """Pass 1: the best score in every group of ``plan.group`` rows.

  Args:
    q: ``[Qb, dim]`` queries.
    db: ``[n, D]`` database, ``D >= dim``; only its first ``dim`` columns are read.
    scale: ``[n]`` per-row factor applied to the scores, or ``None``.
    n_valid: scalar int; rows ``>= n_valid`` are ignored (score ``-inf``). They must
      all lie in the last block (padding of fewer than ``plan.block`` rows).
    plan: the block plan for ``n`` rows.
    dim: how many leading columns to use.
    kind: ``"float"``, ``"hamming"`` or ``"int8"`` (module docstring).

  Returns:
    ``[Qb, plan.num_groups]``; group ``i`` covers block ``i // groups_per_block``.
  """
  qb = q.shape[0]
  reduce = lambda s: s.reshape(qb, plan.groups_per_block, plan.group).max(axis=-1)

  def body(b, _):
    return b + 1, reduce(_block_scores(q, db, scale, b * plan.block, plan, dim, kind))

  # The last block is the only one that can overlap its neighbour or hold padding,
  # so it alone pays for the mask.
  nominal = (plan.num_blocks - 1) * plan.block
  start = plan.n - plan.block
  rows = start + jnp.arange(plan.block)
  ok = (rows >= nominal) & (rows < n_valid)
  last = reduce(jnp.where(ok[None, :], _block_scores(q, db, scale, start, plan, dim, kind),
                          -jnp.inf))
  if plan.num_blocks == 1:
    return last
  _, head = jax.lax.scan(body, 0, None, length=plan.num_blocks - 1)  # [blocks - 1, Qb, gpb]
  return jnp.concatenate([head.transpose(1, 0, 2).reshape(qb, -1), last], axis=1)


def rescore_groups(q: jax.Array, db: jax.Array, scale: jax.Array | None, n_valid: jax.Array,
                   groups: jax.Array, plan: BlockPlan, dim: int, sub_batch: int,
                   kind: str = "float") -> tuple[jax.Array, jax.Array]:
  """Pass 2: score every row of the chosen groups.

  Args:
    q: ``[Qb, dim]``, ``Qb`` a multiple of ``sub_batch``.
    db, scale, n_valid, plan, dim, kind: as in :func:`group_maxima`.
    groups: ``[Qb, G]`` group indices.
    sub_batch: queries whose ``[sub_batch, G, group, dim]`` rows are gathered at once.

  Returns:
    ``(scores, rows)``, each ``[Qb, G * plan.group]``; rows that belong to another
    block or are past ``n_valid`` score ``-inf``.
  """
  nominal = groups // plan.groups_per_block * plan.block
  first = jnp.minimum(nominal, plan.n - plan.block) + groups % plan.groups_per_block * plan.group
  rows = first[..., None] + jnp.arange(plan.group)  # [Qb, G, group]
  take = lambda r: jax.lax.dynamic_slice(db, (r, 0), (plan.group, dim))

  def score(args):
    qs, fs = args
    cand = jax.vmap(jax.vmap(take))(fs)  # [sub_batch, G, group, dim]
    return batched_scores(qs, cand, kind)

  s = _map_sub_batches(score, (q, first), sub_batch)
  if scale is not None:
    s = s * scale[rows]
  ok = (rows >= nominal[..., None]) & (rows < n_valid)
  s = jnp.where(ok, s, -jnp.inf)
  qb = q.shape[0]
  return s.reshape(qb, -1), rows.reshape(qb, -1)


def _map_sub_batches(fn, args: tuple[jax.Array, ...], sub_batch: int) -> jax.Array:
  """``fn`` over consecutive slices of ``sub_batch`` queries (``lax.map``), concatenated.

  Keeps gathered temporaries small enough to stay in cache; falls back to one call
  when the batch is not a multiple of ``sub_batch``.
  """
  qb = args[0].shape[0]
  if qb <= sub_batch or qb % sub_batch:
    return fn(args)
  split = lambda a: a.reshape(qb // sub_batch, sub_batch, *a.shape[1:])
  out = jax.lax.map(fn, tuple(split(a) for a in args))
  return out.reshape(qb, *out.shape[2:])


def local_top_k(q: jax.Array, db: jax.Array, scale: jax.Array | None, n_valid: jax.Array,
                k: int, plan: BlockPlan, dim: int, sub_batch: int = 8,
                kind: str = "float") -> tuple[jax.Array, jax.Array]:
  """Exact top ``k`` rows of one device's database (ties: the smaller id first).

  Args:
    q: ``[Qb, dim]``; db ``[n, D]``; scale ``[n]`` or ``None``; n_valid scalar.
    k: how many rows to return, ``<= n_valid`` (else the tail scores ``-inf``).
    sub_batch: see :func:`rescore_groups`.
    kind: ``"float"``, ``"hamming"`` or ``"int8"`` (module docstring).

  Returns:
    ``(scores [Qb, k], ids [Qb, k])`` sorted by decreasing score, then increasing id;
    ids are local rows.
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  maxima = group_maxima(q, db, scale, n_valid, plan, dim, kind)
  if plan.group == 1:
    scores, ids = jax.lax.top_k(maxima, k)
    block_of = ids // plan.block
    start = jnp.minimum(block_of * plan.block, plan.n - plan.block)
    return scores, start + ids % plan.block
  _, groups = jax.lax.top_k(maxima, min(k, plan.num_groups))
  groups = ascending(groups)  # id order, so that top_k's tie rule is "smaller id first"
  s, rows = rescore_groups(q, db, scale, n_valid, groups, plan, dim, sub_batch, kind)
  scores, pos = jax.lax.top_k(s, k)
  return scores, jnp.take_along_axis(rows, pos, axis=-1)


def ascending(x: jax.Array) -> jax.Array:
  """Sort the last axis of small non-negative ints ``< 2**24`` (exact in float32).

  ``lax.top_k`` over float32 is a fast partial sort on CPU, where ``jnp.sort`` and
  integer ``top_k`` are slow general sorts.
  """
  neg, _ = jax.lax.top_k(-x.astype(jnp.float32), x.shape[-1])
  return (-neg).astype(x.dtype)


def gather_scores(q: jax.Array, db: jax.Array, scale: jax.Array | None, ids: jax.Array,
                  dim: int, sub_batch: int = 8) -> jax.Array:
  """Scores of given rows: ``s[q, j] = <q, db[ids[q, j], :dim]> * scale[ids[q, j]]``.

  Gathers only ``ids.shape[1]`` rows per query, ``sub_batch`` queries at a time so the
  gathered ``[sub_batch, K, dim]`` slab stays in cache. Out-of-range ids are clipped.

  Args:
    q: ``[Qb, dim]``.
    db: ``[n, D]``; scale: ``[n]`` or ``None``; ids: ``[Qb, K]`` local rows.

  Returns:
    ``[Qb, K]`` float32.
  """
  def score(args):
    qs, idx = args
    rows = jnp.take(db, idx, axis=0, mode="clip")[..., :dim]
    return jnp.einsum("qkd,qd->qk", rows, qs, preferred_element_type=jnp.float32)

  s = _map_sub_batches(score, (q, ids), sub_batch)
  if scale is not None:
    s = s * jnp.take(scale, ids, mode="clip")
  return s
