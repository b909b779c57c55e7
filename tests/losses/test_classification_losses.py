import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrl_jax.losses import nested_loss_per_dim, nested_softmax_cross_entropy


def _reference(logits, labels, weights=None, label_smoothing=0.0, mask=None):
  """An explicit loop: per dim, per example log-softmax, smoothed target, weights."""
  logits = np.asarray(logits, np.float64)
  num_dims, batch, num_classes = logits.shape
  weights = np.ones(num_dims) if weights is None else np.asarray(weights, np.float64)
  mask = np.ones(batch) if mask is None else np.asarray(mask, np.float64)
  total = 0.0
  for m in range(num_dims):
    losses = []
    for b in range(batch):
      row = logits[m, b]
      logp = row - row.max() - np.log(np.sum(np.exp(row - row.max())))
      target = np.full(num_classes, label_smoothing / num_classes)
      target[labels[b]] += 1.0 - label_smoothing
      losses.append(-np.sum(target * logp) * mask[b])
    total += weights[m] * np.sum(losses) / mask.sum()
  return total


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("use_weights", [False, True])
def test_nested_ce_equals_explicit_reference(smoothing, use_weights):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 9, 7)).astype(np.float32) * 3
  labels = rng.integers(0, 7, size=9)
  weights = rng.uniform(0.2, 2.0, size=4) if use_weights else None
  got = nested_softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                                     weights=weights, label_smoothing=smoothing)
  np.testing.assert_allclose(got, _reference(logits, labels, weights, smoothing), rtol=1e-5)


def test_loss_is_a_sum_over_dims_not_a_mean():
  logits = jnp.zeros((3, 2, 4))
  labels = jnp.array([0, 1])
  np.testing.assert_allclose(nested_softmax_cross_entropy(logits, labels), 3 * np.log(4),
                             rtol=1e-6)


def test_masked_rows_do_not_count():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 6, 5)).astype(np.float32)
  labels = rng.integers(0, 5, size=6)
  mask = np.array([1, 1, 0, 1, 0, 0], np.float32)
  got = nested_softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), mask=mask,
                                     label_smoothing=0.1)
  np.testing.assert_allclose(got, _reference(logits, labels, None, 0.1, mask), rtol=1e-5)
  keep = mask.astype(bool)
  np.testing.assert_allclose(
      nested_loss_per_dim(jnp.asarray(logits), jnp.asarray(labels), mask=mask),
      nested_loss_per_dim(jnp.asarray(logits[:, keep]), jnp.asarray(labels[keep])), rtol=1e-6)


def test_bf16_logits_are_stable():
  # Large bf16 logits: a bf16 log-softmax would overflow or lose the answer.
  logits = jnp.array([[[300.0, 0.0, -300.0]], [[0.0, 250.0, 0.0]]], jnp.bfloat16)
  labels = jnp.array([1])
  got = nested_softmax_cross_entropy(logits, labels)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, 300.0, rtol=1e-3)
  grads = jax.grad(lambda x: nested_softmax_cross_entropy(x, labels))(logits.astype(jnp.float32))
  assert np.all(np.isfinite(grads))


@pytest.mark.parametrize("kwargs,match", [
    (dict(weights=[1.0, 1.0]), r"weights must have shape \(3,\)"),
    (dict(weights=[1.0, float("nan"), 1.0]), "weights must be positive and finite"),
    (dict(weights=[1.0, -1.0, 1.0]), "weights must be positive and finite"),
    (dict(label_smoothing=1.5), r"label_smoothing must be a number in \[0, 1\), got 1.5"),
    (dict(label_smoothing=-0.1), r"label_smoothing .* got -0.1"),
    (dict(label_smoothing=1.0), r"label_smoothing .* got 1.0"),
    (dict(label_smoothing=float("nan")), r"label_smoothing .* got nan"),
    (dict(label_smoothing=True), r"label_smoothing .* got True"),
    (dict(mask=np.ones(3)), r"mask must be \[B\]"),
])
def test_bad_arguments_are_refused_by_name(kwargs, match):
  # Issue 15, kind 3: label_smoothing=1.5 (or -0.1, 1.0) used to return a finite loss.
  with pytest.raises(ValueError, match=match):
    nested_softmax_cross_entropy(jnp.zeros((3, 2, 4)), jnp.array([0, 1]), **kwargs)


@pytest.mark.parametrize("logits,labels,match", [
    (np.zeros((2, 4)), np.array([0, 1]), r"logits must be \[M, B, C\]"),
    (np.zeros((3, 2, 4)), np.array([0, 1, 2]), r"labels must be \[B\] = \[2\]"),
    (np.zeros((3, 2, 4)), np.array([[0], [1]]), r"labels must be \[B\]"),
    (np.zeros((3, 2, 4)), np.array([0.0, 1.0]), "labels must be integer"),
    (np.zeros((3, 2, 4), np.int32), np.array([0, 1]), "logits must be floating"),
])
def test_shapes_that_would_broadcast_are_refused(logits, labels, match):
  with pytest.raises(ValueError, match=match):
    nested_loss_per_dim(jnp.asarray(logits), jnp.asarray(labels))
