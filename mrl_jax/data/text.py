"""Text inputs for embedding training: a tokenizer wrapper and readers of local pair files.

* :class:`TextTokenizer`: texts to padded ``int32`` arrays ``[B, T]`` with a
  Hugging Face ``tokenizers`` tokenizer (read from a local ``tokenizer.json``).
* :func:`read_pairs`: training pairs (or triplets) from a JSONL or TSV file.
* :func:`read_scored_pairs`: sentence pairs with a gold similarity score, for
  Spearman evaluation (:mod:`mrl_jax.sts`).
* :func:`tokenize_columns`: every column of such rows tokenized to arrays.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

PAIR_COLUMNS = ("anchor", "positive")
SCORED_COLUMNS = ("sentence1", "sentence2", "score")


class TextTokenizer:
  """Texts to ``input_ids``, ``attention_mask`` and ``token_type_ids`` arrays.

  Sequences are truncated to ``max_length`` tokens (special tokens included)
  and right-padded with the tokenizer's pad id to the longest in the batch, or
  to ``pad_to`` (a fixed length keeps jitted shapes static across batches).

  Args:
    tokenizer: a ``tokenizers.Tokenizer``; its own padding setting is turned off
      (this class pads), its truncation is set to ``max_length``.
    max_length: the longest token sequence kept.
  """

  def __init__(self, tokenizer: Any, *, max_length: int):
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
      raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    padding = tokenizer.padding or {}
    self.pad_id = int(padding.get("pad_id", tokenizer.token_to_id("[PAD]") or 0))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    self.tokenizer = tokenizer
    self.max_length = max_length

  @classmethod
  def from_file(cls, path: str, *, max_length: int) -> TextTokenizer:
    """Read a local ``tokenizer.json``."""
    from tokenizers import Tokenizer

    return cls(Tokenizer.from_file(path), max_length=max_length)

  def __call__(self, texts: Sequence[str], *, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """``B`` texts to ``{"input_ids", "attention_mask", "token_type_ids"}``, each ``[B, T]``."""
    if isinstance(texts, str):
      raise ValueError("pass a sequence of texts, not one string")
    texts = list(texts)
    if not texts:
      raise ValueError("no texts to tokenize")
    encodings = self.tokenizer.encode_batch(texts)
    longest = max(len(e.ids) for e in encodings)
    length = longest if pad_to is None else pad_to
    if length < longest:
      raise ValueError(f"pad_to={pad_to} is shorter than the longest sequence ({longest} tokens)")
    out = {
        "input_ids": np.full((len(texts), length), self.pad_id, np.int32),
        "attention_mask": np.zeros((len(texts), length), np.int32),
        "token_type_ids": np.zeros((len(texts), length), np.int32),
    }
    for i, e in enumerate(encodings):
      n = len(e.ids)
      out["input_ids"][i, :n] = e.ids
      out["attention_mask"][i, :n] = e.attention_mask
      out["token_type_ids"][i, :n] = e.type_ids
    return out


def _rows(path: str, columns: Sequence[str]) -> list[list[str]]:
  """The named fields of every record of a JSONL (objects) or TSV (header optional) file."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".jsonl", ".json", ".tsv", ".txt"):
    raise ValueError(f"{path}: unknown extension {ext!r}; use .jsonl or .tsv")
  rows = []
  with open(path, encoding="utf-8") as f:
    lines = [(i, line.rstrip("\n")) for i, line in enumerate(f, 1) if line.strip()]
  if ext in (".jsonl", ".json"):
    for i, line in lines:
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{i}: not a JSON object ({e.msg})") from None
      if not isinstance(record, dict):
        raise ValueError(f"{path}:{i}: expected a JSON object with keys {list(columns)}")
      missing = [c for c in columns if c not in record]
      if missing:
        raise ValueError(f"{path}:{i}: missing {missing}; has {sorted(record)}")
      rows.append([record[c] for c in columns])
  else:
    if lines and lines[0][1].split("\t")[: len(columns)] == list(columns):
      lines = lines[1:]  # header
    for i, line in lines:
      fields = line.split("\t")
      if len(fields) < len(columns):
        raise ValueError(f"{path}:{i}: expected {len(columns)} tab-separated fields "
                         f"({list(columns)}), got {len(fields)}")
      rows.append(fields[: len(columns)])
  if not rows:
    raise ValueError(f"{path}: no records")
  return rows


def read_pairs(path: str, *, columns: Sequence[str] = PAIR_COLUMNS) -> list[tuple[str, ...]]:
  """Training pairs from a local file: one ``(anchor, positive[, negative...])`` per record.

  JSONL: one object per line with the keys ``columns``. TSV: the first
  ``len(columns)`` tab-separated fields of each line, an optional header line
  equal to ``columns`` skipped.

  Args:
    path: a ``.jsonl`` (or ``.json``) or ``.tsv`` (or ``.txt``) file.
    columns: field names, e.g. ``("anchor", "positive", "negative")`` for triplets.

  Returns:
    One tuple of ``len(columns)`` strings per record.
  """
  out = []
  for row in _rows(path, columns):
    if not all(isinstance(t, str) for t in row):
      raise ValueError(f"{path}: every field of {list(columns)} must be a string, got {row!r}")
    out.append(tuple(row))
  return out


def read_scored_pairs(
    path: str, *, columns: Sequence[str] = SCORED_COLUMNS,
) -> tuple[list[str], list[str], np.ndarray]:
  """Scored sentence pairs (e.g. STS-B) from a local JSONL or TSV file.

  Args:
    path: as in :func:`read_pairs`.
    columns: the two text fields and the score field, in that order.

  Returns:
    ``(texts_a, texts_b, scores [N] float32)``.
  """
  if len(columns) != 3:
    raise ValueError(f"columns must name two texts and a score, got {list(columns)}")
  texts_a, texts_b, scores = [], [], []
  for a, b, score in _rows(path, columns):
    try:
      scores.append(float(score))
    except (TypeError, ValueError):
      raise ValueError(f"{path}: score {score!r} is not a number") from None
    texts_a.append(str(a))
    texts_b.append(str(b))
  return texts_a, texts_b, np.asarray(scores, np.float32)


def tokenize_columns(
    tokenizer: TextTokenizer, rows: Sequence[Sequence[str]], *,
    columns: Sequence[str] = PAIR_COLUMNS, pad_to: int | None = None,
) -> dict[str, dict[str, np.ndarray]]:
  """Tokenize each column of ``rows`` (from :func:`read_pairs`): ``{column: arrays [N, T]}``.

  With ``pad_to=None`` every column is padded to the longest sequence over all
  columns, so all arrays share one ``T``.
  """
  if not rows or any(len(r) != len(columns) for r in rows):
    raise ValueError(f"rows must be non-empty tuples of {len(columns)} texts ({list(columns)})")
  out = {c: tokenizer([r[i] for r in rows], pad_to=pad_to) for i, c in enumerate(columns)}
  if pad_to is None:
    length = max(arrays["input_ids"].shape[1] for arrays in out.values())
    fill = lambda key: tokenizer.pad_id if key == "input_ids" else 0
    out = {c: {k: np.pad(v, ((0, 0), (0, length - v.shape[1])), constant_values=fill(k))
               for k, v in arrays.items()}
           for c, arrays in out.items()}
  return out
