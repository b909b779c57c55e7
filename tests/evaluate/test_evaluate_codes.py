"""Binary and int8 codes: quantisation, exact Hamming / int8 search and code shortlists
in cascades, all against brute-force numpy (ties included)."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from testutil import (
  SMALL,
  code_keys,
  hamming,
  normalise,
  np_binary,
  np_int8,
  numpy_code_cascade,
  top_by,
)

from mrl_jax.evaluate import codes, retrieval
from mrl_jax.evaluate.index import PrefixIndex

# Tiny blocks/groups so a few hundred rows span many blocks, groups and sub-batches.
TILES = dict(query_batch=8, block_size=64, group_size=8, sub_batch=4)


def _tied_codes(n, q, width, seed, kind):
  """Codes with many exact ties: few distinct rows, shuffled."""
  rng = np.random.default_rng(seed)
  if kind == "ubinary":
    base = rng.integers(0, 256, (max(n // 7, 1), width), dtype=np.uint8)
    queries = rng.integers(0, 256, (q, width), dtype=np.uint8)
  else:
    base = rng.integers(-2, 3, (max(n // 7, 1), width)).astype(np.int8)
    queries = rng.integers(-2, 3, (q, width)).astype(np.int8)
  db = base[rng.integers(0, len(base), n)]
  return queries, db


class _Identity(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return x


@pytest.mark.parametrize("kind", ["ubinary", "int8_symmetric"])
def test_quantize_matches_the_inference_rule(kind):
  from mrl_jax.core.ops import quantize, truncate_normalize

  rng = np.random.default_rng(0)
  x = rng.standard_normal((9, 21)).astype(np.float32)
  x[0, :5] = [0.0, -0.0, 1e-9, -1e-9, 0.0]  # signs at and near zero
  x[1] = 0.0
  for dim in (5, 8, 13, 21):
    z = truncate_normalize(x, dim)  # inference's own path: truncate, normalise, quantise
    want = quantize(z, kind)
    got = codes.quantize_embeddings(z, kind)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    ref = np_binary(z) if kind == "ubinary" else np_int8(z)
    np.testing.assert_array_equal(np.asarray(got), ref)
  # Under jit as well (no finiteness check there).
  np.testing.assert_array_equal(jax.jit(codes.quantize_embeddings, static_argnums=1)(z, kind),
                                want)


def test_quantize_refuses_bad_input():
  z = np.ones((4, 8), np.float32)
  z[2, 3] = np.nan
  with pytest.raises(ValueError, match=r"1 of 4 rows: \[2\]"):
    codes.quantize_embeddings(z, "ubinary")
  z[2, 3] = np.inf
  with pytest.raises(ValueError, match="non-finite"):
    codes.quantize_embeddings(z, "int8_symmetric")
  with pytest.raises(ValueError, match="code kind"):
    codes.quantize_embeddings(np.ones((2, 8), np.float32), "int4")
  with pytest.raises(ValueError, match="float embeddings"):
    codes.quantize_embeddings(np.ones((2, 8), np.int32), "ubinary")


@pytest.mark.parametrize("n,width,k", [(1, 2, 1), (7, 3, 7), (611, 2, 10), (611, 5, 25),
                                       (300, 8, 12)])
def test_hamming_search_matches_numpy_with_ties(n, width, k):
  queries, db = _tied_codes(n, 13, width, seed=n + width, kind="ubinary")
  dist, ids = codes.hamming_search(queries, db, k, **TILES)
  want_d, want_i = top_by(hamming(queries, db), k)
  np.testing.assert_array_equal(ids, want_i)
  np.testing.assert_array_equal(dist, want_d)
  assert dist.dtype == np.int32 and ids.dtype == np.int32


@pytest.mark.parametrize("n,width,k", [(5, 3, 5), (611, 4, 10), (400, 16, 30)])
def test_int8_search_matches_numpy_with_ties(n, width, k):
  queries, db = _tied_codes(n, 11, width, seed=n, kind="int8_symmetric")
  dots, ids = codes.int8_search(queries, db, k, **TILES)
  want_d, want_i = top_by(-(queries.astype(np.int64) @ db.astype(np.int64).T), k)
  np.testing.assert_array_equal(ids, want_i)
  np.testing.assert_array_equal(dots, -want_d)


def test_int8_search_is_exact_beyond_float32_mantissa_for_unit_vector_codes():
  rng = np.random.default_rng(5)
  x, q = rng.standard_normal((300, 1200)), rng.standard_normal((4, 1200))
  xc, qc = np_int8(normalise(x, 1200)), np_int8(normalise(q, 1200))
  xc[7] = xc[3]  # an exact tie
  dots, ids = codes.int8_search(qc, xc, 9, **TILES)
  want_d, want_i = top_by(-(qc.astype(np.int64) @ xc.astype(np.int64).T), 9)
  np.testing.assert_array_equal(ids, want_i)
  big = np.full((3, 1200), 127, np.int8)  # |q| |x| = 127**2 * 1200 > 2**24
  with pytest.raises(ValueError, match="exact float32"):
    codes.int8_search(big, big, 1)


def test_code_search_refuses_bad_input():
  db = np.zeros((10, 2), np.uint8)
  with pytest.raises(ValueError, match=r"k must be an int in \[1, 10\]"):
    codes.hamming_search(db[:2], db, 11)
  with pytest.raises(ValueError, match="k must be"):
    codes.hamming_search(db[:2], db, 0)
  with pytest.raises(ValueError, match="differ in width"):
    codes.hamming_search(np.zeros((2, 3), np.uint8), db, 1)
  with pytest.raises(ValueError, match="must be uint8"):
    codes.hamming_search(db[:2].astype(np.int8), db.astype(np.int8), 1)
  with pytest.raises(ValueError, match=r"codes\[None, :\]"):
    codes.hamming_search(db[0], db, 1)
  with pytest.raises(ValueError, match="must be int8"):
    codes.int8_search(db[:2], db, 1)
  with pytest.raises(ValueError, match="block_size must be a positive int"):
    codes.hamming_search(db[:2], db, 1, block_size=0)


# -- code shortlists inside a PrefixIndex ------------------------------------------------


def _data(n, d=24, q=11, seed=0, coarse=False):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, d)).astype(np.float32)
  if coarse:  # rows repeat their first 12 dims: ties in a code stage up to 12 dims (float
    # re-rank scores of equal rows may differ in the last bit, so later dims differ)
    x[:, :12] = x[rng.integers(0, n // 5, n), :12]
  return x, rng.standard_normal((q, d)).astype(np.float32)


@pytest.mark.parametrize("kind", ["ubinary", "int8_symmetric"])
def test_index_codes_equal_quantised_normalised_prefixes(kind):
  x, _ = _data(50, d=20)
  index = PrefixIndex(x, **SMALL)
  for dim in (3, 16, 20):
    got = np.asarray(index.codes(kind, dim))[:50]
    want = (np_binary if kind == "ubinary" else np_int8)(normalise(x, dim))
    if kind == "ubinary":
      np.testing.assert_array_equal(got, want)
    else:  # the index normalises in float32: a rounding boundary may move by one step
      assert np.abs(got.astype(int) - want).max() <= 1 and np.mean(got == want) > 0.99
    assert index.shortlist_bytes_per_vector(dim, kind) == got.shape[1]
  assert index.shortlist_bytes_per_vector(16) == 64


@pytest.mark.parametrize("kind", ["ubinary", "int8_symmetric"])
@pytest.mark.parametrize("dim", [5, 16])
def test_one_stage_code_search_matches_numpy(kind, dim):
  x, q = _data(613, coarse=True, seed=dim)
  index = PrefixIndex(x, **SMALL)
  scores, ids = index.search(q, 20, dim, codes=kind)
  keys = code_keys(q, x, dim, kind)
  want_k, want_i = top_by(keys, 20)
  np.testing.assert_array_equal(ids, want_i)
  want_s = dim - 2 * want_k if kind == "ubinary" else -want_k  # +-1 inner product / int8 dot
  np.testing.assert_array_equal(scores, want_s)


@pytest.mark.parametrize("kind", ["ubinary", "int8_symmetric"])
def test_code_shortlist_cascades_match_numpy(kind):
  x, q = _data(700, d=32, coarse=True, seed=4)
  index = PrefixIndex(x, **SMALL)
  got = retrieval.adaptive_retrieval(q, index, shortlist_dim=12, rerank_dim=32, shortlist_k=60,
                                     k=10, shortlist_codes=kind, timed=False)
  np.testing.assert_array_equal(got.ids, numpy_code_cascade(q, x, (12, 32), (60, 10), kind))
  assert got.shortlist_codes == kind
  assert got.bytes_per_vector == (2 if kind == "ubinary" else 12)
  assert got.flops_per_query == 32 * 60 and got.code_ops_per_query == 12 * 700
  got = retrieval.funnel_retrieval(q, index, dims=(8, 16, 32), shortlist=(80, 20, 10),
                                   shortlist_codes=kind, timed=False)
  np.testing.assert_array_equal(got.ids,
                                numpy_code_cascade(q, x, (8, 16, 32), (80, 20, 10), kind))
  # Same stage option through exact_search (one stage) and evaluate-style settings.
  one = retrieval.exact_search(q, index, 7, dim=9, shortlist_codes=kind, timed=False)
  np.testing.assert_array_equal(one.ids, top_by(code_keys(q, x, 9, kind), 7)[1])


def test_code_shortlist_reports_wall_and_cpu_time():
  x, q = _data(200, d=16)
  got = retrieval.adaptive_retrieval(q, x, shortlist_dim=16, rerank_dim=16, shortlist_k=20, k=5,
                                     shortlist_codes="ubinary")
  assert got.seconds_per_query > 0 and got.cpu_seconds_per_query > 0
  assert got.mflops_per_query == 16 * 20 / 1e6


def test_faiss_binary_flat_agrees_with_the_jax_kernel_ties_included():
  pytest.importorskip("faiss")
  x, q = _data(900, d=32, q=13, coarse=True, seed=6)
  index = PrefixIndex(x, **SMALL)
  for dim in (12, 32):
    jax_res = retrieval.exact_search(q, index, 40, dim=dim, shortlist_codes="ubinary",
                                     timed=False)
    peer = retrieval.exact_search(q, index, 40, dim=dim, shortlist_codes="ubinary",
                                  backend="faiss", timed=False)
    assert peer.backend == "faiss-binary-flat"
    np.testing.assert_array_equal(peer.scores, jax_res.scores)
    np.testing.assert_array_equal(peer.ids, jax_res.ids)
  kw = dict(shortlist_dim=16, rerank_dim=32, shortlist_k=50, k=10, shortlist_codes="ubinary",
            timed=False)
  np.testing.assert_array_equal(retrieval.adaptive_retrieval(q, index, backend="faiss", **kw).ids,
                                retrieval.adaptive_retrieval(q, index, **kw).ids)
  with pytest.raises(ValueError, match="IndexBinaryFlat"):
    retrieval.adaptive_retrieval(q, index, backend="faiss", faiss_index="hnsw", **kw)
  with pytest.raises(ValueError, match="no int8"):
    retrieval.adaptive_retrieval(q, index, backend="faiss",
                                 **{**kw, "shortlist_codes": "int8_symmetric"})


def test_bad_code_options_raise():
  x, q = _data(40, d=8)
  index = PrefixIndex(x, **SMALL)
  with pytest.raises(ValueError, match="code kind"):
    retrieval.adaptive_retrieval(q, index, shortlist_dim=4, rerank_dim=8, shortlist_k=10, k=5,
                                 shortlist_codes="pq")
  with pytest.raises(ValueError, match=r"dim must be an int in \[1, 8\]"):
    index.codes("ubinary", 9)
