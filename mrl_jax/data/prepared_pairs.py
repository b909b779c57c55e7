"""Pair files tokenized once into ArrayRecord shards: corpus-scale text training input.

:func:`prepare_pairs` streams a JSONL, TSV or Parquet pair file (the readers and
checks of :mod:`mrl_jax.data.text`: a bad record is a ``ValueError`` naming the
file and line, raised before any training) and writes, into one folder:

* ``pairs-00000.array_record`` ...: one ArrayRecord record per row (random
  access, ``group_size:1``), serialised without pickle as little-endian bytes
  ``uint32 [1 + C]`` (``C``, then the token count of each column) ``+ int32``
  token ids ``+ uint8`` token type ids, the columns one after another in the
  order of ``manifest["columns"]`` (``anchor``, ``positive``, then the hard
  negatives). Tokens are truncated to ``max_length`` (special tokens included)
  and unpadded.
* ``rows.bin``: a fixed-size entry per row, ``uint16 [C]`` token counts then
  ``uint64 [C]`` text hashes (BLAKE2b, 8 bytes, of each text's UTF-8): what a
  global batch needs to choose its padded lengths and to refuse duplicate texts,
  read with ``os.pread`` for the rows of one batch only.
* ``tokenizer.json``: the tokenizer that made the tokens.
* ``manifest.json``: format and version, the source file's path, size, mtime
  and SHA-256, the tokenizer's SHA-256 (of its JSON, truncation included),
  ``max_length``, ``pad_id`` and bucket lengths, the columns, the row count and
  the shards. A source whose size or mtime changed is hashed again; a changed
  hash or tokenizer means the folder is prepared again (:func:`ensure_prepared`)
  or refused (:class:`PreparedPairs` with ``tokenizer_sha256``), never mixed.

Memory while preparing is one chunk of rows, whatever the file's size.
:class:`PreparedPairs` reads a folder by row; :func:`train_batches` turns a
:class:`~mrl_jax.data.text.PairMixture` of them into padded batches in grain
workers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np

from mrl_jax.core import fileio
from mrl_jax.data.text import iter_text_pairs
from mrl_jax.tokenizer import TextTokenizer, bucket_lengths

FORMAT = "mrl_jax.prepared_pairs"
VERSION = 1
MANIFEST = "manifest.json"
ROW_TABLE = "rows.bin"
TOKENIZER_FILE = "tokenizer.json"
ROWS_PER_SHARD = 1_000_000
_CHUNK = 2048  # rows tokenized per encode_batch call while preparing
_HEADER = np.dtype("<u4")


def tokenizer_sha256(tokenizer: TextTokenizer) -> str:
  """SHA-256 of the tokenizer's JSON (vocabulary, normaliser, truncation) and ``max_length``."""
  text = tokenizer.tokenizer.to_str() + f"\nmax_length={tokenizer.max_length}"
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str) -> str:
  """SHA-256 of a file's bytes, read in 8 MiB blocks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(8 << 20):
      h.update(block)
  return h.hexdigest()


def text_hash(text: str) -> int:
  """The 64-bit hash that tells texts apart in a batch (BLAKE2b, 8 bytes, little-endian)."""
  return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def row_dtype(num_columns: int) -> np.dtype:
  """One ``rows.bin`` entry: ``uint16 [C]`` token counts, ``uint64 [C]`` text hashes."""
  return np.dtype([("length", "<u2", (num_columns,)), ("hash", "<u8", (num_columns,))])


def encode_record(ids: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int]]) -> bytes:
  """One row's columns of token ids and type ids as the record bytes (module docstring)."""
  lengths = [len(x) for x in ids]
  return (np.asarray([len(ids), *lengths], _HEADER).tobytes()
          + np.concatenate([np.asarray(x, "<i4") for x in ids]).tobytes()
          + np.concatenate([np.asarray(x, "u1") for x in type_ids]).tobytes())


