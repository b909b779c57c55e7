"""Serving an export as each stack reads it.

* sentence-transformers 6.3: the stored reference (tests/fixtures/make_st_reference.py,
  made with the real library: no warning on load, truncate_dim at every dim, prompts,
  quantize_embeddings) against :meth:`Encoder.embed` and :func:`mrl_jax.core.ops.quantize`;
* vLLM and text-embeddings-inference: their rules for ``dimensions``, pooling and
  normalisation, written out from their sources, on real exports of the pairs task;
* the served sequence length, the pooler, the model card, and Encoder.embed's
  one-forward contract (dims, batch_size, progress bar, prompts, calibrated int8).
"""

import json
import os
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file
from testutil import TESTS, tiny_text_config

from mrl_jax import experiments
from mrl_jax.bundle import artifact, calibration
from mrl_jax.bundle.encoder import Encoder
from mrl_jax.core import ops

DATA = os.path.join(TESTS, "fixtures")
TINY = os.path.join(DATA, "tiny_st_model")
REFERENCE = os.path.join(DATA, "tiny_st_reference.npz")
CORPUS = ["The cat sits on the mat.", "A quick brown fox jumps over the lazy dog.",
          "Matryoshka embeddings can be truncated to a prefix.",
          "Small dolls nest inside bigger dolls.", "JAX compiles numerical programs with XLA!",
          "Sentence transformers encode text into vectors."]  # make_st_reference.CORPUS


# --- sentence-transformers' quantize_embeddings, written out in numpy -------------------


def st_int8(x, calibration_rows):
  starts = calibration_rows.min(0)
  steps = (calibration_rows.max(0) - starts) / np.float32(255)
  steps = np.where(steps == 0, 1, steps)
  return (np.clip(np.floor((x - starts) / steps), 0, 255) - 128).astype(np.int8)


def st_ubinary(x):
  return np.packbits(x > 0, axis=-1)


def st_binary(x):
  return (np.packbits(x > 0, axis=-1).astype(np.int16) - 128).astype(np.int8)


def st_codes(x, precision):
  return {"int8": lambda: st_int8(x, x), "binary": lambda: st_binary(x),
          "ubinary": lambda: st_ubinary(x)}[precision]()


def make_bundle(path):
  shutil.copytree(TINY, path)
  os.remove(os.path.join(path, artifact.METADATA_FILE))  # its note, replaced by a bundle's
  artifact.write_metadata(str(path), modality="text", dims=[8, 16, 32], weights=[1.0] * 3,
                        is_matryoshka=True, step=0, task="pairs", training_config=None)
  return str(path)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
  return make_bundle(tmp_path_factory.mktemp("serve") / "enc")


def test_ops_quantize_is_sentence_transformers_quantize_embeddings():
  ref = np.load(REFERENCE)
  rng = np.random.default_rng(0)
  for m in (8, 16, 32):
    z = ref[f"st_normalized_{m}"]
    for precision in ("int8", "binary", "ubinary"):
      got = np.asarray(ops.quantize(z, precision))
      # The library's own output on the same floats, and the formula written out.
      np.testing.assert_array_equal(got, ref[f"q_{precision}_{m}"], err_msg=precision)
      np.testing.assert_array_equal(got, st_codes(z, precision), err_msg=precision)
      assert got.dtype == ref[f"q_{precision}_{m}"].dtype
    calibrated = np.asarray(ops.quantize(z, "int8",
                                         ranges=ops.int8_ranges(ref[f"calibration_{m}"])))
    np.testing.assert_array_equal(calibrated, ref[f"q_int8_calibrated_{m}"])
    np.testing.assert_array_equal(calibrated, st_int8(z, ref[f"calibration_{m}"]))
  x = rng.normal(size=(50, 24)).astype(np.float32)
  x[:, 3] = 0.25  # a constant dimension: step 0 -> 1, as sentence-transformers
  np.testing.assert_array_equal(np.asarray(ops.quantize(x, "int8")), st_int8(x, x))
  # Out of the calibrated range: saturates at -128 / 127.
  c = x[:10]
  np.testing.assert_array_equal(np.asarray(ops.quantize(x, "int8", ranges=ops.int8_ranges(c))),
                                st_int8(x, c))
  assert np.asarray(ops.quantize(x[:, :5], "binary")).shape == (50, 1)
  with pytest.raises(ValueError, match="ranges"):
    ops.quantize(x, "binary", ranges=ops.int8_ranges(c))
  with pytest.raises(ValueError, match=r"ranges must be \[2, 24\]"):
    ops.quantize(x, "int8", ranges=ops.int8_ranges(c[:, :4]))
  with pytest.raises(ValueError, match="quantize='int4'"):
    ops.quantize(x, "int4")


