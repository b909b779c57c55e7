"""The one exported artifact (safetensors + JSON) and the Encoder that serves it (images)."""

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest
from testutil import tiny_config

from mrl_jax import experiments
from mrl_jax.bundle import artifact
from mrl_jax.bundle import encoder as inference
from mrl_jax.bundle.artifact import BundleError
from mrl_jax.bundle.encoder import Encoder
from mrl_jax.tasks.classification import preprocessing_info


def _config(digits_dir, **kw):
  config = tiny_config(digits_dir, num_train_steps=10, eval_split="test[:64]", **kw)
  config.encoder = dict(name="cnn", embed_dim=16, features=(4,))  # BatchNorm: batch_stats too
  return config


@pytest.fixture(scope="module")
def trained(digits_dir, tmp_path_factory):
  """A trained tiny CNN: its workdir (with encoder/), inputs, embeddings and nested logits."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = _config(digits_dir)
  experiments.train_and_evaluate(config, workdir, progress=False)
  experiment = experiments.create(config, workdir)
  experiment.close()
  task = experiment.task
  x = np.concatenate([b["image"] for b in task.eval_batches()])[:50]
  logits, z = task.model.apply(experiment.state.variables, x, return_embedding=True)
  return {"workdir": workdir, "x": x, "z": np.asarray(z), "logits": np.asarray(logits),
          "experiment": experiment, "path": os.path.join(workdir, "encoder")}


def _truncate_then_normalise(z, m):
  return z[:, :m] / np.linalg.norm(z[:, :m], axis=1, keepdims=True)


def test_exported_embeddings_and_heads_equal_the_training_model_at_every_dim(trained):
  encoder = Encoder.load(trained["path"])
  assert encoder.modality == "image" and encoder.dims == (2, 4, 8, 16)
  assert encoder.embed_dim == 16 and encoder.input_shape == (8, 8, 1)
  for m in encoder.dims:
    got = encoder.embed(trained["x"], dim=m)
    assert got.shape == (50, m) and got.dtype == np.float32
    np.testing.assert_allclose(got, _truncate_then_normalise(trained["z"], m), atol=2e-6)
  np.testing.assert_allclose(encoder.embed(trained["x"], normalize=False), trained["z"],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(encoder.logits(trained["x"]), trained["logits"], rtol=1e-5,
                             atol=1e-5)  # the nested heads travel with the bundle
  meta = encoder.metadata
  assert meta["matryoshka_dimensions"] == [2, 4, 8, 16] and meta["is_matryoshka"]
  assert meta["step"] == 10 and meta["task"] == "classification"
  assert sorted(os.listdir(trained["path"])) == ["config.json", "model.safetensors",
                                                 "mrl_jax.json"]
  assert sorted(encoder.variables) == ["encoder", "head"]
  assert sorted(encoder.variables["encoder"]) == ["batch_stats", "params"]
  raw = np.round(trained["x"][:4] * 255).astype(np.uint8)
  np.testing.assert_allclose(encoder.preprocess(raw), trained["x"][:4], atol=1e-6)
  with pytest.raises(ValueError, match="run Encoder.preprocess on raw pixels first"):
    encoder.embed(raw)
  bad = trained["x"][:5].copy()
  bad[3, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match=r"NaN or inf in rows \[3\]"):
    encoder.embed(bad)


def test_dim_must_be_a_trained_nesting_dim_unless_allowed(trained):
  encoder = Encoder.load(trained["path"])
  for bad in (3, 32, 0, 2.0):
    with pytest.raises(ValueError, match=r"valid dims: \[2, 4, 8, 16\]"):
      encoder.embed(trained["x"], dim=bad)
  with pytest.warns(UserWarning, match="dim=3 was not trained"):
    got = encoder.embed(trained["x"], dim=3, allow_any_dim=True)
  np.testing.assert_allclose(got, _truncate_then_normalise(trained["z"], 3), atol=2e-6)
  with pytest.raises(ValueError, match=r"outside 1\.\.16"):
    encoder.embed(trained["x"], dim=17, allow_any_dim=True)
  with pytest.raises(ValueError, match=r"shape \[B, 8, 8, 1\]"):
    encoder.embed(trained["x"][:, :4])
  encoder.is_matryoshka = False  # as an FF-k bundle: truncating it is an explicit opt-in
  with pytest.warns(UserWarning, match="not trained with MRL"):
    got = encoder.embed(trained["x"], dim=3, allow_any_dim=True)
  np.testing.assert_allclose(got, _truncate_then_normalise(trained["z"], 3), atol=2e-6)


def test_any_batch_size_runs_on_a_few_compiled_sizes(trained, caplog):
  encoder = Encoder.load(trained["path"], batch_sizes=(4, 16))
  assert inference.padded_chunks(37, (4, 16)) == [(0, 16, 16), (16, 16, 16), (32, 5, 16)]
  assert inference.padded_chunks(3, (4, 16)) == [(0, 3, 4)]
  want = encoder.embed(trained["x"], dim=8)
  encoder.embed(trained["x"][:1], dim=8)  # both sizes compiled now
  compiles = lambda: [r.getMessage() for r in caplog.records
                      if "Compiling" in r.getMessage() and "forward_checked" in r.getMessage()]
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    for n in (0, 1, 2, 3, 5, 7, 11, 16, 17, 33, 50):
      got = encoder.embed(trained["x"][:n], dim=8)
      assert got.shape == (n, 8)
      np.testing.assert_allclose(got, want[:n], atol=1e-6)  # padding never leaks into rows
    assert not compiles(), compiles()
    traces = encoder.forward_traces
    # Another dim, normalisation or code reuses the encoder's compiled programs: slices of
    # the one full-width output.
    for dim in encoder.dims:
      for quantize in inference.QUANTIZATIONS:
        encoder.embed(trained["x"][:3], dim=dim, quantize=quantize)
    encoder.embed(trained["x"][:3], dims=encoder.dims, normalize=False)
  assert not compiles(), compiles()
  assert encoder.forward_traces == traces


def test_int8_and_binary_quantisation_of_the_truncated_embedding(trained):
  encoder = Encoder.load(trained["path"])
  z = encoder.embed(trained["x"], dim=8)
  q = encoder.embed(trained["x"], dim=8, quantize="int8_symmetric")
  assert q.dtype == np.int8 and q.shape == (50, 8)
  np.testing.assert_array_equal(q, np.round(z * 127).astype(np.int8))
  # sentence-transformers' int8: per-dimension ranges of these 50 rows (no calibration).
  starts, steps = z.min(0), (z.max(0) - z.min(0)) / np.float32(255)
  np.testing.assert_array_equal(encoder.embed(trained["x"], dim=8, quantize="int8"),
                                (np.clip(np.floor((z - starts) / steps), 0, 255) - 128)
                                .astype(np.int8))
  bits = encoder.embed(trained["x"], dim=4, quantize="ubinary")
  assert bits.dtype == np.uint8 and bits.shape == (50, 1)
  np.testing.assert_array_equal(bits, np.packbits(encoder.embed(trained["x"], dim=4) > 0, -1))
  signed = encoder.embed(trained["x"], dim=4, quantize="binary")
  assert signed.dtype == np.int8
  np.testing.assert_array_equal(signed, (bits.astype(np.int16) - 128).astype(np.int8))
  assert encoder.embed(trained["x"][:0], dim=16, quantize="ubinary").shape == (0, 2)
  with pytest.raises(ValueError, match="needs unit-norm"):
    encoder.embed(trained["x"], dim=8, quantize="int8_symmetric", normalize=False)
  with pytest.raises(ValueError, match="quantize='fp8'"):
    encoder.embed(trained["x"], quantize="fp8")


def test_jax_export_of_the_embed_function_round_trips(trained):
  encoder = Encoder.load(trained["path"])
  served = jax.export.deserialize(encoder.export(dim=4).serialize())  # no mrl_jax code
  for n in (3, 7):
    np.testing.assert_allclose(np.asarray(served.call(trained["x"][:n])),
                               encoder.embed(trained["x"][:n], dim=4), atol=1e-6)


def test_changed_missing_or_mismatched_bundle_files_fail_naming_the_file(trained, tmp_path):
  bundle = str(tmp_path / "bundle")
  shutil.copytree(trained["path"], bundle)
  weights = os.path.join(bundle, "model.safetensors")
  data = bytearray(open(weights, "rb").read())
  data[-5] ^= 1  # one flipped bit in the arrays
  open(weights, "wb").write(bytes(data))
  with pytest.raises(BundleError, match=r"bytes of model.safetensors changed"):
    Encoder.load(bundle)
  shutil.copy(os.path.join(trained["path"], "model.safetensors"), weights)
  config_file = os.path.join(bundle, "config.json")
  config = json.load(open(config_file))

  def load_with(**changes):
    with open(config_file, "w") as f:
      json.dump({**config, **changes}, f)
    return Encoder.load(bundle, verify=False)  # past the hash: the config is checked too

  with pytest.raises(BundleError, match=r"arrays do not match the model config.*shape \(3, 3, "
                                        r"1, 4\), expected \(3, 3, 1, 6\)"):
    load_with(encoder={**config["encoder"], "features": [6]})
  with pytest.raises(BundleError, match="unknown encoder 'os.system'"):
    load_with(encoder={**config["encoder"], "name": "os.system"})
  with pytest.raises(BundleError, match="matryoshka_dimensions"):
    load_with(matryoshka_dimensions=[4, 2])
  with pytest.raises(BundleError, match="preprocessing.scale"):
    load_with(preprocessing={**config["preprocessing"], "scale": "0.5"})
  open(config_file, "wb").write(b"\xff\xfe not json")
  with pytest.raises(BundleError, match=rf"{config_file} is not UTF-8"):
    Encoder.load(bundle, verify=False)
  meta_file = os.path.join(bundle, "mrl_jax.json")
  open(meta_file, "w").write("{not json")
  with pytest.raises(BundleError, match=rf"{meta_file} is not valid JSON"):
    Encoder.load(bundle)
  os.remove(meta_file)
  with pytest.raises(BundleError, match=rf"{meta_file} is missing"):
    Encoder.load(bundle)


def test_re_export_swaps_atomically_and_a_failed_export_keeps_the_old_bundle(trained, tmp_path):
  out = str(tmp_path / "encoder")
  experiments.export_encoder(trained["workdir"], out)
  before = Encoder.load(out).embed(trained["x"][:3])

  def dies(tmp):
    open(os.path.join(tmp, "config.json"), "w").write("{}")
    raise KeyboardInterrupt  # killed half-way through writing the new bundle

  with pytest.raises(KeyboardInterrupt):
    artifact.write_atomically(out, dies)
  np.testing.assert_array_equal(Encoder.load(out).embed(trained["x"][:3]), before)
  assert sorted(os.listdir(tmp_path)) == ["encoder"]  # no partial bundle left behind
  experiments.export_encoder(trained["workdir"], out)  # a rerun replaces it whole
  np.testing.assert_array_equal(Encoder.load(out).embed(trained["x"][:3]), before)


def test_bundle_preprocessing_matches_each_image_pipeline_style():
  import tensorflow as tf

  from mrl_jax.data import images

  raw = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8, 3)).astype(np.uint8)
  spec = {"style": "imagenet", "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3],
          "image_size": 224, "crop_ratio": 224 / 256}
  rule = preprocessing_info({"input": spec})
  assert rule["eval_resize"] == 256 and rule["eval_crop"] == 224
  want = images.normalize(tf.constant(raw), spec["mean"], spec["std"]).numpy()
  encoder = object.__new__(Encoder)  # only the preprocessing rule is needed
  encoder.config, encoder.modality = {"preprocessing": rule}, "image"
  np.testing.assert_allclose(encoder.preprocess(raw), want, rtol=1e-5, atol=1e-5)
  encoder.config = {"preprocessing": preprocessing_info({})}  # the digits ("scale") style
  np.testing.assert_allclose(encoder.preprocess(raw), raw / 255.0, rtol=1e-6)


def test_nan_embeddings_from_the_model_itself_are_refused_not_quantised_to_zero(trained):
  encoder = Encoder.load(trained["path"])
  encoder.variables = jax.tree.map(lambda v: v * np.nan, encoder.variables)  # a broken model
  for quantize in (None, "int8", "binary"):
    with pytest.raises(ValueError, match=r"model produced NaN/inf embeddings for rows \[0, 1"):
      encoder.embed(trained["x"][:3], dim=4, quantize=quantize)


def test_a_killed_exports_leftovers_are_cleaned_by_the_next_export(trained, tmp_path):
  out = str(tmp_path / "encoder")
  experiments.export_encoder(trained["workdir"], out)
  shutil.copytree(out, out + ".tmp-deadbeef")  # as a kill mid-write leaves it
  experiments.export_encoder(trained["workdir"], out)
  assert sorted(os.listdir(tmp_path)) == ["encoder"]
  os.rename(out, out + ".old-12345678")  # a kill between the two renames of a swap
  artifact.remove_leftovers(out)  # the next export puts the complete old bundle back first
  assert sorted(os.listdir(tmp_path)) == ["encoder"]
  Encoder.load(out)
