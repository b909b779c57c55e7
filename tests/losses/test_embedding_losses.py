"""Embedding losses, the Matryoshka wrapper, the fused nested softmax and 2-D Matryoshka."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testutil import run_python

from mrl_jax import losses

# --- explicit numpy references (float64, loops where they make the formula plain)


def _np_unit(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _np_lse(v):
  v = np.asarray(v, np.float64)
  top = v.max()
  return top + np.log(np.sum(np.exp(v - top)))


def _np_in_batch(a, p, n=None, scale=20.0):
  cands = [_np_unit(row) for row in p]
  if n is not None:
    cands += [_np_unit(row) for row in np.asarray(n).reshape(-1, np.shape(n)[-1])]
  cands = np.stack(cands)
  total = 0.0
  for i, row in enumerate(_np_unit(a)):
    logits = scale * cands @ row
    total += _np_lse(logits) - logits[i]
  return total / len(a)


def _np_symmetric(a, p, n=None, scale=20.0):
  """MultipleNegativesSymmetricRankingLoss: (anchor -> all candidates + positive -> anchors) / 2."""
  return 0.5 * (_np_in_batch(a, p, n, scale=scale) + _np_in_batch(p, a, scale=scale))


def _np_cosent(a, b, y, scale=20.0):
  s = scale * np.sum(_np_unit(a) * _np_unit(b), axis=-1)
  terms = [0.0]
  for i in range(len(s)):
    for j in range(len(s)):
      if y[i] > y[j]:
        terms.append(s[j] - s[i])
  return _np_lse(terms)


def _np_mse(s, t):
  return np.mean((np.asarray(s, np.float64) - np.asarray(t, np.float64)) ** 2)


def _np_softmax(v):
  e = np.exp(v - v.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _data(*shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# --- base losses


def test_in_batch_softmax_matches_numpy():
  a, p, n = _data(6, 10), _data(6, 10, seed=1), _data(6, 3, 10, seed=2)
  np.testing.assert_allclose(losses.in_batch_softmax(a, p), _np_in_batch(a, p), rtol=1e-5)
  np.testing.assert_allclose(losses.in_batch_softmax(a, p, n, scale=7.0),
                             _np_in_batch(a, p, n, scale=7.0), rtol=1e-5)


def test_symmetric_in_batch_softmax_matches_numpy():
  a, p = _data(5, 8), _data(5, 8, seed=1)
  np.testing.assert_allclose(losses.symmetric_in_batch_softmax(a, p), _np_symmetric(a, p),
                             rtol=1e-5)


def test_cosent_matches_numpy_with_ties():
  a, b = _data(7, 6), _data(7, 6, seed=1)
  y = np.array([0.1, 0.5, 0.5, 0.9, 0.0, 0.3, 0.9], np.float32)
  np.testing.assert_allclose(losses.cosent(a, b, y), _np_cosent(a, b, y), rtol=1e-5)
  # All scores equal: no ranked pair, so the loss is log(1) = 0 with finite gradients.
  flat = np.full(7, 0.5, np.float32)
  assert float(losses.cosent(a, b, flat)) == 0.0
  assert np.all(np.isfinite(jax.jit(jax.grad(losses.cosent))(jnp.asarray(a), b, flat)))


def test_mse_distillation_matches_numpy():
  s, t = _data(4, 9), _data(4, 9, seed=1)
  np.testing.assert_allclose(losses.mse_distillation(s, t), _np_mse(s, t), rtol=1e-6)


def test_base_losses_reject_mismatched_shapes():
  with pytest.raises(ValueError, match="same shape"):
    losses.in_batch_softmax(_data(4, 8), _data(5, 8))
  with pytest.raises(ValueError, match="negatives must be"):
    losses.in_batch_softmax(_data(4, 8), _data(4, 8), _data(4, 8))
  with pytest.raises(ValueError, match="same shape"):
    losses.mse_distillation(_data(4, 8), _data(4, 6))


# --- the Matryoshka wrapper


def test_one_dim_wrapper_equals_base_loss():
  a, p, n = _data(6, 12), _data(6, 12, seed=1), _data(6, 2, 12, seed=2)
  y = np.arange(6, dtype=np.float32)
  np.testing.assert_allclose(losses.matryoshka(losses.in_batch_softmax, [12])(a, p, n),
                             losses.in_batch_softmax(a, p, n), rtol=1e-6)
  np.testing.assert_allclose(losses.matryoshka(losses.cosent, [12])(a, p, y),
                             losses.cosent(a, p, y), rtol=1e-6)
  np.testing.assert_allclose(
      losses.matryoshka(losses.mse_distillation, [12], normalize=False)(a, p),
      losses.mse_distillation(a, p), rtol=1e-6)


def test_wrapper_is_weighted_sum_over_truncations():
  a, p, n = _data(6, 12), _data(6, 12, seed=1), _data(6, 2, 12, seed=2)
  dims, weights = (2, 5, 12), (0.5, 1.0, 2.0)
  want = sum(w * _np_in_batch(a[:, :m], p[:, :m], n[..., :m])
             for m, w in zip(dims, weights, strict=True))
  got = losses.matryoshka(losses.in_batch_softmax, dims, weights)(a, p, negatives=n)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_truncation_happens_before_normalisation():
  z = _data(5, 16)
  seen = []

  def probe(x):
    seen.append(x)
    return jnp.sum(x)

  losses.matryoshka(probe, (4, 16), embedding_args=(0,))(jnp.asarray(z))
  for x, m in zip(seen, (4, 16), strict=True):
    np.testing.assert_allclose(x, _np_unit(z[:, :m]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(x, axis=-1), 1.0, rtol=1e-5)
  seen.clear()
  losses.matryoshka(probe, (4, 16), normalize=False, embedding_args=("x",))(jnp.asarray(z))
  np.testing.assert_array_equal(seen[0], z[:, :4])


@pytest.mark.parametrize("normalize", [True, False])
def test_teachers_are_truncated_with_the_student(normalize):
  s, t = _data(6, 16), _data(6, 16, seed=1)
  dims = (4, 8, 16)
  cut = (lambda x, m: _np_unit(x[:, :m])) if normalize else (lambda x, m: x[:, :m])
  want = sum(_np_mse(cut(s, m), cut(t, m)) for m in dims)
  got = losses.matryoshka(losses.mse_distillation, dims, normalize=normalize)(s, t)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # As a keyword argument too.
  got_kw = losses.matryoshka(losses.mse_distillation, dims, normalize=normalize)(s, teacher=t)
  np.testing.assert_allclose(got_kw, want, rtol=1e-5)


def test_scores_are_not_truncated_and_explicit_embedding_args():
  a, b = _data(6, 6), _data(6, 6, seed=1)
  y = _data(6, seed=2)
  want = sum(_np_cosent(a[:, :m], b[:, :m], y) for m in (2, 6))
  np.testing.assert_allclose(losses.matryoshka(losses.cosent, (2, 6))(a, b, y), want, rtol=1e-5)
  explicit = losses.matryoshka(losses.cosent, (2, 6), embedding_args=(0, 1))
  np.testing.assert_allclose(explicit(a, b, y), want, rtol=1e-5)


def test_wrapper_errors_are_clear():
  a = _data(4, 8)
  with pytest.raises(ValueError, match="exceeds the embedding size"):
    losses.matryoshka(losses.in_batch_softmax, (4, 16))(a, a)
  with pytest.raises(ValueError, match="distinct, got 4 more than once"):
    losses.matryoshka(losses.in_batch_softmax, (8, 4, 4))
  for bad in (3, 0, -2, 1.5, True):
    with pytest.raises(ValueError, match="n_dims_per_step"):
      losses.matryoshka(losses.in_batch_softmax, (4, 8), n_dims_per_step=bad)
  with pytest.raises(ValueError, match="scalar"):
    losses.matryoshka(lambda x: x, (4, 8), embedding_args=(0,))(a)
  with pytest.raises(ValueError, match="cannot tell which arguments"):
    losses.matryoshka(lambda x: jnp.sum(x), (4, 8))
  with pytest.raises(ValueError, match="'teacher', which is not an argument"):
    losses.matryoshka(losses.in_batch_softmax, (4, 8), embedding_args=("anchors", "teacher"))
  with pytest.raises(ValueError, match="embedding_args entries"):
    losses.matryoshka(losses.in_batch_softmax, (4, 8), embedding_args=(0, 1.0))
  with pytest.raises(ValueError, match="disagree on their size D"):
    losses.matryoshka(losses.cosent, (4,))(np.arange(4.0), a, a)
  with pytest.raises(ValueError, match="always_include_largest"):
    losses.matryoshka(losses.in_batch_softmax, (4, 8), always_include_largest=True)


def _np_ce_argmax_teacher(q, d, teacher_scores, scale=20.0):
  """A distillation-style base loss: in-batch CE against the teacher's argmax document."""
  target = np.argmax(teacher_scores, axis=-1)
  total = 0.0
  for i, row in enumerate(_np_unit(q)):
    logits = scale * _np_unit(d) @ row
    total += _np_lse(logits) - logits[target[i]]
  return total / len(q)


