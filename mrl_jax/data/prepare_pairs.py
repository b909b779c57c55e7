"""Tokenize pair files once into ArrayRecord shards (:mod:`mrl_jax.data.prepared_pairs`).

``python -m mrl_jax.data.prepare_pairs --input=A.jsonl[,B.tsv] --output=DIR
--tokenizer=MODEL_DIR_OR_TOKENIZER_JSON --max_length=128`` writes ``DIR/A.jsonl/``,
``DIR/B.tsv/`` (the layout ``config.prepared_dir=DIR`` of the pairs task reads;
``config.train_file`` may also name those folders directly). A folder already
holding the file prepared with that tokenizer is kept. ``--word_vocabulary``
instead builds the lower-casing word-level tokenizer the pairs task builds for a
random BERT, from every text of the inputs (streamed).

Prints one line per file (rows, seconds, rows/s); exits 2 with the message for a
bad record (naming the file and line) or argument.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from mrl_jax.data import prepared_pairs
from mrl_jax.data.text import iter_text_pairs
from mrl_jax.tokenizer import TextTokenizer, word_tokenizer


def load_tokenizer(path: str, max_length: int) -> TextTokenizer:
  """The :class:`TextTokenizer` the pairs task uses for ``config.model_dir=path`` (a folder)
  or a ``tokenizer.json`` file; truncation at ``max_length`` (a folder's
  ``max_position_embeddings`` caps it, as :func:`mrl_jax.models.text.load_hf_bert`).

  Raises:
    ValueError: neither a folder with ``tokenizer.json`` nor a file.
  """
  if os.path.isdir(path):
    config_path = os.path.join(path, "config.json")
    if os.path.isfile(config_path):
      with open(config_path, encoding="utf-8") as f:
        max_length = min(max_length, int(json.load(f).get("max_position_embeddings",
                                                           max_length)))
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise ValueError(f"--tokenizer: {path!r} is not a tokenizer.json file or a folder with one")
  return TextTokenizer.from_file(path, max_length=max_length)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m mrl_jax.data.prepare_pairs",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--input", required=True, help="pair file(s), comma-separated")
  parser.add_argument("--output", required=True, help="folder of the prepared folders")
  parser.add_argument("--tokenizer", help="a model folder or a tokenizer.json")
  parser.add_argument("--word_vocabulary", action="store_true",
                      help="build a word-level vocabulary from the inputs instead")
  parser.add_argument("--max_length", type=int, default=128)
  parser.add_argument("--rows_per_shard", type=int, default=prepared_pairs.ROWS_PER_SHARD)
  args = parser.parse_args(argv)
  files = [p.strip() for p in args.input.split(",") if p.strip()]
  try:
    if bool(args.tokenizer) == args.word_vocabulary:
      raise ValueError("pass exactly one of --tokenizer and --word_vocabulary")
    names = [os.path.basename(os.path.normpath(p)) for p in files]
    if not files or len(set(names)) != len(names):
      raise ValueError(f"--input={args.input!r}: need files with distinct base names")
    if args.word_vocabulary:
      texts = (t for f in files for _, _, a, p, negs in iter_text_pairs(f) for t in (a, p, *negs))
      tokenizer = word_tokenizer(texts, max_length=args.max_length)
    else:
      tokenizer = load_tokenizer(args.tokenizer, args.max_length)
    for path, name in zip(files, names, strict=True):
      out = os.path.join(args.output, name)
      start = time.perf_counter()
      if not prepared_pairs.ensure_prepared(path, out, tokenizer,
                                            rows_per_shard=args.rows_per_shard):
        print(f"{out}: already prepared from {path} with this tokenizer")
        continue
      seconds = time.perf_counter() - start
      rows = prepared_pairs.PreparedPairs(out).num_rows
      print(f"{out}: {rows} rows from {path} in {seconds:.1f} s ({rows / seconds:,.0f} rows/s)")
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
