"""Issue 26, bundles: verified whole (every file listed and hashed, ``mrl_jax.json`` validated
field by field and covered by its own digest, regular files inside the folder only, dtypes as
exported, hex in any case), and checked from the safetensors header against shapes derived
from the config BEFORE anything is built or allocated (config integers bounded by the tensors
present), with typed JSON fields. Bundles are written by hand here (no training): tiny image,
embedding (adaptor) and text (``tests/fixtures/tiny_st_model``) bundles.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from testutil import sign_bundle, text_bundle

from mrl_jax import models
from mrl_jax.bundle import artifact, hf_folder
from mrl_jax.bundle.artifact import BundleError
from mrl_jax.bundle.encoder import Encoder
from mrl_jax.core import fileio
from mrl_jax.core.heads import MRLHead
from mrl_jax.models.adaptor import MatryoshkaAdaptor
from mrl_jax.models.text import BertConfig

DIMS = [2, 4, 8]


def image_bundle(path):
  os.makedirs(path)
  encoder_cfg = {"name": "mlp", "hidden": [8], "embed_dim": 8}
  encoder = models.build_encoder(encoder_cfg)
  head = MRLHead(3, tuple(DIMS))
  key = jax.random.PRNGKey(0)
  variables = {"encoder": encoder.init(key, jnp.zeros((1, 4, 4, 1)), train=False),
               "head": head.init(key, jnp.zeros((1, 8)))}
  fileio.write_json(os.path.join(path, "config.json"), {
      "model_type": "mrl_jax_image_encoder", "encoder": encoder_cfg, "embed_dim": 8,
      "half_precision": False, "is_matryoshka": True, "matryoshka_dimensions": DIMS,
      "head": {"kind": "mrl", "num_classes": 3, "dims": DIMS},
      "input": {"shape": [4, 4, 1], "dtype": "float32"},
      "preprocessing": {"scale": 1 / 255, "offset": 0.0}})
  artifact.save_weights(path, variables)
  sign_bundle(path, "image")
  return path


def embedding_bundle(path):
  os.makedirs(path)
  model = MatryoshkaAdaptor(hidden=(4,))
  fileio.write_json(os.path.join(path, "config.json"), {
      "model_type": "mrl_jax_embedding_adaptor", "embed_dim": 8, "is_matryoshka": True,
      "matryoshka_dimensions": DIMS, "adaptor": {"hidden": [4], "activation": "relu"},
      "input": {"shape": [8], "dtype": "float32"}, "text_encoder": None})
  artifact.save_weights(path, model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8))))
  sign_bundle(path, "embedding")
  return path


@pytest.fixture
def image(tmp_path):
  return image_bundle(str(tmp_path / "image"))


@pytest.fixture
def text(tmp_path):
  return text_bundle(str(tmp_path / "text"))


def _edit_json(path, name, change):
  file = os.path.join(path, name)
  value = json.load(open(file))
  change(value)
  with open(file, "w") as f:
    json.dump(value, f)


def _resign(path):
  meta = json.load(open(os.path.join(path, artifact.METADATA_FILE)))
  return sign_bundle(path, meta["modality"], meta["matryoshka_dimensions"])


def test_hand_written_bundles_load_and_serve(tmp_path, image, text):
  emb = embedding_bundle(str(tmp_path / "emb"))
  for path, x in ((image, np.ones((2, 4, 4, 1), np.float32)), (emb, np.ones((2, 8), np.float32)),
                  (text, ["a text", "another"])):
    z = Encoder.load(path).embed(x, dim=DIMS[-1] if path != text else 32)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)


# --- config integers bounded by the tensors present, before anything is built ------------------

IMAGE_CONFIG_BOMBS = [
    ("hidden", lambda c: c["encoder"].update(hidden=[1_000_000]), r"config.encoder.hidden\[0\]="
                                                                  r"1000000 is outside"),
    ("layers", lambda c: c["encoder"].update(hidden=[8] * 100_000),
     r"config.encoder.hidden lists 100000 entries, more than the \d+ tensors"),
    ("embed_dim", lambda c: c.update(embed_dim=10**12), r"embed_dim"),
    ("num_classes", lambda c: c["head"].update(num_classes=10**9), r"head.num_classes"),
    ("input.shape", lambda c: c["input"].update(shape=[100_000, 100_000, 1]),
     r"input.shape \[100000, 100000, 1\] has more than"),
    ("input.shape float", lambda c: c["input"].update(shape=[4.0, 4, 1]), r"input.shape"),
]


@pytest.mark.parametrize("change,match", [c[1:] for c in IMAGE_CONFIG_BOMBS],
                         ids=[c[0] for c in IMAGE_CONFIG_BOMBS])
def test_image_config_bombs_are_refused_from_the_header(image, change, match):
  _edit_json(image, "config.json", change)
  _resign(image)
  with pytest.raises(BundleError, match=match):
    Encoder.load(image)


TEXT_CONFIG_BOMBS = [
    ("num_hidden_layers", {"num_hidden_layers": 1_000_000}, r"num_hidden_layers=1000000 needs"),
    ("vocab_size", {"vocab_size": 10**12}, r"word_embeddings.weight: \(44, 32\) \(config.json "
                                           r"implies \(1000000000000, 32\)"),
    ("intermediate_size", {"intermediate_size": 65}, r"intermediate.dense.weight"),
    ("max_position_embeddings", {"max_position_embeddings": 32}, r"position_embeddings.*"
                                                                 r"max_position_embeddings"),
    ("hidden_size", {"hidden_size": 10**9, "num_attention_heads": 1}, r"hidden_size|differ"),
]


@pytest.mark.parametrize("changes,match", [c[1:] for c in TEXT_CONFIG_BOMBS],
                         ids=[c[0] for c in TEXT_CONFIG_BOMBS])
def test_text_config_bombs_are_refused_from_the_header(text, changes, match):
  _edit_json(text, "config.json", lambda c: c.update(changes))
  _resign(text)
  with pytest.raises(BundleError, match=match):
    Encoder.load(text)


def test_arithmetic_bert_shapes_equal_the_traced_model():
  config = BertConfig(vocab_size=44, hidden_size=32, num_layers=2, num_heads=4,
                      intermediate_size=64, max_position_embeddings=16)
  traced = {hf_folder._hf_name(p): (s[::-1] if p[-1] == "kernel" else s)
            for p, s in hf_folder._param_shapes(config).items()}
  assert hf_folder.expected_hf_shapes(config) == traced


@pytest.mark.parametrize("name", ["config.json", "mrl_jax.json"])
def test_deeply_nested_json_is_one_clear_error(image, name):
  with open(os.path.join(image, name), "w") as f:
    f.write("[" * 100_000 + "]" * 100_000)
  with pytest.raises(BundleError, match=rf"{name} is not valid JSON: nested too deeply"):
    Encoder.load(image, verify=False)


@pytest.mark.parametrize("name,key", [("config.json", "model_type"), ("mrl_jax.json", "modality")])
def test_duplicate_json_keys_are_refused(image, name, key):
  file = os.path.join(image, name)
  text = open(file).read()
  open(file, "w").write(text.replace("{", f'{{"{key}": "text", ', 1))
  with pytest.raises(BundleError, match=rf"{name} is not valid JSON: the key '{key}' appears "
                                        "twice"):
    Encoder.load(image, verify=False)


# --- dtypes as exported -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int32, np.float16, np.float64])
def test_image_arrays_of_another_dtype_are_refused(image, dtype):
  file = os.path.join(image, "model.safetensors")
  save_file({k: v.astype(dtype) for k, v in load_file(file).items()}, file)
  _resign(image)
  with pytest.raises(BundleError, match=r"dtype \w+, exported as F32"):
    Encoder.load(image)


def test_text_tensors_must_be_floats(text):
  file = os.path.join(text, "model.safetensors")
  tensors = load_file(file)
  tensors["embeddings.word_embeddings.weight"] = tensors[
      "embeddings.word_embeddings.weight"].astype(np.int32)
  save_file(tensors, file)
  _resign(text)
  with pytest.raises(BundleError, match=r"tensors must be floats .*word_embeddings.weight: I32"):
    Encoder.load(text)


# --- every file listed, regular files inside the folder only ----------------------------------


def test_an_unlisted_file_is_refused(image):
  open(os.path.join(image, "extra.bin"), "wb").write(b"x")
  with pytest.raises(BundleError, match=r"\['extra.bin'\] not listed"):
    Encoder.load(image)
  os.remove(os.path.join(image, "extra.bin"))
  open(os.path.join(image, "README.md"), "w").write("a model card added by a Hub upload\n")
  Encoder.load(image)  # allowed unlisted (never read)


def test_a_deleted_hash_entry_with_an_edited_file_is_refused(image):
  _edit_json(image, "config.json", lambda c: c.update(half_precision=True))
  file = os.path.join(image, artifact.METADATA_FILE)
  meta = json.load(open(file))
  del meta["sha256"]["config.json"]
  json.dump(meta, open(file, "w"))
  with pytest.raises(BundleError, match=r"fields changed since export"):
    Encoder.load(image)
  meta[artifact.METADATA_DIGEST] = artifact.metadata_digest(meta)  # a forger re-signs the metadata
  json.dump(meta, open(file, "w"))
  with pytest.raises(BundleError, match=r"\['config.json'\] not listed"):
    Encoder.load(image)


@pytest.mark.parametrize("what", ["config.json", "model.safetensors", "1_Pooling"])
def test_symlinks_are_refused(text, tmp_path, what):
  target = os.path.join(text, what)
  outside = str(tmp_path / f"outside-{what}")
  shutil.move(target, outside)
  os.symlink(outside, target)
  with pytest.raises(BundleError, match=rf"{what} is a symbolic link"):
    Encoder.load(text)


def test_a_symlinked_metadata_file_is_refused(image, tmp_path):
  meta = os.path.join(image, artifact.METADATA_FILE)
  shutil.move(meta, str(tmp_path / "meta.json"))
  os.symlink(str(tmp_path / "meta.json"), meta)
  with pytest.raises(BundleError, match=r"mrl_jax.json is a symbolic link"):
    Encoder.load(image)


def test_upper_case_hex_digests_are_accepted(image):
  file = os.path.join(image, artifact.METADATA_FILE)
  meta = json.load(open(file))
  meta["sha256"] = {k: v.upper() for k, v in meta["sha256"].items()}
  meta[artifact.METADATA_DIGEST] = artifact.metadata_digest(meta).upper()
  json.dump(meta, open(file, "w"))
  Encoder.load(image)


# --- mrl_jax.json validated field by field and covered by its digest -------------------------

METADATA_ERRORS = [
    ("weights 1e30", {"matryoshka_weights": [1e30, 1.0, 1.0]}, r"matryoshka_weights="),
    ("weights negative", {"matryoshka_weights": [-1.0, 1.0, 1.0]}, r"matryoshka_weights="),
    ("weights all zero", {"matryoshka_weights": [0, 0, 0]}, r"not all 0"),
    ("weights too few", {"matryoshka_weights": [1.0]}, r"must be 3 numbers"),
    ("weights strings", {"matryoshka_weights": ["1", "1", "1"]}, r"matryoshka_weights="),
    ("step -1", {"step": -1}, r"step=-1 must be null or an int >= 0"),
    ("step float", {"step": 2.5}, r"step=2.5"),
    ("is_matryoshka string", {"is_matryoshka": "false"}, r"is_matryoshka='false' must be a JSON "
                                                         r"bool"),
    ("is_matryoshka int", {"is_matryoshka": 1}, r"is_matryoshka=1 must be a JSON bool"),
    ("dims unsorted", {"matryoshka_dimensions": [4, 2, 8]}, r"matryoshka_dimensions="),
    ("dims bools", {"matryoshka_dimensions": [True, 4, 8]}, r"matryoshka_dimensions="),
    ("task", {"task": 3}, r"task=3 must be a string"),
    ("training_config", {"training_config": [1]}, r"training_config"),
    ("hash not hex", {"sha256": {"model.safetensors": "zz" * 32}}, r"not 64 hex digits"),
    ("hash short", {"sha256": {"model.safetensors": "ab"}}, r"not 64 hex digits"),
    ("name leaves", {"sha256": {"model.safetensors": "a" * 64, "../x": "a" * 64}},
     r"'\.\./x' leaves the bundle"),
    ("name absolute", {"sha256": {"model.safetensors": "a" * 64, "/etc/passwd": "a" * 64}},
     r"leaves the bundle"),
    ("no weights entry", {"sha256": {"config.json": "a" * 64}}, r"no sha256 entry"),
    ("digest missing", {artifact.METADATA_DIGEST: None}, r"metadata_sha256 is missing"),
    ("step changed", {"step": 4}, r"fields changed since export"),
    ("weights changed", {"matryoshka_weights": [1.0, 2.0, 1.0]}, r"fields changed since export"),
    ("modality changed", {"modality": "embedding"}, r"fields changed since export"),
]


@pytest.mark.parametrize("changes,match", [c[1:] for c in METADATA_ERRORS],
                         ids=[c[0] for c in METADATA_ERRORS])
def test_metadata_fields_are_validated_and_digested(image, changes, match):
  _edit_json(image, artifact.METADATA_FILE, lambda m: m.update(changes))
  with pytest.raises(BundleError, match=match):
    Encoder.load(image)


# --- typed config.json fields ------------------------------------------------------------------

TYPED_CONFIG_ERRORS = [
    ("half_precision string", lambda c: c.update(half_precision="false"),
     r"half_precision='false' must be a JSON bool"),
    ("half_precision int", lambda c: c.update(half_precision=0), r"half_precision=0 must be"),
    ("head.kind unknown", lambda c: c["head"].update(kind="mrl2"),
     r"kind='mrl2' must be one of \['mrl', 'mrl_e', 'ff'\]"),
    ("head.kind missing", lambda c: c["head"].pop("kind"), r"kind=None must be one of"),
    ("is_matryoshka string", lambda c: c.update(is_matryoshka="false"),
     r"is_matryoshka='false' must be a JSON bool"),
    ("is_matryoshka differs", lambda c: c.update(is_matryoshka=False), r"is_matryoshka differs"),
    ("embed_dim string", lambda c: c.update(embed_dim="8"), r"embed_dim='8' must be an int"),
    ("head not object", lambda c: c.update(head="mrl"), r"head='mrl' must be a JSON object"),
]


@pytest.mark.parametrize("change,match", [c[1:] for c in TYPED_CONFIG_ERRORS],
                         ids=[c[0] for c in TYPED_CONFIG_ERRORS])
def test_config_fields_are_typed(image, change, match):
  _edit_json(image, "config.json", change)
  _resign(image)
  with pytest.raises(BundleError, match=match):
    Encoder.load(image)


@pytest.mark.parametrize("value", ["false", 0, None])
def test_text_is_matryoshka_must_be_a_bool(text, value):
  _edit_json(text, "config.json", lambda c: c.update(is_matryoshka=value))
  _resign(text)
  with pytest.raises(BundleError, match=r"is_matryoshka"):
    Encoder.load(text)
