"""Texts to padded token arrays: the one tokenizer wrapper every text model and input uses.

Sits below the models and the data readers (both need it, neither owns it):
:class:`TextTokenizer` wraps a Hugging Face ``tokenizers.Tokenizer`` (truncation
at ``max_length``, right padding with the pad token), and :func:`bucket_lengths`
picks the few padded lengths a batch may take (one compiled shape each);
:func:`word_tokenizer` builds the word vocabulary of a randomly initialised encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # word_tokenizer's, in id order


def check_encodable(texts: Sequence[str], name: str = "texts") -> None:
  """Refuse a text holding a lone surrogate (tokenizers raises a bare TypeError for it).

  Raises:
    ValueError: naming ``name[i]`` and the character position.
  """
  for i, t in enumerate(texts):
    try:
      t.encode("utf-8")
    except UnicodeEncodeError as e:
      raise ValueError(f"{name}[{i}] holds a lone surrogate U+{ord(t[e.start]):04X} at "
                       f"character {e.start}: not Unicode text, cannot be tokenised") from None


def bucket_lengths(max_length: int, *, smallest: int = 32) -> tuple[int, ...]:
  """Padded lengths for batches: powers of two from ``smallest`` below ``max_length``, then it.

  ``bucket_lengths(512) == (32, 64, 128, 256, 512)``; ``bucket_lengths(300) ==
  (32, 64, 128, 256, 300)``; ``bucket_lengths(16) == (16,)``. Each bucket is one
  compiled shape; a batch is padded to the smallest bucket holding its longest
  text, so a batch of short texts costs a short sequence.
  """
  for name, value in (("max_length", max_length), ("smallest", smallest)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  out, length = [], int(smallest)
  while length < max_length:
    out.append(length)
    length *= 2
  return (*out, int(max_length))


class TextTokenizer:
  """Texts to ``input_ids``, ``attention_mask`` and ``token_type_ids`` arrays ``[B, T]``.

  Sequences are truncated to ``max_length`` tokens (special tokens included;
  the tokenizer's own ``enable_truncation``) and right-padded with the pad token
  (``tokenizers.Encoding.pad``) to the longest in the batch, to ``pad_to``, or to
  the smallest of ``buckets`` that holds the longest.

  Args:
    tokenizer: a ``tokenizers.Tokenizer``; its own batch padding is turned off
      (this class picks the length), its truncation is set to ``max_length``.
    max_length: the longest token sequence kept, ``>= 2``.
  """

  def __init__(self, tokenizer: Any, *, max_length: int):
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
      raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    padding = tokenizer.padding or {}
    self.pad_id = int(padding.get("pad_id", tokenizer.token_to_id("[PAD]") or 0))
    self.pad_token = padding.get("pad_token", tokenizer.id_to_token(self.pad_id) or "[PAD]")
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    self.tokenizer = tokenizer
    self.max_length = max_length

  @classmethod
  def from_file(cls, path: str, *, max_length: int) -> TextTokenizer:
    """Read a local ``tokenizer.json``."""
    from tokenizers import Tokenizer

    return cls(Tokenizer.from_file(path), max_length=max_length)

  def __call__(self, texts: Sequence[str], *, pad_to: int | None = None,
               buckets: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """``B`` texts to ``{"input_ids", "attention_mask", "token_type_ids"}``, each ``[B, T]`` int32.

    Args:
      texts: the texts.
      pad_to: a fixed ``T`` (at least the longest sequence).
      buckets: increasing lengths (e.g. :func:`bucket_lengths`); ``T`` is the
        smallest that holds the longest sequence. Not with ``pad_to``.
        Default (neither): ``T`` is the longest sequence.

    Raises:
      ValueError: one string instead of a sequence, no texts, ``pad_to`` or
        every bucket shorter than the longest sequence.
    """
    encodings = self.encode(texts)
    return self.pad(encodings, self.padded_length(encodings, pad_to=pad_to, buckets=buckets))

  def encode(self, texts: Sequence[str]) -> list[Any]:
    """``texts`` to unpadded, truncated ``tokenizers.Encoding`` s."""
    if isinstance(texts, str):
      raise ValueError("pass a sequence of texts, not one string")
    texts = list(texts)
    if not texts:
      raise ValueError("no texts to tokenize")
    if not all(isinstance(t, str) for t in texts):
      raise ValueError(f"texts must be strings, got {[type(t).__name__ for t in texts][:5]}")
    check_encodable(texts)
    return self.tokenizer.encode_batch(texts)

  def padded_length(self, encodings: Sequence[Any], *, pad_to: int | None = None,
                    buckets: Sequence[int] | None = None) -> int:
    """``T`` for ``encodings``: ``pad_to``, the smallest fitting bucket, or the longest."""
    if pad_to is not None and buckets is not None:
      raise ValueError("pass pad_to or buckets, not both")
    longest = max(len(e.ids) for e in encodings)
    if buckets is not None:
      buckets = _check_buckets(buckets)
      fits = [b for b in buckets if b >= longest]
      if not fits:
        raise ValueError(f"the longest sequence ({longest} tokens) exceeds every bucket "
                         f"{buckets}; include max_length={self.max_length}")
      return fits[0]
    if pad_to is None:
      return longest
    if isinstance(pad_to, bool) or not isinstance(pad_to, (int, np.integer)) or pad_to < longest:
      raise ValueError(f"pad_to={pad_to!r} is shorter than the longest sequence ({longest} tokens)")
    return int(pad_to)

  def pad(self, encodings: Sequence[Any], length: int) -> dict[str, np.ndarray]:
    """Right-pad ``encodings`` (in place, ``Encoding.pad``) to ``length``; stack them ``[B, T]``."""
    for e in encodings:
      e.pad(length, pad_id=self.pad_id, pad_token=self.pad_token)
    return {
        "input_ids": np.asarray([e.ids for e in encodings], np.int32),
        "attention_mask": np.asarray([e.attention_mask for e in encodings], np.int32),
        "token_type_ids": np.asarray([e.type_ids for e in encodings], np.int32),
    }


def _check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
  out = tuple(buckets)
  if (not out or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1
                     for b in out) or list(out) != sorted(set(out))):
    raise ValueError(f"buckets must be strictly increasing positive ints, got {buckets!r}")
  return tuple(int(b) for b in out)


def word_tokenizer(texts: Sequence[str], *, max_length: int) -> TextTokenizer:
  """A lower-casing BERT tokenizer whose vocabulary is every word of ``texts``.

  For training a randomly initialised encoder offline: BERT's normaliser and
  pre-tokenizer, a WordPiece model over ``[PAD] [UNK] [CLS] [SEP] [MASK]`` plus
  the sorted distinct words (unknown words become ``[UNK]``), and ``[CLS] ...
  [SEP]`` around every text.
  """
  from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
  from tokenizers.models import WordPiece

  norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
  words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t))})
  vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *words))}
  tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer, tok.pre_tokenizer = norm, pre
  tok.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]),
                                                 ("[CLS]", vocab["[CLS]"]))
  return TextTokenizer(tok, max_length=max_length)
