"""Two runs of the same command print the same numbers (issue 15, "Also": ``make demo``).

On one machine the whole comparison (training with a seeded tf.data order, XLA on CPU, the
linear probes) is bit-for-bit repeatable. What changes the numbers is the machine: XLA's
CPU code generation depends on the vector instructions the CPU has (a run capped with
``XLA_FLAGS=--xla_cpu_max_isa=SSE4_2`` on an AVX-512 machine gives other parameters), so a
table printed on one CPU may differ from another CPU's by a few test images.
"""

import jax
import numpy as np
import pytest
from testutil import tiny_config

from mrl_jax import demo, experiments


def _config(digits_dir):
  config = tiny_config(digits_dir, num_train_steps=40, checkpoint_every_steps=40,
                       log_every_steps=40, eval_every_steps=40)
  config.nesting.dims = (2, 16)
  return config


@pytest.mark.slow
def test_two_demo_runs_print_the_same_table(digits_dir, tmp_path):
  first = demo.run_demo(_config(digits_dir), str(tmp_path / "a"), progress=False, evaluate=False)
  second = demo.run_demo(_config(digits_dir), str(tmp_path / "b"), progress=False, evaluate=False)
  assert first == second
  assert demo.format_table(first) == demo.format_table(second)
  # Not only the rounded accuracies: the trained parameters are the same bits.
  for run in ("mrl", "mrl_e", "ff_2", "ff_16"):
    config = _config(digits_dir)
    config.update(dict(head=run.split("_")[0] if run.startswith("ff") else run,
                       ff_dim=int(run[3:]) if run.startswith("ff") else None))
    params = []
    for workdir in ("a", "b"):
      experiment = experiments.create(config, str(tmp_path / workdir / run))
      experiment.close()
      params.append(jax.device_get(experiment.state.params))
    jax.tree.map(np.testing.assert_array_equal, *params)
