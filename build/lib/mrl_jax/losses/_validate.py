"""Argument checks shared by the losses: a clear ``ValueError`` naming the argument.

Hyperparameters that arrive as Python numbers or concrete arrays are checked at
call time; traced values (a learnable temperature inside ``jit``) cannot be
inspected and are passed through.
"""

from __future__ import annotations

import math

import jax
import numpy as np


def concrete_float(value) -> float | None:
  """``float(value)`` for a Python number or a concrete size-1 array; ``None`` when traced."""
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, bool):
    raise ValueError(f"expected a number, got the bool {value!r}")
  if isinstance(value, (int, float, np.number)):
    return float(value)
  arr = np.asarray(value)
  if arr.size != 1 or not (np.issubdtype(arr.dtype, np.floating)
                           or np.issubdtype(arr.dtype, np.integer)):
    raise ValueError(f"expected a scalar number, got {value!r}")
  return float(arr.reshape(()))


def check_positive(name: str, value) -> None:
  """``value > 0`` and finite (skipped when traced)."""
  try:
    v = concrete_float(value)
  except ValueError:
    raise ValueError(f"{name} must be a positive finite number, got {value!r}") from None
  if v is not None and not (math.isfinite(v) and v > 0):
    raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def check_non_negative(name: str, value) -> None:
  """``value >= 0`` and finite, for a Python number."""
  if (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
      or not math.isfinite(value) or value < 0):
    raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")


def check_label_smoothing(value) -> None:
  """``label_smoothing`` in ``[0, 1)`` (1 would make the target uniform and the label unused)."""
  if (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
      or not math.isfinite(value) or not 0.0 <= value < 1.0):
    raise ValueError(f"label_smoothing must be a number in [0, 1), got {value!r}")


def check_weights_array(weights, num: int, name: str = "weights") -> None:
  """``weights`` of shape ``[num]``, finite and positive when concrete."""
  shape = np.shape(weights)
  if shape != (num,):
    raise ValueError(f"{name} must have shape ({num},), one per nested size, got shape {shape}")
  if isinstance(weights, jax.core.Tracer):
    return
  arr = np.asarray(weights, np.float64)
  if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
    raise ValueError(f"{name} must be positive and finite, got {arr.tolist()}")


def check_bool(name: str, value) -> None:
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be a bool, got {value!r}")
