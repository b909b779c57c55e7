"""Adaptive classification: a cascade over the nested classifiers (paper, section 4.2).

Given nested logits ``[M, B, C]`` for sizes ``dims = (m_1 < ... < m_M)``, each example
goes through the sizes in order and keeps the prediction of the first size ``i``
whose confidence ``max_c softmax(logits[i, b])_c >= thresholds[i]``; the largest size
always answers (its threshold is ignored). The cost of an example is the size it
stopped at; the *expected dim* is its mean over examples.

Thresholds are tuned on a held-out split, one stage at a time as in the paper's
notebook: for each ``i < M``, over a grid (paper: 100 points in ``[0.1, 1]``), the
two-stage cascade "size ``i``, else size ``i + 1``" is scored, and ``thresholds[i]``
is the smallest grid value reaching that cascade's best accuracy. The tuned
cascade is then applied to the other split.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mrl_jax.evaluate.codes import refuse_nonfinite
from mrl_jax.evaluate.index import Array

PAPER_GRID = np.linspace(0.1, 1.0, 100)


def confidences(logits: Array) -> tuple[np.ndarray, np.ndarray]:
  """``(max softmax probability [M, B], argmax class [M, B])`` of nested logits ``[M, B, C]``."""
  logits = jnp.asarray(logits)
  if logits.ndim != 3 or 0 in logits.shape:
    raise ValueError(f"nested logits must be [M, B, C] with M, B, C >= 1, got shape "
                     f"{logits.shape}")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f"logits must be floating point, got {logits.dtype}")
  refuse_nonfinite(jnp.moveaxis(logits, 1, 0), "logits (rows = examples)")
  conf, pred = _confidences(logits)
  return np.asarray(conf, np.float64), np.asarray(pred)


@jax.jit
def _confidences(logits):
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.max(probs, axis=-1), jnp.argmax(logits, axis=-1)


def cascade_predict(conf: np.ndarray, pred: np.ndarray,
                    thresholds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """Run the cascade.

  Args:
    conf: ``[M, B]`` confidences; pred: ``[M, B]`` predictions (:func:`confidences`).
    thresholds: ``[M]``; stage ``i`` answers when ``conf[i] >= thresholds[i]``
      (the last stage always answers).

  Returns:
    ``(predictions [B], stage [B])``: the answer and the index of the stage that gave it.
  """
  conf, pred = np.asarray(conf), np.asarray(pred)
  thresholds = np.asarray(thresholds, np.float64)
  if conf.ndim != 2 or conf.shape != pred.shape or thresholds.shape != (conf.shape[0],):
    raise ValueError(f"need conf and pred [M, B] and thresholds [M]; got {conf.shape}, "
                     f"{pred.shape}, {thresholds.shape}")
  _check_probabilities(conf, "conf")
  if not np.isfinite(thresholds).all():
    raise ValueError(f"thresholds must be finite, got {thresholds.tolist()}")
  accept = conf >= thresholds[:, None]
  accept[-1] = True
  stage = np.argmax(accept, axis=0)
  return pred[stage, np.arange(pred.shape[1])], stage


def tune_thresholds(conf: np.ndarray, pred: np.ndarray, labels: np.ndarray,
                    grid: Sequence[float] = PAPER_GRID) -> np.ndarray:
  """The paper's greedy per-stage thresholds (see the module docstring).

  Args:
    conf, pred: ``[M, B]`` on the tuning split; labels: ``[B]``.
    grid: candidate thresholds.

  Returns:
    ``[M]`` thresholds; the last is 0 (the largest size always answers).
  """
  conf, pred, labels = np.asarray(conf), np.asarray(pred), np.asarray(labels)
  grid = np.sort(np.asarray(grid, np.float64))
  if (conf.ndim != 2 or pred.shape != conf.shape or labels.shape != (conf.shape[1],)
      or grid.ndim != 1 or not grid.size):
    raise ValueError(f"need conf and pred [M, B], labels [B] and a non-empty 1-D grid; got "
                     f"{conf.shape}, {pred.shape}, {labels.shape}, grid {grid.shape}")
  _check_probabilities(conf, "conf")
  if not np.isfinite(grid).all():
    raise ValueError("grid must be finite")
  out = np.zeros(conf.shape[0])
  for i in range(conf.shape[0] - 1):
    take_small = conf[i][None, :] >= grid[:, None]  # [T, B]
    answer = np.where(take_small, pred[i][None, :], pred[i + 1][None, :])
    acc = np.mean(answer == labels[None, :], axis=1)
    out[i] = grid[np.argmax(acc == acc.max())]
  return out


def cascade_report(conf: np.ndarray, pred: np.ndarray, labels: np.ndarray,
                   thresholds: Sequence[float], dims: Sequence[int]) -> dict:
  """Accuracy and expected dim of the cascade, and of the cascade capped at each size.

  Capping at size ``j`` keeps stages ``0..j`` (``j`` always answers).

  Args:
    conf, pred: ``[M, B]``; labels: ``[B]``; thresholds: ``[M]``; dims: ``[M]`` sizes.

  Returns:
    ``{"accuracy", "expected_dim", "stop_fraction": [M], "capped": [{"max_dim",
    "accuracy", "expected_dim"}, ...]}`` (accuracies as fractions).
  """
  dims = np.asarray(dims, np.float64)
  labels = np.asarray(labels)
  if dims.shape != (np.shape(conf)[0],):
    raise ValueError(f"need one dim per stage ({np.shape(conf)[0]}), got {dims.shape}")
  if not (np.all(dims >= 1) and np.all(np.diff(dims) > 0) and np.all(dims == np.round(dims))):
    raise ValueError(f"dims must be strictly increasing positive ints, got {dims.tolist()}")
  if labels.shape != (np.shape(conf)[1],):
    raise ValueError(f"labels must be [B]={np.shape(conf)[1]}, got {labels.shape}")
  thresholds = np.asarray(thresholds, np.float64)
  capped = []
  for j in range(len(dims)):
    answer, stage = cascade_predict(conf[:j + 1], pred[:j + 1], thresholds[:j + 1])
    capped.append({"max_dim": int(dims[j]), "accuracy": float(np.mean(answer == labels)),
                   "expected_dim": float(np.mean(dims[stage]))})
  _, stage = cascade_predict(conf, pred, thresholds)
  return {"accuracy": capped[-1]["accuracy"], "expected_dim": capped[-1]["expected_dim"],
          "stop_fraction": np.bincount(stage, minlength=len(dims)) / stage.size,
          "capped": capped}


def _check_probabilities(conf: np.ndarray, name: str) -> None:
  if not np.issubdtype(conf.dtype, np.floating) or not np.all((conf >= 0) & (conf <= 1)):
    raise ValueError(f"{name} must hold probabilities in [0, 1] (no NaN); see confidences()")
