"""Run Python code in a fresh interpreter with N fake CPU devices.

``XLA_FLAGS`` must be set before JAX is imported, so multi-device tests run
their JAX code in a subprocess. On failure the child's output is shown.
"""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, *, devices: int = 1, timeout: int = 300,
               env: dict | None = None) -> str:
  full_env = {**os.environ, **(env or {})}
  full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  full_env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "tests")])
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=timeout, env=full_env, cwd=REPO)
  if proc.returncode:
    raise AssertionError(
        f"subprocess with {devices} devices failed ({proc.returncode}):\n"
        f"--- stdout ---\n{proc.stdout[-5000:]}\n--- stderr ---\n{proc.stderr[-5000:]}")
  return proc.stdout
