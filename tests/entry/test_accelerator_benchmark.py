"""benchmarks/accelerator.py --smoke runs every JAX row end to end and writes finite numbers."""

import json
import math
import os
import subprocess
import sys

import pytest
from testutil import REPO

EXPECTED = {
    "resnet": {"cnn_single_head_ff", "cnn_mrl", "cnn_mrl_e"},
    "pairs": {"minilm_l6_plain_mnrl", "minilm_l6_nested_fused"},
    "cached": {"minilm_l6_gradcache_32", "minilm_l6_full_batch_32"},
    "retrieval": {"exact_64", "adaptive_8_to_64"},
}


@pytest.mark.slow
def test_smoke_run_writes_every_row_with_finite_numbers(tmp_path):
  out = tmp_path / "accel.json"
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "accelerator.py"),
                         "--smoke", "--st-python", "none", "--output", str(out)],
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["header"]["smoke"] is True
  assert result["header"]["peak_bf16_tflops"] is None  # CPU: no peak, so no MFU
  got = {}
  for row in result["rows"]:
    got.setdefault(row["group"], set()).add(row["row"])
    time_key = "step_ms" if "step_ms" in row else "ms_per_query"
    rate = next(v for k, v in row.items() if k.endswith("_per_s"))
    for value in (row[time_key], rate):
      assert isinstance(value, float) and math.isfinite(value) and value > 0, row
    if row["group"] in ("resnet", "pairs", "cached"):
      assert math.isfinite(row["loss"]) and row["tflop_per_step"] > 0, row
  assert got == EXPECTED
  by_name = {r["row"]: r for r in result["rows"]}
  assert 0.0 <= by_name["adaptive_8_to_64"]["recall_at_10_vs_exact"] <= 1.0
  assert by_name["minilm_l6_gradcache_32"]["mini_batch_size"] == 8
  assert "| row |" in proc.stdout  # the printed table


def test_only_rejects_unknown_groups():
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "accelerator.py"),
                         "--only", "resnet,gpus"], capture_output=True, text=True, timeout=120,
                        env={**os.environ, "PYTHONPATH": REPO})
  assert proc.returncode == 2 and "--only='resnet,gpus'" in proc.stderr
