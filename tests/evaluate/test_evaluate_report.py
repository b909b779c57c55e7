"""evaluate_nested end to end on a small problem, checked against direct computations."""

import json
import os

import numpy as np
import pytest

from mrl_jax.evaluate import cascade, metrics
from mrl_jax.evaluate.report import default_funnel, evaluate_nested, format_table


def _problem(n=300, q=60, d=16, classes=5, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((classes, d)) * np.linspace(2, 0.2, d)  # early dims informative
  ytr, yte = rng.integers(0, classes, n), rng.integers(0, classes, q)
  xtr = (centres[ytr] + rng.standard_normal((n, d))).astype(np.float32)
  xte = (centres[yte] + rng.standard_normal((q, d))).astype(np.float32)
  return xtr, ytr, xte, yte


def _numpy_neighbors(xtr, xte, dim, k):
  a = xtr[:, :dim] / np.linalg.norm(xtr[:, :dim], axis=1, keepdims=True)
  b = xte[:, :dim] / np.linalg.norm(xte[:, :dim], axis=1, keepdims=True)
  return np.argsort(-(b.astype(np.float64) @ a.T.astype(np.float64)), axis=1, kind="stable")[:, :k]


def test_evaluate_nested_end_to_end(tmp_path):
  xtr, ytr, xte, yte = _problem()
  dims = (2, 4, 16)
  rng = np.random.default_rng(1)
  logits = np.stack([rng.standard_normal((60, 5)) + i * np.eye(5)[yte] for i in range(3)])
  res = evaluate_nested(xtr, ytr, xte, yte, dims, test_logits=logits, ks=(5, 10),
                        shortlist_k=30, out_dir=tmp_path, seed=3)
  # Per-dim rows equal the metrics of brute-force neighbours.
  for row, d in zip(res["per_dim"], dims, strict=True):
    want = metrics.retrieval_metrics(_numpy_neighbors(xtr, xte, d, 10), ytr, yte, (5, 10))
    for key, value in want.items():
      assert row[key] == pytest.approx(value), (d, key)
    assert row["mflops_per_query"] == pytest.approx(d * 300 / 1e6)
    assert row["ms_per_query"] > 0
  # Adaptive rows: one per smaller dim, the paper's FLOPs.
  assert [(r["shortlist_dim"], r["rerank_dim"]) for r in res["adaptive"]] == [(2, 16), (4, 16)]
  assert res["adaptive"][0]["mflops_per_query"] == pytest.approx((2 * 300 + 16 * 30) / 1e6)
  assert res["funnel"][0]["dims"] == [4, 16] and res["funnel"][0]["shortlist"] == [30, 5]
  # Cascade: tuned on 20% of the test split, evaluated on the rest.
  c = res["cascade"]
  assert (c["num_tune"], c["num_eval"]) == (12, 48)
  order = np.random.default_rng(3).permutation(60)
  conf, pred = cascade.confidences(logits)
  thr = cascade.tune_thresholds(conf[:, order[:12]], pred[:, order[:12]], yte[order[:12]])
  np.testing.assert_allclose(c["thresholds"], thr)
  want = cascade.cascade_report(conf[:, order[12:]], pred[:, order[12:]], yte[order[12:]], thr,
                                dims)
  assert c["accuracy"] == pytest.approx(want["accuracy"])
  assert c["expected_dim"] == pytest.approx(want["expected_dim"])
  np.testing.assert_allclose(res["classification"]["top1"],
                             np.mean(np.argmax(logits, -1) == yte, axis=1))
  # Files: metrics.json holds the same numbers, the plots are PNGs.
  names = sorted(os.path.basename(f) for f in res["files"])
  assert names == ["accuracy_vs_dim.png", "cascade.png", "map_vs_mflops.png", "metrics.json"]
  saved = json.loads((tmp_path / "metrics.json").read_text())
  assert saved["per_dim"][1]["map@10"] == pytest.approx(res["per_dim"][1]["map@10"])
  assert (tmp_path / "cascade.png").read_bytes()[:4] == b"\x89PNG"
  table = format_table(res)
  for text in ("exact search per dim", "2->16, K=30", "4->16/30->5", "adaptive classification"):
    assert text in table


def test_evaluate_nested_rejects_bad_input():
  xtr, ytr, xte, yte = _problem(n=40, q=10)
  with pytest.raises(ValueError, match="distinct"):
    evaluate_nested(xtr, ytr, xte, yte, (4, 4), ks=(5,))
  with pytest.raises(ValueError, match="larger than the database"):
    evaluate_nested(xtr, ytr, xte, yte, (2, 16), ks=(50,))
  with pytest.raises(ValueError, match="test_labels"):
    evaluate_nested(xtr, ytr, xte, yte[:3], (2, 16), ks=(5,))
  with pytest.raises(ValueError, match="map_denominator"):
    evaluate_nested(xtr, ytr, xte, yte, (2, 16), ks=(5,), map_denominator="R")
  with pytest.raises(ValueError, match="tune_fraction"):
    evaluate_nested(xtr, ytr, xte, yte, (2, 16), ks=(5,), tune_fraction=1.0)


def test_default_funnel_is_the_papers():
  paper = tuple(2**i for i in range(3, 12))
  assert default_funnel(paper) == ((16, 32, 64, 128, 256, 2048), (200, 100, 50, 25, 10, 10))
  assert default_funnel((8, 16, 64)) == ((16, 64), (200, 10))
  assert default_funnel((8, 64), k=5, shortlist_k=50) == ((8, 64), (50, 5))
  assert default_funnel((64,)) == ((64,), (10,))
