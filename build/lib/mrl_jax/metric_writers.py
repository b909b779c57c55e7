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


def format_scalars(step: int, scalars: Mapping[str, float], prefix: str) -> str:
  """One console line: plain scalars, then each per-dim metric as ``name[dim: value ...]``.

  ``{"loss": 1.2, "top1/dim_8": 0.5, "top1/dim_16": 0.7}`` at step 10 becomes
  ``[train/step 10] loss=1.2 top1[8: 0.5 16: 0.7]``.
  """
  plain, per_dim = [], {}
  for name, value in scalars.items():
    base, sep, dim = name.partition("/dim_")
    if sep:
      per_dim.setdefault(base, []).append(f"{dim}: {value:.4g}")
    else:
      plain.append(f"{name}={value:.4g}")
  parts = plain + [f"{base}[{' '.join(cells)}]" for base, cells in per_dim.items()]
  return f"[{prefix}step {step}] " + " ".join(parts)


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
      self._echo(format_scalars(step, scalars, prefix or "train/"))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
