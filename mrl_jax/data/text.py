"""Text inputs for embedding training: readers, a mixture of files, and bucketed tokenization.

Files use sentence-transformers' column names (https://sbert.net/docs/sentence_transformer/
training_overview.html#dataset-format): ``anchor``, ``positive`` and optional hard
negatives, either one ``negative`` column or ``negative_1 .. negative_k``; STS
files use ``sentence1``, ``sentence2``, ``score``. Three formats:

* JSONL (``.jsonl``, ``.json``): one JSON object per line; other keys are ignored.
* TSV (``.tsv``, ``.txt``): a header row naming the columns, then one record per
  line, fields split on tabs with no quoting (as sentence-transformers reads
  STS-B: ``csv.QUOTE_NONE``), so a text cannot hold a tab or a line break.
* Parquet (``.parquet``, ``.pq``): read with ``pyarrow`` (the ``text`` extra).

Every error about a file's contents is a ``ValueError`` naming the file and, for
JSONL and TSV, the line (``path:line: ...``; Parquet: ``path: row i`` counting
from 0): bytes that are not UTF-8, a bad JSON line, a missing column (a TSV
header or Parquet schema without it is reported before any record), an empty or
non-string text, negative columns that differ between records, a non-numeric or
non-finite score. A missing file raises ``FileNotFoundError``; Parquet without
``pyarrow`` installed, ``ImportError``.

Contents:

* :class:`TextPairs` and :func:`read_text_pairs`: (anchor, positive, k negatives) rows.
* :func:`read_scored_pairs`: scored sentence pairs for Spearman evaluation
  (:mod:`mrl_jax.evaluate.sts`).
* :class:`PairMixture`: several :class:`TextPairs` mixed by weight, each global
  batch a pure function of ``(seed, step)``.
* :func:`tokenize_pairs` (with :class:`mrl_jax.tokenizer.TextTokenizer`): texts to
  ``int32`` arrays padded per batch to the smallest of a few bucket lengths.
* :func:`read_pairs`, :func:`tokenize_columns`: the earlier tuple-based reader
  and tokenizer (fixed columns, headerless TSV allowed).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import unicodedata
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from mrl_jax.core import fileio
from mrl_jax.tokenizer import TextTokenizer

PAIR_COLUMNS = ("anchor", "positive")
SCORED_COLUMNS = ("sentence1", "sentence2", "score")
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".tsv": "tsv", ".txt": "tsv",
           ".parquet": "parquet", ".pq": "parquet"}
_NUMBERED_NEGATIVE = re.compile(r"^negative_(\d+)$")


# --- Reading records ----------------------------------------------------------


def file_format(path: str) -> str:
  """``"jsonl"``, ``"tsv"`` or ``"parquet"`` from ``path``'s extension (see :data:`FORMATS`)."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in FORMATS:
    raise ValueError(f"{path}: unknown extension {ext!r}; use one of {sorted(FORMATS)}")
  return FORMATS[ext]


