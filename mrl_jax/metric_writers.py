"""Write scalar metrics to the console and to TensorBoard event files.

Per-dim metrics (arrays ``[M]``) are expanded into one scalar per nested size:
``loss_per_dim`` at dims ``(8, 16)`` becomes ``loss/dim_8`` and ``loss/dim_16``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from tensorboardX import SummaryWriter

PER_DIM_SUFFIX = "_per_dim"


def expand_per_dim(metrics: Mapping[str, object], dims: Sequence[int]) -> dict[str, float]:
  """``{"top1_per_dim": [M]} -> {"top1/dim_m": float, ...}``; scalars pass through."""
  out = {}
  for name, value in metrics.items():
    value = np.asarray(value)
    if name.endswith(PER_DIM_SUFFIX):
      base = name[: -len(PER_DIM_SUFFIX)]
      for m, v in zip(dims, value.reshape(-1), strict=True):
        out[f"{base}/dim_{m}"] = float(v)
    else:
      out[name] = float(value)
  return out


class MetricWriter:
  """TensorBoard events under ``logdir`` (only on process 0) plus a console echo.

  Args:
    logdir: folder for the event files.
    enabled: False on processes other than 0, so a pod writes one copy.
    echo: a callable for the console lines (e.g. ``tqdm.write``), or None.
  """

  def __init__(self, logdir: str, *, enabled: bool = True, echo=print):
    self._writer = SummaryWriter(logdir) if enabled else None
    self._echo = echo if enabled else None
    if enabled:
      os.makedirs(logdir, exist_ok=True)

  def write_scalars(self, step: int, scalars: Mapping[str, float], *, prefix: str = "") -> None:
    if self._writer is None:
      return
    for name, value in scalars.items():
      self._writer.add_scalar(f"{prefix}{name}", value, step)
    if self._echo is not None:
      head = {k: v for k, v in scalars.items() if "/dim_" not in k}
      text = " ".join(f"{k}={v:.4g}" for k, v in head.items())
      self._echo(f"[{prefix or 'train/'}step {step}] {text}")

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