def _ce_argmax_teacher(q, d, teacher_scores, scale=20.0):
  logits = scale * (q @ d.T)  # q, d arrive truncated and renormalised
  target = jnp.argmax(teacher_scores, axis=-1)
  return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
      logits, target[:, None], axis=-1)[:, 0])


def test_issue_15_score_matrix_is_not_truncated_when_batch_equals_dim():
  # matryoshka(base, (4, 8))(q[8, 8], d[8, 8], teacher_scores[8, 8]) used to cut the SCORE
  # matrix to its first 4 columns because B == D: which arguments are embeddings is explicit.
  q, d, scores = _data(8, 8), _data(8, 8, seed=1), _data(8, 8, seed=2)
  scores[:, 6] += 10.0  # every argmax in the columns a truncation would drop
  want = sum(_np_ce_argmax_teacher(q[:, :m], d[:, :m], scores) for m in (4, 8))
  for spec in [(0, 1), ("q", "d"), (0, "d")]:
    got = losses.matryoshka(_ce_argmax_teacher, (4, 8), embedding_args=spec)(q, d, scores)
    np.testing.assert_allclose(got, want, rtol=1e-5)
  got_kw = losses.matryoshka(_ce_argmax_teacher, (4, 8), embedding_args=("q", "d"))(
      q, d=d, teacher_scores=scores)
  np.testing.assert_allclose(got_kw, want, rtol=1e-5)
  wrong = sum(_np_ce_argmax_teacher(q[:, :m], d[:, :m], scores[:, :m]) for m in (4, 8))
  assert abs(wrong - want) > 1e-2  # the old behaviour gives a different value
  with pytest.raises(ValueError, match="cannot tell which arguments"):
    losses.matryoshka(_ce_argmax_teacher, (4, 8))
  with pytest.raises(ValueError, match="B == D == 8"):  # the shape guess is opt-in, and refuses
    losses.matryoshka(_ce_argmax_teacher, (4, 8), embedding_args="auto")(q, d, scores)
  # When B != D the opt-in guess still works (scores [B] pass through).
  a, b, y = _data(6, 8), _data(6, 8, seed=1), _data(6, seed=2)
  np.testing.assert_allclose(
      losses.matryoshka(losses.cosent, (4, 8), embedding_args="auto")(a, b, y),
      losses.matryoshka(losses.cosent, (4, 8))(a, b, y), rtol=1e-6)


