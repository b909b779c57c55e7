"""Matryoshka training of the text encoder on pairs (mrl_jax.text_train_lib)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from subprocess_util import run_python

from mrl_jax import optim
from mrl_jax import sharding as sharding_lib
from mrl_jax import text_train_lib as ttl
from mrl_jax.config_lib import load_config_file
from mrl_jax.data.text import read_pairs, tokenize_columns
from mrl_jax.losses import in_batch_softmax, matryoshka

CONFIG = os.path.join(REPO, "configs", "text_pairs.py")


def tiny_text_config(**overrides):
  """The example config shrunk: 16 tokens, hidden 32, no dropout, dims 8/16/32."""
  config = load_config_file(CONFIG)
  config.max_length = 16
  config.encoder.dropout = 0.0
  config.learning_rate = 3e-3
  config.warmup_steps = 2
  config.num_train_steps = 40
  config.log_every_steps = 20
  config.eval_every_steps = 40
  config.checkpoint_every_steps = 40
  config.eval_batch_size = 48
  config.update(overrides)
  return config


def test_train_step_loss_equals_unfused_matryoshka():
  config = tiny_text_config(weights=(1.0, 2.0, 0.5))
  bert = ttl.build_encoder(config)
  config = ttl.validate_text_config(config, hidden_size=bert.model.config.hidden_size)
  assert config.dims == (8, 16, 32)
  mesh = sharding_lib.make_mesh()
  schedule = optim.learning_rate_schedule(config, 1)
  state = ttl.create_pair_state(jax.random.PRNGKey(0), bert.model,
                                optim.make_optimizer(config, schedule), None, mesh)
  arrays = tokenize_columns(bert.tokenizer, read_pairs(config.train_file)[:8],
                            pad_to=config.max_length)
  batch = jax.tree.map(jnp.asarray, arrays)
  embed = lambda col: bert.model.apply({"params": state.params}, batch[col]["input_ids"],
                                       batch[col]["attention_mask"])
  anchors, positives = embed("anchor"), embed("positive")
  want = matryoshka(lambda a, p: in_batch_softmax(a, p, scale=config.scale), config.dims,
                    config.weights)(anchors, positives)
  loss_fn = ttl.make_pair_loss("fused", config.dims, config.weights, scale=config.scale)
  step = jax.jit(lambda s, b: ttl.pair_train_step(
      s, b, loss_fn=loss_fn, all_layers=False, dims=config.dims, scale=config.scale,
      learning_rate_fn=schedule))
  new_state, metrics = step(state, batch)
  np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
  per_dim = [in_batch_softmax(anchors[:, :m], positives[:, :m], scale=config.scale)
             for m in config.dims]
  np.testing.assert_allclose(metrics["loss_per_dim"], per_dim, rtol=1e-5)
  assert int(new_state.step) == 1


def test_retrieval_metrics_follow_their_definitions():
  # 3 pairs, D=2: at m=1 every cosine is +-1, so ties count against the match.
  a = np.array([[1.0, 0.0], [1.0, 1.0], [-1.0, 1.0]])
  p = np.array([[1.0, 0.1], [1.0, 1.2], [-1.0, 0.9]])
  out = ttl.retrieval_metrics_per_dim(a, p, (1, 2))
  # m=1: anchors 0 and 1 tie with each other's positives (rank 2); anchor 2 ranks 1.
  np.testing.assert_allclose(out["recall_at_1_per_dim"], [1 / 3, 1.0])
  np.testing.assert_allclose(out["mrr_at_10_per_dim"], [(0.5 + 0.5 + 1) / 3, 1.0])
  np.testing.assert_allclose(out["recall_at_10_per_dim"], [1.0, 1.0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 40-step run on the example pairs, retrieval evaluated on the training pairs."""
  workdir = str(tmp_path_factory.mktemp("text_run"))
  config = tiny_text_config(eval_pairs_file=tiny_text_config().train_file)
  exp = ttl.PairExperiment(config, workdir)
  before = exp.evaluate()
  result = exp.train(progress=False)
  return exp, before, result


