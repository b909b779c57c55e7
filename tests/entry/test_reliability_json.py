"""Issue 26, JSON, text data and configs: strict JSON everywhere data comes in (duplicate keys,
deep nesting, NaN), texts that cannot be right refused with ``file:line`` (invisible-only,
lone surrogates, a hard negative equal to its positive), and run-length config fields that
are never silently dropped (``num_epochs`` with ``num_train_steps``; ``--config.X=None``)."""

import json
import os

import pytest
from absl import flags
from ml_collections import config_flags
from testutil import REPO, TINY_ST_MODEL

from mrl_jax import experiments
from mrl_jax.bundle.encoder import Encoder
from mrl_jax.core import fileio
from mrl_jax.core.fileio import BundleError
from mrl_jax.data.text import TextPairs, TextTokenizer, read_scored_pairs, read_text_pairs
from mrl_jax.experiments import load_workdir_config
from mrl_jax.train import config as config_lib


def _write(path, text):
  path.write_text(text, encoding="utf-8")
  return str(path)


# --- strict JSON --------------------------------------------------------------------------------

@pytest.mark.parametrize("text,match", [
    ('{"a": 1, "a": 2}', r"the key 'a' appears twice"),
    ('{"x": {"b": [], "b": {}}}', r"the key 'b' appears twice"),
    ('[{"k": 1, "k": 1}]', r"the key 'k' appears twice"),
    ("[" * 100_000 + "]" * 100_000, r"nested too deeply"),
    ('{"a": ' * 60_000 + "1" + "}" * 60_000, r"nested too deeply"),
    ('{"w": NaN}', r"NaN is not JSON"),
    ('{"w": -Infinity}', r"-Infinity is not JSON"),
])
def test_read_json_is_strict(tmp_path, text, match):
  path = _write(tmp_path / "x.json", text)
  with pytest.raises(BundleError, match=rf"{path} is not valid JSON: {match}"):
    fileio.read_json(path)


def test_a_workdir_config_with_a_duplicate_key_is_refused(tmp_path):
  _write(tmp_path / "config.json", '{"task": "pairs", "task": "classification"}')
  with pytest.raises(ValueError, match=r"config.json.*the key 'task' appears twice"):
    load_workdir_config(str(tmp_path))


# --- text data ----------------------------------------------------------------------------------

INVISIBLE = {"no-break space": "\u00a0", "zero-width space": "\u200b",
             "BOM": "\ufeff", "zero-width joiner": "\u200d\u200c", "line separator": "\u2028",
             "mixed": " \u00a0\u200b\u2060\t", "ideographic space": "\u3000"}


