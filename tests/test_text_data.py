"""Pair readers, the tokenizer wrapper, and per-dim Spearman evaluation."""

import json

import numpy as np
import pytest
from text_testutil import make_tokenizer_json

from mrl_jax.data.text import (
    TextTokenizer,
    read_pairs,
    read_scored_pairs,
    tokenize_columns,
)
from mrl_jax.sts import cosine_per_dim, rankdata, spearman, spearman_per_dim


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
  make_tokenizer_json(path)
  return TextTokenizer.from_file(path, max_length=6)


def test_tokenizer_pads_truncates_and_marks_padding(tokenizer):
  out = tokenizer(["The cat sat", "a dog ran on the big mat ."])
  assert set(out) == {"input_ids", "attention_mask", "token_type_ids"}
  assert out["input_ids"].dtype == np.int32 and out["input_ids"].shape == (2, 6)  # truncated
  np.testing.assert_array_equal(out["attention_mask"], [[1] * 5 + [0], [1] * 6])
  assert out["input_ids"][0, 0] == 2 and out["input_ids"][0, 4] == 3  # [CLS] ... [SEP]
  assert out["input_ids"][0, 5] == tokenizer.pad_id == 0
  assert tokenizer(["the cat"], pad_to=6)["input_ids"].shape == (1, 6)
  with pytest.raises(ValueError, match="shorter than"):
    tokenizer(["a dog ran on the mat"], pad_to=3)
  with pytest.raises(ValueError, match="not one string"):
    tokenizer("the cat")


def test_read_pairs_jsonl_and_tsv(tmp_path):
  jsonl = tmp_path / "pairs.jsonl"
  jsonl.write_text("\n".join(json.dumps(r) for r in [
      {"anchor": "the cat", "positive": "a cat", "extra": 1},
      {"anchor": "a dog", "positive": "the dog"}]) + "\n\n")
  assert read_pairs(str(jsonl)) == [("the cat", "a cat"), ("a dog", "the dog")]
  tsv = tmp_path / "triplets.tsv"
  tsv.write_text("anchor\tpositive\tnegative\nthe cat\ta cat\ta tree\n")
  assert read_pairs(str(tsv), columns=("anchor", "positive", "negative")) == [
      ("the cat", "a cat", "a tree")]
  headless = tmp_path / "pairs.tsv"
  headless.write_text("the cat\ta cat\n")
  assert read_pairs(str(headless)) == [("the cat", "a cat")]


def test_read_pairs_errors_name_the_line(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"anchor": "x", "positive": "y"}\n{"anchor": "x"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: missing \['positive'\]"):
    read_pairs(str(bad))
  short = tmp_path / "short.tsv"
  short.write_text("only one field\n")
  with pytest.raises(ValueError, match="short.tsv:1: expected 2"):
    read_pairs(str(short))
  with pytest.raises(ValueError, match="unknown extension"):
    read_pairs(str(tmp_path / "pairs.csv"))


def test_read_scored_pairs(tmp_path):
  path = tmp_path / "sts.jsonl"
  path.write_text('{"sentence1": "a", "sentence2": "b", "score": 4.5}\n'
                  '{"sentence1": "c", "sentence2": "d", "score": "1"}\n')
  a, b, scores = read_scored_pairs(str(path))
  assert a == ["a", "c"] and b == ["b", "d"]
  np.testing.assert_array_equal(scores, np.array([4.5, 1.0], np.float32))
  path.write_text('{"sentence1": "a", "sentence2": "b", "score": "high"}\n')
  with pytest.raises(ValueError, match="not a number"):
    read_scored_pairs(str(path))


def test_tokenize_columns_share_one_length(tokenizer):
  rows = [("the cat", "a dog ran fast ."), ("a mat", "the tree")]
  out = tokenize_columns(tokenizer, rows)
  assert out["anchor"]["input_ids"].shape == out["positive"]["input_ids"].shape == (2, 6)
  np.testing.assert_array_equal(out["anchor"]["attention_mask"][0], [1, 1, 1, 1, 0, 0])
  assert tokenize_columns(tokenizer, rows, pad_to=6)["anchor"]["input_ids"].shape == (2, 6)


def test_rankdata_and_spearman():
  np.testing.assert_array_equal(rankdata([10, 30, 20, 20]), [1, 4, 2.5, 2.5])
  assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
  assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  # Pearson of the tie-averaged ranks, computed by hand.
  rx, ry = np.array([1, 4, 2.5, 2.5]), np.array([2, 4, 1, 3])
  want = np.corrcoef(rx, ry)[0, 1]
  assert spearman([10, 30, 20, 20], [5, 9, 1, 7]) == pytest.approx(want)
  assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_spearman_per_dim_truncates_before_normalising():
  rng = np.random.default_rng(0)
  n = 40
  scores = rng.uniform(0, 5, n)
  # First 2 dims carry the score (cosine grows with it); dims 2..8 are noise.
  angle = (5 - scores) / 5 * np.pi / 2
  a = np.concatenate([np.ones((n, 1)), np.zeros((n, 1)), rng.normal(size=(n, 6))], 1)
  b = np.concatenate([np.cos(angle)[:, None], np.sin(angle)[:, None],
                      rng.normal(size=(n, 6)) * 10], 1)
  got = spearman_per_dim(a, b, scores, (2, 8))
  assert got[2] == pytest.approx(1.0) and abs(got[8]) < 0.5
  cos = cosine_per_dim(a, b, (1, 2, 8))
  np.testing.assert_allclose(cos[1], np.cos(angle))
  np.testing.assert_allclose(cos[0], 1.0)
  with pytest.raises(ValueError, match="larger than the embedding size"):
    cosine_per_dim(a, b, (2, 16))
  with pytest.raises(ValueError, match="scores must be"):
    spearman_per_dim(a, b, scores[:-1], (2,))
