"""``train.py`` end to end: resume, SIGTERM -> 143 -> resume, and one-line user errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from testutil import REPO

TEXT = ["--config=configs/text_pairs.py", "--config.max_length=16",
        "--config.loop.log_every_steps=5", "--config.checkpoint.every_steps=5",
        "--config.loop.eval_every_steps=100", "--config.optim.schedule=constant"]


def _cmd(workdir, *extra):
  return [sys.executable, "train.py", f"--workdir={workdir}", *TEXT, *extra]


def _run(workdir, *extra):
  proc = subprocess.run(_cmd(workdir, *extra), cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.mark.slow
def test_sigterm_exits_143_and_the_rerun_ends_like_an_uninterrupted_run(tmp_path):
  straight = str(tmp_path / "straight")
  _run(straight, "--config.loop.num_train_steps=200")
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(_cmd(workdir, "--config.loop.num_train_steps=200"), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and not os.path.isdir(os.path.join(workdir, "checkpoints", "5")):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=240)
  assert proc.returncode == 143, err[-3000:]
  assert "preempted: saved step" in err
  second = _run(workdir, "--config.loop.num_train_steps=200")
  assert "exported the encoder" in second.stdout
  final = lambda d: json.load(open(os.path.join(d, "final_metrics.json")))
  assert final(workdir)["eval"] == final(straight)["eval"] and final(workdir)["step"] == 200
  for name in ("model.safetensors", "config.json"):  # bit for bit the same exported model
    assert open(os.path.join(workdir, "encoder", name), "rb").read() == open(
        os.path.join(straight, "encoder", name), "rb").read()


@pytest.mark.parametrize("args,message", [
    (["--config.foo=1"], "the config has no field 'foo'"),
    (["--config.optim.learning_rate=-1"],
     "config.optim.learning_rate must be a finite number >= 0"),
    (["--config.nesting.weights=(1.0, nan, 1.0)"], "nan"),
    (["--config.checkpoint.max_to_keep=0"], "max_to_keep"),
    (["--config.train_file=/nonexistent.jsonl"], "train_file"),
])
def test_user_errors_are_one_line_and_exit_2(args, message, tmp_path):
  proc = subprocess.run(_cmd(str(tmp_path / "w"), *args), cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error")]
  assert len(lines) == 1 and message in lines[0], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