def test_declared_embedding_args_cover_positional_keyword_and_partial():
  import functools
  a, p, n = _data(5, 8), _data(5, 8, seed=1), _data(5, 2, 8, seed=2)
  want = sum(_np_in_batch(a[:, :m], p[:, :m], n[..., :m], scale=9.0) for m in (2, 8))
  base = functools.partial(losses.in_batch_softmax, scale=9.0)
  nested = losses.matryoshka(base, (8, 2))
  np.testing.assert_allclose(nested(a, p, n), want, rtol=1e-5)
  np.testing.assert_allclose(nested(a, p, negatives=n), want, rtol=1e-5)
  np.testing.assert_allclose(nested(anchors=a, positives=p, negatives=n), want, rtol=1e-5)
  assert nested.embedding_args == ("anchors", "positives", "negatives")


def test_n_dims_per_step_minus_one_means_all_and_dims_in_any_order():
  a, p = _data(6, 16), _data(6, 16, seed=1)
  dims, weights = (16, 8, 2), (3.0, 2.0, 1.0)
  want = sum(w * _np_in_batch(a[:, :m], p[:, :m]) for m, w in zip(dims, weights, strict=True))
  for steps in (-1, None):
    loss = losses.matryoshka(losses.in_batch_softmax, dims, weights, n_dims_per_step=steps)
    np.testing.assert_allclose(loss(a, p), want, rtol=1e-5)
  np.testing.assert_allclose(losses.nested_in_batch_softmax(a, p, dims, weights), want,
                             rtol=1e-5)


