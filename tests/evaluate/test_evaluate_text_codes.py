"""Per-dim retrieval over ubinary / int8_symmetric codes against numpy brute force."""

import numpy as np
import pytest

from mrl_jax.evaluate.text import code_metric_names, code_retrieval_per_dim, evaluate_text

DIMS = (4, 8, 16)


def _np_rank_metrics(score):
  """recall@10 and nDCG@10 from a similarity matrix, one query at a time; ties lose."""
  recall, ndcg = [], []
  for i in range(len(score)):
    rank = 1 + sum(1 for j in range(len(score)) if j != i and score[i][j] >= score[i][i])
    recall.append(float(rank <= 10))
    ndcg.append(1.0 / np.log2(1 + rank) if rank <= 10 else 0.0)
  return np.mean(recall), np.mean(ndcg)


def _np_scores(a, p, m, kind):
  unit = lambda x: x[:m] / np.linalg.norm(x[:m])
  if kind == "ubinary":  # 1 - Hamming distance of the sign bits, as an int: m - 2 * hamming
    code = lambda x: [int(v > 0) for v in unit(x)]
    return [[m - 2 * sum(u != v for u, v in zip(code(x), code(y), strict=True)) for y in p]
            for x in a]
  code = lambda x: [int(np.clip(np.round(127 * v), -127, 127)) for v in unit(x)]
  return [[sum(u * v for u, v in zip(code(x), code(y), strict=True)) for y in p] for x in a]


def test_code_retrieval_matches_numpy_brute_force_at_every_dim():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(24, 16)).astype(np.float32)
  p = (a + 0.9 * rng.normal(size=a.shape)).astype(np.float32)
  got = code_retrieval_per_dim(a, p, DIMS)
  assert sorted(got) == sorted(f"{n}_per_dim" for n in code_metric_names())
  for kind in ("ubinary", "int8_symmetric"):
    want = np.array([_np_rank_metrics(_np_scores(a, p, m, kind)) for m in DIMS])
    np.testing.assert_allclose(got[f"{kind}_recall@10_per_dim"], want[:, 0])
    np.testing.assert_allclose(got[f"{kind}_ndcg@10_per_dim"], want[:, 1])
  # Not a constant: the codes rank worse at 4 bits than at 16.
  assert got["ubinary_ndcg@10_per_dim"][0] < got["ubinary_ndcg@10_per_dim"][-1]


def test_ties_count_against_the_match_and_evaluate_text_reports_codes():
  # Every row has the same sign bits: all Hamming distances tie, so every rank is N.
  a = np.abs(np.random.default_rng(1).normal(size=(12, 8))) + 0.1
  got = code_retrieval_per_dim(a, a, (8,), kinds=("ubinary",))
  np.testing.assert_array_equal(got["ubinary_recall@10_per_dim"], [0.0])
  texts = [f"t{i}" for i in range(12)]
  table = dict(zip(texts, a, strict=True))
  out = evaluate_text(lambda ts: np.stack([table[t] for t in ts]), (4, 8), pairs=(texts, texts))
  assert out["ubinary_recall@10_per_dim"].shape == (2,) and "cosine_recall@10_per_dim" in out
  assert "ubinary_recall@10_per_dim" not in evaluate_text(
      lambda ts: np.stack([table[t] for t in ts]), (8,), pairs=(texts, texts), codes=())
  with pytest.raises(ValueError, match="code kind"):
    code_retrieval_per_dim(a, a, (8,), kinds=("int4",))
  with pytest.raises(ValueError, match="NaN"):
    code_retrieval_per_dim(np.full((3, 8), np.nan), a[:3], (8,))
