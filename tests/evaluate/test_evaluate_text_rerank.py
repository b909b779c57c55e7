"""Binary shortlist -> float re-rank recall@10 per dim against a slow numpy reference."""

import numpy as np
import pytest

from mrl_jax.evaluate.text import binary_rerank_per_dim, evaluate_text

DIMS = (4, 8, 16)


def _np_rerank_recall(a, p, m, shortlist_k):
  """One query at a time: Hamming over the m-prefix's sign bits (ties: smaller id), keep K,
  re-rank by full-dim cosine (ties: shortlist order), keep 10, is the match among them?"""
  unit = lambda x: x / np.linalg.norm(x)
  hits = 0
  for i in range(len(a)):
    bits = lambda x: [v > 0 for v in unit(x[:m])]
    hamming = [sum(u != v for u, v in zip(bits(a[i]), bits(y), strict=True)) for y in p]
    shortlist = sorted(range(len(p)), key=lambda j: (hamming[j], j))[:shortlist_k]
    cos = {j: float(unit(a[i]) @ unit(p[j])) for j in shortlist}
    top = sorted(shortlist, key=lambda j: -cos[j])[:10]  # sorted() is stable
    hits += i in top
  return hits / len(a)


def test_binary_rerank_matches_numpy_reference_at_every_dim():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(40, 16)).astype(np.float32)
  p = (a + 1.2 * rng.normal(size=a.shape)).astype(np.float32)
  for k in (10, 15):
    got = binary_rerank_per_dim(a, p, DIMS, shortlist_k=k)["ubinary_rerank_recall@10_per_dim"]
    want = [_np_rerank_recall(a, p, m, k) for m in DIMS]
    np.testing.assert_allclose(got, want, atol=1e-12, err_msg=f"K={k}")
  # Not a constant: 4 bits shortlist worse than 16, and the whole database is exact search.
  assert got[0] < got[-1]
  full = binary_rerank_per_dim(a, p, (4,), shortlist_k=40)["ubinary_rerank_recall@10_per_dim"]
  want = np.mean([i in np.argsort(-(a[i] / np.linalg.norm(a[i])) @ (
      p / np.linalg.norm(p, axis=1, keepdims=True)).T, kind="stable")[:10] for i in range(40)])
  np.testing.assert_allclose(full, [want])


def test_evaluate_text_clips_the_shortlist_and_refuses_bad_sizes():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(12, 8))
  texts = [f"t{i}" for i in range(12)]
  table = dict(zip(texts, a, strict=True))
  embed = lambda ts: np.stack([table[t] for t in ts])
  out = evaluate_text(embed, (4, 8), pairs=(texts, texts), shortlist_k=100)
  np.testing.assert_allclose(out["ubinary_rerank_recall@10_per_dim"], [1.0, 1.0])
  assert "ubinary_rerank_recall@10_per_dim" not in evaluate_text(embed, (8,),
                                                                 pairs=(texts, texts))
  for bad in (9, 2.5, True, "20"):
    with pytest.raises(ValueError, match="shortlist_k"):
      evaluate_text(embed, (8,), pairs=(texts, texts), shortlist_k=bad)
    with pytest.raises(ValueError, match="shortlist_k"):
      binary_rerank_per_dim(a, a, (8,), shortlist_k=bad)
  with pytest.raises(ValueError, match="shortlist_k"):
    binary_rerank_per_dim(a, a, (8,), shortlist_k=13)
  with pytest.raises(ValueError, match="NaN"):
    binary_rerank_per_dim(np.full((12, 8), np.nan), a, (8,), shortlist_k=10)