# --- sampling sizes inside jit


_NP_BASE = {
    losses.in_batch_softmax: _np_in_batch,
    losses.cosent: _np_cosent,
    losses.mse_distillation: lambda s, t: _np_mse(_np_unit(s), _np_unit(t)),
}


@pytest.mark.parametrize("base,extra", [
    (losses.in_batch_softmax, ()),
    (losses.cosent, (np.linspace(0, 1, 6).astype(np.float32),)),
    (losses.mse_distillation, ()),
])
def test_n_dims_per_step_samples_inside_jit_without_recompiling(base, extra):
  a, b = _data(6, 16), _data(6, 16, seed=1)
  dims, weights = (2, 4, 8, 16), (1.0, 2.0, 3.0, 4.0)
  traces = []

  def counted(*args):
    traces.append(1)
    return base(*args)

  sampled = jax.jit(losses.matryoshka(counted, dims, weights, n_dims_per_step=2,
                                      embedding_args=(0, 1)))
  draw = jax.jit(losses.sample_nested_indices, static_argnums=(1, 2))
  full = [_NP_BASE[base](a[:, :m], b[:, :m], *extra) for m in dims]
  for seed in range(4):
    key = jax.random.key(seed)
    got = sampled(a, b, *extra, rng=key)
    picked = np.asarray(draw(key, len(dims), 2))
    assert len(set(picked.tolist())) == 2
    np.testing.assert_allclose(got, sum(weights[i] * full[i] for i in picked), rtol=1e-5)
  assert sampled._cache_size() == 1
  assert len(traces) == len(dims)  # each size's branch traced once, at the first call


def test_n_dims_per_step_has_gradients():
  a, b = _data(6, 16), _data(6, 16, seed=1)
  loss = losses.matryoshka(losses.in_batch_softmax, (4, 16), n_dims_per_step=1)
  grad = jax.jit(jax.grad(lambda x, k: loss(x, b, rng=k)))
  for seed in range(2):
    g = grad(jnp.asarray(a), jax.random.key(seed))
    assert np.all(np.isfinite(g)) and np.any(g != 0)


def test_always_include_largest():
  for seed in range(8):
    picked = losses.sample_nested_indices(jax.random.key(seed), 5, 2, always_include_largest=True)
    assert 4 in np.asarray(picked).tolist() and len(set(np.asarray(picked).tolist())) == 2
  a, b = _data(4, 8), _data(4, 8, seed=1)
  loss = losses.matryoshka(losses.in_batch_softmax, (2, 4, 8), n_dims_per_step=1,
                           always_include_largest=True)
  np.testing.assert_allclose(loss(a, b, rng=jax.random.key(3)), losses.in_batch_softmax(a, b),
                             rtol=1e-6)


# --- fused nested in-batch softmax


