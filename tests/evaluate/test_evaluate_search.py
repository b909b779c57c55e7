"""Exact k-NN search, adaptive and funnel retrieval against brute-force numpy."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from testutil import REPO, SMALL, TESTS

from mrl_jax.evaluate import retrieval
from mrl_jax.evaluate.index import PrefixIndex


# Small blocks and groups so that tiny databases still exercise several blocks, the
# shifted last block, the group pass and the sub-batched gathers.
def _prefix_scores(queries, database, dim):
  """Cosine similarities of the truncated-then-normalised prefixes, in float64."""
  q = np.asarray(queries, np.float64)[:, :dim]
  x = np.asarray(database, np.float64)[:, :dim]
  q = q / np.linalg.norm(q, axis=1, keepdims=True)
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
  return q @ x.T


def _brute_force(queries, database, dim, k):
  s = _prefix_scores(queries, database, dim)
  ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(s, ids, axis=1), ids


def _numpy_cascade(queries, database, dims, keeps):
  """Shortlist with dims[0] over everything, then re-rank the survivors stage by stage."""
  _, ids = _brute_force(queries, database, dims[0], keeps[0])
  for d, keep in zip(dims[1:], keeps[1:], strict=True):
    s = np.take_along_axis(_prefix_scores(queries, database, d), ids, axis=1)
    order = np.argsort(-s, axis=1, kind="stable")[:, :keep]
    ids = np.take_along_axis(ids, order, axis=1)
  return ids


def _data(n, d=24, q=11, seed=0):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((q, d)).astype(
      np.float32)


# (rows, prefix dim, k): one row; fewer rows than a group; many blocks with the shifted
# last block, on the cached normalised prefix (dim 3) and on the stored database (24).
@pytest.mark.parametrize("n,dim,k", [(1, 24, 1), (7, 3, 7), (1003, 3, 10), (1003, 24, 1)])
def test_search_matches_brute_force(n, dim, k):
  x, q = _data(n)
  scores, ids = PrefixIndex(x, **SMALL).search(q, k, dim)
  want_s, want_i = _brute_force(q, x, dim, k)
  np.testing.assert_array_equal(ids, want_i)
  np.testing.assert_allclose(scores, want_s, atol=1e-5)


def test_ties_return_the_k_best_scores():
  rng = np.random.default_rng(1)
  x = np.repeat(rng.standard_normal((20, 8)).astype(np.float32), 5, axis=0)
  x = x[rng.permutation(len(x))]  # every row has four exact duplicates
  q = rng.standard_normal((6, 8)).astype(np.float32)
  scores, ids = PrefixIndex(x, **SMALL).search(q, 12, 8)
  ref = _prefix_scores(q, x, 8)
  np.testing.assert_allclose(scores, -np.sort(-ref, axis=1)[:, :12], atol=1e-5)
  np.testing.assert_allclose(np.take_along_axis(ref, ids, axis=1), scores, atol=1e-5)
  assert all(len(set(row)) == 12 for row in ids)


def test_prefixes_are_truncated_then_normalised():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((200, 16)).astype(np.float32)
  x[:, 4:] *= rng.uniform(0.01, 100, (200, 1)).astype(np.float32)  # tails of very mixed size
  q = rng.standard_normal((5, 16)).astype(np.float32)
  _, ids = PrefixIndex(x, **SMALL).search(q, 5, 4)
  np.testing.assert_array_equal(ids, _brute_force(q, x, 4, 5)[1])
  # Normalising the whole vector before truncating would rank differently.
  full = x / np.linalg.norm(x, axis=1, keepdims=True)
  assert not np.array_equal(ids, np.argsort(-(q[:, :4] @ full[:, :4].T), axis=1)[:, :5])


def test_zero_rows_score_zero():
  x, q = _data(30, d=6)
  x[3] = 0
  scores, ids = PrefixIndex(x, **SMALL).search(q, 30, 6)
  assert np.isfinite(scores).all()
  np.testing.assert_allclose(scores[ids == 3], 0.0)


def test_adaptive_with_full_dims_equals_exact_search():
  x, q = _data(500, d=32)
  index = PrefixIndex(x, **SMALL)
  exact = retrieval.exact_search(q, index, 7, timed=False)
  adaptive = retrieval.adaptive_retrieval(q, index, shortlist_dim=32, rerank_dim=32,
                                          shortlist_k=40, k=7)
  np.testing.assert_array_equal(adaptive.ids, exact.ids)
  np.testing.assert_allclose(adaptive.scores, exact.scores, atol=1e-6)
  assert adaptive.flops_per_query == 32 * 500 + 32 * 40
  assert adaptive.seconds_per_query > 0


def test_funnel_with_one_stage_equals_exact_search():
  x, q = _data(300, d=16)
  index = PrefixIndex(x, **SMALL)
  funnel = retrieval.funnel_retrieval(q, index, dims=(16,), shortlist=(6,), timed=False)
  np.testing.assert_array_equal(funnel.ids, _brute_force(q, x, 16, 6)[1])
  assert funnel.flops_per_query == 16 * 300


def test_adaptive_and_funnel_match_numpy_cascades():
  x, q = _data(700, d=32)
  index = PrefixIndex(x, **SMALL)
  got = retrieval.adaptive_retrieval(q, index, shortlist_dim=4, rerank_dim=32, shortlist_k=50,
                                     k=10, timed=False)
  np.testing.assert_array_equal(got.ids, _numpy_cascade(q, x, (4, 32), (50, 10)))
  got = retrieval.funnel_retrieval(q, index, dims=(2, 4, 8, 32), shortlist=(80, 40, 10),
                                   timed=False)
  assert got.keeps == (80, 40, 10, 10)
  np.testing.assert_array_equal(got.ids, _numpy_cascade(q, x, (2, 4, 8, 32), (80, 40, 10, 10)))
  assert got.flops_per_query == 2 * 700 + 4 * 80 + 8 * 40 + 32 * 10


def test_flops_reproduce_the_papers_numbers():
  n = 1_281_167  # ImageNet-1K train
  assert retrieval.cascade_flops(n, (2048,), (10,)) / 1e6 == pytest.approx(2623.8, abs=0.1)
  assert retrieval.cascade_flops(n, (16, 2048), (200, 10)) / 1e6 == pytest.approx(20.91, abs=0.01)
  assert retrieval.cascade_flops(n, (8, 2048), (200, 10)) / 1e6 == pytest.approx(10.66, abs=0.01)


def test_bad_inputs_raise():
  x, q = _data(20, d=8)
  index = PrefixIndex(x, **SMALL)
  with pytest.raises(ValueError, match="larger than the database"):
    index.search(q, 21)
  with pytest.raises(ValueError, match="k must be an int >= 1"):
    index.search(q, 0)
  with pytest.raises(ValueError, match="must not decrease"):
    index.cascade(q, (8, 4), (10, 5))
  with pytest.raises(ValueError, match="at most as many"):
    index.cascade(q, (4, 8), (5, 10))
  with pytest.raises(ValueError, match=r"ints in \[1, 8\]"):
    index.search(q, 3, 9)
  with pytest.raises(ValueError, match="queries have 4 dims"):
    index.search(q[:, :4], 3, 8)
  with pytest.raises(ValueError, match="smaller than k"):
    retrieval.adaptive_retrieval(q, index, shortlist_dim=2, rerank_dim=8, shortlist_k=5, k=6)
  with pytest.raises(ValueError, match="len"):
    retrieval.funnel_retrieval(q, index, dims=(2, 8), shortlist=(9, 5, 3))
  with pytest.raises(ValueError, match="backend"):
    retrieval.exact_search(q, index, 3, backend="annoy")
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    PrefixIndex(np.zeros(5, np.float32))


def test_faiss_flat_agrees_with_jax_and_hnsw_finds_most():
  pytest.importorskip("faiss")
  x, q = _data(2000, d=32, q=20, seed=3)
  index = PrefixIndex(x, **SMALL)
  kw = dict(shortlist_dim=8, rerank_dim=32, shortlist_k=60, k=10, timed=False)
  jax_res = retrieval.adaptive_retrieval(q, index, **kw)
  flat = retrieval.adaptive_retrieval(q, index, backend="faiss", **kw)
  np.testing.assert_array_equal(flat.ids, jax_res.ids)
  assert flat.backend == "faiss-flat"
  exact_jax = retrieval.exact_search(q, index, 15, dim=8, timed=False)
  exact_faiss = retrieval.exact_search(q, index, 15, dim=8, backend="faiss", timed=False)
  np.testing.assert_array_equal(exact_faiss.ids, exact_jax.ids)
  np.testing.assert_allclose(exact_faiss.scores, exact_jax.scores, atol=1e-5)
  hnsw = retrieval.adaptive_retrieval(q, index, backend="faiss", faiss_index="hnsw", **kw)
  found = np.mean([len(np.intersect1d(a, b)) for a, b in zip(hnsw.ids, jax_res.ids,
                                                              strict=True)])
  assert found >= 9  # approximate shortlist, most of the exact top-10 found


_SHARDED = textwrap.dedent("""
    import numpy as np, jax
    from mrl_jax.evaluate.index import PrefixIndex
    from testutil import SMALL, numpy_code_cascade
    from test_evaluate_search import _brute_force, _data, _numpy_cascade  # this file's own
    assert len(jax.devices()) == 3
    assert PrefixIndex(np.ones((4, 2), np.float32)).shard == "queries"  # CPU default
    for shard in ("database", "queries"):
      for n in (5, 301):  # 301 rows: padded to 303 over 3 database shards
        x, q = _data(n, d=16)
        index = PrefixIndex(x, shard=shard, **SMALL)
        assert index.mesh.size == 3
        assert index.database.sharding.is_fully_replicated == (shard == "queries")
        k = min(n, 6)
        scores, ids = index.search(q, k, 3)
        np.testing.assert_array_equal(ids, _brute_force(q, x, 3, k)[1])
        np.testing.assert_allclose(scores, _brute_force(q, x, 3, k)[0], atol=1e-5)
        if n > 100:
          _, ids = index.cascade(q, (2, 16), (40, 5))
          np.testing.assert_array_equal(ids, _numpy_cascade(q, x, (2, 16), (40, 5)))
          # 5-bit codes: ties everywhere, merged across shards
          for kind in ("ubinary", "int8_symmetric"):
            _, ids = index.cascade(q, (5, 16), (40, 5), shortlist_codes=kind)
            np.testing.assert_array_equal(ids, numpy_code_cascade(q, x, (5, 16), (40, 5), kind))
    print("SHARDED_OK")
""")


def test_three_devices_sharding_database_or_queries_give_the_same_answers():
  root = REPO
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=3",
             PYTHONPATH=os.pathsep.join([root, TESTS, os.path.dirname(__file__)]))
  out = subprocess.run([sys.executable, "-c", _SHARDED], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
  assert "SHARDED_OK" in out.stdout, out.stderr[-3000:]
