"""The pairs task in two processes (2 CPU devices each) trains the model of one process with
4 devices: the same global batches (each process reading its share of the prepared shards),
the same ("data", "fsdp") mesh, the same final metrics."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_multihost import TIMEOUT_S, _finish, _free_port
from testutil import REPO


def _env(devices: int) -> dict:
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
          "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}


@pytest.mark.slow
def test_two_processes_train_the_pairs_model_of_one_process_with_four_devices(tmp_path):
  port = _free_port()
  worker = os.path.join(REPO, "tests", "multihost_pairs_worker.py")
  procs = [subprocess.Popen([sys.executable, worker, str(i), "2", str(port),
                             str(tmp_path / "multi")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(2), cwd=REPO)
           for i in range(2)]
  try:
    single = subprocess.run([sys.executable, "train.py", f"--config={worker}",
                             f"--workdir={tmp_path / 'single'}"], capture_output=True, text=True,
                            env=_env(4), cwd=REPO, timeout=TIMEOUT_S)
  finally:
    logs = _finish(procs)
  assert single.returncode == 0, single.stderr[-4000:]
  multi = json.loads(logs[0].split("RESULT", 1)[1].splitlines()[0])
  with open(tmp_path / "single" / "final_metrics.json") as f:
    want = json.load(f)
  assert multi["step"] == want["step"] == 6 and sorted(multi["eval"]) == sorted(want["eval"])
  assert "spearman_per_dim" in want["eval"] or any("spearman" in k for k in want["eval"])
  for key, value in want["eval"].items():
    np.testing.assert_allclose(multi["eval"][key], value, atol=1e-6, err_msg=key)
  # Process 0 prepared the shards once in the shared workdir; process 1 reused them.
  assert sorted(os.listdir(tmp_path / "multi" / "prepared")) == [
      "train_hard_negatives.jsonl", "train_pairs.jsonl"]
