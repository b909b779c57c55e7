"""MRL-E fused head vs per-dim matmuls vs one ordinary head: forward + backward time.

    python benchmarks/heads.py [--batch 256 --dim 2048 --classes 1000]

Prints median times of jitted value-and-grad (w.r.t. the embedding and the
head's parameters) measured side by side in one run, and the ratios next to the
project's target (MRL-E head <= 1.25x a single head). Two objectives:
``linear`` (sum of logits times a fixed random cotangent: the head alone) and
``nested CE`` (the nested softmax cross-entropy on top, as in training).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import device_line, median_seconds  # noqa: E402

from mrl_jax.core.heads import FixedFeatureHead, MRLHead  # noqa: E402
from mrl_jax.core.nesting import default_dims  # noqa: E402
from mrl_jax.core.prefix_matmul import naive_prefix_matmul  # noqa: E402
from mrl_jax.losses import nested_softmax_cross_entropy  # noqa: E402

TARGET = 1.25


def naive_mrl_e(params, z, dims):
  return naive_prefix_matmul(z, params["kernel"], dims) + params["bias"]


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--dim", type=int, default=2048)
  parser.add_argument("--classes", type=int, default=1000)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()
  dims = default_dims(args.dim)
  kz, kp, kl = jax.random.split(jax.random.PRNGKey(0), 3)
  z = jax.random.normal(kz, (args.batch, args.dim))
  labels = jax.random.randint(kl, (args.batch,), 0, args.classes)
  fused = MRLHead(args.classes, dims, tied=True)
  separate = MRLHead(args.classes, dims, tied=False)
  single = FixedFeatureHead(args.classes, args.dim)
  p_tied = fused.init(kp, z)["params"]
  p_sep = separate.init(kp, z)["params"]
  p_single = single.init(kp, z)["params"]
  heads = {
      "single head (D-wide)": (lambda p, z: single.apply({"params": p}, z)[None], p_single),
      "MRL-E fused (mrl_jax)": (lambda p, z: fused.apply({"params": p}, z), p_tied),
      "MRL-E per-dim matmuls": (lambda p, z: naive_mrl_e(p, z, dims), p_tied),
      "MRL separate heads": (lambda p, z: separate.apply({"params": p}, z), p_sep),
  }
  print(device_line())
  print(f"B={args.batch} D={args.dim} C={args.classes} dims={list(dims)}")
  for objective in ("linear", "nested CE"):
    times = {}
    for name, (apply, params) in heads.items():
      if objective == "linear":
        cot = jax.random.normal(kl, (1 if name.startswith("single") else len(dims),
                                     args.batch, args.classes))
        loss = lambda p, z, apply=apply, cot=cot: jnp.sum(apply(p, z) * cot)
      else:
        loss = lambda p, z, apply=apply: nested_softmax_cross_entropy(apply(p, z), labels)
      step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
      times[name] = median_seconds(lambda step=step, params=params: step(params, z),
                                   repeats=args.repeats)
    base = times["single head (D-wide)"]
    print(f"\n[{objective}] forward+backward, median of {args.repeats}")
    for name, t in times.items():
      print(f"  {name:24s} {1e3 * t:8.2f} ms   {t / base:5.2f}x single head")
    fused_ratio = times["MRL-E fused (mrl_jax)"] / base
    speedup = times["MRL-E per-dim matmuls"] / times["MRL-E fused (mrl_jax)"]
    verdict = "met" if fused_ratio <= TARGET else "MISSED"
    print(f"  MRL-E fused vs single head: {fused_ratio:.2f}x (target <= {TARGET}x: {verdict}); "
          f"fused vs per-dim: {speedup:.2f}x faster")


if __name__ == "__main__":
  main()
