"""Train any task: ``python train.py --config=configs/NAME.py --workdir=DIR``.

``config.task`` picks the task (``classification``, ``pairs``, ``adaptor``, or
your own, see ``mrl_jax.tasks``); every task runs through the one loop of
``mrl_jax.train.loop``. Resumes from the latest checkpoint in ``DIR`` when there
is one, and exports the encoder to ``DIR/encoder`` at the end (load it with
``mrl_jax.bundle.encoder.Encoder.load``).

Override any config field with ``--config.FIELD=VALUE`` (e.g.
``--config.head=mrl_e``, ``--config.nesting.dims='(64, 32, 16)'``); the fields
and their meaning are in the config file itself and in
``mrl_jax.train.config.base_config`` (the fields every task shares).

Multi-host (TPU pod slices, Slurm, MPI): run the same command on every host
with ``--distributed``; elsewhere also pass ``--coordinator_address``,
``--num_processes`` and ``--process_id``. A ``SIGTERM`` (preemption notice)
writes a checkpoint and exits with status 143; rerun the command to resume.
A user error (bad config, bad file, refused checkpoint) ends with one line on
stderr and exit status 2; ``--debug`` shows the traceback.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mrl_jax import experiments
from mrl_jax.bundle.artifact import BundleError
from mrl_jax.train import config as config_lib
from mrl_jax.train import loop, specs
from mrl_jax.train.checkpoints import CheckpointError
from mrl_jax.train.preemption import Preempted

FLAGS = flags.FLAGS
config_lib.accept_none_on_command_line()  # --config.X=None for every optional field
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events.")
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() first (one process per host). On TPU, "
                  "Slurm and Open MPI the coordinator and process ids are found automatically.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
flags.DEFINE_integer("process_id", None, "This process's index (with --distributed).")
flags.DEFINE_string("export_dir", None,
                    "Where to write the encoder at the end (default: WORKDIR/encoder; '' to "
                    "skip). With config.checkpoint.best_metric the best step is exported.")
flags.DEFINE_bool("debug", False, "Show the traceback of user errors too.")
flags.mark_flags_as_required(["config", "workdir"])

PREEMPTED_EXIT_CODE = 128 + 15  # as if ended by SIGTERM
USER_ERROR_EXIT_CODE = 2
# What a user can cause and fix: shown as one line, not a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
               PermissionError, CheckpointError, BundleError, loop.NonFiniteLossError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if FLAGS.distributed:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; no-op elsewhere
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  try:
    experiment = experiments.create(FLAGS.config, FLAGS.workdir)
    try:
      result = experiment.train()
      if FLAGS.export_dir != "":
        result["export_dir"] = experiment.export(FLAGS.export_dir)
    finally:
      experiment.close()
  except Preempted as e:
    logging.warning("%s", e)
    sys.exit(PREEMPTED_EXIT_CODE)
  except USER_ERRORS as e:
    if FLAGS.debug:
      raise
    print(f"train.py: error: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT_CODE)
  if jax.process_index() == 0:
    print(experiment.task.describe(result))
    if result.get("export_dir"):
      print(f"exported the encoder to {result['export_dir']}")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad ``--config.FIELD`` reported in one line (exit 2)."""
  try:
    specs.check_no_moved_fields(
        arg.split("=", 1)[0].removeprefix("--config.") for arg in argv[1:]
        if arg.startswith("--config.") and "." not in arg.split("=", 1)[0][len("--config."):])
    argv, none_fields = config_lib.split_none_overrides(argv)  # --config.FIELD=None
    rest = FLAGS(argv)
    config_lib.apply_none_overrides(FLAGS.config, none_fields)
    return rest
  except flags.Error as e:
    problem = str(e)
  except (AttributeError, KeyError) as e:  # ml_collections: a field the config does not have
    problem = f"the config has no field {str(e).strip(chr(34))} (see the config file's fields)"
  except (TypeError, ValueError) as e:
    problem = str(e)
  print(f"train.py: error: bad command line: {problem}", file=sys.stderr)
  sys.exit(USER_ERROR_EXIT_CODE)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
