"""The demo's text comparison (mrl_jax.demo.run_text_demo) on a tiny random BERT and a
slice of the stdlib corpus: four bundles, rows equal to a numpy reference (float) and to the
evaluators (codes, binary funnel; tested against numpy in tests/evaluate), runs reused."""

import json
import os

import numpy as np
import pytest
from testutil import REPO, tiny_text_config

from mrl_jax import demo
from mrl_jax.bundle.encoder import Encoder
from mrl_jax.data.stdlib_corpus import write_stdlib_corpus
from mrl_jax.data.text import read_text_pairs
from mrl_jax.evaluate.text import binary_rerank_per_dim, code_retrieval_per_dim
from mrl_jax.train.config import load_config_file

MODULES = ["textwrap", "json.decoder", "json.encoder", "shlex", "fnmatch", "glob", "difflib",
           "calendar", "heapq", "statistics", "fractions", "base64", "ipaddress", "copy", "pprint"]
EVAL_PAIRS = 40
SHORTLIST_K = 15


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  out = tmp_path_factory.mktemp("corpus")
  counts = write_stdlib_corpus(str(out), modules=MODULES, eval_fraction=0.3)
  assert counts["train"] >= 100 and counts["eval"] > EVAL_PAIRS, counts
  return out


def _config(corpus, **overrides):
  fields = dict(train_file=str(corpus / "train.jsonl"), eval_file=None,
                eval_pairs_file=str(corpus / "eval.jsonl"), num_train_steps=8,
                checkpoint_every_steps=8, log_every_steps=8, shortlist_k=SHORTLIST_K)
  return tiny_text_config(**{**fields, **overrides})


def _reference(anchors, positives, dims):
  """recall@1, recall@10, MRR@10, nDCG@10 per dim, one query at a time (truncate, then
  normalise)."""
  out = {"recall_at_1": [], "recall_at_10": [], "mrr_at_10": [], "ndcg_at_10": []}
  for m in dims:
    hits1 = hits10 = rr = gain = 0.0
    for i in range(len(anchors)):
      a = anchors[i, :m] / np.linalg.norm(anchors[i, :m])
      cos = [float(a @ (p[:m] / np.linalg.norm(p[:m]))) for p in positives]
      rank = 1 + sum(1 for j, c in enumerate(cos) if j != i and c >= cos[i])
      hits1 += rank == 1
      hits10 += rank <= 10
      rr += 1.0 / rank if rank <= 10 else 0.0
      gain += 1.0 / np.log2(1 + rank) if rank <= 10 else 0.0
    for name, value in (("recall_at_1", hits1), ("recall_at_10", hits10), ("mrr_at_10", rr),
                        ("ndcg_at_10", gain)):
      out[name].append(value / len(anchors))
  return out