@pytest.mark.parametrize("dims,embed_dim,variant", [
    ((8, 16, 32, 64), 64, "plain"),
    ((3, 10, 40), 64, "plain"),  # does not start at 8, last dim < D
    ((5, 6, 7, 48, 90), 96, "weights"),
    ((3, 10, 40), 64, "negatives"),
    ((8, 16, 32, 64), 64, "symmetric"),
    ((3, 10, 40), 64, "symmetric_negatives"),
    ((40, 3, 10), 64, "weights_negatives"),  # dims largest first, weights follow them
])
def test_fused_equals_unfused_in_value_and_gradient(dims, embed_dim, variant):
  a, p = jnp.asarray(_data(12, embed_dim)), jnp.asarray(_data(12, embed_dim, seed=1))
  n = jnp.asarray(_data(12, 2, embed_dim, seed=2)) if "negatives" in variant else None
  weights = tuple(np.linspace(0.5, 2.0, len(dims))) if "weights" in variant else None
  symmetric = variant.startswith("symmetric")
  base = losses.symmetric_in_batch_softmax if symmetric else losses.in_batch_softmax
  unfused_loss = losses.matryoshka(base, dims, weights)

  def fused(a, p, scale):
    return losses.nested_in_batch_softmax(a, p, dims, weights, negatives=n, symmetric=symmetric,
                                          scale=scale)

  def unfused(a, p, scale):
    return unfused_loss(a, p, scale=scale) if n is None else unfused_loss(a, p, n, scale=scale)

  scale = jnp.float32(7.0)  # a learnable temperature gets its gradient too
  got_value, got_grads = jax.jit(jax.value_and_grad(fused, (0, 1, 2)))(a, p, scale)
  want_value, want_grads = jax.jit(jax.value_and_grad(unfused, (0, 1, 2)))(a, p, scale)
  np.testing.assert_allclose(got_value, want_value, rtol=1e-5)
  for got, want in zip(got_grads, want_grads, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _np_nested(a, p, n, dims, weights, scale, symmetric):
  base = _np_symmetric if symmetric else _np_in_batch
  return sum(w * base(a[:, :m], p[:, :m], None if n is None else n[..., :m], scale=scale)
             for m, w in zip(dims, weights, strict=True))


def _np_grad(fn, arrays, eps=1e-6):
  """Central finite differences of a float64 numpy function, for every input element."""
  arrays = [np.asarray(x, np.float64) for x in arrays]
  grads = []
  for i, x in enumerate(arrays):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
      up = [y.copy() for y in arrays]
      down = [y.copy() for y in arrays]
      up[i][idx] += eps
      down[i][idx] -= eps
      g[idx] = (fn(*up) - fn(*down)) / (2 * eps)
    grads.append(g)
  return grads


@pytest.mark.parametrize("symmetric", [False, True])
def test_fused_with_hard_negatives_equals_numpy_loop_in_value_and_gradient(symmetric):
  a, p, n = _data(4, 6), _data(4, 6, seed=1), _data(4, 2, 6, seed=2)
  dims, weights, scale = (6, 2, 4), (1.0, 0.5, 2.0), 5.0
  fused = lambda a, p, n: losses.nested_in_batch_softmax(
      a, p, dims, weights, negatives=n, scale=scale, symmetric=symmetric)
  got, got_grads = jax.jit(jax.value_and_grad(fused, (0, 1, 2)))(a, p, n)
  ref = lambda a, p, n: _np_nested(a, p, n, dims, weights, scale, symmetric)
  np.testing.assert_allclose(got, ref(a, p, n), rtol=1e-5)
  for g, want in zip(got_grads, _np_grad(ref, (a, p, n)), strict=True):
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5)


def test_candidate_order_does_not_change_the_value():
  # Every hard negative of the batch is a candidate for every anchor (MNRL's convention):
  # shuffling the negatives across rows changes nothing.
  a, p, n = _data(5, 16), _data(5, 16, seed=1), _data(5, 3, 16, seed=2)
  perm = np.random.default_rng(3).permutation(15)
  shuffled = n.reshape(15, 16)[perm].reshape(5, 3, 16)
  for symmetric in (False, True):
    f = lambda n, sym: losses.nested_in_batch_softmax(a, p, (4, 16), negatives=n, symmetric=sym)
    np.testing.assert_allclose(f(shuffled, symmetric), f(n, symmetric), rtol=1e-6)
  np.testing.assert_allclose(losses.in_batch_softmax(a, p, shuffled),
                             losses.in_batch_softmax(a, p, n), rtol=1e-6)


def test_symmetric_with_negatives_matches_numpy():
  a, p, n = _data(5, 8), _data(5, 8, seed=1), _data(5, 2, 8, seed=2)
  np.testing.assert_allclose(losses.symmetric_in_batch_softmax(a, p, n, scale=7.0),
                             _np_symmetric(a, p, n, scale=7.0), rtol=1e-5)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_scale_must_be_positive(scale):
  a = _data(4, 8)
  for call in (lambda: losses.in_batch_softmax(a, a, scale=scale),
               lambda: losses.symmetric_in_batch_softmax(a, a, scale=scale),
               lambda: losses.cosent(a, a, np.arange(4.0), scale=scale),
               lambda: losses.nested_in_batch_softmax(a, a, (4, 8), scale=scale)):
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
      call()


