"""Padded pair batches from prepared shards, built in grain workers; batch ``s`` = f(seed, s).

Global batch ``s`` (all processes together):

1. Rows. :meth:`~mrl_jax.data.text.PairMixture.batch_indices` ``(s)`` picks the
   source ``k`` and ``B`` rows of it (exact step shares per file, every row once
   per epoch). With ``batch_sampler="no_duplicates"`` (sentence-transformers'
   ``NoDuplicatesBatchSampler``, https://sbert.net/docs/package_reference/
   sentence_transformer/sampler.html) those rows are offered in order and a row
   is kept only if none of its texts (anchor, positive, negatives) equals a text
   of a row already kept; the batch is then filled with rows drawn uniformly
   from the source by ``np.random.default_rng([seed, 3, s]).integers(0, N_k, B)``
   (``B`` at a time), offered the same way. Texts are compared by their 64-bit
   BLAKE2b hashes (``rows.bin``): two different texts of one batch collide with
   probability about ``(B (2 + K))**2 / 2**65``.
2. Lengths. Each column group (anchors, positives, every negative) is padded to
   the smallest bucket holding its longest text in the GLOBAL batch (one length
   for all groups with ``shared_length``), read from ``rows.bin`` for the ``B``
   rows: every process pads to the same lengths.
3. Process ``p`` of ``P`` reads the records of rows ``[p B / P, (p + 1) B / P)``
   only.

So batch ``s`` depends on the prepared files, ``seed``, ``B``, the sampler and
``s``; a run resumed at step ``s`` reads nothing before it (O(1) resume), on any
process count. The same arrays as :func:`~mrl_jax.data.text.tokenize_pairs` of
the rows' texts (the tests check it).
"""

from __future__ import annotations

import atexit
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from mrl_jax.data.prepared_pairs import PreparedPairs
from mrl_jax.data.text import PairMixture

SAMPLERS = ("default", "no_duplicates")
_NO_DUPLICATES_TAG = 3  # after text.py's schedule (1) and permutation (2) streams
MAX_DRAWS_PER_ROW = 100


def no_duplicate_rows(source: PreparedPairs, primary: Sequence[int],
                      rng: np.random.Generator) -> np.ndarray:
  """``len(primary)`` rows of ``source`` without a text twice (rule 1 of the module docstring).

  Raises:
    ValueError: no such batch found within ``MAX_DRAWS_PER_ROW * B`` extra draws
      (a source with too few distinct texts), naming the source.
  """
  size = len(primary)
  chosen: list[int] = []
  taken: set[int] = set()
  seen: set[int] = set()

  def offer(rows: Sequence[int]) -> None:
    for r, hashes in zip(rows, source.row_info(rows)["hash"].tolist(), strict=True):
      if len(chosen) == size:
        return
      if r in taken or not seen.isdisjoint(hashes):
        continue
      chosen.append(r)
      taken.add(r)
      seen.update(hashes)

  offer(list(primary))
  draws = 0
  while len(chosen) < size:
    if draws >= MAX_DRAWS_PER_ROW * size:
      raise ValueError(f"{source.path}: found only {len(chosen)} of {size} rows without a "
                       f"duplicate text after {draws} random draws; lower config.batch_size or "
                       "use config.batch_sampler='default'")
    offer(rng.integers(0, len(source), size).tolist())
    draws += size
  return np.asarray(chosen, np.int64)


def global_rows(mixture: PairMixture, step: int, *,
                batch_sampler: str = "default") -> tuple[int, np.ndarray]:
  """``(source k, rows [B])`` of global batch ``step`` (rule 1 of the module docstring)."""
  if batch_sampler not in SAMPLERS:
    raise ValueError(f"batch_sampler={batch_sampler!r} must be one of {SAMPLERS}")
  pairs = mixture.batch_indices(step)
  k, rows = pairs[0][0], np.asarray([r for _, r in pairs], np.int64)
  if batch_sampler == "no_duplicates":
    rng = np.random.default_rng([mixture.seed, _NO_DUPLICATES_TAG, int(step)])
    rows = no_duplicate_rows(mixture.sources[k], rows, rng)
  return k, rows


def _bucket(longest: int, buckets: Sequence[int]) -> int:
  fits = [b for b in buckets if b >= longest]
  if not fits:
    raise ValueError(f"a text of {longest} tokens exceeds every bucket {tuple(buckets)}")
  return fits[0]


def _pad(records, lengths: np.ndarray, columns: Sequence[int], length: int,
         pad_id: int) -> dict[str, np.ndarray]:
  """Columns ``columns`` of ``records`` right-padded to ``length``: arrays ``[n, m, T]``."""
  n, m = len(records), len(columns)
  mask = np.arange(length)[None, None, :] < lengths[:, columns, None]
  ids = np.full((n, m, length), pad_id, np.int32)
  types = np.zeros((n, m, length), np.int32)
  ids[mask] = np.concatenate([rec[0][c] for rec in records for c in columns])
  types[mask] = np.concatenate([rec[1][c] for rec in records for c in columns])
  return {"input_ids": ids, "attention_mask": mask.astype(np.int32), "token_type_ids": types}


