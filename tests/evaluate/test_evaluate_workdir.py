import json
import os
import subprocess
import sys

import numpy as np
import pytest
from testutil import REPO, tiny_config

from mrl_jax import experiments
from mrl_jax.evaluate.encoder import evaluate_encoder, evaluate_workdir
from mrl_jax.evaluate.report import evaluate_nested


def test_evaluation_reads_the_exported_encoder_and_matches_the_training_model(digits_dir,
                                                                             tmp_path):
  config = tiny_config(digits_dir, num_train_steps=20)
  final = experiments.train_and_evaluate(config, str(tmp_path), progress=False)
  got = evaluate_workdir(str(tmp_path), ks=(10,))
  experiment = experiments.create(config, str(tmp_path))  # the trainer's own view
  experiment.close()
  task, variables = experiment.task, experiment.state.variables
  train, test = task.predict(variables, "train"), task.predict(variables, "test")
  want = evaluate_nested(train["embedding"], train["label"], test["embedding"], test["label"],
                         (2, 4, 8, 16), test_logits=test["logits"], ks=(10,))
  for key in ("per_dim", "adaptive", "funnel"):
    for a, b in zip(got[key], want[key], strict=True):
      np.testing.assert_allclose(a["map@10"], b["map@10"], atol=1e-2)  # a few queries: float ties
      np.testing.assert_allclose(a["1nn"], b["1nn"], atol=1e-2)
  np.testing.assert_allclose(got["classification"]["top1"], final["eval"]["top1_per_dim"],
                             atol=1e-6)
  with open(tmp_path / "eval" / "metrics.json") as f:
    assert json.load(f)["dims"] == [2, 4, 8, 16]


def test_text_bundles_are_evaluated_per_dim(tmp_path):
  from testutil import tiny_text_config

  final = experiments.train_and_evaluate(tiny_text_config(num_train_steps=10), str(tmp_path),
                                       progress=False)
  got = evaluate_encoder(os.path.join(tmp_path, "encoder"))
  assert got["dims"] == [8, 16, 32]
  for name in ("spearman_per_dim", "cosine_recall@10_per_dim", "cosine_mrr@10_per_dim",
               "cosine_ndcg@10_per_dim"):
    np.testing.assert_allclose(got[name], final["eval"][name], atol=1e-5)
  assert got["files"][1].endswith("metrics_vs_dim.png") and os.path.getsize(got["files"][1])


def test_evaluate_cli_and_clear_errors(digits_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="no exported encoder"):
    evaluate_workdir(str(tmp_path / "nothing"))
  experiments.train_and_evaluate(tiny_config(digits_dir, num_train_steps=10), str(tmp_path),
                               progress=False)
  proc = subprocess.run([sys.executable, "-m", "mrl_jax.evaluate",
                         f"--encoder={tmp_path / 'encoder'}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "adaptive retrieval" in proc.stdout and "metrics.json" in proc.stdout
  proc = subprocess.run([sys.executable, "-m", "mrl_jax.evaluate", f"--encoder={tmp_path}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "mrl_jax.json is missing" in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
