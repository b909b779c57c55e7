"""Bad inputs to the retrieval and evaluation functions (issue 15, kinds 3 and 4): each gets a
clear ValueError naming the argument, and non-finite values are never ranked or served.

``BAD_INPUTS`` is a table of (description, call, expected message): one test per row.
"""

import warnings

import numpy as np
import pytest

from mrl_jax.evaluate import cascade, classification, codes, metrics, retrieval
from mrl_jax.evaluate.index import PrefixIndex, normalize_prefix
from mrl_jax.evaluate.report import default_funnel, evaluate_nested

RNG = np.random.default_rng(0)
X = RNG.standard_normal((40, 8)).astype(np.float32)
Q = RNG.standard_normal((5, 8)).astype(np.float32)
SMALL = dict(query_batch=8, block_size=16, group_size=4, sub_batch=4)
INDEX = PrefixIndex(X, **SMALL)
LOGITS = RNG.standard_normal((3, 6, 4)).astype(np.float32)
LABELS6 = np.array([0, 1, 2, 3, 0, 1])


def _with(x, row, col, value):
  x = np.array(x, copy=True)
  x[row, col] = value
  return x


def _adaptive(**kw):
  args = dict(shortlist_dim=4, rerank_dim=8, shortlist_k=20, k=5, timed=False)
  return retrieval.adaptive_retrieval(Q, INDEX, **{**args, **kw})


def _evaluate(**kw):
  ytr, yte = np.arange(40) % 4, np.arange(5) % 4
  args = dict(ks=(5,), shortlist_k=10)
  return evaluate_nested(X, ytr, Q, yte, (2, 4, 8), **{**args, **kw})


