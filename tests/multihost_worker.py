"""One process of the multi-process test (``tests/train/test_multihost.py``).

``python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT DATA_DIR WORKDIR``:

1. runs ``train.py --distributed --coordinator_address=localhost:PORT ...`` in this
   process, the command a pod runs on every host (it joins the ``jax.distributed``
   job; CPU collectives over gloo), training with ``--config`` = :func:`get_config`;
2. restores that run's checkpoint and loads its exported encoder, across processes;
3. trains on fixed global batches (:func:`train_on_fixed_batches`), and prints
   ``RESULT<json>`` on process 0.

:func:`train_on_fixed_batches` in one process is the test's reference.
"""

import json
import sys

STEPS = 4
# Data parallel over the processes, FSDP over each process's devices.
OVERRIDES = dict(mesh_shape=(-1, 2), fsdp_min_size=64, label_smoothing=0.1,
                 eval_split="test[:64]")


def get_config(data_dir: str):
  """The config of step 1 (``--config=tests/multihost_worker.py:DATA_DIR``)."""
  from testutil import tiny_config

  return tiny_config(data_dir, num_train_steps=STEPS, checkpoint_every_steps=2,
                     log_every_steps=2, eval_every_steps=STEPS, **OVERRIDES)


def train_on_fixed_batches(data_dir: str) -> dict:
  """``STEPS`` train steps on fixed global batches, then an eval of the test split.

  Every process passes its own rows of each global batch to
  ``make_array_from_process_local_data``, so the maths is the same for any
  number of processes. Returns the per-step losses, the final params
  (gathered), the mesh and the eval over the split, read one share per process.
  """
  import functools
  import tempfile

  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  from testutil import tiny_config

  from mrl_jax import experiments
  from mrl_jax.train import sharding

  overrides = {**OVERRIDES, "mesh_shape": (-1, min(2, jax.device_count()))}
  workdir = tempfile.mkdtemp() if jax.process_index() == 0 else None
  workdir = multihost_utils.broadcast_one_to_all(
      np.frombuffer((workdir or "").ljust(256).encode(), np.uint8))
  experiment = experiments.create(tiny_config(data_dir, num_train_steps=STEPS, **overrides),
                                    bytes(np.asarray(workdir)).decode().strip())
  config, mesh, state = experiment.config, experiment.mesh, experiment.state
  step_fn = experiment.train_step_fn
  to_global = functools.partial(sharding.as_global, sharding=sharding.batch_sharding(mesh))
  rows = config.batch_size // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(STEPS):
    images = rng.random((config.batch_size, 8, 8, 1), dtype=np.float32)
    labels = rng.integers(0, 10, config.batch_size).astype(np.int32)
    state, metrics = step_fn(state, to_global({"image": images[mine], "label": labels[mine]}))
    losses.append(float(metrics["loss"]))
  params = [np.asarray(multihost_utils.process_allgather(x, tiled=True)).tolist()
            for x in jax.tree.leaves(state.params)]
  ev = experiment.task.evaluate(state.variables)
  experiment.close()
  return {"losses": losses, "params": params, "mesh": dict(mesh.shape),
          "eval_loss_per_dim": np.asarray(ev["loss_per_dim"]).tolist(),
          "num_examples": ev["num_examples"]}


def check_train_py_run(data_dir: str, workdir: str) -> dict:
  """Restore the run's final checkpoint and load its exported encoder."""
  import os

  import numpy as np

  from mrl_jax import experiments
  from mrl_jax.bundle import encoder as inference

  resumed = experiments.create(get_config(data_dir), workdir)
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    final = json.load(f)
  encoder = inference.Encoder.load(os.path.join(workdir, "encoder"))
  z = encoder.embed(np.zeros((3, 8, 8, 1), np.float32), dim=4)
  return {"step": final["step"], "eval": final["eval"]["loss_per_dim"],
          "resumed_step": resumed.step, "mesh": dict(resumed.mesh.shape),
          "exported_step": encoder.metadata["step"], "embedding_shape": list(z.shape)}


if __name__ == "__main__":
  pid, nproc, port, data_dir, workdir = sys.argv[1:]
  from absl import flags

  import train

  argv = ["train.py", f"--config={__file__}:{data_dir}", f"--workdir={workdir}",
          "--distributed", f"--coordinator_address=localhost:{port}",
          f"--num_processes={nproc}", f"--process_id={pid}"]
  flags.FLAGS(argv)
  train.main(argv[:1])
  result = {"train_py": check_train_py_run(data_dir, workdir),
            **train_on_fixed_batches(data_dir)}
  if int(pid) == 0:
    print("RESULT" + json.dumps(result))
