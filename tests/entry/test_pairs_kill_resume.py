"""The pairs task killed with SIGKILL mid-run (grain workers building batches from the
prepared shards, no-duplicates sampler) and rerun ends with the uninterrupted run's final
metrics exactly: batch s is a function of (seed, s), resumed without reading the batches
before it."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from testutil import REPO

FLAGS = ["--config=configs/text_pairs.py", "--config.max_length=16", "--config.batch_size=8",
         "--config.loop.num_train_steps=24", "--config.checkpoint.every_steps=6",
         "--config.loop.eval_every_steps=24", "--config.loop.log_every_steps=6",
         "--config.encoder.dropout=0.0", "--config.input_workers=1",
         "--config.batch_sampler=no_duplicates"]


def _train(workdir: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "train.py", f"--workdir={workdir}", *FLAGS],
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, "PYTHONPATH": REPO})


def _finished(proc: subprocess.Popen) -> None:
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-4000:]


@pytest.mark.slow
def test_a_pairs_run_killed_mid_training_resumes_to_the_straight_runs_metrics(tmp_path):
  straight = _train(str(tmp_path / "straight"))
  killed_dir = tmp_path / "killed"
  proc = _train(str(killed_dir))
  checkpoints = killed_dir / "checkpoints"
  deadline = time.time() + 240
  while not (checkpoints.is_dir() and any(d.isdigit() and int(d) >= 6
                                          for d in os.listdir(checkpoints))):
    assert proc.poll() is None and time.time() < deadline, "no checkpoint before the kill"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not (killed_dir / "final_metrics.json").exists()
  _finished(_train(str(killed_dir)))
  _finished(straight)
  got = json.loads((killed_dir / "final_metrics.json").read_text())
  want = json.loads((tmp_path / "straight" / "final_metrics.json").read_text())
  assert got["step"] == want["step"] == 24
  assert got["eval"] == want["eval"]
