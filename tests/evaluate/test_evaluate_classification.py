"""Per-dim top-k, 1-NN accuracy and the adaptive-classification cascade vs numpy loops."""

import numpy as np
import pytest

from mrl_jax.evaluate import cascade, classification
from mrl_jax.evaluate.index import PrefixIndex


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_top_k_accuracy_matches_a_loop_with_ties_by_class_index():
  rng = np.random.default_rng(0)
  logits = rng.integers(0, 4, (3, 40, 6)).astype(np.float32)  # many exact ties
  labels = rng.integers(0, 6, 40)
  for k in (1, 2, 5):
    want = []
    for m in range(3):
      hits = 0
      for b in range(40):
        order = sorted(range(6), key=lambda c, m=m, b=b: (-logits[m, b, c], c))
        hits += labels[b] in order[:k]
      want.append(hits / 40)
    np.testing.assert_allclose(classification.top_k_accuracy(logits, labels, k), want)
  # k = 1 is the argmax (first maximum) accuracy.
  np.testing.assert_allclose(classification.top_k_accuracy(logits, labels, 1),
                             np.mean(np.argmax(logits, -1) == labels, axis=1))
  acc = classification.per_dim_accuracy(logits, labels, ks=(1, 5, 7))
  assert set(acc) == {"top1", "top5"}  # k = 7 > C is skipped
  with pytest.raises(ValueError, match="k=7"):
    classification.top_k_accuracy(logits, labels, 7)
  with pytest.raises(ValueError, match="labels must be in"):
    classification.top_k_accuracy(logits, labels + 6, 1)


def test_nearest_neighbor_accuracy_per_dim():
  rng = np.random.default_rng(1)
  train, test = rng.standard_normal((60, 8)), rng.standard_normal((25, 8))
  ytr, yte = rng.integers(0, 3, 60), rng.integers(0, 3, 25)
  got = classification.nearest_neighbor_accuracy(train.astype(np.float32), ytr,
                                                 test.astype(np.float32), yte, (2, 8))
  for i, d in enumerate((2, 8)):
    a = train[:, :d] / np.linalg.norm(train[:, :d], axis=1, keepdims=True)
    b = test[:, :d] / np.linalg.norm(test[:, :d], axis=1, keepdims=True)
    assert got[i] == pytest.approx(np.mean(ytr[np.argmax(b @ a.T, axis=1)] == yte))
  index = PrefixIndex(train.astype(np.float32))
  with pytest.raises(ValueError, match="labels must be"):
    classification.nearest_neighbor_accuracy(index, ytr[:5], test, yte, (2,))


def _nested_logits(seed=2, m=4, b=300, c=5):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, c, b)
  # Larger sizes see the label more clearly, so accuracy and confidence grow with m.
  logits = np.stack([rng.standard_normal((b, c)) + (i + 1) * 0.8 * np.eye(c)[labels]
                     for i in range(m)]).astype(np.float32)
  return logits, labels


def test_cascade_extremes_equal_the_smallest_and_largest_size():
  logits, labels = _nested_logits()
  conf, pred = cascade.confidences(logits)
  np.testing.assert_allclose(conf, _softmax(logits.astype(np.float64)).max(-1), rtol=1e-5)
  dims = (8, 16, 32, 64)
  zero = cascade.cascade_report(conf, pred, labels, np.zeros(4), dims)
  assert zero["accuracy"] == pytest.approx(np.mean(pred[0] == labels))
  assert zero["expected_dim"] == 8
  never = cascade.cascade_report(conf, pred, labels, np.full(4, 1.01), dims)
  assert never["accuracy"] == pytest.approx(np.mean(pred[-1] == labels))
  assert never["expected_dim"] == 64
  np.testing.assert_allclose(never["stop_fraction"], [0, 0, 0, 1])


def test_cascade_predict_and_capped_curve_match_a_loop():
  logits, labels = _nested_logits(seed=3)
  conf, pred = cascade.confidences(logits)
  thresholds = np.array([0.9, 0.7, 0.5, 0.0])
  dims = (2, 4, 8, 16)
  answer, stage = cascade.cascade_predict(conf, pred, thresholds)
  report = cascade.cascade_report(conf, pred, labels, thresholds, dims)
  for cap in range(4):
    answers, used = [], []
    for b in range(len(labels)):
      i = next((i for i in range(cap) if conf[i, b] >= thresholds[i]), cap)
      answers.append(pred[i, b])
      used.append(dims[i])
      if cap == 3:
        assert answer[b] == pred[i, b] and stage[b] == i
    row = report["capped"][cap]
    assert row["max_dim"] == dims[cap]
    assert row["accuracy"] == pytest.approx(np.mean(np.array(answers) == labels))
    assert row["expected_dim"] == pytest.approx(np.mean(used))


def test_tuned_thresholds_are_the_smallest_best_grid_points():
  logits, labels = _nested_logits(seed=4)
  conf, pred = cascade.confidences(logits)
  grid = np.linspace(0.1, 1, 100)
  got = cascade.tune_thresholds(conf, pred, labels, grid)
  assert got[-1] == 0.0
  for i in range(3):
    accs = [np.mean(np.where(conf[i] >= t, pred[i], pred[i + 1]) == labels) for t in grid]
    assert got[i] == grid[int(np.argmax(accs))]  # argmax = first (smallest) best point
  with pytest.raises(ValueError, match="thresholds"):
    cascade.cascade_predict(conf, pred, got[:2])
