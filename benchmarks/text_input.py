"""Text training input at corpus scale: preparation, input throughput, peak memory, side by side.

  python benchmarks/text_input.py [--pairs 5000000] [--small_pairs 50000] [--batch_size 1024]
                                  [--max_length 128] [--batches 20] [--train_steps 20]
                                  [--dir DIR]

1. Generates two JSONL pair files (``--pairs`` and ``--small_pairs`` rows) of
   random words from a 20,000-word vocabulary: anchors 6-20 words, positives
   40-160 words (most truncated at ``--max_length`` tokens), a few duplicates.
2. Preparation (:func:`mrl_jax.data.prepared_pairs.prepare_pairs`) of the big
   file: seconds and rows/s (hashing, parsing, tokenizing, writing).
3. Input throughput: pairs/s delivered at ``--batch_size`` rows of up to
   ``--max_length`` tokens by the prepared-shard pipeline with 0, 1 and 2 grain
   workers, against the in-memory reader of before (``PairMixture.batch`` +
   ``tokenize_pairs`` on the training thread, on the small file: its speed does
   not depend on the file's size, its memory does).
4. Peak resident memory (``ru_maxrss`` of a child process) of a
   ``--train_steps``-step ``train.py`` run of the pairs task (tiny random BERT)
   on the big prepared file against the same run on the small one.

The machine is shared: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from mrl_jax.data import pair_batches, prepared_pairs  # noqa: E402
from mrl_jax.data.text import (  # noqa: E402
    PairMixture,
    read_text_pairs,
    tokenize_pairs,
)
from mrl_jax.tokenizer import bucket_lengths, word_tokenizer  # noqa: E402

VOCAB = 20_000


def words(n: int) -> list[str]:
  return [f"w{i}" for i in range(n)]


def generate(path: str, rows: int, seed: int) -> float:
  """Write ``rows`` random pairs to ``path``; returns seconds."""
  start = time.perf_counter()
  rng = np.random.default_rng(seed)
  vocab = np.asarray(words(VOCAB))
  with open(path, "w", encoding="utf-8") as f:
    for start_row in range(0, rows, 10_000):
      n = min(10_000, rows - start_row)
      a_len, p_len = rng.integers(6, 21, n), rng.integers(40, 161, n)
      tokens = vocab[rng.integers(0, VOCAB, int(a_len.sum() + p_len.sum()))].tolist()
      lines, i = [], 0
      for a, p in zip(a_len.tolist(), p_len.tolist(), strict=True):
        anchor, positive = " ".join(tokens[i:i + a]), " ".join(tokens[i + a:i + a + p])
        i += a + p
        lines.append(json.dumps({"anchor": anchor, "positive": positive}) + "\n")
      f.writelines(lines)
  return time.perf_counter() - start


def throughput(it, batches: int, batch_size: int) -> float:
  """pairs/s over ``batches`` batches after 2 warm-up batches."""
  for _ in range(2):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch_size / (time.perf_counter() - start)


def in_memory(path: str, tokenizer, batch_size: int, buckets):
  pairs = read_text_pairs(path)
  mixture = PairMixture([pairs], batch_size=batch_size, seed=0)
  step = 0
  while True:
    yield tokenize_pairs(tokenizer, mixture.batch(step), buckets=buckets)
    step += 1


def peak_rss_of_training(prepared: str, workdir: str, steps: int, max_length: int,
                         workers: int) -> float:
  """Peak RSS (MiB) of a child ``train.py`` run of ``steps`` steps on ``prepared``.

  ``ru_maxrss`` of RUSAGE_CHILDREN is the largest single descendant: the trainer
  (with ``workers > 0`` the grain workers, which read the records, are separate).
  """
  code = (
      "import resource, subprocess, sys\n"
      f"r = subprocess.run([sys.executable, {os.path.join(REPO, 'train.py')!r}, "
      f"'--config={os.path.join(REPO, 'configs', 'text_pairs.py')}', '--workdir={workdir}', "
      f"'--config.train_file={prepared}', '--config.max_length={max_length}', "
      f"'--config.loop.num_train_steps={steps}', '--config.batch_size=64', "
      "'--config.loop.eval_every_steps=100000', '--config.checkpoint.every_steps=100000', "
      f"'--config.input_workers={workers}', "
      "'--config.loop.log_every_steps=10', '--config.optim.warmup_steps=2'], capture_output=True, "
      "text=True)\n"
      "assert r.returncode == 0, r.stderr[-3000:]\n"
      "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
  if out.returncode:
    raise RuntimeError(out.stderr[-3000:])
  return int(out.stdout.split()[-1]) / 1024


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--pairs", type=int, default=5_000_000)
  p.add_argument("--small_pairs", type=int, default=50_000)
  p.add_argument("--batch_size", type=int, default=1024)
  p.add_argument("--max_length", type=int, default=128)
  p.add_argument("--batches", type=int, default=20)
  p.add_argument("--train_steps", type=int, default=20)
  p.add_argument("--dir", default="/tmp/mrl_text_input_bench")
  args = p.parse_args()
  os.makedirs(args.dir, exist_ok=True)
  big, small = (os.path.join(args.dir, f"pairs_{n}.jsonl") for n in (args.pairs,
                                                                       args.small_pairs))
  rows = []
  for path, n in ((big, args.pairs), (small, args.small_pairs)):
    if not os.path.isfile(path):
      seconds = generate(path, n, seed=n)
      rows.append(f"generate {n:,} pairs: {seconds:.1f} s, "
                  f"{os.path.getsize(path) / 2**20:.0f} MiB")
  tokenizer = word_tokenizer(words(VOCAB), max_length=args.max_length)
  buckets = bucket_lengths(args.max_length)
  prepared = {}
  for path, n in ((big, args.pairs), (small, args.small_pairs)):
    out = os.path.join(args.dir, "prepared", os.path.basename(path))
    start = time.perf_counter()
    if prepared_pairs.ensure_prepared(path, out, tokenizer):
      seconds = time.perf_counter() - start
      mib = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 2**20
      rows.append(f"prepare {n:,} pairs: {seconds:.1f} s = {n / seconds:,.0f} pairs/s "
                  f"({mib:.0f} MiB on disk)")
    prepared[n] = out
  source = prepared_pairs.PreparedPairs(prepared[args.pairs])
  batches = pair_batches.LocalBatches([source], None, batch_size=args.batch_size, seed=0,
                                      buckets=buckets)
  rates = {}
  for workers in (0, 1, 2):
    it = pair_batches.train_batches(batches, worker_count=workers)
    rates[f"prepared shards, {workers} workers"] = throughput(it, args.batches, args.batch_size)
    it.close()
  rates["in-memory reader (before)"] = throughput(
      in_memory(small, tokenizer, args.batch_size, buckets), args.batches, args.batch_size)
  base = rates["in-memory reader (before)"]
  rows.append(f"input throughput at B={args.batch_size}, <= {args.max_length} tokens:")
  rows += [f"  {name:34s} {r:10,.0f} pairs/s  ({r / base:.2f}x)" for name, r in rates.items()]
  for workers in (0, 1):
    rss = {n: peak_rss_of_training(prepared[n], os.path.join(args.dir, f"run_{n}_{time.time()}"),
                                   args.train_steps, args.max_length, workers)
           for n in (args.pairs, args.small_pairs)}
    rows.append(f"peak RSS of a {args.train_steps}-step train.py run, input_workers={workers}: "
                f"{args.pairs:,} pairs {rss[args.pairs]:.0f} MiB, {args.small_pairs:,} pairs "
                f"{rss[args.small_pairs]:.0f} MiB ({rss[args.pairs] / rss[args.small_pairs]:.3f}x)")
  rows.append(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
              f"this process' peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
  print("\n".join(rows))


if __name__ == "__main__":
  main()
