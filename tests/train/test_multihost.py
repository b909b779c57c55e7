"""Two processes on localhost (``jax.distributed``, gloo CPU collectives) vs one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from multihost_worker import STEPS, train_on_fixed_batches
from testutil import REPO

TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(process_id: int, port: int, data_dir: str, workdir: str) -> subprocess.Popen:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}
  return subprocess.Popen(
      [sys.executable, os.path.join(REPO, "tests", "multihost_worker.py"), str(process_id), "2",
       str(port), data_dir, workdir],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)


def _finish(procs: list[subprocess.Popen]) -> list[str]:
  """Both logs; fails showing both when either process fails or hangs."""
  logs, failed = [], False
  for proc in procs:
    try:
      out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      out, _ = proc.communicate()
      out += f"\n[killed after {TIMEOUT_S} s]"
    failed |= proc.returncode != 0
    logs.append(out)
  if failed:
    pytest.fail("\n".join(f"--- process {i} (exit {p.returncode}) ---\n{log[-6000:]}"
                          for i, (p, log) in enumerate(zip(procs, logs, strict=True))))
  return logs


@pytest.mark.slow
def test_two_processes_run_train_py_and_train_like_one_on_the_same_global_batches(
    digits_dir, tmp_path):
  port = _free_port()
  procs = [_start(i, port, digits_dir, str(tmp_path / "multi")) for i in range(2)]
  try:  # the one-process reference runs here meanwhile, on this process's single device
    single = train_on_fixed_batches(digits_dir)
  finally:
    logs = _finish(procs)
  multi = json.loads(logs[0].split("RESULT", 1)[1])
  assert multi["mesh"] == {"data": 2, "fsdp": 2} and single["mesh"] == {"data": 1, "fsdp": 1}
  np.testing.assert_allclose(multi["losses"], single["losses"], rtol=2e-5)
  for got, want in zip(multi["params"], single["params"], strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-6)
  # Each process read its own half of the split; together every example counted once.
  assert multi["num_examples"] == single["num_examples"] == 64
  np.testing.assert_allclose(multi["eval_loss_per_dim"], single["eval_loss_per_dim"], rtol=1e-5)
  # `train.py --distributed` across the processes: the loop with its checkpoints, the
  # restore onto the same mesh and the export at the end.
  run = multi["train_py"]
  assert run["mesh"] == {"data": 2, "fsdp": 2}
  assert run["step"] == run["resumed_step"] == run["exported_step"] == STEPS
  assert np.all(np.isfinite(run["eval"])) and run["embedding_shape"] == [3, 4]
