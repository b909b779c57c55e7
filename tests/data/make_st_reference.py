"""Writes ``tiny_st_model/`` (mrl_jax) and ``tiny_st_reference.npz`` (sentence-transformers).

Run by hand, never by the tests, in two steps from the repository root:

1. With mrl_jax's environment, write a tiny "fine-tuned" model folder with
   :func:`mrl_jax.models.hf_bert.save_sentence_transformer`: a random BERT
   (hidden 32, 2 layers, 4 heads, intermediate 64, 16 positions) whose every
   parameter is perturbed so that no LayerNorm or bias keeps its initial value,
   a lower-casing word-level WordPiece tokenizer over :data:`CORPUS`'s words,
   ``max_seq_length`` 12, ``matryoshka_dimensions`` (8, 16, 32), :data:`PROMPTS` and
   a model card::

     PYTHONPATH=. python tests/data/make_st_reference.py model

2. In a throwaway virtualenv outside the repository, with torch (a CPU wheel)
   installed first and then sentence-transformers (never a dependency of
   mrl_jax; check that the second install pulls no other torch)::

     python -m venv /tmp/stenv && /tmp/stenv/bin/pip install torch==2.13.0  # CPU wheel
     /tmp/stenv/bin/pip install sentence-transformers  # must keep torch 2.13.0
     /tmp/stenv/bin/python tests/data/make_st_reference.py reference

   (Stored: sentence-transformers 6.3.0, transformers 5.25.0, torch 2.13.0+cpu.)

   This loads the folder with ``SentenceTransformer`` and stores, for
   :data:`TEXTS` (one longer than ``max_seq_length``): the padded token ids and
   attention mask of ``model.tokenize``, and for every ``m`` in the dims,
   ``SentenceTransformer(path, truncate_dim=m).encode(TEXTS)`` as it comes
   (``st_<m>``: the Normalize module runs *before* the truncation, so these rows
   have norm < 1 below 32) and with ``normalize_embeddings=True``
   (``st_normalized_<m>``: truncated, then L2-normalised); the same with
   ``prompt_name="query"`` (``st_query_<m>``); sentence-transformers'
   ``quantize_embeddings`` of ``st_normalized_<m>`` for ``"binary"``, ``"ubinary"``,
   ``"int8"`` (ranges of the rows themselves) and ``"int8"`` calibrated on the
   normalised embeddings of :data:`CORPUS` (``calibration_<m>``):
   ``q_<precision>_<m>`` and ``q_int8_calibrated_<m>``. Every warning and log
   record emitted while loading is stored too (``load_messages``; the test
   requires none above INFO).

``tests/test_hf_bert.py`` compares ``load_hf_bert`` on the folder against them.
"""

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_DIR = os.path.join(HERE, "tiny_st_model")
REFERENCE = os.path.join(HERE, "tiny_st_reference.npz")
DIMS = (8, 16, 32)
MAX_SEQ_LENGTH = 12
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CORPUS = [
    "The cat sits on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "Matryoshka embeddings can be truncated to a prefix.",
    "Small dolls nest inside bigger dolls.",
    "JAX compiles numerical programs with XLA!",
    "Sentence transformers encode text into vectors.",
]
PROMPTS = {"query": "query: ", "document": ""}
TEXTS = [
    "The cat sits on the mat.",
    "a QUICK brown dog jumps",
    "Matryoshka dolls nest; embeddings can be truncated.",
    "Unknown zebras wander here",
    # 20 tokens with [CLS] and [SEP]: truncated to MAX_SEQ_LENGTH.
    "the quick brown fox jumps over the lazy dog and the cat sits on the small mat again",
    "XLA!",
]


def word_tokenizer(texts):
  """A lower-casing BERT-style tokenizer whose WordPiece vocabulary is every word of ``texts``."""
  from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
  from tokenizers.models import WordPiece

  norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
  words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t))})
  vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *words))}
  tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer, tok.pre_tokenizer = norm, pre
  tok.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]),
                                                 ("[CLS]", vocab["[CLS]"]))
  return tok


