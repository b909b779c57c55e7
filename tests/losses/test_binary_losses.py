"""Binary-aware terms against slow numpy references (loops over pairs), and their gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrl_jax import losses
from mrl_jax.core import ops
from mrl_jax.losses import (
  BinaryAware,
  binary_relaxed_in_batch_softmax,
  binary_relaxed_supervised_contrastive,
  spread_out_regularizer,
)

DIMS = (4, 8, 12)


def _data(b=5, d=12, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(b, d)).astype(np.float32)
  p = (a + 0.7 * rng.normal(size=(b, d))).astype(np.float32)
  return a, p


def _unit(v):
  v = np.asarray(v, np.float64)
  return v / np.linalg.norm(v)


def _np_gor(a, p, m, non_matching=None):
  """Zhang et al. 2017 eq. 4 over the non-matching pairs (default i != j), one at a time."""
  keep = (lambda i, j: i != j) if non_matching is None else (lambda i, j: non_matching[i][j])
  s = [float(_unit(a[i, :m]) @ _unit(p[j, :m]))
       for i in range(len(a)) for j in range(len(p)) if keep(i, j)]
  if not s:
    return 0.0
  m1, m2 = np.mean(s), np.mean(np.square(s))
  return m1 ** 2 + max(0.0, m2 - 1.0 / m)


def _np_code(x, m, t, estimator):
  u = np.sqrt(m) * _unit(x[:m]) / t
  return np.tanh(u) if estimator == "tanh" else np.where(u > 0, 1.0, -1.0)


def _np_binary_softmax(a, p, m, scale, t, estimator):
  total = 0.0
  for i in range(len(a)):
    ca = _np_code(a[i], m, t, estimator)
    logits = [scale * float(ca @ _np_code(p[j], m, t, estimator)) / m for j in range(len(p))]
    top = max(logits)
    total += top + np.log(sum(np.exp(v - top) for v in logits)) - logits[i]
  return total / len(a)


def test_spread_out_regularizer_matches_the_numpy_reference_at_every_dim():
  a, p = _data()
  got = spread_out_regularizer(a, p, (12, 4, 8))  # any order: ascending out
  assert got.shape == (3,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, [_np_gor(a, p, m) for m in DIMS], rtol=1e-5, atol=1e-7)
  # Rows of any scale give the same value (truncate, then normalise).
  np.testing.assert_allclose(spread_out_regularizer(1e20 * a, 1e-20 * p, DIMS), got, rtol=1e-5)
  # Identical non-matching directions are penalised hardest: M1 = M2 = 1.
  ones = np.ones((3, 4), np.float32)
  np.testing.assert_allclose(spread_out_regularizer(ones, ones, (4,)), [1 + 1 - 1 / 4],
                             rtol=1e-6)


@pytest.mark.parametrize("estimator", ["tanh", "ste"])
def test_binary_relaxed_softmax_matches_the_numpy_reference(estimator):
  a, p = _data(seed=1)
  got = jax.jit(lambda a, p: binary_relaxed_in_batch_softmax(
      a, p, DIMS, scale=10.0, temperature=0.5, estimator=estimator))(a, p)
  assert got.shape == (3,) and got.dtype == jnp.float32
  want = [_np_binary_softmax(a, p, m, 10.0, 0.5, estimator) for m in DIMS]
  np.testing.assert_allclose(got, want, rtol=1e-5)


def _np_supcon(x, labels, m, scale, t, estimator):
  """Khosla et al. 2020 eq. 2 (L_out) on relaxed codes, one anchor and positive at a time."""
  codes = [_np_code(row, m, t, estimator) for row in x]
  per_anchor = []
  for i in range(len(x)):
    others = [j for j in range(len(x)) if j != i]
    positives = [j for j in others if labels[j] == labels[i]]
    if not positives:
      continue
    logits = {j: scale * float(codes[i] @ codes[j]) / m for j in others}
    lse = np.log(sum(np.exp(v) for v in logits.values()))
    per_anchor.append(-np.mean([logits[p] - lse for p in positives]))
  return float(np.mean(per_anchor)) if per_anchor else 0.0


@pytest.mark.parametrize("estimator", ["tanh", "ste"])
def test_supervised_contrastive_on_codes_matches_the_numpy_reference(estimator):
  x, _ = _data(b=7, seed=7)
  labels = np.array([0, 1, 0, 2, 1, 0, 3])  # class 2 and 3: one row each, no positive
  mask = labels[:, None] == labels[None, :]
  got = jax.jit(lambda x, mask: binary_relaxed_supervised_contrastive(
      x, mask, DIMS, scale=10.0, temperature=0.5, estimator=estimator))(x, mask)
  assert got.shape == (3,) and got.dtype == jnp.float32
  want = [_np_supcon(x, labels, m, 10.0, 0.5, estimator) for m in DIMS]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_array_equal(losses.binary.same_label_mask(jnp.asarray(labels)), mask)
  # No row with a positive: 0, not NaN.
  alone = np.eye(7, dtype=bool)
  np.testing.assert_array_equal(binary_relaxed_supervised_contrastive(x, alone, DIMS), 0.0)


def test_spread_out_over_a_mask_of_non_matching_pairs_matches_the_reference():
  x, _ = _data(b=6, seed=8)
  labels = np.array([0, 0, 1, 1, 2, 0])
  non_matching = labels[:, None] != labels[None, :]
  got = spread_out_regularizer(x, x, DIMS, non_matching=non_matching)
  np.testing.assert_allclose(got, [_np_gor(x, x, m, non_matching) for m in DIMS],
                             rtol=1e-5, atol=1e-7)
  none = np.zeros((6, 6), bool)  # every row one class: nothing to spread, 0
  np.testing.assert_array_equal(spread_out_regularizer(x, x, DIMS, non_matching=none), 0.0)
  with pytest.raises(ValueError, match=r"\[B, B\]"):
    spread_out_regularizer(x, x, DIMS, non_matching=non_matching[:3])
  with pytest.raises(ValueError, match="bool"):
    spread_out_regularizer(x, x, DIMS, non_matching=non_matching.astype(np.float32))


def test_binary_aware_weights_and_sums_the_terms_and_is_off_at_zero():
  x, p = _data(b=6, seed=9)
  weights = (1.0, 0.5, 2.0)
  assert BinaryAware.create(DIMS, weights, spread_out_weight=0.0, binary_weight=0) is None
  terms = BinaryAware.create(DIMS, weights, spread_out_weight=0.3, binary_weight=0.7,
                             scale=10.0, temperature=0.5)
  w = np.asarray(weights)
  total, metrics = terms.pairs(x, p)
  gor = spread_out_regularizer(x, p, DIMS)
  soft = binary_relaxed_in_batch_softmax(x, p, DIMS, scale=10.0, temperature=0.5)
  np.testing.assert_allclose(total, 0.3 * np.sum(w * gor) + 0.7 * np.sum(w * soft), rtol=1e-6)
  np.testing.assert_allclose(metrics["spread_out_per_dim"], gor)
  labels = np.array([0, 1, 0, 1, 2, 2])
  mask = labels[:, None] == labels[None, :]
  total, metrics = terms.grouped(x, mask)
  gor = spread_out_regularizer(x, x, DIMS, non_matching=~mask)
  sup = binary_relaxed_supervised_contrastive(x, mask, DIMS, scale=10.0, temperature=0.5)
  np.testing.assert_allclose(total, 0.3 * np.sum(w * gor) + 0.7 * np.sum(w * sup), rtol=1e-6)
  np.testing.assert_allclose(metrics["binary_loss_per_dim"], sup)
  only = BinaryAware.create(DIMS, weights, spread_out_weight=0.0, binary_weight=1.0)
  assert set(only.pairs(x, p)[1]) == {"binary_loss_per_dim"}
  with pytest.raises(ValueError, match="spread_out_weight"):
    BinaryAware.create(DIMS, weights, spread_out_weight=-1.0, binary_weight=0.0)
  with pytest.raises(ValueError, match="weights"):
    BinaryAware.create(DIMS, weights[:2], spread_out_weight=1.0, binary_weight=0.0)


def test_ste_similarity_is_the_hamming_similarity_of_ubinary_codes():
  a, p = _data(b=6, d=16, seed=2)
  m = 16
  bits = lambda x: np.unpackbits(np.asarray(ops.quantize(ops.truncate_normalize(x, m),
                                                         "ubinary")), axis=-1)[:, :m]
  hamming = (bits(a)[:, None, :] != bits(p)[None, :, :]).sum(-1)
  sims = 1.0 - 2.0 * hamming / m
  scale = 7.0
  logits = scale * sims
  want = np.mean([np.log(np.exp(row).sum()) - row[i] for i, row in enumerate(logits)])
  got = binary_relaxed_in_batch_softmax(a, p, (m,), scale=scale, estimator="ste")
  np.testing.assert_allclose(got, [want], rtol=1e-5)


def test_tanh_tends_to_the_sign_as_the_temperature_falls():
  a, p = _data(seed=3)
  sign = jax.jit(lambda a, p: binary_relaxed_in_batch_softmax(a, p, DIMS, estimator="ste"))(a, p)
  cold = jax.jit(lambda a, p: binary_relaxed_in_batch_softmax(a, p, DIMS, temperature=1e-4))(a, p)
  np.testing.assert_allclose(cold, sign, rtol=1e-3)


def test_gradients_are_finite_and_ste_passes_identity_within_the_clip():
  a, p = _data(seed=4)
  for fn in (lambda a, p: jnp.sum(spread_out_regularizer(a, p, DIMS)),
             lambda a, p: jnp.sum(binary_relaxed_in_batch_softmax(a, p, DIMS)),
             lambda a, p: jnp.sum(binary_relaxed_in_batch_softmax(a, p, DIMS,
                                                                  estimator="ste"))):
    ga, gp = jax.jit(jax.grad(fn, argnums=(0, 1)))(a, p)
    assert np.isfinite(ga).all() and np.isfinite(gp).all() and np.abs(ga).sum() > 0
  # Zero rows stay finite (normalisation leaves them zero).
  zero = np.zeros_like(a)
  assert np.isfinite(jax.jit(jax.grad(
      lambda x: jnp.sum(spread_out_regularizer(x, p, DIMS))))(zero)).all()

  # Within the clip |v| <= 1 the STE's gradient is the identity's (sign forward,
  # v backward); outside it, zero.
  v = jnp.asarray(np.random.default_rng(5).uniform(-2, 2, size=(64,)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(6).normal(size=(64,)), jnp.float32)
  ste = jax.grad(lambda v: jnp.sum(w * losses.binary.relaxed_sign(v, "ste")))(v)
  identity = jax.grad(lambda v: jnp.sum(w * (v + jax.lax.stop_gradient(jnp.sign(v) - v))))(v)
  inside = np.abs(np.asarray(v)) < 1
  assert 0 < inside.sum() < len(inside)
  np.testing.assert_array_equal(np.asarray(ste)[inside], np.asarray(identity)[inside])
  np.testing.assert_array_equal(np.asarray(ste)[~inside], 0.0)
  np.testing.assert_array_equal(losses.binary.relaxed_sign(v, "ste"), np.where(v > 0, 1, -1))


def test_bad_arguments_raise_clear_errors():
  a, p = _data()
  with pytest.raises(ValueError, match="same shape"):
    spread_out_regularizer(a, p[:, :8], DIMS)
  with pytest.raises(ValueError, match="B >= 2"):
    spread_out_regularizer(a[:1], p[:1], DIMS)
  with pytest.raises(ValueError, match="dim"):
    spread_out_regularizer(a, p, (4, 64))
  with pytest.raises(ValueError, match="estimator"):
    binary_relaxed_in_batch_softmax(a, p, DIMS, estimator="sign")
  with pytest.raises(ValueError, match="temperature"):
    binary_relaxed_in_batch_softmax(a, p, DIMS, temperature=0.0)
  with pytest.raises(ValueError, match="scale"):
    binary_relaxed_in_batch_softmax(a, p, DIMS, scale=float("nan"))