def test_embedding_argument_errors():
  a = _data(4, 8)
  with pytest.raises(ValueError, match=r"scores must be \[B\] = \[4\]"):
    losses.cosent(a, a, np.zeros((4, 1)))
  with pytest.raises(ValueError, match="temperature must be a positive"):
    losses.layer_kl_divergence(a, a, temperature=0.0)
  with pytest.raises(ValueError, match="same shape"):
    losses.layer_kl_divergence(a, a[:, :4], temperature=0.3)
  with pytest.raises(ValueError, match="symmetric must be a bool"):
    losses.nested_in_batch_softmax(a, a, (4, 8), symmetric="yes")
  with pytest.raises(ValueError, match="weights must be positive and finite"):
    losses.nested_in_batch_softmax(a, a, (4, 8), (1.0, float("nan")))


def test_fused_per_dim_and_jit():
  a, p = _data(8, 32), _data(8, 32, seed=1)
  per_dim = jax.jit(losses.nested_in_batch_softmax_per_dim, static_argnums=2)(a, p, (4, 32))
  np.testing.assert_allclose(per_dim, [_np_in_batch(a[:, :4], p[:, :4]), _np_in_batch(a, p)],
                             rtol=1e-5)
  with pytest.raises(ValueError, match="larger than the embedding size"):
    losses.nested_in_batch_softmax(a, p, (4, 64))


# --- 2-D Matryoshka


_NP_LAYER_WEIGHT = {
    "uniform": lambda layer: 1.0,
    "linear": lambda layer: 1.0 / (1 + layer),
    "log": lambda layer: 1.0 / (1 + np.log(1 + layer)),
}


def _np_adaptive(per_layer, base, last_w, prior_w, kl_w, temp, layers_used,
                 weighting="uniform"):
  """The AdaptiveLayerLoss formula over numpy per-layer arguments ``[L, B, D]``."""
  last = [x[-1] for x in per_layer]
  total = last_w * base(*last)
  for layer in layers_used:
    v = _NP_LAYER_WEIGHT[weighting](layer) / len(layers_used)
    total += prior_w * v * base(*[x[layer] for x in per_layer])
    if temp > 0:
      t = np.concatenate(last).astype(np.float64)
      s = np.concatenate([x[layer] for x in per_layer]).astype(np.float64)
      p, q = _np_softmax(t / temp), _np_softmax(s / temp)
      total += kl_w * temp * np.sum(p * (np.log(p) - np.log(q))) / len(t)
  return total


@pytest.mark.parametrize("weighting", ["uniform", "linear", "log"])
@pytest.mark.parametrize("steps", [None, -1])
def test_adaptive_layer_matches_formula_with_all_layers(weighting, steps):
  a, p = _data(4, 6, 8), _data(4, 6, 8, seed=1)
  loss = losses.adaptive_layer(losses.in_batch_softmax, n_layers_per_step=steps,
                               last_layer_weight=1.5, prior_layers_weight=0.7,
                               kl_div_weight=2.0, kl_temperature=0.3, layer_weighting=weighting)
  want = _np_adaptive([a, p], _np_in_batch, 1.5, 0.7, 2.0, 0.3, [0, 1, 2], weighting)
  np.testing.assert_allclose(loss(a, p), want, rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(layer_weighting="exp"), "layer_weighting must be one of"),
    (dict(kl_temperature=-0.1), "kl_temperature must be a non-negative finite number"),
    (dict(prior_layers_weight=float("nan")), "prior_layers_weight must be a non-negative"),
    (dict(last_layer_weight=-1.0), "last_layer_weight"),
    (dict(kl_div_weight=float("inf")), "kl_div_weight"),
    (dict(n_layers_per_step=0), "n_layers_per_step must be -1 or None"),
    (dict(n_layers_per_step=-2), "n_layers_per_step"),
    (dict(layer_args=()), "layer_args must be a non-empty sequence"),
])
def test_adaptive_layer_refuses_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    losses.adaptive_layer(losses.in_batch_softmax, **kwargs)