@pytest.mark.parametrize("text", list(INVISIBLE.values()), ids=list(INVISIBLE))
def test_invisible_only_texts_are_refused_with_file_and_line(tmp_path, text):
  rows = [{"anchor": "a dog", "positive": "a puppy"}, {"anchor": text, "positive": "x"}]
  path = _write(tmp_path / "p.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
  with pytest.raises(ValueError, match=r"p.jsonl:2: column 'anchor' holds only invisible "
                                       "characters"):
    read_text_pairs(path)


def test_invisible_texts_are_refused_in_tsv_and_in_memory(tmp_path):
  path = _write(tmp_path / "s.tsv", "sentence1\tsentence2\tscore\nok\t\u200b\u200b\t1.0\n")
  with pytest.raises(ValueError, match=r"s.tsv:2: column 'sentence2' holds only invisible"):
    read_scored_pairs(path)
  with pytest.raises(ValueError, match=r"positives must be non-empty strings: '\\u200b' holds"):
    TextPairs(["a"], ["\u200b"])


def test_a_visible_text_with_invisible_characters_is_kept(tmp_path):
  rows = [{"anchor": "\u200ba dog\u00a0", "positive": "a puppy"}]
  path = _write(tmp_path / "p.jsonl", json.dumps(rows[0]) + "\n")
  assert read_text_pairs(path).anchors == ["\u200ba dog\u00a0"]


def test_duplicate_keys_in_a_jsonl_record_are_refused(tmp_path):
  path = _write(tmp_path / "p.jsonl", '{"anchor": "a", "positive": "b"}\n'
                '{"anchor": "a", "positive": "b", "positive": "c"}\n')
  with pytest.raises(ValueError, match=r"p.jsonl:2: not a valid JSON object: the key 'positive' "
                                       "appears twice"):
    read_text_pairs(path)


def test_a_lone_surrogate_in_a_jsonl_text_is_refused(tmp_path):
  path = _write(tmp_path / "p.jsonl", '{"anchor": "a \\ud800 b", "positive": "c"}\n')
  with pytest.raises(ValueError, match=r"p.jsonl:1: column 'anchor' holds a lone surrogate "
                                       "U\\+D800 at character 2"):
    read_text_pairs(path)


@pytest.mark.parametrize("columns,bad", [
    ({"negative": "a puppy"}, "negative"),
    ({"negative_1": "a cat", "negative_2": "a puppy"}, "negative_2"),
])
def test_a_hard_negative_equal_to_its_positive_is_refused(tmp_path, columns, bad):
  row = {"anchor": "a dog", "positive": "a puppy", **columns}
  path = _write(tmp_path / "p.jsonl", json.dumps(row) + "\n")
  with pytest.raises(ValueError, match=rf"p.jsonl:1: column '{bad}' is identical to 'positive'"):
    read_text_pairs(path)
  tsv = _write(tmp_path / "p.tsv", "\t".join(row) + "\n" + "\t".join(row.values()) + "\n")
  with pytest.raises(ValueError, match=rf"p.tsv:2: column '{bad}' is identical"):
    read_text_pairs(tsv)


def test_a_hard_negative_equal_to_its_positive_is_refused_in_memory():
  with pytest.raises(ValueError, match=r"row 1: hard negative 1 is identical to the positive"):
    TextPairs(["a", "b"], ["c", "d"], [["e"], ["d"]])


# --- lone surrogates at embed time --------------------------------------------------------------

@pytest.mark.parametrize("texts,index", [(["ok", "bad \udc80"], 1), (["\ud83d"], 0)])
def test_a_lone_surrogate_in_embed_is_named(tmp_path, texts, index):
  from testutil import text_bundle

  encoder = Encoder.load(text_bundle(str(tmp_path / "text")))
  with pytest.raises(ValueError, match=rf"inputs\[{index}\] holds a lone surrogate U\+D"):
    encoder.embed(texts)
  tokenizer = TextTokenizer.from_file(os.path.join(TINY_ST_MODEL, "tokenizer.json"), max_length=16)
  with pytest.raises(ValueError, match=rf"texts\[{index}\] holds a lone surrogate"):
    tokenizer(texts)


# --- run length: never silently dropped -------------------------------------------------------

def _parse_cli(*args):
  """train.py's parsing (ml_collections flags + the None overrides) of ``args``."""
  argv = ["train.py", f"--config={os.path.join(REPO, 'configs', 'digits_mlp.py')}", *args]
  argv, none_fields = config_lib.split_none_overrides(argv)
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  config_lib.apply_none_overrides(values.config, none_fields)
  return values.config


@pytest.mark.parametrize("epochs", ["3", "0.5"])
def test_num_epochs_under_a_configured_step_count_is_told_not_dropped(epochs):
  config = _parse_cli(f"--config.loop.num_epochs={epochs}")
  with pytest.warns(UserWarning, match=rf"config.loop.num_epochs={float(epochs)} is ignored: "
                                       r"config.loop.num_train_steps=2000 is set and wins; .*"
                                       r"--config.loop.num_train_steps=None"):
    config = experiments.validate_config(config)
  assert config.loop.num_train_steps == 2000 and config.loop.num_epochs is None


@pytest.mark.parametrize("none", ["None", "none", "null"])
def test_num_train_steps_none_on_the_command_line(none):
  config = _parse_cli(f"--config.loop.num_train_steps={none}", "--config.loop.num_epochs=3")
  assert config.loop.num_train_steps is None and config.loop.num_epochs == 3.0
  experiments.validate_config(config)
  with pytest.raises(ValueError, match="set config.loop.num_train_steps or config.loop.num_epo"):
    experiments.validate_config(_parse_cli(f"--config.loop.num_train_steps={none}"))


def test_none_for_an_unknown_field_is_named():
  with pytest.raises(ValueError, match=r"--config.no_such_field=None: the config has no field"):
    _parse_cli("--config.no_such_field=None")