def decode_record(data: bytes, where: str = "record") -> tuple[list[np.ndarray], list[np.ndarray]]:
  """The inverse of :func:`encode_record`: ``(ids per column int32, type ids per column uint8)``.

  Raises:
    ValueError: bytes that are not such a record (naming ``where``).
  """
  buf = memoryview(data)
  if len(buf) < 4:
    raise ValueError(f"{where}: truncated record ({len(buf)} bytes)")
  c = int(np.frombuffer(buf[:4], _HEADER)[0])
  head = 4 * (1 + c)
  if c < 2 or len(buf) < head:
    raise ValueError(f"{where}: bad record header (columns={c}, {len(buf)} bytes)")
  lengths = np.frombuffer(buf[4:head], _HEADER).astype(np.int64)
  total = int(lengths.sum())
  if len(buf) != head + 5 * total:
    raise ValueError(f"{where}: record of {len(buf)} bytes, its header says {head + 5 * total}")
  ids = np.frombuffer(buf[head:head + 4 * total], "<i4")
  types = np.frombuffer(buf[head + 4 * total:], "u1")
  cuts = np.cumsum(lengths)[:-1]
  return np.split(ids, cuts), np.split(types, cuts)


# --- preparing ------------------------------------------------------------------


def _source_info(path: str) -> dict[str, Any]:
  st = os.stat(path)
  return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def prepared_reason(out_dir: str, source: str, tokenizer: TextTokenizer) -> str | None:
  """Why ``out_dir`` is not a valid preparation of ``source`` with ``tokenizer`` (None: it is).

  Size and mtime equal to the manifest's: valid without reading ``source``;
  otherwise its SHA-256 decides.
  """
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.isfile(path):
    return f"{path} does not exist"
  try:
    manifest = fileio.read_json(path)
  except ValueError as e:
    return str(e)
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get(
      "version") != VERSION:
    return f"{path} is not a version-{VERSION} {FORMAT} manifest"
  if manifest["tokenizer"]["sha256"] != tokenizer_sha256(tokenizer):
    return f"{path} was prepared with another tokenizer"
  info, recorded = _source_info(source), manifest["source"]
  if (info["size"], info["mtime_ns"]) != (recorded["size"], recorded["mtime_ns"]):
    if info["size"] != recorded["size"] or file_sha256(source) != recorded["sha256"]:
      return f"{source} changed since {out_dir} was prepared (SHA-256 differs)"
  return None


