"""``python -m mrl_jax.evaluate --encoder PATH`` (or ``--workdir DIR``): metrics at every dim."""

import argparse
import sys

from mrl_jax.evaluate.report import format_table
from mrl_jax.evaluate.workdir import evaluate_encoder, evaluate_workdir
from mrl_jax.export import BundleError


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--encoder", help="an exported encoder folder")
  source.add_argument("--workdir", help="a folder written by train.py (its encoder/)")
  parser.add_argument("--out_dir", default=None, help="default: beside the encoder, in eval/")
  args = parser.parse_args()
  try:
    if args.encoder:
      metrics = evaluate_encoder(args.encoder, out_dir=args.out_dir)
    else:
      metrics = evaluate_workdir(args.workdir, out_dir=args.out_dir)
  except (BundleError, FileNotFoundError, ValueError) as e:
    print(f"mrl_jax.evaluate: error: {e}", file=sys.stderr)
    sys.exit(2)
  if "per_dim" in metrics:
    print(format_table(metrics))
  else:
    for name, values in metrics.items():
      if name.endswith("_per_dim"):
        cells = ", ".join(f"{m}: {v:.4f}" for m, v in zip(metrics["dims"], values, strict=True))
        print(f"{name.removesuffix('_per_dim')} per dim: {cells}")
  print("\nwrote " + ", ".join(metrics.get("files", [])))


if __name__ == "__main__":
  main()