class LocalBatches:
  """``step -> this process's rows of global batch step`` (module docstring), picklable.

  Holds the prepared folders' names and the mixture's arguments; every process
  (grain worker) opens the files itself. (This module does not import
  :mod:`mrl_jax.data.grain_input`'s helpers: that module imports TensorFlow,
  which every spawned worker would then load.)

  Returns (when called):
    ``{"anchor": arrays [b, Ta], "positive": arrays [b, Tp]}`` plus, with ``K > 0``
    hard negatives, ``"negative": arrays [b, K, Tn]``; ``arrays`` is
    ``{"input_ids", "attention_mask", "token_type_ids"}`` int32, ``b = B / P``.
  """

  def __init__(self, sources: Sequence[PreparedPairs], weights: Sequence[float] | None, *,
               batch_size: int, seed: int, buckets: Sequence[int], shared_length: bool = False,
               batch_sampler: str = "default", process_index: int = 0, process_count: int = 1):
    if batch_sampler not in SAMPLERS:
      raise ValueError(f"batch_sampler={batch_sampler!r} must be one of {SAMPLERS}")
    for name, value, low in (("process_index", process_index, 0),
                             ("process_count", process_count, 1)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if process_index >= process_count or batch_size % process_count:
      raise ValueError(f"need 0 <= process_index < process_count dividing batch_size="
                       f"{batch_size}; got process_index={process_index}, "
                       f"process_count={process_count}")
    self.local = batch_size // process_count
    self.mixture = PairMixture(sources, weights, batch_size=batch_size, seed=seed)
    self._args = (list(sources), weights, batch_size, seed)
    self.buckets, self.shared_length = tuple(buckets), bool(shared_length)
    self.batch_sampler, self.process_index = batch_sampler, process_index

  def __getstate__(self) -> dict:
    return {k: v for k, v in self.__dict__.items() if k != "mixture"}  # its caches are local

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    sources, weights, batch_size, seed = self._args
    self.mixture = PairMixture(sources, weights, batch_size=batch_size, seed=seed)

  def __call__(self, step: int) -> dict[str, dict[str, np.ndarray]]:
    k, rows = global_rows(self.mixture, int(step), batch_sampler=self.batch_sampler)
    source = self.mixture.sources[k]
    lengths = source.row_info(rows)["length"].astype(np.int64)  # [B, C], all processes' rows
    mine = slice(self.process_index * self.local, (self.process_index + 1) * self.local)
    records = source.records(rows[mine])
    groups = {"anchor": [0], "positive": [1]}
    if lengths.shape[1] > 2:
      groups["negative"] = list(range(2, lengths.shape[1]))
    shared = _bucket(int(lengths.max()), self.buckets) if self.shared_length else None
    out = {}
    for name, cols in groups.items():
      length = shared or _bucket(int(lengths[:, cols].max()), self.buckets)
      arrays = _pad(records, lengths[mine], cols, length, source.pad_id)
      out[name] = arrays if name == "negative" else {key: v[:, 0] for key, v in arrays.items()}
    return out


def init_worker(worker_index: int, worker_count: int) -> None:
  """grain's ``worker_init_fn`` (Linux): bounded memory, and no orphan when the trainer dies.

  * ``mallopt(M_ARENA_MAX, 2)``: the ArrayRecord reader's threads each get a glibc
    malloc arena, and freed record buffers stay resident in them: measured on a
    1M-row shard, resident memory grew towards the shard's size (+486 MiB after 60
    batches of 1024 random reads); with few arenas it stays flat.
  * ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: a worker whose trainer was killed
    (``kill -9``, preemption) exits too instead of lingering.
  """
  del worker_index, worker_count
  if not sys.platform.startswith("linux"):
    return
  import ctypes
  import signal

  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mallopt(-8, 2)  # M_ARENA_MAX
    libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
  except (AttributeError, OSError):  # another C library: keep its defaults
    pass


def train_batches(batches: LocalBatches, *, start_step: int = 0, worker_count: int = 0,
                  prefetch: int = 2) -> Iterator[dict[str, Any]]:
  """``batches(s)`` for ``s = start_step, start_step + 1, ...`` (endless), built ahead.

  Args:
    batches: the per-step map (:class:`LocalBatches`).
    start_step: the first step (resuming: nothing before it is read).
    worker_count: grain worker processes (``mp_prefetch``) building batches in
      parallel, in order; 0: two threads of this process.
    prefetch: batches built ahead (per worker with ``worker_count > 0``).

  Returns:
    A grain iterator (``close()``-able where grain offers it).
  """
  for name, value, low in (("start_step", start_step, 0), ("worker_count", worker_count, 0),
                           ("prefetch", prefetch, 1)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
  ds = grain.MapDataset.range(int(start_step), sys.maxsize).map(batches)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2 if not worker_count else 1,
                                            prefetch_buffer_size=prefetch))
  if worker_count:
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain reads its absl flags' defaults (outside train.py)
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                     per_worker_buffer_size=prefetch),
                        worker_init_fn=init_worker)
    it = iter(it)
    # Stop the workers before interpreter shutdown: grain's shared-memory buffers, freed
    # later by the garbage collector, print tracebacks once their modules are gone.
    atexit.register(it.close)
    return it
  return iter(it)


def local_batches(sources: Sequence[PreparedPairs], weights: Sequence[float] | None, *,
                  batch_size: int, seed: int, buckets: Sequence[int], shared_length: bool = False,
                  batch_sampler: str = "default", process_index: int | None = None,
                  process_count: int | None = None) -> LocalBatches:
  """:class:`LocalBatches` for this process (default: ``jax.process_index()``, ``_count()``)."""
  import jax  # not at module level: grain workers import this module, and need no jax

  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  return LocalBatches(sources, weights, batch_size=batch_size, seed=seed, buckets=buckets,
                      shared_length=shared_length, batch_sampler=batch_sampler,
                      process_index=index, process_count=count)