def prepare_pairs(source: str, out_dir: str, tokenizer: TextTokenizer, *,
                  rows_per_shard: int = ROWS_PER_SHARD) -> dict[str, Any]:
  """Tokenize the pair file ``source`` once into ``out_dir`` (module docstring); streams.

  The folder is written under a temporary name and moved into place when
  complete (:func:`mrl_jax.core.fileio.atomic_replace_dir`): an error or a kill
  leaves any earlier ``out_dir`` as it was.

  Args:
    source: a JSONL, TSV or Parquet file of ``anchor``, ``positive`` and
      optional ``negative`` / ``negative_1..k`` columns
      (:func:`~mrl_jax.data.text.read_text_pairs`).
    out_dir: the folder to create or replace.
    tokenizer: the run's :class:`~mrl_jax.tokenizer.TextTokenizer`.
    rows_per_shard: rows per ArrayRecord file, ``>= 1``.

  Returns:
    The manifest written.

  Raises:
    FileNotFoundError: no ``source``.
    ValueError: a bad record, naming the file and line; a token count over 65535.
  """
  from array_record.python.array_record_module import ArrayRecordWriter

  if isinstance(rows_per_shard, bool) or not isinstance(rows_per_shard, int) or rows_per_shard < 1:
    raise ValueError(f"rows_per_shard must be an int >= 1, got {rows_per_shard!r}")
  if not isinstance(tokenizer, TextTokenizer):
    raise ValueError(f"tokenizer must be a TextTokenizer, got {type(tokenizer).__name__}")
  if tokenizer.max_length > np.iinfo(np.uint16).max:
    raise ValueError(f"tokenizer.max_length={tokenizer.max_length} exceeds the 65535 tokens "
                     f"a {ROW_TABLE} entry holds")
  if not os.path.isfile(source):
    raise FileNotFoundError(f"{source}: no such file")
  info = {**_source_info(source), "sha256": file_sha256(source)}
  tmp = fileio.make_temp_dir(out_dir)
  try:
    shards, writer, rows, columns = [], None, 0, None
    with open(os.path.join(tmp, ROW_TABLE), "wb") as table:
      chunk: list[tuple[str, list[str]]] = []

      def flush():
        nonlocal writer, rows
        texts = [t for _, row in chunk for t in row]
        # Without character offsets (unused here) where tokenizers has it: ~20% faster.
        encode = getattr(tokenizer.tokenizer, "encode_batch_fast", tokenizer.tokenizer.encode_batch)
        encodings = encode(texts)
        c = len(columns)
        entries = np.zeros(len(chunk), row_dtype(c))
        for i, (_, row) in enumerate(chunk):
          encs = encodings[i * c:(i + 1) * c]
          if rows % rows_per_shard == 0:
            if writer is not None:
              writer.close()
            shards.append(f"pairs-{len(shards):05d}.array_record")
            writer = ArrayRecordWriter(os.path.join(tmp, shards[-1]), "group_size:1")
          writer.write(encode_record([e.ids for e in encs], [e.type_ids for e in encs]))
          entries[i]["length"] = [len(e.ids) for e in encs]
          entries[i]["hash"] = [text_hash(t) for t in row]
          rows += 1
        table.write(entries.tobytes())
        chunk.clear()

      for where, neg_cols, anchor, positive, negatives in iter_text_pairs(source):
        if columns is None:
          columns = ["anchor", "positive", *neg_cols]
        chunk.append((where, [anchor, positive, *negatives]))
        if len(chunk) == _CHUNK:
          flush()
      if chunk:
        flush()
    if writer is not None:
      writer.close()
    tokenizer.tokenizer.save(os.path.join(tmp, TOKENIZER_FILE))
    manifest = {
        "format": FORMAT, "version": VERSION, "source": info,
        "tokenizer": {"sha256": tokenizer_sha256(tokenizer), "max_length": tokenizer.max_length,
                      "pad_id": tokenizer.pad_id, "file": TOKENIZER_FILE},
        "bucket_lengths": list(bucket_lengths(tokenizer.max_length)),
        "columns": columns, "num_rows": rows, "shards": shards,
        "row_table": {"file": ROW_TABLE, "length": "<u2", "hash": "blake2b-64 <u8"},
        "record": "<u4 [1 + C] (C, token counts), <i4 ids, u1 type ids",
    }
    fileio.write_json(os.path.join(tmp, MANIFEST), manifest, what="manifest")
    fileio.atomic_replace_dir(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


def ensure_prepared(source: str, out_dir: str, tokenizer: TextTokenizer,
                    **kwargs: Any) -> bool:
  """Prepare ``source`` into ``out_dir`` unless it already is (:func:`prepared_reason`).

  Returns:
    True when it (re)prepared, False when ``out_dir`` was valid.
  """
  if prepared_reason(out_dir, source, tokenizer) is None:
    return False
  prepare_pairs(source, out_dir, tokenizer, **kwargs)
  return True


def is_prepared_dir(path: str) -> bool:
  """Whether ``path`` is a folder holding a prepared-pairs manifest."""
  return os.path.isfile(os.path.join(path, MANIFEST))


# --- reading --------------------------------------------------------------------


class PreparedPairs:
  """Random access to a prepared folder: records, token counts and text hashes by row.

  Opens its files lazily in each process (grain workers get a copy by value of
  the folder name only), so it is cheap to hand to input workers.

  Args:
    directory: a folder written by :func:`prepare_pairs`.
    tokenizer_sha256: if given, the folder must have been prepared with this
      tokenizer (:func:`tokenizer_sha256`).

  Raises:
    ValueError: no or a bad manifest, missing shards, a ``rows.bin`` of the
      wrong size, or another tokenizer; each naming the file.
  """

  def __init__(self, directory: str, *, tokenizer_sha256: str | None = None):
    self.directory = os.path.abspath(directory)
    path = os.path.join(self.directory, MANIFEST)
    if not os.path.isfile(path):
      raise ValueError(f"{directory}: not a prepared pairs folder (no {MANIFEST}); prepare it "
                       "with python -m mrl_jax.data.prepare_pairs")
    m = fileio.read_json(path)
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
      raise ValueError(f"{path}: not a version-{VERSION} {FORMAT} manifest")
    if tokenizer_sha256 is not None and m["tokenizer"]["sha256"] != tokenizer_sha256:
      raise ValueError(f"{path}: prepared with another tokenizer (SHA-256 "
                       f"{m['tokenizer']['sha256'][:12]}..., this run's {tokenizer_sha256[:12]}"
                       f"...); prepare {m['source']['path']} again with this run's tokenizer")
    self.manifest = m
    self.columns = tuple(m["columns"])
    self.num_rows = int(m["num_rows"])
    self.pad_id = int(m["tokenizer"]["pad_id"])
    self.path = m["source"]["path"]
    self.dtype = row_dtype(len(self.columns))
    for name in (*m["shards"], m["row_table"]["file"]):
      if not os.path.isfile(os.path.join(self.directory, name)):
        raise ValueError(f"{path}: lists {name}, which is missing")
    table = os.path.join(self.directory, m["row_table"]["file"])
    if os.path.getsize(table) != self.num_rows * self.dtype.itemsize:
      raise ValueError(f"{table}: {os.path.getsize(table)} bytes, expected num_rows "
                       f"{self.num_rows} x {self.dtype.itemsize}")
    self._opened = None

  def __len__(self) -> int:
    return self.num_rows

  @property
  def num_negatives(self) -> int:
    """``k``, the hard negatives per row."""
    return len(self.columns) - 2

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_opened": None}  # file handles are reopened where it is used

  def _files(self):
    if self._opened is None or self._opened[0] != os.getpid():
      import grain

      shards = [os.path.join(self.directory, s) for s in self.manifest["shards"]]
      fd = os.open(os.path.join(self.directory, self.manifest["row_table"]["file"]), os.O_RDONLY)
      # One read thread per call: the callers (grain threads, workers) are the parallelism.
      source = grain.sources.ArrayRecordDataSource(shards, reader_options={"max_parallelism": "1"})
      self._opened = (os.getpid(), source, fd)
    return self._opened[1:]

  def _check_rows(self, rows: Sequence[int]) -> list[int]:
    rows = [int(r) for r in rows]
    bad = [r for r in rows if not 0 <= r < self.num_rows]
    if bad:
      raise ValueError(f"{self.directory}: rows {bad[:5]} are outside 0..{self.num_rows - 1}")
    return rows

  def row_info(self, rows: Sequence[int]) -> np.ndarray:
    """The ``rows.bin`` entries of ``rows``: fields ``length [n, C]`` and ``hash [n, C]``."""
    _, fd = self._files()
    size = self.dtype.itemsize
    data = b"".join(os.pread(fd, size, r * size) for r in self._check_rows(rows))
    return np.frombuffer(data, self.dtype)

  def records(self, rows: Sequence[int]) -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
    """``(ids per column, type ids per column)`` of each row (:func:`decode_record`)."""
    source, _ = self._files()
    rows = self._check_rows(rows)
    return [decode_record(data, f"{self.directory} row {r}")
            for r, data in zip(rows, source.__getitems__(rows), strict=True)]