def _text_lines(path: str) -> Iterator[tuple[int, str]]:
  """``(line number from 1, text)`` of each non-blank line, decoded as strict UTF-8.

  A UTF-8 byte-order mark at the start is dropped; ``\\r\\n`` endings are accepted.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  with open(path, "rb") as f:
    for i, raw in enumerate(f, 1):
      if i == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{i}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                         f"{e.start + 1}: {e.reason})") from None
      line = line.rstrip("\r\n")
      if line.strip():
        yield i, line


def read_records(path: str, required: Sequence[str] = ()) -> Iterator[tuple[str, dict[str, Any]]]:
  """``(where, record)`` for every record of a JSONL, TSV (with header) or Parquet file.

  ``where`` is ``"path:line"`` (JSONL, TSV) or ``"path: row i"`` (Parquet), the
  prefix of every error about that record. A TSV header row or Parquet schema
  without a ``required`` column is an error before any record.
  """
  fmt = file_format(path)
  if fmt == "parquet":
    yield from _parquet_records(path, required)
    return
  lines = _text_lines(path)
  if fmt == "jsonl":
    for i, line in lines:
      try:
        record = fileio.loads_json(line)  # strict: a duplicated key is refused
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{i}: not a JSON object ({e.msg} at column {e.colno})") from None
      except ValueError as e:
        raise ValueError(f"{path}:{i}: not a valid JSON object: {e}") from None
      if not isinstance(record, dict):
        raise ValueError(f"{path}:{i}: expected a JSON object, got {type(record).__name__}")
      yield f"{path}:{i}", record
    return
  header = next(lines, None)
  if header is None:
    return
  columns = header[1].split("\t")
  duplicates = sorted({c for c in columns if columns.count(c) > 1})
  if duplicates or not all(columns):
    raise ValueError(f"{path}:{header[0]}: the header row must name each column once, "
                     f"got {columns}")
  missing = [c for c in required if c not in columns]
  if missing:
    raise ValueError(f"{path}:{header[0]}: the header row {columns} lacks {missing} (a TSV "
                     "file starts with a header row naming its columns)")
  for i, line in lines:
    fields = line.split("\t")
    if len(fields) != len(columns):
      raise ValueError(f"{path}:{i}: expected {len(columns)} tab-separated fields "
                       f"(header {columns}), got {len(fields)}")
    yield f"{path}:{i}", dict(zip(columns, fields, strict=True))


def _parquet_records(path: str, required: Sequence[str] = ()
                     ) -> Iterator[tuple[str, dict[str, Any]]]:
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise ImportError(f"{path}: reading Parquet needs pyarrow "
                      "(pip install 'mrl_jax[text]')") from None
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  try:
    parquet = pq.ParquetFile(path)
  except Exception as e:  # pyarrow's ArrowInvalid, OSError, ... on a corrupt file
    raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
  names = parquet.schema_arrow.names
  missing = [c for c in required if c not in names]
  if missing:
    raise ValueError(f"{path}: no column {missing}; has {names}")
  # One record batch at a time: memory of a batch, not of the file.
  i = 0
  for batch in parquet.iter_batches(batch_size=4096):
    for record in batch.to_pylist():
      yield f"{path}: row {i}", record
      i += 1


def _text(where: str, record: dict[str, Any], column: str) -> str:
  if column not in record:
    raise ValueError(f"{where}: missing column {column!r}; has {sorted(record)}")
  value = record[column]
  if not isinstance(value, str):
    raise ValueError(f"{where}: column {column!r} must be a string, got {value!r}")
  problem = text_problem(value)
  if problem:
    raise ValueError(f"{where}: column {column!r} {problem}")
  return value


# Characters that print nothing: separators (Z*), controls (Cc), format characters (Cf:
# zero-width space/joiners, BOM, bidi marks) and unassigned code points (Cn).
_INVISIBLE = ("Zs", "Zl", "Zp", "Cc", "Cf", "Cn")


def text_problem(text: str) -> str | None:
  """Why ``text`` cannot be a training or query text, or None when it can.

  Refused: an empty text, one of only invisible characters (whitespace, no-break
  spaces, zero-width spaces, BOMs, ...; it would tokenise to ``[CLS] [SEP]``),
  and one holding a lone surrogate (``"\\ud800"`` in JSON: not encodable as UTF-8,
  so not tokenisable).
  """
  if not text.strip(" \t\n\r\f\v"):
    return "is an empty text"
  if all(ch.isspace() or unicodedata.category(ch) in _INVISIBLE for ch in text):
    codes = ", ".join(f"U+{ord(ch):04X}" for ch in dict.fromkeys(text))
    return f"holds only invisible characters ({codes[:60]}): an empty text"
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    return (f"holds a lone surrogate U+{ord(text[e.start]):04X} at character {e.start} "
            "(not Unicode text; fix the file's escapes)")
  return None


def negative_columns(columns: Sequence[str]) -> tuple[str, ...]:
  """The hard-negative columns among ``columns``: ``("negative",)``, ``negative_1..k`` or ``()``.

  Raises:
    ValueError: both forms at once, or numbered columns that are not exactly
      ``negative_1 .. negative_k``.
  """
  numbered = sorted(int(m.group(1)) for c in columns if (m := _NUMBERED_NEGATIVE.match(c)))
  if "negative" in columns:
    if numbered:
      raise ValueError(f"use either 'negative' or 'negative_1..k', not both: {sorted(columns)}")
    return ("negative",)
  if numbered != list(range(1, len(numbered) + 1)):
    raise ValueError(f"hard-negative columns must be negative_1..negative_k without gaps, got "
                     f"{[f'negative_{n}' for n in numbered]}")
  return tuple(f"negative_{n}" for n in numbered)


# --- Pairs ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextPairs:
  """Training rows: ``anchors[i]``, ``positives[i]`` and ``k`` hard ``negatives[i]``.

  Attributes:
    anchors: ``N`` texts (queries).
    positives: ``N`` texts, ``positives[i]`` the match of ``anchors[i]``.
    negatives: ``N`` lists of the same length ``k >= 0`` (``None``: ``k = 0``).
    path: where the rows came from (a file, or a name such as ``"<stdlib:train>"``).

  Raises:
    ValueError: columns of different lengths, negatives of different counts, or
      a text that is not a non-empty string.
  """

  anchors: list[str]
  positives: list[str]
  negatives: list[list[str]] | None = None
  path: str = "<memory>"

  def __post_init__(self):
    anchors, positives = list(self.anchors), list(self.positives)
    negatives = ([[] for _ in anchors] if self.negatives is None
                 else [list(row) for row in self.negatives])
    if not len(anchors) == len(positives) == len(negatives):
      raise ValueError(f"{self.path}: {len(anchors)} anchors, {len(positives)} positives and "
                       f"{len(negatives)} negative lists; they must be equal")
    k = len(negatives[0]) if negatives else 0
    for i, row in enumerate(negatives):
      if len(row) != k:
        raise ValueError(f"{self.path}: row {i} has {len(row)} negatives, row 0 has {k}")
    for name, texts in (("anchors", anchors), ("positives", positives),
                        ("negatives", [t for row in negatives for t in row])):
      for t in texts:
        if not isinstance(t, str) or text_problem(t):
          why = text_problem(t) if isinstance(t, str) else "is not a string"
          raise ValueError(f"{self.path}: {name} must be non-empty strings: {t!r} {why}")
    for i, (p, row) in enumerate(zip(positives, negatives, strict=True)):
      if p in row:
        raise ValueError(f"{self.path}: row {i}: hard negative {row.index(p) + 1} is identical "
                         "to the positive (a pair cannot be both)")
    object.__setattr__(self, "anchors", anchors)
    object.__setattr__(self, "positives", positives)
    object.__setattr__(self, "negatives", negatives)

  def __len__(self) -> int:
    return len(self.anchors)

  @property
  def num_negatives(self) -> int:
    """``k``, the hard negatives per row."""
    return len(self.negatives[0]) if self.negatives else 0

  def select(self, rows: Sequence[int] | np.ndarray) -> TextPairs:
    """The rows ``rows`` (indices into ``0..N-1``, in that order) as a new :class:`TextPairs`."""
    rows = [int(r) for r in rows]
    bad = [r for r in rows if not 0 <= r < len(self)]
    if bad:
      raise ValueError(f"{self.path}: rows {bad[:5]} are outside 0..{len(self) - 1}")
    return TextPairs([self.anchors[r] for r in rows], [self.positives[r] for r in rows],
                     [self.negatives[r] for r in rows], path=self.path)


def read_text_pairs(path: str) -> TextPairs:
  """(anchor, positive, hard negatives) rows from a JSONL, TSV or Parquet file.

  Columns follow sentence-transformers: ``anchor``, ``positive`` and optional
  ``negative`` (``k = 1``) or ``negative_1 .. negative_k``; other columns are
  ignored. The first record fixes ``k``; every record must have the same
  negative columns.

  Args:
    path: a ``.jsonl``/``.json``, ``.tsv``/``.txt`` (header row) or
      ``.parquet``/``.pq`` file.

  Returns:
    A :class:`TextPairs` with ``path`` set.

  Raises:
    FileNotFoundError: no such file.
    ValueError: naming the file and line (see the module docstring), or an empty file.
  """
  anchors, positives, negatives = [], [], []
  for _, _, anchor, positive, negs in iter_text_pairs(path):
    anchors.append(anchor)
    positives.append(positive)
    negatives.append(negs)
  return TextPairs(anchors, positives, negatives, path=path)


def iter_text_pairs(path: str) -> Iterator[tuple[str, tuple[str, ...], str, str, list[str]]]:
  """:func:`read_text_pairs` one record at a time (memory of one record, any file size).

  Yields:
    ``(where, negative_columns, anchor, positive, negatives)`` per record,
    ``where`` being ``"path:line"`` (``"path: row i"`` for Parquet).

  Raises:
    As :func:`read_text_pairs`, when the bad record is reached.
  """
  neg_cols: tuple[str, ...] | None = None
  first = ""
  for where, record in read_records(path, PAIR_COLUMNS):
    try:
      cols = negative_columns(list(record))
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
    if neg_cols is None:
      neg_cols, first = cols, where
    elif cols != neg_cols:
      raise ValueError(f"{where}: inconsistent negatives: this record has {len(cols)} "
                       f"{list(cols)}, the first record ({first}) has {len(neg_cols)} "
                       f"{list(neg_cols)}")
    anchor, positive = _text(where, record, "anchor"), _text(where, record, "positive")
    negatives = [_text(where, record, c) for c in neg_cols]
    if positive in negatives:
      raise ValueError(f"{where}: column {neg_cols[negatives.index(positive)]!r} is identical "
                       "to 'positive' (a hard negative cannot be the positive)")
    yield where, neg_cols, anchor, positive, negatives
  if neg_cols is None:
    raise ValueError(f"{path}: no records")


def read_scored_pairs(
    path: str, *, columns: Sequence[str] = SCORED_COLUMNS,
) -> tuple[list[str], list[str], np.ndarray]:
  """Scored sentence pairs (e.g. STS-B) from a JSONL, TSV (header row) or Parquet file.

  Args:
    path: as in :func:`read_text_pairs`.
    columns: the two text columns and the score column, in that order.

  Returns:
    ``(texts_a, texts_b, scores [N] float64)``.

  Raises:
    ValueError: naming the file and line: a missing or empty text, a score that
      is missing, not a number (booleans included) or not finite (NaN, inf).
  """
  if isinstance(columns, str) or len(columns) != 3:
    raise ValueError(f"columns must name two texts and a score, got {columns!r}")
  col_a, col_b, col_score = columns
  texts_a, texts_b, scores = [], [], []
  for where, record in read_records(path, columns):
    texts_a.append(_text(where, record, col_a))
    texts_b.append(_text(where, record, col_b))
    if col_score not in record:
      raise ValueError(f"{where}: missing column {col_score!r}; has {sorted(record)}")
    raw = record[col_score]
    try:
      if isinstance(raw, bool) or raw is None:
        raise TypeError
      score = float(raw)
    except (TypeError, ValueError):
      raise ValueError(f"{where}: score {raw!r} is not a number") from None
    if not math.isfinite(score):
      raise ValueError(f"{where}: score {raw!r} is not finite")
    scores.append(score)
  if not scores:
    raise ValueError(f"{path}: no records")
  return texts_a, texts_b, np.asarray(scores, np.float64)


# --- Mixing files ---------------------------------------------------------------

# NumPy's SeedSequence ignores trailing zeros ([s, 0] seeds as [s]): every stream
# below starts with (seed, TAG) with a distinct non-zero TAG, so no two collide.
_SCHEDULE_TAG, _PERMUTATION_TAG = 1, 2


def eval_data(eval_file: str | None, eval_pairs_file: str | None) -> tuple[Any, Any]:
  """``(scored, pairs)`` for :func:`~mrl_jax.evaluate.text.evaluate_text` from eval files.

  ``scored = (texts_a, texts_b, gold [N])`` from ``eval_file`` (STS columns);
  ``pairs = (anchors, positives)`` from ``eval_pairs_file``; None where a file is unset.
  """
  scored = read_scored_pairs(eval_file) if eval_file else None
  rows = read_text_pairs(eval_pairs_file) if eval_pairs_file else None
  return scored, (rows.anchors, rows.positives) if rows else None


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
  """Integers ``n_k >= 0`` summing to ``total`` closest to ``total * w_k / sum(w)``."""
  exact = weights / weights.sum() * total
  counts = np.floor(exact).astype(np.int64)
  order = np.argsort(-(exact - counts), kind="stable")
  counts[order[: total - counts.sum()]] += 1
  return counts


class PairMixture:
  """Several :class:`TextPairs` sources mixed by weight; batch ``s`` depends only on ``(seed, s)``.

  Sampling rule. Every global batch holds ``batch_size`` rows of ONE source, so
  in-batch negatives come from the same file (as in sentence-transformers'
  multi-dataset samplers, https://sbert.net/docs/package_reference/
  sentence_transformer/sampler.html: ``PROPORTIONAL`` draws each batch's dataset
  in proportion to the dataset sizes, ``ROUND_ROBIN`` takes one batch of each in
  turn until the smallest runs out). Here the share of steps is set by
  ``weights`` (default: the source sizes, i.e. proportional), and it is exact:

  1. Sources. Steps come in blocks of ``block_steps``; in every block source
     ``k`` gets exactly ``n_k`` steps (``block_steps * w_k / sum(w)`` rounded by
     largest remainder) in the order of a permutation drawn from
     ``np.random.default_rng([seed, 1, block])``.
  2. Rows. Source ``k`` is read in epochs: epoch ``e`` is the permutation of its
     ``N_k`` rows from ``np.random.default_rng([seed, 2, k, e])`` cut into
     ``N_k // batch_size`` batches (the last ``N_k mod batch_size`` rows of each
     epoch's order are dropped, different rows every epoch). The ``c``-th step
     that picks source ``k`` reads its batch ``c``: every row once per epoch,
     never twice in one batch.

  ``c`` counts the block's earlier steps only, so finding batch ``s`` costs
  ``O(block_steps + N_k)`` (cached), whatever ``s``: resuming at step ``s``
  reads nothing before it.

  Args:
    sources: one or more :class:`TextPairs` (or any sized source with a ``path``,
      such as :class:`mrl_jax.data.prepared_pairs.PreparedPairs`; :meth:`batch`
      needs TextPairs), each with ``>= batch_size`` rows.
      Sources may differ in ``num_negatives`` (each batch has its source's ``k``).
    weights: one finite weight ``>= 0`` per source, not all 0; ``None``: the sizes.
    batch_size: ``B``, rows per GLOBAL batch (all processes together).
    seed: an int ``>= 0``.
    block_steps: steps per block (step shares are exact per block); a source
      whose weight rounds to no step per block is an error.

  Raises:
    ValueError: any bad argument, naming it.
  """

  def __init__(self, sources: Sequence[TextPairs], weights: Sequence[float] | None = None, *,
               batch_size: int, seed: int = 0, block_steps: int = 1000):
    sources = list(sources) if not isinstance(sources, TextPairs) else [sources]
    # Any sized source with a ``path`` (TextPairs, prepared shards): only sizes are used here.
    if not sources or not all(hasattr(s, "__len__") and hasattr(s, "path") for s in sources):
      raise ValueError(f"sources must be a non-empty sequence of TextPairs (or prepared "
                       f"pairs), got {sources!r}")
    for name, value in (("batch_size", batch_size), ("seed", seed), ("block_steps", block_steps)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (
          0 if name == "seed" else 1):
        raise ValueError(f"{name} must be an int >= {0 if name == 'seed' else 1}, got {value!r}")
    small = [(s.path, len(s)) for s in sources if len(s) < batch_size]
    if small:
      raise ValueError(f"every source needs >= batch_size={batch_size} rows; {small} have fewer")
    if weights is None:
      weights = [len(s) for s in sources]
    try:
      w = np.asarray(weights, np.float64)
    except (TypeError, ValueError):
      raise ValueError(f"weights must be numbers, got {weights!r}") from None
    if w.shape != (len(sources),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
      raise ValueError(f"weights must be {len(sources)} finite numbers >= 0, not all 0; "
                       f"got {weights!r}")
    counts = _largest_remainder(w, int(block_steps))
    starved = [sources[k].path for k in range(len(sources)) if w[k] > 0 and counts[k] == 0]
    if starved:
      raise ValueError(f"the weights of {starved} round to 0 of block_steps={block_steps} "
                       "steps; raise block_steps or those weights")
    self.sources = sources
    self.weights = w / w.sum()
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.block_steps = int(block_steps)
    self.steps_per_block = counts  # n_k
    self.batches_per_epoch = np.array([len(s) // self.batch_size for s in sources])
    self._block = functools.lru_cache(maxsize=4)(self._block_uncached)
    self._permutation = functools.lru_cache(maxsize=2 * len(sources) + 2)(
        self._permutation_uncached)

  def _block_uncached(self, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(source of each step of the block [R], steps of each source before it [R])."""
    order = np.repeat(np.arange(len(self.sources)), self.steps_per_block)
    order = np.random.default_rng([self.seed, _SCHEDULE_TAG, block]).permutation(order)
    before = np.empty_like(order)
    seen = np.zeros(len(self.sources), np.int64)
    for i, k in enumerate(order):
      before[i] = seen[k]
      seen[k] += 1
    return order, before

  def _permutation_uncached(self, source: int, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, _PERMUTATION_TAG, source, epoch])
    return rng.permutation(len(self.sources[source]))

  def _check_step(self, step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"step must be an int >= 0, got {step!r}")
    return int(step)

  def source_of(self, step: int) -> int:
    """The source index of global batch ``step``."""
    step = self._check_step(step)
    order, _ = self._block(step // self.block_steps)
    return int(order[step % self.block_steps])

  def batch_indices(self, step: int) -> list[tuple[int, int]]:
    """The ``batch_size`` ``(source, row)`` pairs of global batch ``step``, in batch order."""
    step = self._check_step(step)
    block, offset = divmod(step, self.block_steps)
    order, before = self._block(block)
    k = int(order[offset])
    c = block * int(self.steps_per_block[k]) + int(before[offset])  # k's batches so far
    epoch, j = divmod(c, int(self.batches_per_epoch[k]))
    rows = self._permutation(k, epoch)[j * self.batch_size:(j + 1) * self.batch_size]
    return [(k, int(r)) for r in rows]

  def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> TextPairs:
    """This process's share of global batch ``step``: rows ``[p*B/P, (p+1)*B/P)`` of it.

    Args:
      step: the global step, ``>= 0``.
      process_index: ``p`` in ``[0, P)`` (``jax.process_index()``).
      process_count: ``P`` (``jax.process_count()``); must divide ``batch_size``.

    Returns:
      ``B / P`` rows as a :class:`TextPairs` (``path``: the source's).
    """
    for name, value, low in (("process_index", process_index, 0),
                             ("process_count", process_count, 1)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if process_index >= process_count or self.batch_size % process_count:
      raise ValueError(f"need 0 <= process_index < process_count dividing batch_size="
                       f"{self.batch_size}; got process_index={process_index}, "
                       f"process_count={process_count}")
    per = self.batch_size // process_count
    pairs = self.batch_indices(step)[process_index * per:(process_index + 1) * per]
    return self.sources[pairs[0][0]].select([r for _, r in pairs])


# --- Tokenization -----------------------------------------------------------------


def tokenize_pairs(
    tokenizer: TextTokenizer, pairs: TextPairs, *, buckets: Sequence[int] | None = None,
    pad_to: int | None = None, shared_length: bool = False,
) -> dict[str, dict[str, np.ndarray]]:
  """A batch of :class:`TextPairs` to arrays, each column padded to its own bucket.

  Args:
    tokenizer: a :class:`TextTokenizer`.
    pairs: ``B`` rows with ``k`` negatives each.
    buckets: as in :meth:`TextTokenizer.__call__` (e.g. ``bucket_lengths(max_length)``).
    pad_to: a fixed length for every column instead.
    shared_length: pad every column to the bucket of the longest text of ALL
      columns (one ``T``, e.g. to run the encoder once over the concatenation);
      by default each column gets its own bucket (short queries stay short).

  Returns:
    ``{"anchor": arrays [B, Ta], "positive": arrays [B, Tp]}`` plus, when
    ``k > 0``, ``"negative": arrays [B, k, Tn]`` (negative ``j`` of row ``i`` at
    ``[i, j]``); ``arrays`` is ``{"input_ids", "attention_mask", "token_type_ids"}``.
  """
  if not isinstance(pairs, TextPairs):
    raise ValueError(f"pairs must be TextPairs, got {type(pairs).__name__}")
  if len(pairs) == 0:
    raise ValueError("pairs is empty")
  columns = {"anchor": pairs.anchors, "positive": pairs.positives}
  k = pairs.num_negatives
  if k:
    columns["negative"] = [t for row in pairs.negatives for t in row]
  encoded = {c: tokenizer.encode(texts) for c, texts in columns.items()}
  if shared_length:
    everything = [e for encodings in encoded.values() for e in encodings]
    length = tokenizer.padded_length(everything, pad_to=pad_to, buckets=buckets)
    out = {c: tokenizer.pad(encodings, length) for c, encodings in encoded.items()}
  else:
    out = {c: tokenizer.pad(encodings, tokenizer.padded_length(encodings, pad_to=pad_to,
                                                               buckets=buckets))
           for c, encodings in encoded.items()}
  if k:
    out["negative"] = {key: v.reshape(len(pairs), k, -1) for key, v in out["negative"].items()}
  return out
