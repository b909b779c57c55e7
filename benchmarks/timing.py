"""Timing helper shared by the benchmark scripts (not part of the library)."""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import numpy as np


def median_seconds(fn: Callable[[], object], *, repeats: int = 20, warmup: int = 3) -> float:
  """Median wall time of ``fn()`` (results blocked on) after ``warmup`` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def device_line() -> str:
  d = jax.devices()[0]
  return (f"device: {d.platform} ({d.device_kind}), {jax.device_count()} device(s), "
          f"jax {jax.__version__}")
