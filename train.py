"""Train any config: ``python train.py --config=configs/NAME.py --workdir=DIR``.

Resumes from the latest checkpoint in ``DIR`` when there is one, and writes an
inference bundle to ``DIR/encoder`` at the end (see ``mrl_jax.inference``).
Override fields with ``--config.FIELD=VALUE`` (e.g. ``--config.head=mrl_e``).

Multi-host (TPU pod slices, Slurm, MPI): run the same command on every host
with ``--distributed``; elsewhere also pass ``--coordinator_address``,
``--num_processes`` and ``--process_id``. A ``SIGTERM`` (preemption notice)
writes a checkpoint and exits with status 143; rerun the command to resume.
"""

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mrl_jax import export, train_lib
from mrl_jax.preemption import Preempted

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events.")
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() first (one process per host). On TPU, "
                  "Slurm and Open MPI the coordinator and process ids are found automatically.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
flags.DEFINE_integer("process_id", None, "This process's index (with --distributed).")
flags.DEFINE_string("export_dir", None,
                    "Where to write the inference bundle at the end (default: WORKDIR/encoder; "
                    "'' to skip). With config.best_metric the best step is exported.")
flags.mark_flags_as_required(["config", "workdir"])

PREEMPTED_EXIT_CODE = 128 + 15  # as if ended by SIGTERM


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if FLAGS.distributed:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; no-op elsewhere
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if FLAGS.config.get("task") == "pairs":  # text embedding training (configs/text_pairs.py)
    from mrl_jax import text_train_lib
    result = text_train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    print(text_train_lib.format_result(result))
    return
  experiment = train_lib.Experiment(FLAGS.config, FLAGS.workdir)
  try:
    result = experiment.train()
  except Preempted as e:
    logging.warning("%s", e)
    sys.exit(PREEMPTED_EXIT_CODE)
  main_process = jax.process_index() == 0
  if main_process:
    print("final eval top-1 per dim: " + ", ".join(
        f"{m}: {100 * a:.2f}%"
        for m, a in zip(result["dims"], result["eval"]["top1_per_dim"], strict=True)))
  export_dir = os.path.join(FLAGS.workdir, "encoder") if FLAGS.export_dir is None \
      else FLAGS.export_dir
  if export_dir:
    step = experiment.checkpointer.best_step()
    export.export_encoder(FLAGS.workdir, export_dir, step=step, overwrite=True)
    if main_process:
      print(f"exported the encoder of step {step} to {export_dir}")


if __name__ == "__main__":
  app.run(main)
