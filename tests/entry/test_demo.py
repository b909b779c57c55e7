import json

import numpy as np
import pytest
from testutil import tiny_config

from mrl_jax import demo


@pytest.mark.slow
def test_demo_writes_the_table_json_and_plot(digits_dir, tmp_path):
  config = tiny_config(digits_dir, num_train_steps=40, checkpoint_every_steps=40,
                       log_every_steps=40, eval_every_steps=40)
  config.nesting.dims = (4, 16)
  results = demo.run_demo(config, str(tmp_path), progress=False)
  evaluation = results.pop("evaluation")
  with open(tmp_path / "results.json") as f:
    assert json.load(f) == results
  # The exported MRL encoder and the nested evaluation of its embedding.
  assert (tmp_path / "mrl" / "encoder" / "mrl_jax.json").exists()
  assert [row["dim"] for row in evaluation["per_dim"]] == [4, 16]
  assert (tmp_path / "mrl" / "eval" / "metrics.json").exists()
  assert evaluation["per_dim"][-1]["1nn"] > 0.5 and "cascade" in evaluation
  assert results["dims"] == [4, 16]
  assert set(results["top1"]) == {"mrl", "mrl_e", "ff", "truncated"}
  for row in results["top1"].values():
    assert len(row) == 2 and all(0.0 <= v <= 1.0 for v in row)
  # FF-16 is the ordinary model; it and the probe on its full embedding must beat chance.
  assert results["top1"]["ff"][1] > 0.5 and results["top1"]["truncated"][1] > 0.5
  assert (tmp_path / "results.png").stat().st_size > 10_000
  table = demo.format_table(results)
  assert "MRL-E" in table and "ordinary, truncated" in table
  assert f"{100 * results['top1']['mrl'][0]:8.2f}" in table
  np.testing.assert_array_equal(sorted(p.name for p in tmp_path.iterdir() if p.is_dir()),
                                ["ff_16", "ff_4", "mrl", "mrl_e"])
