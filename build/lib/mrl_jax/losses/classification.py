"""The nested classification loss: cross-entropy of every nested head, summed over sizes.

The Matryoshka objective is a weighted **sum** over the nested sizes of an
ordinary loss computed on each prefix: ``L = sum_m c_m * L(head_m(z[:, :m]), y)``
(Kusupati et al. 2022, eq. 1; the reference's ``Matryoshka_CE_Loss``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mrl_jax.losses._validate import check_label_smoothing, check_weights_array


def _check_logits_labels(logits: jax.Array, labels: jax.Array) -> None:
  if np.ndim(logits) != 3:
    raise ValueError(f"logits must be [M, B, C], got shape {np.shape(logits)}")
  if not jnp.issubdtype(jnp.result_type(logits), jnp.floating):
    raise ValueError(f"logits must be floating point, got dtype {jnp.result_type(logits)}")
  if np.ndim(labels) != 1 or np.shape(labels)[0] != np.shape(logits)[1]:
    raise ValueError(f"labels must be [B] = [{np.shape(logits)[1]}] class ids, got shape "
                     f"{np.shape(labels)}")
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise ValueError(f"labels must be integer class ids, got dtype {jnp.result_type(labels)}")
  if not isinstance(labels, jax.core.Tracer):  # under jit the ids cannot be inspected
    ids = np.asarray(labels)
    bad = np.flatnonzero((ids < 0) | (ids >= np.shape(logits)[2]))
    if bad.size:
      raise ValueError(f"labels must be class ids in [0, {np.shape(logits)[2]}) (C = "
                       f"logits.shape[-1]); got {ids[bad[0]]} at index {bad[0]} "
                       f"({bad.size} out of range)")


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
    labels: ``[B]`` integer class ids in ``[0, C)`` (checked when concrete; an id
      out of range would give a NaN loss).
    label_smoothing: ``eps`` in ``[0, 1)``.

  Returns:
    ``[M, B]`` float32 losses.

  Raises:
    ValueError: wrong ranks, dtypes or batch sizes, a (concrete) label outside
      ``[0, C)``, or ``label_smoothing`` outside ``[0, 1)``.
  """
  _check_logits_labels(logits, labels)
  check_label_smoothing(label_smoothing)
  logp = jax.nn.log_softmax(jnp.asarray(logits).astype(jnp.float32), axis=-1)
  labels = jnp.asarray(labels).astype(jnp.int32)
  nll = -jnp.take_along_axis(logp, labels[None, :, None], axis=-1)[..., 0]
  if not label_smoothing:
    return nll
  smooth = -jnp.mean(logp, axis=-1)
  return (1.0 - label_smoothing) * nll + label_smoothing * smooth


def nested_loss_per_dim(
    logits: jax.Array,
    labels: jax.Array,
    *,
    label_smoothing: float = 0.0,
    mask: jax.Array | None = None,
) -> jax.Array:
  """Batch-mean cross-entropy at each nested size, ``[M, B, C] -> [M]`` float32.

  Args:
    logits, labels, label_smoothing: see :func:`softmax_cross_entropy_per_dim`.
    mask: optional ``[B]`` 0/1 weights (padding rows get 0); the mean is then
      over the unmasked rows (``max(sum(mask), 1)``).

  Raises:
    ValueError: as :func:`softmax_cross_entropy_per_dim`, or ``mask`` not ``[B]``.
  """
  ce = softmax_cross_entropy_per_dim(logits, labels, label_smoothing=label_smoothing)
  if mask is None:
    return jnp.mean(ce, axis=-1)
  if np.shape(mask) != ce.shape[1:]:
    raise ValueError(f"mask must be [B] = {list(ce.shape[1:])}, got shape {np.shape(mask)}")
  mask = jnp.asarray(mask, jnp.float32)
  return jnp.sum(ce * mask, axis=-1) / jnp.maximum(jnp.sum(mask), 1.0)


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
    weights: ``[M]`` positive finite relative importance per size; all ones when ``None``.
    label_smoothing: ``eps`` in ``[0, 1)``, see :func:`softmax_cross_entropy_per_dim`.
    mask: optional ``[B]`` 0/1 weights (padding rows get 0); the batch mean is
      then over the unmasked rows.

  Returns:
    A float32 scalar.

  Raises:
    ValueError: bad shapes (``weights`` not ``[M]``, ``mask`` not ``[B]``),
      non-positive or non-finite weights, ``label_smoothing`` outside ``[0, 1)``.
  """
  per_dim = nested_loss_per_dim(logits, labels, label_smoothing=label_smoothing, mask=mask)
  if weights is None:
    return jnp.sum(per_dim)
  check_weights_array(weights, per_dim.shape[0])
  return jnp.sum(jnp.asarray(weights, jnp.float32) * per_dim)
