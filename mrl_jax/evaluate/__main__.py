"""``python -m mrl_jax.evaluate --workdir DIR``: evaluate a trained workdir at every dim."""

import argparse

from mrl_jax.evaluate.report import format_table
from mrl_jax.evaluate.workdir import evaluate_workdir


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", required=True, help="a folder written by train.py")
  parser.add_argument("--out_dir", default=None, help="default: WORKDIR/eval")
  args = parser.parse_args()
  metrics = evaluate_workdir(args.workdir, out_dir=args.out_dir)
  print(format_table(metrics))
  print("\nwrote " + ", ".join(metrics.get("files", [])))


if __name__ == "__main__":
  main()
