import json
import os
import subprocess
import sys

import pytest
from subprocess_util import REPO


def _train(workdir, data_dir, steps):
  cmd = [sys.executable, "train.py", "--config=configs/digits_mlp.py", f"--workdir={workdir}",
         f"--config.data_dir={data_dir}", f"--config.num_train_steps={steps}",
         "--config.encoder.hidden=(32,)", "--config.batch_size=32",
         "--config.log_every_steps=5", "--config.checkpoint_every_steps=5",
         "--config.eval_every_steps=100", "--config.schedule=constant"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.mark.slow
def test_train_py_trains_and_resumes(digits_dir, tmp_path):
  workdir = str(tmp_path / "run")
  first = _train(workdir, digits_dir, 10)
  assert "final eval top-1 per dim: 1:" in first.stdout
  second = _train(workdir, digits_dir, 15)
  # The second command resumed at step 10 and ran 5 more steps.
  assert "train/step 15" in second.stdout + second.stderr
  assert "train/step 5 " not in second.stdout + second.stderr
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    assert json.load(f)["step"] == 15