def test_encoder_matches_sentence_transformers_from_one_forward(bundle):
  ref = np.load(REFERENCE)
  texts = [str(t) for t in ref["texts"]]
  encoder = Encoder.load(bundle)
  assert encoder.max_length == int(ref["max_seq_length"]) == 12
  got = encoder.embed(texts, dims=[8, 16, 32])
  assert encoder.forward_traces == 1  # 6 texts: one padded batch, one length
  for m in (8, 16, 32):
    np.testing.assert_allclose(got[m], ref[f"st_normalized_{m}"], atol=1e-5)
    np.testing.assert_allclose(encoder.embed(texts, dim=m, prompt_name="query"),
                               ref[f"st_query_{m}"], atol=1e-5)
    for precision in ("int8", "binary", "ubinary"):
      np.testing.assert_array_equal(encoder.embed(texts, dim=m, quantize=precision),
                                    st_codes(got[m], precision), err_msg=precision)
  # Every dim x code above reused the forward programs of the first call and the prompt's.
  assert encoder.forward_traces <= 2


def test_stored_int8_ranges_give_every_batch_one_scale(bundle, tmp_path):
  path = str(tmp_path / "calibrated")
  shutil.copytree(bundle, path)
  os.remove(os.path.join(path, artifact.METADATA_FILE))
  full = Encoder.load(bundle).embed(CORPUS, normalize=False)
  ranges = calibration.int8_ranges_per_dim(full, (8, 16, 32))
  calibration.write_int8_ranges(path, ranges)
  artifact.write_metadata(path, modality="text", dims=[8, 16, 32], weights=[1.0] * 3,
                        is_matryoshka=True, step=0, task="pairs", training_config=None)
  encoder = Encoder.load(path)
  assert sorted(encoder.int8_ranges) == [8, 16, 32]
  texts = ["a cat on a mat", "dolls nest", "XLA compiles"]
  for m in (8, 16, 32):
    z = encoder.embed(texts, dim=m)
    c = full[:, :m] / np.linalg.norm(full[:, :m], axis=1, keepdims=True)
    want = st_int8(z, c)
    np.testing.assert_array_equal(encoder.embed(texts, dim=m, quantize="int8"), want)
    # One text alone gets the code it has in the batch: the stored ranges, not its own.
    np.testing.assert_array_equal(encoder.embed(texts[:1], dim=m, quantize="int8"), want[:1])
    np.testing.assert_array_equal(
        Encoder.load(bundle).embed(texts, dim=m, quantize="int8", calibration_embeddings=full),
        want)
  with pytest.raises(ValueError, match="calibration_embeddings apply"):
    encoder.embed(texts, quantize="binary", calibration_embeddings=full)


