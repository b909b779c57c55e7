"""The paper's comparison on offline data: MRL vs MRL-E vs FF-k vs an ordinary model truncated.

``python -m mrl_jax.demo --config=configs/digits_mlp.py --workdir=DIR`` (what
``make demo`` runs) trains, in ``DIR/<run>``:

* ``mrl``: nested heads at every dim of the config's nesting list;
* ``mrl_e``: the weight-tied (efficient) nested head;
* ``ff_<k>``: one fixed-feature model per nested size k (FF-k);
* ``truncated``: the ordinary model (``ff_<D>``) whose embedding is cut to its
  first k dims, with a linear probe trained on each cut.

It prints one top-1 table, writes ``DIR/results.json`` as
``{"dims": [...], "top1": {"mrl": [...], "mrl_e": [...], "ff": [...], "truncated": [...]}}``
(``null`` where a row has no value) and plots the curves to ``DIR/results.png``.
Then it exports the MRL encoder to ``DIR/mrl/encoder`` and evaluates the MRL
model's nested embedding (1-NN, mAP@k, cascade, adaptive and funnel retrieval)
into ``DIR/mrl/eval/``. Runs already finished in ``DIR`` are reused (their
checkpoints are restored).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from mrl_jax import config_lib, probe, train_lib
from mrl_jax.evaluate import plots
from mrl_jax.evaluate.report import format_table as format_evaluation
from mrl_jax.evaluate.workdir import evaluate_workdir

ROWS = (("mrl", "MRL"), ("mrl_e", "MRL-E"), ("ff", "FF-k"), ("truncated", "ordinary, truncated"))


def _variant(config: ml_collections.ConfigDict, **overrides: Any) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  config.update(overrides)
  return config


def run_demo(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
             evaluate: bool = True) -> dict[str, Any]:
  """Train every model of the comparison and return the results dict (see module doc).

  With ``evaluate``, the returned dict also holds ``"evaluation"``: the MRL model's
  :func:`~mrl_jax.evaluate.report.evaluate_nested` metrics (not in ``results.json``).
  """
  config = config_lib.validate_config(config)
  dims = list(config.nesting.dims)
  top1: dict[str, list[float | None]] = {}
  for head in ("mrl", "mrl_e"):
    _say(progress, f"== training {head} (nested dims {dims})")
    result = train_lib.train_and_evaluate(_variant(config, head=head),
                                          os.path.join(workdir, head), progress=progress,
                                          export_dir=None if head == "mrl" else "")
    top1[head] = result["eval"]["top1_per_dim"]
  top1["ff"] = []
  for k in dims:
    _say(progress, f"== training FF-{k}")
    result = train_lib.train_and_evaluate(_variant(config, head="ff", ff_dim=k),
                                          os.path.join(workdir, f"ff_{k}"), progress=progress,
                                          export_dir="")
    top1["ff"].append(result["eval"]["top1_per_dim"][0])
  _say(progress, f"== linear probes on the ordinary (FF-{dims[-1]}) model's truncated embedding")
  top1["truncated"] = _truncated_row(_variant(config, head="ff", ff_dim=dims[-1]),
                                     os.path.join(workdir, f"ff_{dims[-1]}"), dims)
  results = {"dims": dims, "top1": top1}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  plot_results(results, os.path.join(workdir, "results.png"))
  if evaluate:
    mrl_dir = os.path.join(workdir, "mrl")
    _say(progress, "== evaluating the exported MRL encoder's nested embedding")
    results = {**results, "evaluation": evaluate_workdir(mrl_dir)}
  return results


def _truncated_row(config: ml_collections.ConfigDict, workdir: str,
                   dims: Sequence[int]) -> list[float]:
  experiment = train_lib.Experiment(config, workdir)  # restores the trained model
  try:
    task, variables = experiment.task, experiment.state.variables
    train = task.predict(variables, config.train_split)
    test = task.predict(variables, config.eval_split)
  finally:
    experiment.close()
  return probe.truncated_probe_accuracy(train["embedding"], train["label"], test["embedding"],
                                        test["label"], dims, task.spec.num_classes)


def format_table(results: dict[str, Any]) -> str:
  """The results as a fixed-width text table of top-1 % per nested dim."""
  dims = results["dims"]
  width = max(len(label) for _, label in ROWS) + 2
  lines = ["top-1 % (test split) per nested dim".ljust(width),
           "dim".ljust(width) + "".join(f"{m:>8d}" for m in dims)]
  for key, label in ROWS:
    values = results["top1"].get(key) or [None] * len(dims)
    cells = "".join(f"{'-':>8}" if v is None else f"{100 * v:8.2f}" for v in values)
    lines.append(label.ljust(width) + cells)
  return "\n".join(lines)


def plot_results(results: dict[str, Any], path: str) -> None:
  """Top-1 vs nested dim (log2 x-axis), one curve per row, saved as a PNG."""
  curves = {}
  for key, label in ROWS:
    values = results["top1"].get(key) or []
    pts = [(m, 100 * v) for m, v in zip(results["dims"], values, strict=False) if v is not None]
    if pts:
      curves[label] = tuple(zip(*pts, strict=True))
  plots.plot_accuracy_vs_dim(curves, path)


def _say(enabled: bool, text: str) -> None:
  if enabled:
    print(text, flush=True)


def main(argv: Sequence[str]) -> None:
  from absl import flags, logging

  del argv
  logging.set_verbosity(logging.WARNING)
  results = run_demo(flags.FLAGS.config, flags.FLAGS.workdir)
  workdir = flags.FLAGS.workdir
  print("\nMRL model, nested embedding (database = train split, queries = test split):")
  print(format_evaluation(results["evaluation"]))
  print()
  print(format_table(results))
  print(f"\nwrote {os.path.join(workdir, 'results.json')}, results.png, "
        f"the MRL encoder bundle {os.path.join(workdir, 'mrl', 'encoder')} and "
        f"{os.path.join(workdir, 'mrl', 'eval', 'metrics.json')}")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  flags.DEFINE_string("workdir", "workdir/demo", "Where every run and the results go.")
  config_flags.DEFINE_config_file("config", "configs/digits_mlp.py", "Base config.")
  app.run(main)
