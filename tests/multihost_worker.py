"""One process of the multi-process test (``tests/test_multihost.py``).

``python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT DATA_DIR WORKDIR`` joins a
``jax.distributed`` job on ``localhost:PORT`` (CPU collectives over gloo) and prints
``RESULT<json>``. :func:`run` with one process is the single-process reference.
"""

import json
import sys

STEPS = 4


def run(process_id: int, num_processes: int, port: int | None, data_dir: str, workdir: str,
        *, experiment: bool) -> dict:
  """Train on fixed global batches (phase 1); with ``experiment`` also run the full loop.

  Phase 1 feeds the same global batches whatever the number of processes: each
  process passes its rows to ``make_array_from_process_local_data``. Returns the
  per-step losses, the final params (gathered), and an eval over the test split
  read as one share per process.
  """
  import jax

  if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes, process_id,
                               initialization_timeout=120, heartbeat_timeout_seconds=30)
  import functools

  import numpy as np
  from conftest import tiny_config
  from jax.experimental import multihost_utils

  from mrl_jax import config_lib, export, inference, models, optim, sharding, train_lib
  from mrl_jax.data import pipeline

  # Data parallel over processes, FSDP over each process's devices.
  overrides = dict(mesh_shape=(-1, min(2, jax.device_count())), fsdp_min_size=64,
                   label_smoothing=0.1, eval_split="test[:64]")
  config = config_lib.validate_config(tiny_config(data_dir, **overrides))
  mesh = sharding.make_mesh(config.mesh_shape)
  schedule = optim.learning_rate_schedule(config, steps_per_epoch=10)
  state = train_lib.create_train_state(
      jax.random.PRNGKey(0), models.build_classifier(config, 10),
      optim.make_optimizer(config, schedule), (8, 8, 1), mesh, config.fsdp_min_size)
  step_fn = train_lib.jit_train_step(config, schedule, mesh,
                                     jax.tree.map(lambda x: x.sharding, state))
  to_global = functools.partial(pipeline.as_global, sharding=sharding.batch_sharding(mesh))
  rows = config.batch_size // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(STEPS):
    images = rng.random((config.batch_size, 8, 8, 1), dtype=np.float32)
    labels = rng.integers(0, 10, config.batch_size).astype(np.int32)
    state, metrics = step_fn(state, to_global({"image": images[mine], "label": labels[mine]}))
    losses.append(float(metrics["loss"]))
  gather = lambda tree: [np.asarray(multihost_utils.process_allgather(x, tiled=True))
                         for x in jax.tree.leaves(tree)]
  params = gather(state.params)
  builder = pipeline.get_builder(config.dataset, data_dir)
  ev = train_lib.evaluate(jax.jit(train_lib.eval_step, out_shardings=sharding.replicated(mesh)),
                          state, pipeline.eval_batches(builder, config.eval_split,
                                                       batch_size=config.batch_size), to_global)
  out = {"losses": losses, "params": [p.tolist() for p in params],
         "eval_loss_per_dim": np.asarray(ev["loss_per_dim"]).tolist(),
         "num_examples": ev["num_examples"], "mesh": dict(mesh.shape)}
  if experiment:
    # Phase 2: the real loop, checkpoints, restore and export, across processes.
    exp_config = tiny_config(data_dir, num_train_steps=STEPS, checkpoint_every_steps=2,
                             log_every_steps=2, eval_every_steps=STEPS, **overrides)
    exp = train_lib.Experiment(exp_config, workdir)
    result = exp.train(progress=False)
    resumed = train_lib.Experiment(exp_config, workdir)
    same = all(np.array_equal(a, b) for a, b in zip(gather(exp.state.params),
                                                      gather(resumed.state.params), strict=True))
    export.export_encoder(workdir, workdir + "/encoder")
    encoder = inference.Encoder.load(workdir + "/encoder")
    z = encoder.embed(np.zeros((3, 8, 8, 1), np.float32), dim=4)
    out["experiment"] = {"step": result["step"], "eval": result["eval"]["loss_per_dim"],
                         "resumed_step": resumed.step, "resumed_params_equal": same,
                         "embedding_shape": list(z.shape)}
  return out


if __name__ == "__main__":
  pid, nproc, port, data_dir, workdir = sys.argv[1:]
  result = run(int(pid), int(nproc), int(port), data_dir, workdir, experiment=True)
  if int(pid) == 0:
    print("RESULT" + json.dumps(result))
