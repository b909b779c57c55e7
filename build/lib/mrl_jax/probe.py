"""Linear probes: fit a softmax classifier on frozen (optionally truncated) features.

Used for the "ordinary model, truncated" baseline: an ordinary model's embedding
cut to its first ``k`` dims, with a fresh linear classifier trained on top.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _check_features(x: np.ndarray, y: np.ndarray, x_name: str,
                    y_name: str) -> tuple[np.ndarray, np.ndarray]:
  x, y = np.asarray(x), np.asarray(y)
  if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1 or x.dtype.kind != "f":
    raise ValueError(f"{x_name} must be float features [N, d] with N, d >= 1, got dtype "
                     f"{x.dtype} and shape {x.shape}")
  if y.shape != (x.shape[0],) or y.dtype.kind not in "iu":
    raise ValueError(f"{y_name} must be [N] = [{x.shape[0]}] integer classes, got dtype "
                     f"{y.dtype} and shape {y.shape}")
  bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
  if bad.size:
    raise ValueError(f"{x_name} has NaN/inf in {bad.size} of {len(x)} rows: "
                     f"{bad[:10].tolist()}")
  return x, y


def _check_classes(y: np.ndarray, num_classes: int, y_name: str) -> None:
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
      or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  if y.size and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(f"{y_name} must be classes in [0, num_classes={num_classes}), got values "
                     f"in [{y.min()}, {y.max()}]")


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

  Raises:
    ValueError: naming the argument: features that are not float ``[N, d]`` or
      hold NaN/inf, labels that are not ``[N]`` ints in ``[0, num_classes)``,
      ``steps < 1``, ``learning_rate`` not positive and finite, ``l2`` not
      finite and ``>= 0``.
  """
  train_x, train_y = _check_features(train_x, train_y, "train_x", "train_y")
  _check_classes(train_y, num_classes, "train_y")
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"steps must be an int >= 1, got {steps!r}")
  for name, value, low in (("learning_rate", learning_rate, "> 0"), ("l2", l2, ">= 0")):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) \
        or not math.isfinite(value) or (value <= 0 if low == "> 0" else value < 0):
      raise ValueError(f"{name} must be a finite number {low}, got {value!r}")
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
  """Top-1 of a linear probe on ``z[:, :k]`` for each ``k`` in ``dims``.

  Raises:
    ValueError: as :func:`fit_linear_probe`, test features of another width,
      or a ``k`` outside ``[1, d]``.
  """
  train_z, train_y = _check_features(train_z, train_y, "train_z", "train_y")
  test_z, test_y = _check_features(test_z, test_y, "test_z", "test_y")
  _check_classes(test_y, num_classes, "test_y")
  width = train_z.shape[1]
  if test_z.shape[1] != width:
    raise ValueError(f"train_z and test_z must have the same width, got {width} and "
                     f"{test_z.shape[1]}")
  if not len(dims) or any(isinstance(k, bool) or not isinstance(k, (int, np.integer))
                          or not 1 <= k <= width for k in dims):
    raise ValueError(f"dims must be ints in [1, {width}] (the feature width), got {list(dims)}")
  accs = []
  for k in dims:
    probe = fit_linear_probe(train_z[:, :k], train_y, num_classes, **probe_kwargs)
    pred = np.argmax(probe_logits(probe, test_z[:, :k]), -1)
    accs.append(float(np.mean(pred == test_y)))
  return accs
