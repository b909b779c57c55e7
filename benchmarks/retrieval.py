"""Exact vs adaptive vs funnel retrieval on a synthetic database, side by side.

    python benchmarks/retrieval.py                       # 500,000 x 2048, 1,000 queries
    python benchmarks/retrieval.py --n 100000 --faiss flat,hnsw

Prints the device, the sizes, and for each method the paper's FLOPs/query, the wall
time and the process CPU time of the whole query set (best of ``--repeats`` runs,
each after a warm-up batch that compiles), the speedups over exact full-dim search,
and recall@k relative to exact search (the fraction of the exact top-k ids found).
Printed, not asserted. Memory: about ``n * dim * 4`` bytes plus small caches.

The synthetic embeddings mimic a Matryoshka model (see :func:`synthetic`): early
dims carry most of the class signal.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--n", type=int, default=500_000, help="database size")
  p.add_argument("--dim", type=int, default=2048, help="full embedding size")
  p.add_argument("--queries", type=int, default=1000)
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--shortlist-dim", type=int, default=16, help="D_s")
  p.add_argument("--shortlist-k", type=int, default=200, help="K")
  p.add_argument("--funnel-dims", default="16,32,64,128,256,2048")
  p.add_argument("--funnel-shortlist", default="200,100,50,25,10")
  p.add_argument("--faiss", default="flat", help="comma list of flat,hnsw, or 'none'")
  p.add_argument("--classes", type=int, default=1000)
  p.add_argument("--repeats", type=int, default=2, help="timed runs per method (best kept)")
  p.add_argument("--devices", type=int, default=1,
                 help="CPU devices to shard the database over (sets XLA_FLAGS)")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def aligned_empty(shape, dtype, align: int = 64):
  """An uninitialised numpy array whose data is ``align``-byte aligned (JAX can alias it)."""
  import numpy as np
  nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
  buf = np.empty(nbytes + align, np.uint8)
  off = (-buf.ctypes.data) % align
  return buf[off:off + nbytes].view(dtype).reshape(shape)


def synthetic(n: int, dim: int, classes: int, seed: int):
  """``([n, dim] float32 class-structured embeddings, [n] labels)``, Matryoshka-like.

  ``x_j = (4 * c_{y, j} * (j + 1) ** -0.5 + noise_j) * (j + 1) ** -0.5``: dim ``j``'s
  variance decays like ``1 / (j + 1)`` and its share of class signal decays too, so
  a short prefix already ranks by class almost as well as the full vector (as in
  the paper). The class centres ``c`` are the same for every ``seed``.
  """
  import numpy as np
  centres = np.random.default_rng(1234).standard_normal((classes, dim), dtype=np.float32)
  rng = np.random.default_rng(seed)
  decay = (np.arange(dim, dtype=np.float32) + 1.0) ** -0.5
  centres *= 4.0 * decay
  x = aligned_empty((n, dim), np.float32)
  y = rng.integers(0, classes, n)
  chunk = 16384
  for lo in range(0, n, chunk):
    hi = min(n, lo + chunk)
    x[lo:hi] = rng.standard_normal((hi - lo, dim), dtype=np.float32)
    x[lo:hi] += centres[y[lo:hi]]
    x[lo:hi] *= decay
  return x, y


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.devices > 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}")
  import jax
  import numpy as np

  from mrl_jax.evaluate import retrieval
  from mrl_jax.evaluate.index import PrefixIndex
  from mrl_jax.evaluate.metrics import map_at_k, relevance

  funnel_dims = tuple(int(d) for d in args.funnel_dims.split(","))
  funnel_keep = tuple(int(k) for k in args.funnel_shortlist.split(","))
  faiss_kinds = [] if args.faiss == "none" else [s for s in args.faiss.split(",") if s]
  print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
        f"jax {jax.__version__}")
  print(f"database: {args.n:,} x {args.dim} float32 ({args.n * args.dim * 4 / 2**30:.2f} GiB), "
        f"{args.queries:,} queries, top-{args.k}, {args.classes} classes")
  t0 = time.perf_counter()
  db, db_labels = synthetic(args.n, args.dim, args.classes, args.seed)
  queries, query_labels = synthetic(args.queries, args.dim, args.classes, args.seed + 1)
  index = PrefixIndex(db)
  index.prepare((args.shortlist_dim, args.dim))
  index.prepare(funnel_dims)
  print(f"data + caches: {time.perf_counter() - t0:.1f} s "
        f"(normalised {args.shortlist_dim}-d prefix cached: "
        f"{index.normalised(args.shortlist_dim) is not None})")

  methods = [("exact", f"{args.dim}-d", dict(dims=(args.dim,), keeps=(args.k,)))]
  methods.append(("adaptive", f"{args.shortlist_dim}->{args.dim}, K={args.shortlist_k}",
                  dict(dims=(args.shortlist_dim, args.dim), keeps=(args.shortlist_k, args.k))))
  methods.append(("funnel", "->".join(map(str, funnel_dims)) + " / "
                  + "->".join(map(str, funnel_keep)),
                  dict(dims=funnel_dims, keeps=funnel_keep + (funnel_keep[-1],))))
  for kind in faiss_kinds:
    methods.append((f"adaptive faiss-{kind}", f"{args.shortlist_dim}->{args.dim}, "
                    f"K={args.shortlist_k}", dict(dims=(args.shortlist_dim, args.dim),
                                                  keeps=(args.shortlist_k, args.k),
                                                  backend="faiss", faiss_index=kind)))
  rows, exact = [], None
  for name, desc, kw in methods:
    retrieval.cascade_retrieval(queries[:index.query_batch], index, timed=False, **kw)  # compile
    best_wall, best_cpu, result = float("inf"), float("inf"), None
    for _ in range(args.repeats):
      c0, t0 = time.process_time(), time.perf_counter()
      result = retrieval.cascade_retrieval(queries, index, timed=False, **kw)
      best_wall = min(best_wall, time.perf_counter() - t0)
      best_cpu = min(best_cpu, time.process_time() - c0)
    if exact is None:
      exact = result
    found = [len(np.intersect1d(a, b)) for a, b in zip(result.ids, exact.ids, strict=True)]
    recall = float(np.mean(found)) / args.k
    mean_ap = map_at_k(relevance(result.ids, db_labels, query_labels), args.k)
    rows.append((name, desc, result.mflops_per_query, best_wall, best_cpu, recall, mean_ap))
    print(f"  {name}: {best_wall:.3f} s", flush=True)

  ex_wall, ex_cpu, ex_flops = rows[0][3], rows[0][4], rows[0][2]
  print()
  print(f"{'method':<22} {'setting':<40} {'MFLOPs/q':>9} {'wall s':>8} {'ms/q':>7} "
        f"{'speedup':>8} {'FLOPs x':>8} {'cpu s':>7} {'cpu x':>6} {'R@' + str(args.k):>6} "
        f"{'mAP@' + str(args.k):>7}")
  for name, desc, mflops, wall, cpu, recall, mean_ap in rows:
    print(f"{name:<22} {desc:<40} {mflops:>9.2f} {wall:>8.3f} {1e3 * wall / args.queries:>7.3f} "
          f"{ex_wall / wall:>7.1f}x {ex_flops / mflops:>7.1f}x {cpu:>7.2f} {ex_cpu / cpu:>5.1f}x "
          f"{recall:>6.3f} {100 * mean_ap:>7.2f}")
  print(f"\nwall / cpu: best of {args.repeats} runs over all {args.queries} queries (compiled "
        f"beforehand), wall-clock and process CPU seconds; speedup and cpu x: exact's time / "
        f"the method's; FLOPs x: the paper's FLOP ratio; R@{args.k}: share of the exact "
        f"top-{args.k} ids found; mAP@{args.k} (%): paper's mAP, relevant = same class.")


if __name__ == "__main__":
  main()
