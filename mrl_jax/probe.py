"""Linear probes: fit a softmax classifier on frozen (optionally truncated) features.

Used for the "ordinary model, truncated" baseline: an ordinary model's embedding
cut to its first ``k`` dims, with a fresh linear classifier trained on top.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, num_classes: int, *,
                     steps: int = 500, learning_rate: float = 0.05,
                     l2: float = 1e-4) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Full-batch Adam on L2-regularised softmax regression over standardised features.

  Deterministic: zero initialisation, no sampling.

  Args:
    train_x: ``[N, d]`` features.
    train_y: ``[N]`` integer labels.

  Returns:
    ``(mean [d], std [d], kernel [d, C], bias [C])``; predict with
    :func:`probe_logits`.
  """
  x = jnp.asarray(train_x, jnp.float32)
  mean, std = jnp.mean(x, 0), jnp.std(x, 0) + 1e-6
  x = (x - mean) / std
  y = jnp.asarray(train_y, jnp.int32)
  params = (jnp.zeros((x.shape[1], num_classes)), jnp.zeros((num_classes,)))
  tx = optax.adam(learning_rate)

  def loss_fn(p):
    logits = x @ p[0] + p[1]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + l2 * jnp.sum(p[0] ** 2)

  def body(carry, _):
    p, opt = carry
    grads = jax.grad(loss_fn)(p)
    updates, opt = tx.update(grads, opt, p)
    return (optax.apply_updates(p, updates), opt), None

  (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
  return tuple(np.asarray(a) for a in (mean, std, *params))


def probe_logits(probe: tuple[np.ndarray, ...], x: np.ndarray) -> np.ndarray:
  """``[N, d] -> [N, C]`` logits of a probe from :func:`fit_linear_probe`."""
  mean, std, kernel, bias = probe
  return ((np.asarray(x, np.float32) - mean) / std) @ kernel + bias


def truncated_probe_accuracy(train_z: np.ndarray, train_y: np.ndarray, test_z: np.ndarray,
                             test_y: np.ndarray, dims: Sequence[int], num_classes: int,
                             **probe_kwargs) -> list[float]:
  """Top-1 of a linear probe on ``z[:, :k]`` for each ``k`` in ``dims``."""
  accs = []
  for k in dims:
    probe = fit_linear_probe(train_z[:, :k], train_y, num_classes, **probe_kwargs)
    pred = np.argmax(probe_logits(probe, test_z[:, :k]), -1)
    accs.append(float(np.mean(pred == test_y)))
  return accs
