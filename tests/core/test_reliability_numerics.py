"""Issue 26, numerics: every norm is scale-safe (rows scaled by 1e20 or 1e-25 rank, normalise and
train as the unscaled rows do), bfloat16 databases are accepted, and ``k`` is named as ``k``.

The reference is numpy in float64 (no float32 overflow or underflow for float32 inputs).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrl_jax.core import ops
from mrl_jax.evaluate import index as index_lib
from mrl_jax.evaluate import retrieval, sts
from mrl_jax.losses import embedding, fused

RNG = np.random.default_rng(0)
DB = RNG.standard_normal((120, 32)).astype(np.float32)
Q = (DB[:12] + 0.3 * RNG.standard_normal((12, 32))).astype(np.float32)
SCALES = [1e20, 1e-25, 1e30, 1e-30, 1e-33]


def _reference_top_k(q, db, k, dim):
  """float64 cosine top-k of the ``dim``-prefixes (ties: smaller id first)."""
  q, db = np.asarray(q, np.float64)[:, :dim], np.asarray(db, np.float64)[:, :dim]
  sims = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
      db / np.linalg.norm(db, axis=1, keepdims=True)).T
  return np.argsort(-sims, axis=1, kind="stable")[:, :k], np.sort(sims, axis=1)[:, ::-1][:, :k]


@pytest.mark.parametrize("scale", SCALES)
def test_exact_search_is_scale_invariant(scale):
  s = np.float32(scale)
  assert np.isfinite(DB * s).all() and (np.abs(DB * s) > 0).all()
  got = retrieval.exact_search(Q * s, DB * s, 5)
  want_ids, want_scores = _reference_top_k(Q, DB, 5, 32)
  np.testing.assert_array_equal(got.ids, want_ids)
  np.testing.assert_allclose(got.scores, want_scores, atol=1e-5)


@pytest.mark.parametrize("scale", [1e20, 1e-25])
@pytest.mark.parametrize("codes", [None, "int8_symmetric", "ubinary"])
def test_adaptive_retrieval_is_scale_invariant(scale, codes):
  s = np.float32(scale)
  kw = dict(shortlist_dim=8, rerank_dim=32, shortlist_k=30, k=5, shortlist_codes=codes)
  base = retrieval.adaptive_retrieval(Q, DB, **kw)
  got = retrieval.adaptive_retrieval(Q * s, DB * s, **kw)
  np.testing.assert_array_equal(got.ids, base.ids)
  np.testing.assert_allclose(got.scores, base.scores, atol=1e-5)


@pytest.mark.parametrize("scale", SCALES)
def test_index_caches_are_scale_invariant(scale):
  index = index_lib.PrefixIndex(DB * np.float32(scale), max_cached_dim=8)
  ref = DB[:, :8] / np.linalg.norm(DB[:, :8].astype(np.float64), axis=1, keepdims=True)
  np.testing.assert_allclose(np.asarray(index.normalised(8))[:120], ref, atol=1e-6)
  inv = np.asarray(index.inv_norm(32))[:120] * np.float64(scale)
  np.testing.assert_allclose(inv, 1 / np.linalg.norm(DB.astype(np.float64), axis=1), rtol=1e-5)
  np.testing.assert_array_equal(index.codes("ubinary", 16), index_lib.PrefixIndex(DB).codes(
      "ubinary", 16))


@pytest.mark.parametrize("scale", SCALES)
def test_truncate_normalize_and_l2_normalize_give_unit_rows(scale):
  x = jnp.asarray(DB[:6] * np.float32(scale))
  for out in (ops.truncate_normalize(x, 16), embedding.l2_normalize(x[:, :16]),
              index_lib.normalize_prefix(x, 16), ops.unit_rows(x[:, :16])):
    want = DB[:6, :16] / np.linalg.norm(DB[:6, :16].astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-6)


def test_zero_rows_stay_zero_with_finite_gradients():
  x = jnp.zeros((2, 4))
  for fn in (ops.truncate_normalize, embedding.l2_normalize, ops.unit_rows):
    np.testing.assert_array_equal(fn(x), 0.0)
    assert np.isfinite(jax.grad(lambda v, fn=fn: fn(v).sum())(x)).all()
  np.testing.assert_array_equal(ops.inverse_norms(x), 0.0)


@pytest.mark.parametrize("scale", [1e20, 1e-25])
def test_losses_are_scale_invariant(scale):
  a, p = jnp.asarray(DB[:8]), jnp.asarray(Q[:8])
  s = np.float32(scale)
  base = fused.nested_in_batch_softmax(a, p, (8, 16, 32))
  got = fused.nested_in_batch_softmax(a * s, p * s, (8, 16, 32))
  np.testing.assert_allclose(got, base, rtol=1e-5)
  unfused = embedding.in_batch_softmax(a * s, p * s)
  np.testing.assert_allclose(unfused, embedding.in_batch_softmax(a, p), rtol=1e-5)
  # the gradient is that of the scale-invariant loss: d/dx L(s x) = s L'(s x) = L'(x)
  g = jax.grad(lambda x: fused.nested_in_batch_softmax(x, p, (8, 16, 32)))
  np.testing.assert_allclose(g(a * s) * s, g(a), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scale", [1e20, 1e-25])
def test_sts_cosines_are_scale_invariant(scale):
  s = np.float32(scale)
  np.testing.assert_allclose(sts.cosine_per_dim(DB[:10] * s, Q[:10] * s, (8, 32)),
                             sts.cosine_per_dim(DB[:10], Q[:10], (8, 32)), atol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16])
def test_low_precision_database_is_accepted(dtype):
  db, q = DB.astype(dtype), Q.astype(dtype)
  got = retrieval.exact_search(q, db, 5)
  want, _ = _reference_top_k(np.asarray(q, np.float32), np.asarray(db, np.float32), 5, 32)
  np.testing.assert_array_equal(got.ids[:, 0], want[:, 0])
  assert index_lib.PrefixIndex(db).database.dtype == jnp.float32


@pytest.mark.parametrize("k", [5.0, "5", True, 0])
def test_k_is_named_as_k(k):
  with pytest.raises(ValueError, match=r"^k must be an int"):
    retrieval.exact_search(Q, DB, k)
  with pytest.raises(ValueError, match=r"^k must be an int"):
    index_lib.PrefixIndex(DB).search(Q, k)