BAD_INPUTS = [
    # Kind 4: non-finite and raw inputs.
    ("NaN row in the database", lambda: PrefixIndex(_with(X, 7, slice(None), np.nan)),
     r"database has non-finite values .* in 1 of 40 rows: \[7\]"),
    ("one NaN element in the database", lambda: PrefixIndex(_with(X, 31, 5, np.nan)),
     r"rows: \[31\]"),
    ("inf in the database", lambda: retrieval.exact_search(Q, _with(X, 2, 0, np.inf), 3),
     r"rows: \[2\]"),
    ("NaN query", lambda: INDEX.search(_with(Q, 3, 1, np.nan), 3), r"queries\[:, :8\].*\[3\]"),
    ("NaN query, adaptive", lambda: retrieval.adaptive_retrieval(
        _with(Q, 0, 0, np.nan), INDEX, shortlist_dim=4, rerank_dim=8, shortlist_k=20, k=5),
     r"queries\[:, :8\] has non-finite"),
    ("NaN query, binary shortlist", lambda: INDEX.search(_with(Q, 1, 2, np.nan), 3, 4,
                                                         codes="ubinary"), "non-finite"),
    ("NaN row quantised",
     lambda: codes.quantize_embeddings(_with(Q, 4, 0, np.nan), "int8_symmetric"),
     r"rows: \[4\]"),
    ("1-D database in exact_search", lambda: retrieval.exact_search(Q, X[0], 3),
     r"database must be \[N, D\].*x\[None, :\]"),
    ("1-D query", lambda: INDEX.search(Q[0], 3), r"queries must be \[Q, D\].*q\[None, :\]"),
    ("integer database", lambda: PrefixIndex(X.astype(np.int32)), "floating point"),
    ("uint8 codes as a database", lambda: PrefixIndex(np.zeros((4, 2), np.uint8)),
     "hamming_search"),
    ("integer queries", lambda: INDEX.search(Q.astype(np.int32), 3), "floating point"),
    ("NaN train embeddings", lambda: evaluate_nested(_with(X, 9, 0, np.nan), np.arange(40) % 4,
                                                     Q, np.arange(5) % 4, (2, 8), ks=(5,),
                                                     shortlist_k=10),
     r"train_embeddings has non-finite .*\[9\]"),
    ("NaN test logits", lambda: _evaluate(test_logits=_with(
        RNG.standard_normal((3, 5, 4)).astype(np.float32), 1, 2, np.nan)),
     r"test_logits .*\[2\]"),
    ("NaN logits in top_k_accuracy", lambda: classification.top_k_accuracy(
        _with(LOGITS[0], 2, 1, np.nan), LABELS6), r"logits .*rows: \[2\]"),
    ("NaN logits in the cascade", lambda: cascade.confidences(_with(LOGITS, 1, 4, np.nan)),
     r"rows: \[4\]"),
    ("NaN confidences", lambda: cascade.cascade_predict(np.full((2, 3), np.nan),
                                                         np.zeros((2, 3), int), [0.5, 0.0]),
     "probabilities"),
    # Kind 3: arguments with a domain.
    ("k larger than the database", lambda: retrieval.exact_search(Q, INDEX, 41),
     r"k=41 is larger than the database \(40 items\)"),
    ("k = 0", lambda: INDEX.search(Q, 0), "k must be an int >= 1"),
    ("float k", lambda: INDEX.search(Q, 2.5), "k must be an int"),
    ("dim past the embedding", lambda: INDEX.search(Q, 3, 9), r"ints in \[1, 8\]"),
    ("default shortlist_k larger than the database",
     lambda: retrieval.adaptive_retrieval(Q, INDEX, shortlist_dim=4, rerank_dim=8),
     r"shortlist_k=200 is larger than the database \(40 items\); pass shortlist_k <= 40"),
    ("shortlist_k < k", lambda: _adaptive(shortlist_k=4), "smaller than k=5"),
    ("k = 0 in adaptive", lambda: _adaptive(k=0), "k must be an int >= 1"),
    ("rerank_dim < shortlist_dim", lambda: _adaptive(shortlist_dim=8, rerank_dim=4),
     "rerank_dim=4 is smaller"),
    ("shortlist_dim = 0", lambda: _adaptive(shortlist_dim=0), r"shortlist_dim must be an int in"),
    ("unknown codes", lambda: _adaptive(shortlist_codes="pq"), "code kind"),
    ("unknown backend", lambda: _adaptive(backend="annoy"), "backend"),
    ("unknown faiss index", lambda: _adaptive(backend="faiss", faiss_index="ivf"), "faiss_index"),
    ("hnsw_m = 1", lambda: _adaptive(hnsw_m=1), "hnsw_m"),
    ("ef_search = 0", lambda: _adaptive(ef_search=0), "ef_search"),
    ("timed not a bool", lambda: _adaptive(timed="yes"), "timed"),
    ("funnel lengths", lambda: retrieval.funnel_retrieval(Q, INDEX, (2, 8), (9, 5, 3)), "len"),
    ("default funnel on small data", lambda: retrieval.funnel_retrieval(Q, INDEX),
     r"dims must be ints in \[1, 8\]"),
    ("index option 0", lambda: PrefixIndex(X, block_size=0), "block_size must be a positive"),
    ("negative max_cached_dim", lambda: PrefixIndex(X, max_cached_dim=-1), "max_cached_dim"),
    ("index options with a built index", lambda: retrieval.exact_search(Q, INDEX, 3,
                                                                         block_size=4),
     "given with a built PrefixIndex"),
    ("normalize_prefix dim 0", lambda: normalize_prefix(X, 0), r"dim must be an int in \[1, 8\]"),
    ("codes of a prefix past D", lambda: INDEX.codes("int8_symmetric", 9), r"\[1, 8\]"),
    ("evaluate: k above N", lambda: _evaluate(ks=(50,)), r"ks: k=50 is larger than the database"),
    ("evaluate: float k", lambda: _evaluate(ks=(2.5,)), "ks must be positive ints"),
    ("evaluate: shortlist_k above N", lambda: _evaluate(shortlist_k=41),
     r"shortlist_k must be an int in \[max\(ks\)=5, N=40\]"),
    ("evaluate: shortlist_k below max(ks)", lambda: _evaluate(shortlist_k=3), "shortlist_k"),
    ("evaluate: adaptive K above N", lambda: _evaluate(adaptive=[(2, 8, 99)]),
     r"adaptive setting \(2, 8, 99\): K must be"),
    ("evaluate: adaptive D_r < D_s", lambda: _evaluate(adaptive=[(8, 2, 10)]),
     "D_r=2 is smaller"),
    ("evaluate: adaptive codes", lambda: _evaluate(adaptive=[(2, 8, 10, "pq")]), "code kind"),
    ("evaluate: float labels", lambda: evaluate_nested(X, np.zeros(40), Q, np.zeros(5, int),
                                                       (2, 8), ks=(5,)), "integer classes"),
    ("evaluate: seed", lambda: _evaluate(seed=1.5), "seed must be an int"),
    ("evaluate: tune_fraction", lambda: _evaluate(tune_fraction=1.0), "tune_fraction"),
    ("evaluate: logits shape", lambda: _evaluate(test_logits=LOGITS), "test_logits must be"),
    ("default_funnel dims", lambda: default_funnel((8, 4)), "strictly increasing"),
    ("top_k_accuracy k", lambda: classification.top_k_accuracy(LOGITS, LABELS6, 1.5),
     "must be an int"),
    ("top_k_accuracy float labels", lambda: classification.top_k_accuracy(
        LOGITS, LABELS6.astype(float)), "integer classes"),
    ("per_dim_accuracy ks", lambda: classification.per_dim_accuracy(LOGITS, LABELS6, (0,)),
     "ks must be positive"),
    ("1-NN float labels", lambda: classification.nearest_neighbor_accuracy(
        INDEX, np.zeros(40), Q, np.zeros(5, int), (4,)), "integer classes"),
    ("cascade_report dims", lambda: cascade.cascade_report(
        np.full((2, 3), 0.5), np.zeros((2, 3), int), np.zeros(3, int), [0.5, 0], [8, 4]),
     "strictly increasing"),
    ("tune_thresholds pred shape", lambda: cascade.tune_thresholds(
        np.full((2, 3), 0.5), np.zeros((2, 4), int), np.zeros(3, int)), "conf and pred"),
    ("NaN threshold", lambda: cascade.cascade_predict(
        np.full((2, 3), 0.5), np.zeros((2, 3), int), [np.nan, 0]), "thresholds must be finite"),
    ("relevance of floats", lambda: metrics.map_at_k(np.full((2, 3), 0.5), 2), "bool"),
    ("negative num_relevant", lambda: metrics.recall_at_k(np.ones((1, 2), bool), 1,
                                                          np.array([-1])), "non-negative"),
    ("overlap k above K", lambda: metrics.overlap_at_k(np.zeros((2, 3), int),
                                                       np.zeros((2, 3), int), 4), "k must be"),
]


