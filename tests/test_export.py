import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import tiny_config

from mrl_jax import export, inference, train_lib
from mrl_jax.export import BundleError
from mrl_jax.inference import Encoder


def _config(digits_dir, **kw):
  config = tiny_config(digits_dir, num_train_steps=10, eval_split="test[:64]", **kw)
  config.encoder = dict(name="cnn", embed_dim=16, features=(4,))  # BatchNorm: batch_stats too
  return config


@pytest.fixture(scope="module")
def trained(digits_dir, tmp_path_factory):
  """A trained tiny CNN: its workdir, a batch of inputs and its training-time embeddings."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = _config(digits_dir)
  train_lib.train_and_evaluate(config, workdir, progress=False)
  experiment = train_lib.Experiment(config, workdir)
  x = np.concatenate([b["image"] for b in experiment.eval_batches()])[:50]
  _, z = train_lib.predict_step(experiment.state, {"image": x})
  export.export_encoder(workdir, os.path.join(workdir, "encoder"))
  return {"workdir": workdir, "x": x, "z": np.asarray(z), "experiment": experiment}


def _truncate_then_normalise(z, m):
  return z[:, :m] / np.linalg.norm(z[:, :m], axis=1, keepdims=True)


def test_exported_embeddings_equal_the_training_model_at_every_dim(trained, tmp_path):
  from_workdir = Encoder.load(os.path.join(trained["workdir"], "encoder"))
  experiment = trained["experiment"]
  export.export_encoder(experiment.state, str(tmp_path / "b"), config=experiment.config,
                        input_shape=experiment.spec.image_shape)
  from_state = Encoder.load(str(tmp_path / "b"))
  for encoder in (from_workdir, from_state):
    assert encoder.dims == (2, 4, 8, 16) and encoder.embed_dim == 16
    for m in encoder.dims:
      got = encoder.embed(trained["x"], dim=m)
      assert got.shape == (50, m) and got.dtype == np.float32
      np.testing.assert_allclose(got, _truncate_then_normalise(trained["z"], m), atol=2e-6)
    np.testing.assert_allclose(encoder.embed(trained["x"], normalize=False), trained["z"],
                               rtol=1e-5, atol=1e-6)
  meta = from_workdir.metadata
  assert meta["matryoshka_dimensions"] == [2, 4, 8, 16] and meta["is_matryoshka"]
  assert meta["input"]["shape"] == [8, 8, 1] and meta["source"]["step"] == 10
  # Only what inference needs: encoder params and BatchNorm statistics, no heads or optimizer
  # (loading checks that the bundle holds exactly the arrays its encoder config implies).
  assert sorted(from_workdir.variables) == ["batch_stats", "params"]
  paths = [jax.tree_util.keystr(k)
           for k, _ in jax.tree_util.tree_flatten_with_path(from_workdir.variables)[0]]
  assert paths and not any("head" in p or "opt" in p for p in paths), paths
  raw = np.round(trained["x"][:4] * 255).astype(np.uint8)
  np.testing.assert_allclose(from_workdir.preprocess(raw), trained["x"][:4], atol=1e-6)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    export.export_encoder(trained["workdir"], os.path.join(trained["workdir"], "encoder"))


def test_dim_must_be_a_trained_nesting_dim_unless_allowed(trained):
  encoder = Encoder.load(os.path.join(trained["workdir"], "encoder"))
  for bad in (3, 32, 0, 2.0):
    with pytest.raises(ValueError, match=r"valid dims: \[2, 4, 8, 16\]"):
      encoder.embed(trained["x"], dim=bad)
  got = encoder.embed(trained["x"], dim=3, allow_any_dim=True)
  np.testing.assert_allclose(got, _truncate_then_normalise(trained["z"], 3), atol=2e-6)
  with pytest.raises(ValueError, match=r"outside 1\.\.16"):
    encoder.embed(trained["x"], dim=17, allow_any_dim=True)
  with pytest.raises(ValueError, match=r"shape \[B, 8, 8, 1\]"):
    encoder.embed(trained["x"][:, :4])


def test_any_batch_size_runs_on_a_few_compiled_sizes(trained, caplog):
  encoder = Encoder.load(os.path.join(trained["workdir"], "encoder"), batch_sizes=(4, 16))
  assert inference.padded_chunks(37, (4, 16)) == [(0, 16, 16), (16, 16, 16), (32, 5, 16)]
  assert inference.padded_chunks(3, (4, 16)) == [(0, 3, 4)]
  want = encoder.embed(trained["x"], dim=8)
  encoder.embed(trained["x"][:1], dim=8)  # both sizes compiled now
  compiles = lambda: [r.getMessage() for r in caplog.records
                      if "Compiling" in r.getMessage() and "embed_fn" in r.getMessage()]
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    for n in (0, 1, 2, 3, 5, 7, 11, 16, 17, 33, 50):
      got = encoder.embed(trained["x"][:n], dim=8)
      assert got.shape == (n, 8)
      np.testing.assert_allclose(got, want[:n], atol=1e-6)  # padding never leaks into rows
    assert not compiles(), compiles()
    encoder.embed(trained["x"][:3], dim=4)  # a new dim compiles, for the one size it needs
  assert len(compiles()) == 1, compiles()


def test_int8_and_binary_quantisation_of_the_truncated_embedding(trained):
  encoder = Encoder.load(os.path.join(trained["workdir"], "encoder"))
  z = encoder.embed(trained["x"], dim=8)
  q = encoder.embed(trained["x"], dim=8, quantize="int8")
  assert q.dtype == np.int8 and q.shape == (50, 8)
  np.testing.assert_array_equal(q, np.round(z * 127).astype(np.int8))
  bits = encoder.embed(trained["x"], dim=4, quantize="binary")
  assert bits.dtype == np.uint8 and bits.shape == (50, 1)
  np.testing.assert_array_equal(bits, np.packbits(encoder.embed(trained["x"], dim=4) > 0, -1))
  assert encoder.embed(trained["x"][:0], dim=16, quantize="binary").shape == (0, 2)
  with pytest.raises(ValueError, match="needs unit-norm"):
    encoder.embed(trained["x"], dim=8, quantize="int8", normalize=False)
  with pytest.raises(ValueError, match="quantize='fp8'"):
    encoder.embed(trained["x"], quantize="fp8")


def test_jax_export_of_the_embed_function_round_trips(trained):
  encoder = Encoder.load(os.path.join(trained["workdir"], "encoder"))
  blob = encoder.export(dim=4).serialize()
  served = jax.export.deserialize(blob)  # no mrl_jax or Flax model code involved
  for n in (3, 7):
    np.testing.assert_allclose(np.asarray(served.call(trained["x"][:n])),
                               encoder.embed(trained["x"][:n], dim=4), atol=1e-6)


def test_bundles_that_do_not_match_their_config_or_miss_files_fail_clearly(trained, tmp_path):
  source = os.path.join(trained["workdir"], "encoder")
  bundle = str(tmp_path / "bundle")
  shutil.copytree(source, bundle)
  meta_file = os.path.join(bundle, "encoder.json")
  meta = json.load(open(meta_file))

  def load_with(**changes):
    with open(meta_file, "w") as f:
      json.dump({**meta, **changes}, f)
    return Encoder.load(bundle)

  # Arrays written by another model config (wider conv) than the one in the metadata.
  with pytest.raises(BundleError, match=rf"bundle {bundle}: its arrays do not match its model "
                                        r"config .*\['conv_0'\]\['kernel'\]: shape \(3, 3, 1, 4\), "
                                        r"expected \(3, 3, 1, 6\)"):
    load_with(encoder={**meta["encoder"], "features": [6]})
  with pytest.raises(BundleError, match="encoder .*must name one of"):
    load_with(encoder={**meta["encoder"], "name": "os.system"})
  with pytest.raises(BundleError, match="matryoshka_dimensions"):
    load_with(matryoshka_dimensions=[4, 2])
  with pytest.raises(BundleError, match="format_version 99"):
    load_with(format_version=99)
  open(meta_file, "w").write("{not json")
  with pytest.raises(BundleError, match=rf"{meta_file} is unreadable"):
    Encoder.load(bundle)
  os.remove(meta_file)
  with pytest.raises(BundleError, match=rf"no encoder bundle at {bundle}: encoder.json is missing"):
    Encoder.load(bundle)
  shutil.copy(os.path.join(source, "encoder.json"), meta_file)
  shutil.rmtree(os.path.join(bundle, "variables"))
  with pytest.raises(BundleError, match=r"arrays folder .*variables is missing"):
    Encoder.load(bundle)


def test_bundle_preprocessing_matches_each_image_pipeline_style():
  import tensorflow as tf

  from mrl_jax.data import images

  raw = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 3)).astype(np.uint8)
  spec = {"style": "imagenet", "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3],
          "image_size": 224, "crop_ratio": 224 / 256}
  rule = export.preprocessing_info({"input": spec})
  assert rule["eval_resize"] == 256 and rule["eval_crop"] == 224
  want = images.normalize(tf.constant(raw), spec["mean"], spec["std"]).numpy()
  encoder = object.__new__(Encoder)  # only the preprocessing rule is needed
  encoder.preprocessing = rule
  np.testing.assert_allclose(encoder.preprocess(raw), want, rtol=1e-5, atol=1e-5)
  encoder.preprocessing = export.preprocessing_info({})  # the digits ("scale") style
  np.testing.assert_allclose(encoder.preprocess(raw), raw / 255.0, rtol=1e-6)
