"""Loss + gradient time of the nested in-batch softmax: fused vs unfused vs plain.

  python benchmarks/nested_loss.py [--batch 256] [--rounds 100] [--negatives K]

For each setting it times ``jax.value_and_grad`` (w.r.t. anchors and positives,
and the ``[B, K, D]`` hard negatives with ``--negatives K``) of three jitted
losses on random embeddings:

* ``plain``: :func:`mrl_jax.losses.in_batch_softmax` at the full size ``D``;
* ``unfused``: ``matryoshka(in_batch_softmax, dims)``, one similarity matmul per size;
* ``fused``: :func:`mrl_jax.losses.nested_in_batch_softmax`.

The variants run interleaved call by call for ``--rounds`` rounds; the best
(least disturbed by other load on a shared machine) and the median per-call
times are printed, with ratios to ``plain``. The target is fused <= 1.4x.
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
from mrl_jax.core.nesting import default_dims  # noqa: E402

SETTINGS = (
    ("D=768, dims 64..768", 768, (64, 128, 256, 512, 768)),
    ("D=2048, dims 8..2048", 2048, default_dims(2048, start=8)),
)


def _variants(dims):
  unfused = losses.matryoshka(losses.in_batch_softmax, dims)
  return {
      "plain": losses.in_batch_softmax,
      "unfused": unfused,
      "fused": lambda a, p, n=None: losses.nested_in_batch_softmax(a, p, dims, negatives=n),
  }


def _time(fns, args, rounds):
  """Per-call times, the variants interleaved call by call: ``{name: [seconds, ...]}``."""
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=100)
  parser.add_argument("--negatives", type=int, default=0, help="hard negatives per row")
  flags = parser.parse_args()
  print(f"{device_line()}, batch {flags.batch}, {flags.negatives} hard negatives per row")
  for title, embed_dim, dims in SETTINGS:
    rng = np.random.default_rng(0)
    shapes = [(flags.batch, embed_dim)] * 2
    if flags.negatives:
      shapes.append((flags.batch, flags.negatives, embed_dim))
    args = tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes)
    fns = {name: jax.jit(jax.value_and_grad(fn, tuple(range(len(args)))))
           for name, fn in _variants(dims).items()}
    values = {name: float(fn(*args)[0]) for name, fn in fns.items()}  # compile + warm up
    if not np.isclose(values["fused"], values["unfused"], rtol=1e-5):
      raise AssertionError(f"fused {values['fused']} != unfused {values['unfused']}")
    times = _time(fns, args, flags.rounds)
    best = {name: min(t) for name, t in times.items()}
    median = {name: float(np.median(t)) for name, t in times.items()}
    print(f"{title} (M={len(dims)}): loss+grad per call, best and median of {flags.rounds}")
    for name in fns:
      print(f"  {name:8s} best {1e3 * best[name]:7.2f} ms ({best[name] / best['plain']:4.2f}x)"
            f"   median {1e3 * median[name]:7.2f} ms ({median[name] / median['plain']:4.2f}x)")
    print(f"  fused is {best['unfused'] / best['fused']:.2f}x faster than unfused (best)")

if __name__ == "__main__":
  main()