def test_batch_size_progress_bar_and_prompts(bundle, capsys):
  encoder = Encoder.load(bundle)
  texts = [f"the cat number {i} sits" for i in range(20)]
  want = encoder.embed(texts, dim=16)
  np.testing.assert_allclose(encoder.embed(texts, dim=16, batch_size=3), want, atol=1e-6)
  capsys.readouterr()
  encoder.embed(texts, dim=16, batch_size=2, show_progress_bar=True)
  assert "embed" in capsys.readouterr().err
  encoder.embed(texts, dim=16, batch_size=2, show_progress_bar=False)
  assert capsys.readouterr().err == ""
  np.testing.assert_allclose(encoder.embed(["cat"], prompt="query: "),
                             encoder.embed(["query: cat"]), atol=1e-6)
  np.testing.assert_allclose(encoder.embed(["cat"], prompt_name="document"),
                             encoder.embed(["cat"]), atol=1e-6)
  with pytest.raises(ValueError, match=r"prompt_name='passage'.*\['document', 'query'\]"):
    encoder.embed(["cat"], prompt_name="passage")
  for bad in (0, 2.5, True):
    with pytest.raises(ValueError, match="batch_size"):
      encoder.embed(["cat"], batch_size=bad)
  with pytest.raises(ValueError, match="dim= or dims="):
    encoder.embed(["cat"], dim=8, dims=[8])
  with pytest.raises(ValueError, match=r"valid dims: \[8, 16, 32\]"):
    encoder.embed(["cat"], dims=[8, 12])
  assert {m: v.shape for m, v in encoder.embed([], dims=[8, 32], quantize="ubinary").items()
          } == {8: (0, 1), 32: (0, 4)}


# --- the stacks' own rules, on real exports of the pairs task --------------------------


def vllm_accepts_dimensions(config: dict, dimensions: int) -> bool:
  """vLLM's check of an embeddings request's ``dimensions`` (ModelConfig.is_matryoshka and
  PoolingParams' verification): refused unless config.json declares Matryoshka support;
  then it must be one of ``matryoshka_dimensions`` when those are listed."""
  if not (bool(config.get("matryoshka_dimensions")) or config.get("is_matryoshka", False)):
    return False
  dims = config.get("matryoshka_dimensions")
  return dimensions in dims if dims is not None else dimensions >= 1


def tei_pipeline(folder: str) -> dict:
  """What text-embeddings-inference reads: modules.json's module folders, the pooling of
  1_Pooling/config.json (its classic ``pooling_mode_*`` booleans, exactly one true), and
  ``dimensions <= hidden_size`` (it truncates, then normalises)."""
  modules = json.load(open(os.path.join(folder, "modules.json")))
  for module in modules:
    assert module["path"] == "" or os.path.isdir(os.path.join(folder, module["path"]))
  pooling_dir = next(m["path"] for m in modules if m["type"].endswith("Pooling"))
  pooling = json.load(open(os.path.join(folder, pooling_dir, "config.json")))
  modes = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v is True]
  assert len(modes) == 1, modes
  hidden = json.load(open(os.path.join(folder, "config.json")))["hidden_size"]
  return {"pooling": modes[0], "normalize": any(m["type"].endswith("Normalize") for m in modules),
          "max_dimensions": hidden}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  out = {}
  for name, overrides in (("mrl", {}), ("baseline", {"nesting": {"dims": (32,)}})):
    workdir = str(tmp_path_factory.mktemp(name))
    result = experiments.train_and_evaluate(tiny_text_config(num_train_steps=2, **overrides),
                                          workdir, progress=False)
    out[name] = (result["export_dir"], result)
  return out


def test_vllm_tei_and_sentence_transformers_metadata(exports):
  mrl, _ = exports["mrl"]
  config = json.load(open(os.path.join(mrl, "config.json")))
  assert config["is_matryoshka"] is True and config["matryoshka_dimensions"] == [8, 16, 32]
  assert [vllm_accepts_dimensions(config, d) for d in (8, 16, 32, 12)] == [True] * 3 + [False]
  assert tei_pipeline(mrl) == {"pooling": "pooling_mode_mean_tokens", "normalize": True,
                               "max_dimensions": 32}
  st = json.load(open(os.path.join(mrl, "config_sentence_transformers.json")))
  assert st["matryoshka_dimensions"] == [8, 16, 32] and st["similarity_fn_name"] == "cosine"
  # A baseline (one trained size) is no Matryoshka model: vLLM refuses every dimensions.
  baseline, _ = exports["baseline"]
  config = json.load(open(os.path.join(baseline, "config.json")))
  assert config["is_matryoshka"] is False and "matryoshka_dimensions" not in config
  assert not any(vllm_accepts_dimensions(config, d) for d in (8, 16, 32))
  assert tei_pipeline(baseline)["normalize"]