@pytest.mark.parametrize("call,match", [pytest.param(c, m, id=d) for d, c, m in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_nan_rows_are_never_ranked():
  """The reported failure: one NaN row became the top-1 of every query. Refused now; the
  same database without that row searches normally, and a NaN outside the searched
  prefix of a query is not read."""
  x = _with(X, 11, 3, np.nan)
  with pytest.raises(ValueError, match=r"\[11\]"):
    retrieval.exact_search(Q, x, 5)
  keep = np.arange(40) != 11
  res = retrieval.exact_search(Q, x[keep], 5, timed=False)
  assert np.isfinite(res.scores).all()
  q = _with(Q, 0, 7, np.nan)  # only dims [:4] are read
  np.testing.assert_array_equal(INDEX.search(q, 5, 4)[1], INDEX.search(Q, 5, 4)[1])


def test_evaluate_nested_clamps_defaults_to_small_data():
  """``evaluate_nested(train[100, 32], ..., test[20, 32], dims=(4, 8, 16, 32), ks=(10,))``:
  the default K=200 is larger than the 100 train items: clamped, with a warning."""
  rng = np.random.default_rng(1)
  xtr, xte = rng.standard_normal((100, 32)), rng.standard_normal((20, 32))
  ytr, yte = rng.integers(0, 3, 100), rng.integers(0, 3, 20)
  with pytest.warns(UserWarning, match=r"shortlist_k=200 exceeds the database \(100 train items\)"):
    res = evaluate_nested(xtr, ytr, xte, yte, (4, 8, 16, 32), ks=(10,))
  assert [r["shortlist_k"] for r in res["adaptive"]] == [100, 100, 100]
  assert res["funnel"][0]["shortlist"][0] == 100
  # The default ks too: (10, 25, 50, 100) on 30 items keeps (10, 25).
  with pytest.warns(UserWarning, match=r"using ks=\(10, 25\)"):
    res = evaluate_nested(xtr[:30], ytr[:30], xte, yte, (4, 32), shortlist_k=30)
  assert res["ks"] == [10, 25]
  with warnings.catch_warnings():  # nothing to say when the defaults fit
    warnings.simplefilter("error")
    evaluate_nested(xtr, ytr, xte, yte, (4, 32), ks=(10,), shortlist_k=50)


def test_code_rows_in_evaluate_nested():
  rng = np.random.default_rng(2)
  xtr, xte = rng.standard_normal((120, 16)), rng.standard_normal((10, 16))
  ytr, yte = rng.integers(0, 3, 120), rng.integers(0, 3, 10)
  res = evaluate_nested(xtr, ytr, xte, yte, (4, 16), ks=(5,), shortlist_k=40,
                        adaptive=[(16, 16, 40, "ubinary"), (8, 16, 40, "int8_symmetric"),
                                  (4, 16, 40)])
  rows = res["adaptive"]
  assert [r.get("shortlist_codes") for r in rows] == ["ubinary", "int8_symmetric", None]
  assert [r["bytes_per_vector"] for r in rows] == [2, 8, 16]
  want = retrieval.adaptive_retrieval(xte.astype(np.float32), xtr.astype(np.float32),
                                      shortlist_dim=16, rerank_dim=16, shortlist_k=40, k=5,
                                      shortlist_codes="ubinary", timed=False)
  assert rows[0]["map@5"] == pytest.approx(metrics.map_at_k(
      metrics.relevance(want.ids, ytr, yte), 5))
