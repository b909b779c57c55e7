"""Evaluate a trained workdir: embed its train and test splits, run every nested metric.

``python -m mrl_jax.evaluate --workdir DIR`` (and ``make demo``) call
:func:`evaluate_workdir`: it rebuilds the model from ``DIR/config.json``, restores
the latest checkpoint, embeds both splits in one pass each, and hands them to
:func:`~mrl_jax.evaluate.report.evaluate_nested` (database = train split,
queries = test split), which writes ``DIR/eval/metrics.json`` and the plots.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from mrl_jax import train_lib
from mrl_jax.evaluate.report import evaluate_nested


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (``DIR/config.json``, written by the loop)."""
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} not found: {workdir} is not a training workdir") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e


def evaluate_workdir(workdir: str, *, out_dir: str | None = None, **kwargs: Any) -> dict:
  """All per-dim, cascade, adaptive and funnel metrics of the model trained in ``workdir``.

  Args:
    workdir: a folder written by ``train.py`` / ``train_lib.train_and_evaluate``.
    out_dir: where ``metrics.json`` and the plots go (default ``workdir/eval``).
    **kwargs: passed to :func:`~mrl_jax.evaluate.report.evaluate_nested`.

  Returns:
    The dict of :func:`~mrl_jax.evaluate.report.evaluate_nested`.
  """
  experiment = train_lib.Experiment(load_workdir_config(workdir), workdir)
  if experiment.checkpointer.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint in {experiment.checkpointer.directory}: train first")
  config = experiment.config
  train = experiment.predict(config.train_split)
  test = experiment.predict(config.eval_split)
  nested = config.head in ("mrl", "mrl_e")
  return evaluate_nested(
      train["embedding"], train["label"], test["embedding"], test["label"],
      tuple(config.nesting.dims), test_logits=test["logits"] if nested else None,
      out_dir=out_dir or os.path.join(workdir, "eval"),
      model_name={"mrl": "MRL", "mrl_e": "MRL-E"}.get(config.head, "FF"), **kwargs)
