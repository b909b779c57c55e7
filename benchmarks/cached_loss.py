"""Peak memory and step time of the cached (GradCache) step vs the full-batch step.

  python benchmarks/cached_loss.py [--batch 1024] [--mini-batch 64] [--rounds 3]

A tiny BERT (:class:`mrl_jax.models.text.TextEncoder`, hidden 64, 2 layers,
sequence 32, dropout on) embeds anchors and positives; the loss is the fused
nested in-batch softmax (:func:`mrl_jax.losses.nested_in_batch_softmax`).
For each step the script prints the compiled program's temporary memory
(``jax.stages.Compiled.memory_analysis().temp_size_in_bytes``, the activations
and scratch buffers: the peak that grows with the batch) and the median wall
time of the jitted ``value_and_grad``:

* ``full``: ``jax.value_and_grad`` through the encoder on the whole batch, at
  the largest of ``--batch``, ``--batch / 2``, ... that compiles and runs;
* ``cached``: :func:`mrl_jax.losses.cached_value_and_grad` at ``--batch`` in
  chunks of ``--mini-batch``.

Goal (issue 13): cached peak memory <= 1/4 of the full batch's, time overhead
<= +15% per example. GradCache re-runs every chunk's forward, so its compute is
about 4/3 of the full step's; the overhead measured is what remains.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import device_line  # noqa: E402

from mrl_jax import losses  # noqa: E402
from mrl_jax.models.text import BertConfig, TextEncoder  # noqa: E402

DIMS = (8, 16, 32, 64)
SEQ = 32
CONFIG = BertConfig(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4,
                    intermediate_size=256, max_position_embeddings=SEQ)
MODEL = TextEncoder(CONFIG)


def embed_fn(params, x, rng):
  """``{"anchor", "positive"}`` ids ``[b, T]`` -> embeddings ``[b, 64]`` each (dropout on)."""
  ids = jnp.concatenate([x["anchor"], x["positive"]])
  out = MODEL.apply({"params": params}, ids, jnp.ones_like(ids), train=True,
                    rngs={"dropout": rng})
  size = x["anchor"].shape[0]
  return {"anchor": out[:size], "positive": out[size:]}


def loss_fn(e):
  return losses.nested_in_batch_softmax(e["anchor"], e["positive"], DIMS), None


def full_step(params, x, rng):
  return jax.value_and_grad(lambda p: loss_fn(embed_fn(p, x, rng)), has_aux=True)(params)


def _inputs(batch: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.integers(1, CONFIG.vocab_size, size=(batch, SEQ)), jnp.int32)
          for k in ("anchor", "positive")}


def _measure(fn, args, rounds: int) -> tuple[int, float]:
  """``(temp bytes, median seconds)`` of a jitted ``fn(*args)``."""
  compiled = jax.jit(fn).lower(*args).compile()
  memory = compiled.memory_analysis()
  temp = int(memory.temp_size_in_bytes) if memory is not None else -1
  jax.block_until_ready(compiled(*args))  # warm up
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return temp, float(np.median(times))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=1024)
  parser.add_argument("--mini-batch", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=3)
  flags = parser.parse_args()
  print(f"{device_line()}; tiny BERT hidden {CONFIG.hidden_size}, {CONFIG.num_layers} layers, "
        f"seq {SEQ}, dims {DIMS}")
  params = MODEL.init(jax.random.key(0), _inputs(2)["anchor"], jnp.ones((2, SEQ), jnp.int32))
  params = params["params"]
  rng = jax.random.key(1)

  full_batch, full = flags.batch, None
  while full is None and full_batch >= flags.mini_batch:
    try:
      full = _measure(full_step, (params, _inputs(full_batch), rng), flags.rounds)
    except Exception as err:  # noqa: BLE001 - out of memory at compile or run time
      if "RESOURCE_EXHAUSTED" not in str(err) and "out of memory" not in str(err).lower():
        raise
      full_batch //= 2
  cached_fn = lambda p, x, r: losses.cached_value_and_grad(
      embed_fn, loss_fn, p, x, r, mini_batch_size=flags.mini_batch)
  cached = _measure(cached_fn, (params, _inputs(flags.batch), rng), flags.rounds)

  rows = [("full", full_batch, *full), (f"cached mb={flags.mini_batch}", flags.batch, *cached)]
  print(f"{'step':16s} {'batch':>6s} {'temp MiB':>9s} {'ms/step':>9s} {'us/example':>11s}")
  for name, batch, temp, sec in rows:
    print(f"{name:16s} {batch:6d} {temp / 2**20:9.1f} {1e3 * sec:9.1f} {1e6 * sec / batch:11.1f}")
  mem_ratio = cached[0] / full[0]
  time_ratio = (cached[1] / flags.batch) / (full[1] / full_batch)
  print(f"cached / full: peak temp memory {mem_ratio:.3f}x (goal <= 0.25), time per example "
        f"{time_ratio:.3f}x (goal <= 1.15)")


if __name__ == "__main__":
  main()
