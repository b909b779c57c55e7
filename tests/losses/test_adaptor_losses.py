"""Matryoshka-Adaptor: model, losses (vs numpy references), PCA and evaluation, a tiny run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mrl_jax.evaluate import adaptor as ev
from mrl_jax.losses import adaptor as al
from mrl_jax.models.adaptor import MatryoshkaAdaptor

DIMS = (2, 4, 8)


def _cos(x):
  x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return x @ x.T


def _pair_ref(e, f, dims, power=1):
  s = _cos(e.astype(np.float64))
  b = e.shape[0]
  out = []
  for m in dims:
    gap = np.abs(s - _cos(f[:, :m].astype(np.float64))) ** power
    out.append(sum(gap[i, j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1)))
  return np.array(out)


def _topk_ref(e, f, dims, k, power=1):
  s = _cos(e.astype(np.float64))
  b = e.shape[0]
  out = []
  for m in dims:
    sm = _cos(f[:, :m].astype(np.float64))
    total = 0.0
    for i in range(b):
      others = [j for j in np.argsort(-s[i], kind="stable") if j != i][:k]
      total += sum(abs(s[i, j] - sm[i, j]) ** power for j in others)
    out.append(total / (b * k))
  return np.array(out)


def _rank_ref(q, d, dims, scale):
  out = []
  for m in dims:
    logits = scale * _cos_ab(q[:, :m], d[:, :m])
    lse = np.log(np.sum(np.exp(logits), axis=1))
    out.append(np.mean(lse - np.diag(logits)))
  return np.array(out)


def _cos_ab(a, b):
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return a @ b.T


@pytest.fixture
def batch():
  rng = np.random.default_rng(0)
  e = rng.normal(size=(7, 8)).astype(np.float32)
  f = (e + 0.5 * rng.normal(size=e.shape)).astype(np.float32)
  return e, f


# -- model ------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden", [(), (16,), (16, 8)])
def test_adaptor_starts_as_identity(hidden):
  e = np.random.default_rng(1).normal(size=(5, 12)).astype(np.float32)
  model = MatryoshkaAdaptor(hidden=hidden, activation="gelu")
  params = model.init(jax.random.key(0), e)
  out = model.apply(params, e)
  assert out.shape == (5, 12) and out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), e)
  assert params["params"]["out"]["kernel"].shape == ((hidden or (12,))[-1], 12)


def test_adaptor_learns_away_from_identity():
  e = np.random.default_rng(2).normal(size=(6, 8)).astype(np.float32)
  model = MatryoshkaAdaptor(hidden=(16,))
  params = model.init(jax.random.key(0), e)
  grads = jax.grad(lambda p: al.adaptor_loss(e, model.apply(p, e), (2, 8), k=2)[0])(params)
  assert float(jnp.abs(grads["params"]["out"]["kernel"]).sum()) > 0


def test_adaptor_rejects_bad_inputs():
  model = MatryoshkaAdaptor(hidden=(4,))
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    model.init(jax.random.key(0), jnp.zeros((2, 3, 4)))
  with pytest.raises(ValueError, match="activation"):
    MatryoshkaAdaptor(activation="swish!").init(jax.random.key(0), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="hidden"):
    MatryoshkaAdaptor(hidden=(0,)).init(jax.random.key(0), jnp.zeros((2, 4)))


# -- losses vs numpy ------------------------------------------------------------------------


def test_pairwise_loss_matches_numpy(batch):
  e, f = batch
  got = al.pairwise_similarity_loss_per_dim(e, f, DIMS)
  np.testing.assert_allclose(got, _pair_ref(e, f, DIMS), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_topk_loss_matches_numpy(batch, k):
  e, f = batch
  got = al.topk_similarity_loss_per_dim(e, f, DIMS, k=k)
  np.testing.assert_allclose(got, _topk_ref(e, f, DIMS, k), rtol=1e-5, atol=1e-6)


def test_squared_gaps_match_numpy(batch):
  e, f = batch
  np.testing.assert_allclose(al.pairwise_similarity_loss_per_dim(e, f, DIMS, gap="squared"),
                             _pair_ref(e, f, DIMS, power=2), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(al.topk_similarity_loss_per_dim(e, f, DIMS, k=2, gap="squared"),
                             _topk_ref(e, f, DIMS, 2, power=2), rtol=1e-5, atol=1e-7)
  loss, _ = al.adaptor_loss(e, f, DIMS, k=2, gap="squared")
  np.testing.assert_allclose(loss, np.sum(_pair_ref(e, f, DIMS, 2) + _topk_ref(e, f, DIMS, 2, 2)),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="gap must be"):
    al.adaptor_loss(e, f, DIMS, gap="huber")


def test_topk_with_all_neighbours_is_pairwise(batch):
  e, f = batch
  np.testing.assert_allclose(al.topk_similarity_loss_per_dim(e, f, DIMS, k=e.shape[0] - 1),
                             al.pairwise_similarity_loss_per_dim(e, f, DIMS), rtol=1e-5)


def test_reconstruction_loss_matches_numpy(batch):
  e, f = batch
  want = np.mean(np.sum(np.abs(f.astype(np.float64) - e), axis=1))
  np.testing.assert_allclose(al.reconstruction_loss(e, f), want, rtol=1e-5)


def test_ranking_loss_matches_numpy(batch):
  e, f = batch
  got = al.ranking_loss_per_dim(e, f, DIMS, scale=5.0)
  np.testing.assert_allclose(got, _rank_ref(e.astype(np.float64), f, DIMS, 5.0), rtol=1e-4)


def test_similarity_losses_vanish_when_prefixes_keep_the_geometry():
  # f puts all of e in its first 3 dims (zeros after): every prefix >= 3 has e's cosines.
  e = np.random.default_rng(3).normal(size=(6, 3)).astype(np.float32)
  e = np.concatenate([e, np.zeros((6, 5), np.float32)], axis=1)
  np.testing.assert_allclose(al.pairwise_similarity_loss_per_dim(e, e, (4, 8)), 0, atol=1e-6)
  np.testing.assert_allclose(al.topk_similarity_loss_per_dim(e, e, (4, 8), k=2), 0, atol=1e-6)
  assert float(al.pairwise_similarity_loss_per_dim(e, e, (2,))[0]) > 0.01


def test_adaptor_loss_combines_the_parts(batch):
  e, f = batch
  q, d = e[:4], f[:4]
  weights = (1.0, 2.0, 0.5)
  loss, metrics = al.adaptor_loss(e, f, DIMS, weights, k=3, topk_weight=1.5, pair_weight=0.7,
                                  reconstruction_weight=0.01, rank_weight=2.0,
                                  adapted_queries=q, adapted_documents=d, scale=5.0)
  w = np.array(weights)
  topk = w @ _topk_ref(e, f, DIMS, 3)
  pair = w @ _pair_ref(e, f, DIMS)
  rank = w @ _rank_ref(q.astype(np.float64), d, DIMS, 5.0)
  rec = np.mean(np.sum(np.abs(f.astype(np.float64) - e), axis=1))
  np.testing.assert_allclose(loss, 1.5 * topk + 0.7 * pair + 0.01 * rec + 2.0 * rank, rtol=1e-4)
  np.testing.assert_allclose(metrics["rank"], rank, rtol=1e-4)
  np.testing.assert_allclose(metrics["pair/dim_4"], _pair_ref(e, f, (4,))[0], rtol=1e-5)
  assert set(metrics) == {"loss", "topk", "pair", "rank", "reconstruction",
                          *(f"{n}/dim_{m}" for n in ("topk", "pair", "rank") for m in DIMS)}
  # Unsupervised: no rank term; a zero weight drops its term.
  loss_u, metrics_u = jax.jit(lambda a, b: al.adaptor_loss(a, b, DIMS, k=3, pair_weight=0.0))(e, f)
  np.testing.assert_allclose(loss_u, np.sum(_topk_ref(e, f, DIMS, 3)), rtol=1e-5)
  assert "rank" not in metrics_u and "pair" not in metrics_u


def test_losses_reject_bad_arguments(batch):
  e, f = batch
  with pytest.raises(ValueError, match="larger than the embedding size"):
    al.adaptor_loss(e, f, (4, 16))
  with pytest.raises(ValueError, match="distinct"):  # any order is fine (stored ascending)
    al.adaptor_loss(e, f, (4, 4))
  with pytest.raises(ValueError, match="same shape"):
    al.adaptor_loss(e, f[:, :4], (2,))
  with pytest.raises(ValueError, match="k must be"):
    al.adaptor_loss(e, f, DIMS, k=7)
  with pytest.raises(ValueError, match="pair_weight"):
    al.adaptor_loss(e, f, DIMS, pair_weight=-1.0)
  with pytest.raises(ValueError, match="both adapted_queries"):
    al.adaptor_loss(e, f, DIMS, adapted_queries=e)


# -- PCA and evaluation ------------------------------------------------------------------------


def test_pca_matches_numpy_eig():
  rng = np.random.default_rng(4)
  x = (rng.normal(size=(50, 6)) * np.array([5, 3, 2, 1, 0.5, 0.1])).astype(np.float32)
  pca = ev.fit_pca(x)
  cov = np.cov(x.astype(np.float64), rowvar=False, bias=True)
  vals, vecs = np.linalg.eigh(cov)
  np.testing.assert_allclose(pca.explained_variance, vals[::-1], rtol=1e-4)
  for i in range(6):  # same axes up to sign; the sign rule: largest entry positive
    v = vecs[:, 5 - i] * np.sign(vecs[np.argmax(np.abs(vecs[:, 5 - i])), 5 - i])
    np.testing.assert_allclose(pca.components[i], v, atol=1e-4)
  np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(6), atol=1e-5)
  np.testing.assert_allclose(pca(x, 2), pca(x)[:, :2], rtol=1e-6)
  uncentred = ev.fit_pca(x, center=False)
  np.testing.assert_array_equal(uncentred.mean, 0)


def test_ndcg_matches_hand_computation():
  rel = np.array([[0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
  num_rel = np.array([2, 1, 3])
  want = [(1 / np.log2(3) + 1 / np.log2(5)) / (1 + 1 / np.log2(3)), 1.0, 0.0]
  np.testing.assert_allclose(ev.ndcg_at_k(rel, 4, num_rel), np.mean(want))
  np.testing.assert_allclose(ev.ndcg_at_k(rel[:, :1], 1, num_rel), 1 / 3)


def _neighbours_ref(q, db, k, exclude):
  s = _cos_ab(q.astype(np.float64), db.astype(np.float64))
  if exclude is not None:
    s[np.arange(len(q)), exclude] = -np.inf
  return np.argsort(-s, axis=1, kind="stable")[:, :k]


def test_neighbor_recall_matches_numpy():
  rng = np.random.default_rng(5)
  db = rng.normal(size=(40, 8)).astype(np.float32)
  reduced = (db @ rng.normal(size=(8, 8))).astype(np.float32)
  ids = np.arange(0, 40, 3)
  got = ev.neighbor_recall(db, reduced, (2, 8), query_ids=ids, k=5)
  truth = _neighbours_ref(db[ids], db, 5, ids)
  for m in (2, 8):
    found = _neighbours_ref(reduced[ids, :m], reduced[:, :m], 5, ids)
    want = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(found, truth, strict=True)])
    assert got[m] == pytest.approx(want)
  # The identity (and any rotation) at full size recovers every neighbour.
  assert ev.neighbor_recall(db, db, (8,), k=5)[8] == 1.0
  rotation = np.linalg.qr(rng.normal(size=(8, 8)))[0].astype(np.float32)
  assert ev.neighbor_recall(db, db @ rotation, (8,), k=5)[8] == pytest.approx(1.0)


def test_pair_metrics_match_numpy():
  rng = np.random.default_rng(6)
  docs = rng.normal(size=(30, 6)).astype(np.float32)
  queries = (docs[:10] + 0.8 * rng.normal(size=(10, 6))).astype(np.float32)
  pairs = np.array([[i, i] for i in range(10)] + [[0, 20], [3, 21]])
  got = ev.pair_metrics(queries, docs, pairs, (3, 6), k=5)
  for m in (3, 6):
    ranked = _neighbours_ref(queries[:, :m], docs[:, :m], 5, None)
    relevant = [{d for q, d in pairs if q == i} for i in range(10)]
    recall = np.mean([len(set(r) & rel) / len(rel)
                      for r, rel in zip(ranked, relevant, strict=True)])
    assert got[m]["recall@5"] == pytest.approx(recall)
    rel = np.array([[d in s for d in r] for r, s in zip(ranked, relevant, strict=True)])
    assert got[m]["ndcg@5"] == pytest.approx(
        ev.ndcg_at_k(rel, 5, np.array([len(s) for s in relevant])))


def test_evaluation_rejects_bad_inputs():
  x = np.ones((4, 3), np.float32)
  with pytest.raises(ValueError, match=r"must be \[N, D\]"):
    ev.check_embeddings(np.ones((4, 3, 2)))
  bad = x.copy()
  bad[1, 2] = np.nan
  bad[3, 0] = np.inf
  with pytest.raises(ValueError, match="rows 1, 3"):
    ev.check_embeddings(bad)
  with pytest.raises(ValueError, match="rows 1, 3"):
    ev.fit_pca(bad)
  with pytest.raises(ValueError, match="larger than the embedding size"):
    ev.neighbor_recall(x, x, (2, 4), k=1)
  with pytest.raises(ValueError, match=r"pairs rows \[1\] have document ids \[7\] outside"):
    ev.check_pairs([[0, 1], [1, 7]], num_queries=2, num_documents=5)
  with pytest.raises(ValueError, match="query ids"):
    ev.check_pairs([[-1, 1]], num_queries=2, num_documents=5)
  with pytest.raises(ValueError, match=r"\[P, 2\]"):
    ev.check_pairs([0, 1, 2], num_queries=2, num_documents=5)
  with pytest.raises(ValueError, match="needs at least"):
    ev.neighbor_recall(x, x, (3,), k=4)


# -- a tiny run on data with a known low-dimensional structure -------------------------------------


def _low_rank_data(rng, n, dim=64, rank=6, noise=0.05):
  """A rank-``rank`` Gaussian signal rotated into dims ``8:`` (none in the first 8), plus noise.

  The exact neighbours are the signal's; truncation to 8 dims sees only noise.
  """
  basis = np.linalg.qr(rng.normal(size=(dim - 8, rank)))[0]
  x = np.zeros((n, dim))
  x[:, 8:] = rng.normal(size=(n, rank)) @ basis.T
  return (x + noise * rng.normal(size=(n, dim))).astype(np.float32)


def test_tiny_run_moves_the_structure_into_the_8_dim_prefix():
  rng = np.random.default_rng(0)
  data = _low_rank_data(rng, 600)
  train, test = data[:400], data[400:]
  dims = (8, 16, 32, 64)
  model = MatryoshkaAdaptor(hidden=())
  params = model.init(jax.random.key(0), train[:2])
  opt = optax.adam(1e-3)
  state = opt.init(params)

  @jax.jit
  def step(params, state, batch):
    def loss_fn(p):
      return al.adaptor_loss(batch, model.apply(p, batch), dims, k=10)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  first = None
  for _ in range(300):
    params, state, loss = step(params, state, train[rng.choice(400, 128, replace=False)])
    first = float(loss) if first is None else first
  assert float(loss) < 0.5 * first
  adapt = jax.jit(lambda e: model.apply(params, e))
  results = ev.compare_reductions(
      {"truncate": lambda e: e, "pca": ev.fit_pca(train, center=False),
       "adaptor": lambda e: np.asarray(adapt(e))}, test, dims, k=10)["neighbor_recall@10"]
  assert results["truncate"][8] < 0.15
  assert results["adaptor"][8] > results["truncate"][8] + 0.6
  assert results["adaptor"][8] > 0.8 * results["pca"][8]
  table = ev.format_reduction_table({"neighbor_recall@10": results})
  assert "adaptor" in table and "    8" in table