def test_tiny_run_learns(trained):
  _, before, result = trained
  after = result["eval"]
  assert result["step"] == 40 and result["dims"] == [8, 16, 32]
  assert after["recall_at_1_per_dim"][-1] >= before["recall_at_1_per_dim"][-1] + 0.2, (
      before, after)
  assert after["mrr_at_10_per_dim"][-1] > before["mrr_at_10_per_dim"][-1]


def test_exported_encoder_reproduces_embeddings_at_every_dim(trained):
  exp, _, result = trained
  bundle = ttl.load_text_encoder(result["export_dir"])
  assert bundle.dims == (8, 16, 32) and bundle.model == exp.bert.model
  texts = ["how do I reset my password", "a cat naps on the couch", "unseen words here"]
  tok = exp.bert.tokenizer(texts)
  raw = np.asarray(exp.bert.model.apply({"params": jax.device_get(exp.state.params)},
                                        tok["input_ids"], tok["attention_mask"]))
  for m in bundle.dims:
    want = raw[:, :m] / np.linalg.norm(raw[:, :m], axis=1, keepdims=True)
    np.testing.assert_allclose(bundle.embed(texts, dim=m), want, rtol=1e-5, atol=1e-6)
  meta_path = os.path.join(result["export_dir"], "metadata.json")
  with open(meta_path) as f:
    meta = json.load(f)
  assert meta["bert_config"]["hidden_size"] == 32 and meta["normalize"] is True


def test_bad_configs_raise_clear_errors(tmp_path):
  with pytest.raises(ValueError, match=r"64 is larger than.*hidden_size=32"):
    ttl.validate_text_config(tiny_text_config(dims=(8, 64)), hidden_size=32)
  with pytest.raises(ValueError, match="2 weights for 3 nesting dims"):
    ttl.validate_text_config(tiny_text_config(weights=(1.0, 2.0)), hidden_size=32)
  with pytest.raises(ValueError, match="config.loss"):
    ttl.validate_text_config(tiny_text_config(loss="cosent"), hidden_size=32)
  with pytest.raises(ValueError, match="n_dims_per_step"):
    ttl.validate_text_config(tiny_text_config(n_dims_per_step=4), hidden_size=32)
  with pytest.raises(ValueError, match="does not divide"):
    ttl.validate_text_config(tiny_text_config(batch_size=15), hidden_size=32, num_devices=2)
  with pytest.raises(ValueError, match="train_file"):
    ttl.validate_text_config(tiny_text_config(train_file="/nonexistent.jsonl"), hidden_size=32)
  with pytest.raises(ValueError, match="config.dims"):  # the boundary: before any training
    ttl.train_and_evaluate(tiny_text_config(dims=(8, 16, 33)), str(tmp_path))


@pytest.mark.slow
def test_train_script_runs_on_two_devices_and_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  code = ("import runpy, sys; sys.argv = ['train.py', '--config=configs/text_pairs.py', "
          f"'--workdir={workdir}', '--config.num_train_steps=%d', '--config.log_every_steps=5', "
          "'--config.checkpoint_every_steps=10', '--config.eval_every_steps=100', "
          "'--config.loss=%s', '--config.n_dims_per_step=2']; "
          "runpy.run_path('train.py', run_name='__main__')")
  first = run_python(code % (10, "fused"), devices=2)
  assert "final eval spearman per dim: 8:" in first
  second = run_python(code % (20, "fused"), devices=2)
  assert "[train/step 15]" in second and "[train/step 5]" not in second  # resumed at 10
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    assert json.load(f)["step"] == 20
  bundle = ttl.load_text_encoder(os.path.join(workdir, "text_encoder"))
  assert bundle.embed(["a dog runs in the park"], dim=16).shape == (1, 16)