def front_matter(card: str) -> dict:
  head = re.match(r"\A---\n(.*?)\n---\n", card, re.S).group(1)
  out, key = {}, None
  for line in head.splitlines():
    if line.startswith("- "):
      out[key].append(json.loads(line[2:]))
    else:
      key, _, value = line.partition(":")
      out[key] = json.loads(value) if value.strip() else []
  return out


def test_model_card_says_what_the_model_is(exports):
  mrl, result = exports["mrl"]
  card = open(os.path.join(mrl, "README.md"), encoding="utf-8").read()
  meta = front_matter(card)
  assert meta["library_name"] == "sentence-transformers"
  assert meta["pipeline_tag"] == "sentence-similarity"
  assert "matryoshka" in meta["tags"] and "base_model" not in meta  # a random BERT
  for i, m in enumerate((8, 16, 32)):
    row = f"| {m} | " + " | ".join(f"{result['eval'][k][i]:.4f}"
                                   for k in sorted(result["eval"])) + " |"
    assert row in card
  assert "truncate_dim=8" in card and '"dimensions": 8' in card
  assert '"num_train_steps": 2' in card  # the training configuration
  baseline, _ = exports["baseline"]
  card = open(os.path.join(baseline, "README.md"), encoding="utf-8").read()
  assert "matryoshka" not in front_matter(card)["tags"] and "**not** trained" in card
  assert '"dimensions"' not in card


def test_served_length_is_the_base_models_never_the_training_length(tmp_path):
  # The tiny model folder as the base: it serves 12 tokens, has 16 positions.
  cfg = tiny_text_config(num_train_steps=1, model_dir=TINY, max_length=8,
                         nesting={"dims": (8, 16, 32)})
  result = experiments.train_and_evaluate(cfg, str(tmp_path / "base"), progress=False)
  out = result["export_dir"]
  assert json.load(open(os.path.join(out, "sentence_bert_config.json")))["max_seq_length"] == 12
  assert json.load(open(os.path.join(out, "tokenizer.json")))["truncation"]["max_length"] == 12
  meta = json.load(open(os.path.join(out, "mrl_jax.json")))
  assert (meta["max_seq_length"], meta["train_max_length"]) == (12, 8)
  assert Encoder.load(out).max_length == 12
  # The base model's pooler is carried through, bit for bit.
  base, written = (load_file(os.path.join(p, "model.safetensors")) for p in (TINY, out))
  for name in ("pooler.dense.weight", "pooler.dense.bias"):
    np.testing.assert_array_equal(written[name], base[name])
  card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
  meta = front_matter(card)
  assert (meta["base_model"], meta["license"]) == ("tiny_st_model", "apache-2.0")
  assert "Maximum sequence length: 12 tokens" in card
  # An explicit export field wins, bounded by the position table.
  cfg.export.max_seq_length = 16
  out = experiments.train_and_evaluate(cfg, str(tmp_path / "explicit"),
                                     progress=False)["export_dir"]
  assert json.load(open(os.path.join(out, "sentence_bert_config.json")))["max_seq_length"] == 16
  cfg.export.max_seq_length = 17
  with pytest.raises(ValueError, match="export.max_seq_length=17.*max_position_embeddings=16"):
    experiments.train_and_evaluate(cfg, str(tmp_path / "too_long"), progress=False)


def test_model_dir_takes_a_hub_repo_id_from_the_local_cache(tmp_path, monkeypatch):
  pytest.importorskip("huggingface_hub")
  from mrl_jax.tasks.pairs import resolve_model_dir

  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
  with pytest.raises(ValueError, match="not in the local cache"):
    resolve_model_dir("someone/absent-model")
  # A cached snapshot, laid out as huggingface_hub writes it.
  repo = tmp_path / "hub" / "models--someone--tiny"
  snapshot = repo / "snapshots" / ("0" * 40)
  shutil.copytree(TINY, snapshot)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text("0" * 40)
  assert resolve_model_dir("someone/tiny") == str(snapshot)
  assert resolve_model_dir(TINY) == TINY
  with pytest.raises(ValueError, match="not a folder"):
    resolve_model_dir(str(tmp_path / "nowhere"))
