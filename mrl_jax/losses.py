"""Nested (Matryoshka) losses, as pure functions over arrays.

The Matryoshka objective is a weighted **sum** over the nested sizes of an
ordinary loss computed on each prefix: ``L = sum_m c_m * L(head_m(z[:, :m]), y)``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def softmax_cross_entropy_per_dim(
    logits: jax.Array,
    labels: jax.Array,
    *,
    label_smoothing: float = 0.0,
) -> jax.Array:
  """Per-example cross-entropy at every nested size.

  With ``eps = label_smoothing`` the target is ``(1 - eps) * onehot(y) + eps / C``
  (PyTorch's ``nn.CrossEntropyLoss(label_smoothing=eps)``), and
  ``CE[m, b] = -sum_c target[b, c] * log_softmax(logits[m, b])[c]``.
  The log-softmax is computed in float32 whatever the logits' dtype.

  Args:
    logits: ``[M, B, C]`` (any float dtype, e.g. bfloat16).
    labels: ``[B]`` integer class ids.
    label_smoothing: ``eps`` in ``[0, 1)``.

  Returns:
    ``[M, B]`` float32 losses.
  """
  chex.assert_rank(logits, 3)
  chex.assert_rank(labels, 1)
  chex.assert_equal(logits.shape[1], labels.shape[0])
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[None, :, None].astype(jnp.int32), axis=-1)[..., 0]
  if not label_smoothing:
    return nll
  smooth = -jnp.mean(logp, axis=-1)
  return (1.0 - label_smoothing) * nll + label_smoothing * smooth


def nested_softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    weights: jax.Array | None = None,
    label_smoothing: float = 0.0,
    mask: jax.Array | None = None,
) -> jax.Array:
  """The Matryoshka classification loss: ``sum_m w_m * mean_b CE(logits[m, b], y_b)``.

  The same value as the PyTorch reference's ``Matryoshka_CE_Loss`` over
  ``nn.CrossEntropyLoss(label_smoothing=...)``: a sum over nested sizes, a mean
  over the batch.

  Args:
    logits: ``[M, B, C]``.
    labels: ``[B]`` integer class ids.
    weights: ``[M]`` relative importance per size; all ones when ``None``.
    label_smoothing: see :func:`softmax_cross_entropy_per_dim`.
    mask: optional ``[B]`` 0/1 weights (padding rows get 0); the batch mean is
      then over the unmasked rows.

  Returns:
    A float32 scalar.
  """
  per_dim = nested_loss_per_dim(logits, labels, label_smoothing=label_smoothing, mask=mask)
  if weights is None:
    return jnp.sum(per_dim)
  weights = jnp.asarray(weights, jnp.float32)
  chex.assert_shape(weights, per_dim.shape)
  return jnp.sum(weights * per_dim)


def nested_loss_per_dim(
    logits: jax.Array,
    labels: jax.Array,
    *,
    label_smoothing: float = 0.0,
    mask: jax.Array | None = None,
) -> jax.Array:
  """Batch-mean cross-entropy at each nested size, ``[M, B, C] -> [M]`` float32."""
  ce = softmax_cross_entropy_per_dim(logits, labels, label_smoothing=label_smoothing)
  if mask is None:
    return jnp.mean(ce, axis=-1)
  mask = jnp.asarray(mask, jnp.float32)
  chex.assert_shape(mask, ce.shape[1:])
  return jnp.sum(ce * mask, axis=-1) / jnp.maximum(jnp.sum(mask), 1.0)
