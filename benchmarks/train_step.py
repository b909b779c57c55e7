"""Examples/sec of the ResNet-50 train step: MRL head vs one ordinary head vs MRL-E.

  python benchmarks/train_step.py [--batch_size 8] [--image_size 224] [--steps 1]
                                  [--rounds 8] [--bf16 | --no-bf16]

The model and optimiser are those of ``configs/imagenet_resnet50.py`` (1000
classes, SGD with momentum and weight decay, label smoothing 0.1); only the
head differs: ``mrl`` (9 nested classifiers, 8..2048), ``mrl_e`` (one tied
classifier, fused prefix matmul) and ``ff`` at 2048 dims, the ordinary
single-head ResNet-50. The step is :func:`mrl_jax.train.loop.train_step`,
jitted with the state donated, on whatever device JAX sees. After one
compiling step per head, the heads take turns for ``--rounds`` rounds of
``--steps`` steps each, so that a load change on a shared machine hits all of
them alike; each head's fastest round (and the median) is reported. The
paper's claim: the nested heads add negligible cost to a ResNet-50 step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import imagenet_resnet50  # noqa: E402
from mrl_jax import experiments  # noqa: E402
from mrl_jax.tasks.classification import ClassificationTask  # noqa: E402
from mrl_jax.train import config as config_lib  # noqa: E402
from mrl_jax.train import loop, optim  # noqa: E402
from mrl_jax.train import sharding as sharding_lib  # noqa: E402

HEADS = {"mrl": "MRL", "ff": "single head (FF-2048)", "mrl_e": "MRL-E"}
NUM_CLASSES = 1000


def build_step(head: str, args: argparse.Namespace, mesh: jax.sharding.Mesh):
  """``(step_fn, state)`` for the ResNet-50 recipe with ``head``."""
  config = imagenet_resnet50.get_config()
  config.head = head
  config.ff_dim = 2048 if head == "ff" else None
  config.batch_size = args.batch_size
  config.half_precision = args.bf16
  config = experiments.validate_config(config, num_devices=mesh.size)
  spec = ClassificationTask.parse_spec(config)
  task = ClassificationTask.without_data(spec, mesh=mesh, num_classes=NUM_CLASSES,
                                        input_shape=(args.image_size, args.image_size, 3))
  schedule = optim.learning_rate_schedule(config_lib.spec_of(config), steps_per_epoch=1251)
  state = loop.create_train_state(
      task, jax.random.PRNGKey(0), optim.make_optimizer(config_lib.spec_of(config).optim, schedule),
      mesh)
  step = loop.jit_train_step(task, schedule, mesh, jax.tree.map(lambda x: x.sharding, state))
  return step, state


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--steps", type=int, default=1, help="timed steps per round")
  parser.add_argument("--rounds", type=int, default=8)
  parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                      help="bf16 compute (default: on accelerators, off on CPU)")
  args = parser.parse_args()
  device = jax.devices()[0]
  if args.bf16 is None:
    args.bf16 = device.platform != "cpu"
  # The init programs' threefry bits take minutes to compile on a small CPU;
  # the timed train step draws no random numbers, so the PRNG does not matter.
  jax.config.update("jax_default_prng_impl", "rbg")
  mesh = sharding_lib.make_mesh()
  print(f"device: {jax.device_count()} x {device.device_kind} ({device.platform}), "
        f"jax {jax.__version__}")
  print(f"ResNet-50, {NUM_CLASSES} classes, global batch {args.batch_size}, "
        f"{args.image_size}x{args.image_size} px, {'bf16' if args.bf16 else 'float32'} compute, "
        f"{args.rounds} rounds x {args.steps} steps per head")
  rng = np.random.default_rng(0)
  batch = sharding_lib.as_global(
      {"image": rng.normal(size=(args.batch_size, args.image_size, args.image_size, 3))
       .astype(np.float32),
       "label": rng.integers(0, NUM_CLASSES, args.batch_size).astype(np.int32)},
      sharding_lib.batch_sharding(mesh))
  runs = {}
  for head in HEADS:
    tick = time.perf_counter()
    step, state = build_step(head, args, mesh)
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    print(f"  {head}: init + compile + first step {time.perf_counter() - tick:.1f} s")
    runs[head] = [step, state, []]
  for _ in range(args.rounds):
    for run in runs.values():
      step, state, times = run
      tick = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = step(state, batch)
      jax.block_until_ready((state, metrics))
      times.append((time.perf_counter() - tick) / args.steps)
      run[1] = state
  best = {head: min(run[2]) for head, run in runs.items()}
  median = {head: float(np.median(run[2])) for head, run in runs.items()}
  for head, name in HEADS.items():
    print(f"{name:>22}: {args.batch_size / best[head]:8.2f} examples/s "
          f"(best {1e3 * best[head]:.0f} ms/step, median {1e3 * median[head]:.0f}; rounds: "
          + ", ".join(f"{1e3 * t:.0f}" for t in runs[head][2]) + " ms)")
  for head in ("mrl", "mrl_e"):
    print(f"step time {HEADS[head]} / single head: {best[head] / best['ff']:.3f}x best, "
          f"{median[head] / median['ff']:.3f}x median")


if __name__ == "__main__":
  main()
