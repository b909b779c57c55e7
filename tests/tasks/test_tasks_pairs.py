"""The pairs task: its loss equals the unfused Matryoshka wrapper, its metrics follow their
definitions, and its export is a sentence-transformers folder that Encoder serves exactly."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testutil import REPO, tiny_text_config

from mrl_jax import experiments
from mrl_jax.bundle.encoder import Encoder
from mrl_jax.evaluate.text import pair_retrieval_per_dim
from mrl_jax.losses import in_batch_softmax, matryoshka
from mrl_jax.tasks.pairs import PairsTask
from mrl_jax.train import sharding as sharding_lib


def _task(tmp_path, **overrides):

  config = experiments.task_spec(tiny_text_config(**overrides))
  return PairsTask(config, workdir=str(tmp_path), mesh=sharding_lib.make_mesh())


def test_fused_loss_equals_the_unfused_matryoshka_wrapper(tmp_path):
  task = _task(tmp_path, nesting={"dims": (32, 8, 16), "weights": (0.5, 1.0, 2.0)})
  assert task.dims == (8, 16, 32)
  params = task.init_variables(jax.random.PRNGKey(0))["params"]
  batch = jax.tree.map(lambda x: jnp.asarray(x[:8]), next(task.train_batches(0)))
  embed = lambda col: task.model.apply({"params": params}, batch[col]["input_ids"],
                                       batch[col]["attention_mask"])
  anchors, positives = embed("anchor"), embed("positive")
  want = matryoshka(lambda a, p: in_batch_softmax(a, p, scale=20.0), (8, 16, 32),
                    (1.0, 2.0, 0.5), embedding_args=(0, 1))(anchors, positives)
  loss, (_, metrics) = jax.jit(task.loss_and_metrics)(params, {}, batch, jax.random.PRNGKey(1))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  per_dim = [in_batch_softmax(anchors[:, :m], positives[:, :m], scale=20.0) for m in (8, 16, 32)]
  np.testing.assert_allclose(metrics["loss_per_dim"], per_dim, rtol=1e-5)


def test_pair_retrieval_metrics_follow_their_definitions():
  # 3 pairs, D=2: at m=1 every cosine is +-1, so ties count against the match.
  a = np.array([[1.0, 0.0], [1.0, 1.0], [-1.0, 1.0]])
  p = np.array([[1.0, 0.1], [1.0, 1.2], [-1.0, 0.9]])
  out = pair_retrieval_per_dim(a, p, (1, 2))
  np.testing.assert_allclose(out["cosine_recall@1_per_dim"], [1 / 3, 1.0])
  np.testing.assert_allclose(out["cosine_accuracy@1_per_dim"], [1 / 3, 1.0])
  np.testing.assert_allclose(out["cosine_mrr@10_per_dim"], [(0.5 + 0.5 + 1) / 3, 1.0])
  np.testing.assert_allclose(out["cosine_recall@10_per_dim"], [1.0, 1.0])
  # nDCG@10 with one relevant item: 1 / log2(1 + rank); ranks at m=1 are 2, 2, 1.
  np.testing.assert_allclose(out["cosine_ndcg@10_per_dim"],
                             [(1 / np.log2(3) * 2 + 1) / 3, 1.0])
  with pytest.raises(ValueError, match="NaN"):
    pair_retrieval_per_dim(np.full((3, 2), np.nan), p, (1, 2))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("text_run"))
  config = tiny_text_config(num_train_steps=20)
  result = experiments.train_and_evaluate(config, workdir, progress=False)
  experiment = experiments.create(config, workdir)
  experiment.close()
  return experiment, result


def test_export_is_a_sentence_transformers_folder_served_exactly_at_every_dim(trained):
  experiment, result = trained
  path = result["export_dir"]
  for name in ("config.json", "model.safetensors", "tokenizer.json", "modules.json",
               "1_Pooling/config.json", "sentence_bert_config.json",
               "config_sentence_transformers.json", "mrl_jax.json"):
    assert os.path.isfile(os.path.join(path, name)), name
  config = json.load(open(os.path.join(path, "config.json")))
  assert config["is_matryoshka"] is True and config["matryoshka_dimensions"] == [8, 16, 32]
  encoder = Encoder.load(path)
  assert encoder.modality == "text" and encoder.dims == (8, 16, 32)
  texts = ["how do I reset my password", "a cat naps on the couch", "unseen words here"]
  raw = experiment.task.embed_texts(jax.device_get(experiment.state.params), texts)
  for m in encoder.dims:
    want = raw[:, :m] / np.linalg.norm(raw[:, :m], axis=1, keepdims=True)
    np.testing.assert_allclose(encoder.embed(texts, dim=m), want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"valid dims: \[8, 16, 32\]"):
    encoder.embed(texts, dim=5)
  assert encoder.embed(texts).shape == (3, 32)  # default: the largest trained dim
  with pytest.raises(ValueError, match="list of str"):
    encoder.embed("one string")


def test_bad_text_configs_name_the_field(tmp_path):

  cases = [({"nesting": {"dims": (8, 64)}}, "larger than the embedding"),
           ({"loss": "cosent"}, "config.loss"), ({"n_dims_per_step": 4}, "n_dims_per_step"),
           ({"train_file": "/nonexistent.jsonl"}, "train_file"), ({"scale": 0.0}, "scale"),
           ({"encoder": {"dropout": 1.5}}, "encoder.dropout")]
  for overrides, match in cases:
    with pytest.raises(ValueError, match=match):
      experiments.validate_config(tiny_text_config(**overrides))
  with pytest.raises(ValueError, match="does not divide"):
    experiments.validate_config(tiny_text_config(batch_size=15), num_devices=2)


def test_cached_step_equals_the_full_batch_step_with_hard_negatives(tmp_path):

  negatives = os.path.join(REPO, "examples", "text", "train_hard_negatives.jsonl")
  full = _task(tmp_path / "a", train_file=negatives, batch_size=8, symmetric=True)
  cached = _task(tmp_path / "b", train_file=negatives, batch_size=8, symmetric=True,
                 mini_batch_size=2)
  params = full.init_variables(jax.random.PRNGKey(0))["params"]
  batch = jax.tree.map(jnp.asarray, next(cached.train_batches(0)))  # one padded length
  assert batch["negative"]["input_ids"].ndim == 3
  rng = jax.random.PRNGKey(3)
  (want, (_, want_m)), want_g = jax.jit(full.value_and_grad)(params, {}, batch, rng)
  (got, (_, got_m)), got_g = jax.jit(cached.value_and_grad)(params, {}, batch, rng)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got_m["loss_per_dim"], want_m["loss_per_dim"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               got_g, want_g)


def test_a_single_nesting_dim_exports_an_ordinary_model(tmp_path):
  result = experiments.train_and_evaluate(tiny_text_config(num_train_steps=2,
                                                         nesting={"dims": (32,)}),
                                        str(tmp_path), progress=False)
  config = json.load(open(os.path.join(result["export_dir"], "config.json")))
  assert config["is_matryoshka"] is False and "matryoshka_dimensions" not in config
  encoder = Encoder.load(result["export_dir"])
  assert not encoder.is_matryoshka and encoder.dims == (32,)
  with pytest.raises(ValueError, match=r"valid dims: \[32\]"):
    encoder.embed(["a cat"], dim=8)
  with pytest.warns(UserWarning, match="not trained with MRL"):  # an explicit opt-in
    assert encoder.embed(["a cat"], dim=8, allow_any_dim=True).shape == (1, 8)