def write_model() -> None:
  import jax
  import jax.numpy as jnp

  from mrl_jax.model_card import text_model_card
  from mrl_jax.models.hf_bert import save_sentence_transformer
  from mrl_jax.models.text import BertConfig, TextEncoder

  tokenizer = word_tokenizer(CORPUS)
  config = BertConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_layers=2,
                      num_heads=4, intermediate_size=64, max_position_embeddings=16)
  ids = jnp.zeros((1, 4), jnp.int32)
  params = TextEncoder(config).init(jax.random.key(0), ids, jnp.ones_like(ids))["params"]
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = treedef.unflatten([p + 0.2 * jax.random.normal(k, p.shape, p.dtype)
                              for p, k in zip(leaves, keys, strict=True)])
  path = save_sentence_transformer(
      MODEL_DIR, params=params, config=config, tokenizer=tokenizer, pooling="mean",
      max_seq_length=MAX_SEQ_LENGTH, matryoshka_dimensions=DIMS, normalize=True,
      mrl_jax_metadata={"matryoshka_dimensions": list(DIMS), "matryoshka_weights": [1.0] * 3,
                        "note": "random tiny test model (tests/data/make_st_reference.py)"},
      overwrite=True, prompts=PROMPTS,
      model_card=text_model_card(embed_dim=32, dims=DIMS, is_matryoshka=True,
                                 max_seq_length=MAX_SEQ_LENGTH, train_max_length=None,
                                 pooling="mean", license="apache-2.0"))
  print("wrote", path, sorted(os.listdir(path)))


def write_reference() -> None:
  import contextlib
  import io
  import logging
  import warnings

  import sentence_transformers
  import torch
  import transformers
  from sentence_transformers import SentenceTransformer
  from sentence_transformers.util import quantize_embeddings

  records = []

  class Keep(logging.Handler):
    def emit(self, record):
      records.append(f"{record.levelname} {record.name}: {record.getMessage()}")

  logging.getLogger().addHandler(Keep(level=logging.WARNING))
  transformers.logging.enable_propagation()
  stderr = io.StringIO()
  with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(stderr):
    warnings.simplefilter("always")
    model = SentenceTransformer(MODEL_DIR, device="cpu")
  # transformers prints its load report (MISSING / UNEXPECTED tensors) to stderr.
  report = [line for line in stderr.getvalue().splitlines()
            if "MISSING" in line or "UNEXPECTED" in line or "LOAD REPORT" in line]
  messages = [f"{w.category.__name__}: {w.message}" for w in caught] + records + report
  assert model.max_seq_length == MAX_SEQ_LENGTH, model.max_seq_length
  features = model.tokenize(TEXTS)
  assert int(features["attention_mask"].sum(1).max()) == MAX_SEQ_LENGTH  # one is truncated
  out = {
      "texts": np.array(TEXTS),
      "dims": np.array(DIMS, np.int32),
      "input_ids": features["input_ids"].numpy().astype(np.int32),
      "attention_mask": features["attention_mask"].numpy().astype(np.int32),
      "versions": np.array([f"sentence_transformers {sentence_transformers.__version__}",
                            f"transformers {transformers.__version__}",
                            f"torch {torch.__version__}"]),
      "load_messages": np.array(messages, dtype=str).reshape(-1),
      "max_seq_length": np.int32(model.max_seq_length),
  }
  for m in DIMS:
    truncating = SentenceTransformer(MODEL_DIR, device="cpu", truncate_dim=m)
    out[f"st_{m}"] = truncating.encode(TEXTS, convert_to_numpy=True).astype(np.float32)
    out[f"st_normalized_{m}"] = truncating.encode(
        TEXTS, convert_to_numpy=True, normalize_embeddings=True).astype(np.float32)
    assert out[f"st_{m}"].shape == (len(TEXTS), m)
    out[f"st_query_{m}"] = truncating.encode(
        TEXTS, convert_to_numpy=True, normalize_embeddings=True,
        prompt_name="query").astype(np.float32)
    z = out[f"st_normalized_{m}"]
    calibration = truncating.encode(CORPUS, convert_to_numpy=True, normalize_embeddings=True)
    out[f"calibration_{m}"] = calibration.astype(np.float32)
    for precision in ("binary", "ubinary", "int8"):
      out[f"q_{precision}_{m}"] = quantize_embeddings(z, precision=precision)
    out[f"q_int8_calibrated_{m}"] = quantize_embeddings(
        z, precision="int8", calibration_embeddings=calibration)
  np.savez(REFERENCE, **out)
  print("wrote", REFERENCE, "with", out["versions"], "load messages:", messages)


if __name__ == "__main__":
  if len(sys.argv) != 2 or sys.argv[1] not in ("model", "reference"):
    sys.exit(f"usage: {sys.argv[0]} model|reference (see the docstring)")
  write_model() if sys.argv[1] == "model" else write_reference()