def test_adaptive_layer_needs_to_know_the_layer_arguments():
  with pytest.raises(ValueError, match="carry a layer axis"):
    losses.adaptive_layer(lambda a, p: jnp.sum(a * p))
  a, p = _data(3, 4, 8), _data(2, 4, 8, seed=1)
  with pytest.raises(ValueError, match="same L"):
    losses.adaptive_layer(losses.in_batch_softmax, n_layers_per_step=None)(a, p)


def test_adaptive_layer_samples_inside_jit():
  a, p = _data(5, 6, 8), _data(5, 6, 8, seed=1)
  loss = jax.jit(losses.adaptive_layer(losses.in_batch_softmax, n_layers_per_step=2))
  values = {round(float(loss(a, p, rng=jax.random.key(s))), 4) for s in range(8)}
  assert len(values) > 1 and loss._cache_size() == 1
  with pytest.raises(ValueError, match="rng"):
    losses.adaptive_layer(losses.in_batch_softmax, n_layers_per_step=2)(a, p)


def test_kl_teacher_gets_no_gradient():
  a, p = _data(3, 6, 8), _data(3, 6, 8, seed=1)
  only_kl = losses.adaptive_layer(losses.in_batch_softmax, n_layers_per_step=None,
                                  last_layer_weight=0.0, prior_layers_weight=0.0)
  grad = jax.jit(jax.grad(only_kl))(jnp.asarray(a), p)
  np.testing.assert_array_equal(grad[-1], 0.0)
  assert np.all(np.abs(grad[:-1]).sum(axis=(1, 2)) > 0)


def test_matryoshka_2d_matches_formula_when_nothing_is_sampled():
  a, p = _data(3, 6, 8), _data(3, 6, 8, seed=1)
  dims = (2, 4, 8)
  nested = lambda x, y: sum(_np_in_batch(x[:, :m], y[:, :m]) for m in dims)
  loss = losses.matryoshka_2d(losses.in_batch_softmax, dims, n_layers_per_step=-1,
                              n_dims_per_step=-1, layer_weighting="linear")
  want = _np_adaptive([a, p], nested, 1.0, 1.0, 1.0, 0.3, [0, 1], "linear")
  np.testing.assert_allclose(loss(a, p), want, rtol=1e-5)
  sampled = jax.jit(losses.matryoshka_2d(losses.in_batch_softmax, dims))
  for s in range(3):
    assert np.isfinite(float(sampled(a, p, rng=jax.random.key(s))))
  assert sampled._cache_size() == 1


def test_matryoshka_2d_with_a_distillation_teacher_that_has_no_layer_axis():
  s, t = _data(3, 6, 8), _data(6, 8, seed=1)
  loss = losses.matryoshka_2d(losses.mse_distillation, (4, 8), n_layers_per_step=None,
                              n_dims_per_step=None, kl_temperature=0.0, normalize=False,
                              layer_args=("student",))
  nested = lambda x: sum(_np_mse(x[:, :m], t[:, :m]) for m in (4, 8))
  want = nested(s[-1]) + sum(nested(s[i]) / 2 for i in range(2))  # uniform: 1 / |S|
  np.testing.assert_allclose(loss(s, t), want, rtol=1e-5)


_SHARDED = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from mrl_jax import losses
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 8, 16)).astype(np.float32)
    p = rng.normal(size=(3, 8, 16)).astype(np.float32)
    loss = losses.matryoshka_2d(losses.in_batch_softmax, (4, 16), n_layers_per_step=1,
                                n_dims_per_step=None)
    step = jax.jit(jax.value_and_grad(lambda a, p, k: loss(a, p, rng=k)))
    key = jax.random.key(1)
    want_v, want_g = step(a, p, key)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    shard = NamedSharding(mesh, P(None, "data", None))
    got_v, got_g = step(jax.device_put(a, shard), jax.device_put(p, shard), key)
    assert len(got_g.sharding.device_set) == 4, got_g.sharding
    np.testing.assert_allclose(got_v, want_v, rtol=1e-5)
    np.testing.assert_allclose(got_g, want_g, rtol=1e-4, atol=1e-6)
    print("OK")
""")


def test_matryoshka_2d_is_the_same_on_a_batch_sharded_mesh():
  assert "OK" in run_python(_SHARDED, devices=4)