def test_text_demo_rows_match_a_numpy_reference_and_finished_runs_are_reused(corpus, tmp_path):
  results = demo.run_text_demo(_config(corpus), str(tmp_path), eval_pairs=EVAL_PAIRS,
                               progress=False)
  with open(tmp_path / "results.json") as f:
    assert json.load(f) == results
  dims = [8, 16, 32]
  assert results["dims"] == dims and results["eval_pairs"] == EVAL_PAIRS
  assert results["model"] == "random BERT"
  assert results["shortlist_k"] == SHORTLIST_K and results["binary_aware"] == demo.TEXT_BINARY_AWARE

  # The bundles: the untrained step-0 encoder, and the three fine-tunes with their nestings.
  bundles = {row: Encoder.load(str(tmp_path / row / "encoder")) for row, _ in demo.TEXT_ROWS}
  assert bundles["shipped"].metadata["step"] == 0
  assert bundles["no_mrl"].dims == (32,) and bundles["mrl"].dims == tuple(dims)
  assert bundles["mrl_binary"].dims == tuple(dims)
  for row in ("no_mrl", "mrl", "mrl_binary"):
    assert bundles[row].metadata["step"] == 8
    assert bundles[row].metadata["training_config"]["eval_pairs_file"] is None
  trained = {row: bundles[row].metadata["training_config"] for row in ("mrl", "mrl_binary")}
  assert trained["mrl"]["binary_weight"] == trained["mrl"]["spread_out_weight"] == 0.0
  for name, value in demo.TEXT_BINARY_AWARE.items():
    assert trained["mrl_binary"][name] == value

  # Every row: the seed-0 subset of the held-out file, embedded in its own order.
  held_out = read_text_pairs(str(corpus / "eval.jsonl"))
  rows = np.sort(np.random.default_rng(0).permutation(len(held_out))[:EVAL_PAIRS])
  anchors = [held_out.anchors[i] for i in rows]
  positives = [held_out.positives[i] for i in rows]
  embeddings = {}
  for row, encoder in bundles.items():
    a = np.stack([encoder.embed([t], normalize=False)[0] for t in anchors])
    p = np.stack([encoder.embed([t], normalize=False)[0] for t in positives])
    embeddings[row] = a
    for name, want in _reference(a, p, dims).items():
      np.testing.assert_allclose(results[name][row], want, atol=1e-9, err_msg=f"{row} {name}")
    codes = code_retrieval_per_dim(a, p, dims)
    codes.update(binary_rerank_per_dim(a, p, dims, shortlist_k=SHORTLIST_K))
    for name, key in (("int8_ndcg_at_10", "int8_symmetric_ndcg@10"),
                      ("ubinary_recall_at_10", "ubinary_recall@10"),
                      ("ubinary_rerank_recall_at_10", "ubinary_rerank_recall@10")):
      np.testing.assert_allclose(results[name][row], codes[f"{key}_per_dim"], atol=1e-9,
                                 err_msg=f"{row} {name}")
  assert not np.allclose(embeddings["shipped"], embeddings["mrl"], atol=1e-3)  # it trained
  assert not np.allclose(embeddings["no_mrl"], embeddings["mrl"], atol=1e-3)
  assert not np.allclose(embeddings["mrl_binary"], embeddings["mrl"], atol=1e-3)

  table = demo.format_text_table(results)
  assert all(label in table for _, label in demo.TEXT_ROWS)
  assert "".join(f"{100 * v:7.1f}" for v in results["mrr_at_10"]["mrl"]) in table
  assert f"{EVAL_PAIRS} held-out pairs" in table
  tables = demo.format_binary_tables(results)
  assert all(f"dim {m}" in tables for m in dims) and f"{SHORTLIST_K}-item" in tables
  last = "".join(f"{100 * results[key]['mrl_binary'][-1]:8.1f}" for key, _ in demo.BINARY_COLUMNS)
  assert "MRL + binary-aware".ljust(20) + last in tables
  assert len([line for line in tables.splitlines() if line.startswith("goal:")]) == 3

  # A second call restores the finished runs instead of training them again.
  runs = ("no_mrl", "mrl", "mrl_binary")
  stamps = {row: os.path.getmtime(tmp_path / row / "checkpoints") for row in runs}
  assert demo.run_text_demo(_config(corpus), str(tmp_path), eval_pairs=EVAL_PAIRS,
                            progress=False) == results
  assert {row: os.path.getmtime(tmp_path / row / "checkpoints") for row in runs} == stamps


def test_text_demo_refuses_bad_arguments_before_training(corpus, tmp_path):
  with pytest.raises(ValueError, match="eval_pairs_file"):
    demo.run_text_demo(_config(corpus, eval_pairs_file=None), str(tmp_path))
  for bad in (0, -3, 2.5, True):
    with pytest.raises(ValueError, match="eval_pairs"):
      demo.run_text_demo(_config(corpus), str(tmp_path), eval_pairs=bad)
  for bad in ({"binary_weight": 0.0}, {"binary_wieght": 1.0}, [("binary_weight", 1.0)]):
    with pytest.raises(ValueError, match="binary_w|binary_aware"):
      demo.run_text_demo(_config(corpus), str(tmp_path), binary_aware=bad)
  with pytest.raises(ValueError, match="at least 10"):
    demo.run_text_demo(_config(corpus), str(tmp_path), eval_pairs=9)
  with pytest.raises(ValueError, match="pairs task"):
    demo.run_text_demo(load_config_file(os.path.join(REPO, "configs", "digits_mlp.py")),
                       str(tmp_path))
  assert not os.listdir(tmp_path)
