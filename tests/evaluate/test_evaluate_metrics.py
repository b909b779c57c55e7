"""Retrieval metrics against slow, obvious per-query loops and hand-checked cases."""

import math

import numpy as np
import pytest

from mrl_jax.evaluate import metrics


def _reference(neighbors, db_labels, q_labels, k, denominator="k"):
  """Per-query loops straight from the definitions."""
  p, r, ap = [], [], []
  for q in range(len(q_labels)):
    rel = [int(db_labels[n] == q_labels[q]) for n in neighbors[q][:k]]
    num_rel = sum(int(lab == q_labels[q]) for lab in db_labels)
    p.append(sum(rel) / k)
    if num_rel:
      r.append(sum(rel) / num_rel)
    total = 0.0
    for i in range(k):
      if rel[i]:
        total += sum(rel[:i + 1]) / (i + 1)
    den = {"k": k, "hits": sum(rel), "relevant": min(k, num_rel)}[denominator]
    ap.append(total / den if den else 0.0)
  return np.mean(p), (np.mean(r) if r else np.nan), np.mean(ap)


def test_hand_checked_example():
  db_labels = np.array([0, 1, 0, 2, 0, 1])  # class 0: 3 items, class 1: 2, class 2: 1
  q_labels = np.array([0, 2])
  neighbors = np.array([[1, 0, 2, 3], [3, 0, 1, 2]])
  rel = metrics.relevance(neighbors, db_labels, q_labels)
  np.testing.assert_array_equal(rel, [[0, 1, 1, 0], [1, 0, 0, 0]])
  assert metrics.one_nn_accuracy(rel) == 0.5
  assert metrics.precision_at_k(rel, 4) == pytest.approx((2 / 4 + 1 / 4) / 2)
  # recall: query 0 found 2 of its class's 3 items, query 1 the single item of class 2.
  num_rel = metrics.count_relevant(db_labels, q_labels)
  np.testing.assert_array_equal(num_rel, [3, 1])
  assert metrics.recall_at_k(rel, 4, num_rel) == pytest.approx((2 / 3 + 1) / 2)
  # AP@4 of query 0: P@2 = 1/2, P@3 = 2/3; of query 1: P@1 = 1.
  ap = metrics.average_precision_at_k(rel, 4)
  np.testing.assert_allclose(ap, [(1 / 2 + 2 / 3) / 4, 1 / 4])
  np.testing.assert_allclose(metrics.average_precision_at_k(rel, 4, denominator="hits"),
                             [(1 / 2 + 2 / 3) / 2, 1.0])
  np.testing.assert_allclose(
      metrics.average_precision_at_k(rel, 4, denominator="relevant", num_relevant=num_rel),
      [(1 / 2 + 2 / 3) / 3, 1.0])


@pytest.mark.parametrize("denominator", ["k", "hits", "relevant"])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_metrics_match_loops_on_random_lists(k, denominator):
  rng = np.random.default_rng(k)
  db_labels = rng.integers(0, 4, 50)
  q_labels = rng.integers(0, 5, 30)  # class 4 never occurs in the database
  neighbors = np.stack([rng.permutation(50)[:12] for _ in range(30)])
  got = metrics.retrieval_metrics(neighbors, db_labels, q_labels, ks=(k,),
                                  map_denominator=denominator)
  p, r, ap = _reference(neighbors, db_labels, q_labels, k, denominator)
  assert got[f"precision@{k}"] == pytest.approx(p)
  assert got[f"recall@{k}"] == pytest.approx(r)
  assert got[f"map@{k}"] == pytest.approx(ap)
  assert got["1nn"] == pytest.approx(np.mean(db_labels[neighbors[:, 0]] == q_labels))


def test_paper_map_divides_by_k_not_by_hits():
  rel = np.array([[True] + [False] * 9])
  assert metrics.map_at_k(rel, 10) == pytest.approx(0.1)
  assert metrics.map_at_k(rel, 10, denominator="hits") == pytest.approx(1.0)


def test_recall_uses_class_size_and_skips_absent_classes():
  db_labels = np.array([7] + [1] * 20)  # class 7 has a single item
  rel = metrics.relevance(np.array([[0, 1, 2], [1, 2, 3]]), db_labels, np.array([7, 9]))
  num_rel = metrics.count_relevant(db_labels, np.array([7, 9]))
  np.testing.assert_array_equal(num_rel, [1, 0])
  assert metrics.recall_at_k(rel, 3, num_rel) == 1.0  # the absent class 9 is left out
  assert np.isnan(metrics.recall_at_k(rel[1:], 3, num_rel[1:]))


def test_consecutive_hits_each_add_their_precision():
  # Several neighbours with the query's label at consecutive ranks: AP adds P@i at each.
  rel = np.array([[True, True, False, True]])
  assert metrics.map_at_k(rel, 4) == pytest.approx((1 + 1 + 3 / 4) / 4)


def test_bad_inputs_raise():
  rel = np.zeros((2, 5), bool)
  with pytest.raises(ValueError, match="larger than the 5 neighbours"):
    metrics.precision_at_k(rel, 6)
  with pytest.raises(ValueError, match="positive int"):
    metrics.map_at_k(rel, 0)
  with pytest.raises(ValueError, match="denominator"):
    metrics.map_at_k(rel, 2, denominator="R")
  with pytest.raises(ValueError, match="needs num_relevant"):
    metrics.map_at_k(rel, 2, denominator="relevant")
  with pytest.raises(ValueError, match="neighbour ids"):
    metrics.relevance(np.array([[3]]), np.array([0, 1]), np.array([0]))
  with pytest.raises(ValueError, match="2 neighbour lists for 1"):
    metrics.relevance(np.zeros((2, 1), int), np.array([0]), np.array([0]))


def test_ndcg_at_k_against_a_loop_over_the_definition():
  rng = np.random.default_rng(7)
  rel = rng.random((40, 12)) < 0.3
  num_relevant = rng.integers(0, 6, 40)
  for k in (1, 5, 10):
    want = []
    for q in range(40):
      if num_relevant[q] == 0:
        continue  # no relevant item: not averaged
      dcg = sum(1.0 / math.log2(i + 2) for i in range(k) if rel[q, i])
      idcg = sum(1.0 / math.log2(i + 2) for i in range(min(k, num_relevant[q])))
      want.append(dcg / idcg)
    np.testing.assert_allclose(metrics.ndcg_at_k(rel, k, num_relevant), np.mean(want))
  assert math.isnan(metrics.ndcg_at_k(rel, 5, np.zeros(40, int)))
  with pytest.raises(ValueError, match="num_relevant"):
    metrics.ndcg_at_k(rel, 5, np.ones(3))
