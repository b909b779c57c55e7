import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, tiny_config

from mrl_jax import train_lib
from mrl_jax.evaluate.report import evaluate_nested
from mrl_jax.evaluate.workdir import evaluate_workdir, load_workdir_config


def test_evaluate_workdir_equals_evaluate_nested_on_the_models_embeddings(digits_dir, tmp_path):
  config = tiny_config(digits_dir, num_train_steps=20)
  train_lib.train_and_evaluate(config, str(tmp_path), progress=False)
  got = evaluate_workdir(str(tmp_path), ks=(10,))
  experiment = train_lib.Experiment(load_workdir_config(str(tmp_path)), str(tmp_path))
  train, test = experiment.predict("train"), experiment.predict("test")
  want = evaluate_nested(train["embedding"], train["label"], test["embedding"], test["label"],
                         (2, 4, 8, 16), test_logits=test["logits"], ks=(10,))
  for key in ("per_dim", "adaptive", "funnel"):
    for a, b in zip(got[key], want[key], strict=True):
      assert a["map@10"] == b["map@10"] and a["1nn"] == b["1nn"]
  assert got["classification"] == want["classification"]
  with open(tmp_path / "eval" / "metrics.json") as f:
    assert json.load(f)["dims"] == [2, 4, 8, 16]


def test_evaluate_cli_and_clear_errors(digits_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="not a training workdir"):
    evaluate_workdir(str(tmp_path / "nothing"))
  train_lib.train_and_evaluate(tiny_config(digits_dir, num_train_steps=10), str(tmp_path),
                               progress=False)
  proc = subprocess.run([sys.executable, "-m", "mrl_jax.evaluate", f"--workdir={tmp_path}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "adaptive retrieval" in proc.stdout and "metrics.json" in proc.stdout
  metrics = json.load(open(tmp_path / "eval" / "metrics.json"))
  assert np.isclose(metrics["classification"]["top1"][-1],
                    json.load(open(tmp_path / "final_metrics.json"))["eval"]["top1_per_dim"][-1])
