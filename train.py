"""Train any config: ``python train.py --config=configs/NAME.py --workdir=DIR``.

Resumes from the latest checkpoint in ``DIR`` when there is one. Override
fields with ``--config.FIELD=VALUE`` (e.g. ``--config.head=mrl_e``).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from mrl_jax import train_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events.")
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  if FLAGS.config.get("task") == "pairs":  # text embedding training (configs/text_pairs.py)
    from mrl_jax import text_train_lib
    result = text_train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    print(text_train_lib.format_result(result))
    return
  result = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  dims = result["dims"]
  top1 = result["eval"]["top1_per_dim"]
  print("final eval top-1 per dim: " + ", ".join(
      f"{m}: {100 * a:.2f}%" for m, a in zip(dims, top1, strict=True)))


if __name__ == "__main__":
  app.run(main)
