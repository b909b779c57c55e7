"""Exact vs adaptive vs funnel retrieval, float and binary/int8 shortlists, side by side.

    python benchmarks/retrieval.py                       # 500,000 x 2048, 1,000 queries
    python benchmarks/retrieval.py --n 50000 --dim 512 --funnel-dims 16,32,64,128,256,512
    python benchmarks/retrieval.py --faiss flat,hnsw,binary --profile

Prints the device, the sizes, the load average (``os.getloadavg``) before and after,
and for each method: bytes per database vector that its shortlist stage scans, the
paper's float MFLOPs/query, the wall time and the process CPU time of the whole query
set (each the MEDIAN of ``--repeats`` runs, after a warm-up batch that compiles), the
wall and CPU speedups over exact full-dim search side by side, recall@k against exact
search (the share of the exact top-k ids found) and mAP@k. ``--profile`` splits the
time of the float and binary adaptive cascades into their parts (scan, top-k, rescore,
re-rank gather). Printed, not asserted. Memory: about ``n * dim * 4`` bytes plus small
caches. Run it on an otherwise idle machine: the load average shows whether it was.

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
  p.add_argument("--binary-dims", default="16,32",
                 help="D_s of the binary-code shortlists (comma list, or 'none')")
  p.add_argument("--int8-dims", default="16", help="D_s of the int8-code shortlists, or 'none'")
  p.add_argument("--funnel-dims", default="16,32,64,128,256,2048")
  p.add_argument("--funnel-shortlist", default="200,100,50,25,10")
  p.add_argument("--faiss", default="flat,binary",
                 help="comma list of flat,hnsw,binary (FAISS shortlist peers), or 'none'")
  p.add_argument("--faiss-binary-dims", default="32",
                 help="D_s of the FAISS IndexBinaryFlat peer rows (comma list)")
  p.add_argument("--classes", type=int, default=1000)
  p.add_argument("--repeats", type=int, default=5, help="timed runs per method (median kept)")
  p.add_argument("--profile", action="store_true",
                 help="also time the parts of the float and binary adaptive cascades")
  p.add_argument("--devices", type=int, default=1,
                 help="CPU devices to shard the database over (sets XLA_FLAGS)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if args.repeats < 1 or args.n < 1 or args.queries < 1 or args.k < 1:
    p.error("--repeats, --n, --queries and --k must be positive")
  return args


def _dims(text: str) -> list[int]:
  return [] if text == "none" else [int(d) for d in text.split(",") if d]


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


def _load() -> str:
  return "/".join(f"{v:.2f}" for v in os.getloadavg())


def _median_run(fn, repeats: int):
  """``(result, median wall s, median CPU s)`` of ``repeats`` calls (after the warm-up)."""
  import numpy as np
  walls, cpus, result = [], [], None
  for _ in range(repeats):
    c0, t0 = time.process_time(), time.perf_counter()
    result = fn()
    walls.append(time.perf_counter() - t0)
    cpus.append(time.process_time() - c0)
  return result, float(np.median(walls)), float(np.median(cpus))


def profile(index, queries, args) -> None:
  """Median wall/CPU seconds of each part of the D_s -> D adaptive cascade, all queries."""
  import jax.numpy as jnp

  qb = index.query_batch
  batches = [jnp.asarray(queries[lo:lo + qb]) for lo in range(0, len(queries) - qb + 1, qb)]
  if not batches:
    print("profile: fewer queries than one batch; skipped")
    return
  for label, codes in (("float", None), ("ubinary", "ubinary")):
    _profile_cascade(index, batches, label, codes, args)


def _profile_cascade(index, batches, label, codes, args) -> None:
  import jax
  import jax.numpy as jnp

  from mrl_jax.evaluate import codes as codes_lib
  from mrl_jax.evaluate import knn
  from mrl_jax.evaluate.index import normalize_prefix

  ds, big, kk, sb = args.shortlist_dim, args.dim, args.shortlist_k, index.sub_batch
  plan = index.block_plan(ds, codes)
  kind = "float" if codes is None else "hamming"
  mat = index.normalised(ds) if codes is None else index.scan_codes(codes, ds)
  width = ds if codes is None else mat.shape[1]
  q0 = [normalize_prefix(q, ds) if codes is None else
        codes_lib.to_words(codes_lib.quantize_embeddings(normalize_prefix(q, ds), codes))
        for q in batches]

  def timed(name, fn, inputs):
    jax.block_until_ready([fn(*a) for a in inputs[:1]])
    out, wall, cpu = _median_run(lambda: jax.block_until_ready([fn(*a) for a in inputs]),
                                 args.repeats)
    print(f"  {name:<44} {wall:>8.3f} {cpu:>8.3f}")
    return out

  print(f"\nprofile, {label} {ds}->{big}, K={kk}, {len(batches) * index.query_batch} queries "
        f"({plan}):")
  print(f"  {'part':<44} {'wall s':>8} {'cpu s':>8}")
  scan = jax.jit(lambda q, m: knn.group_maxima(q, m, None, plan.n, plan, width, kind))
  maxima = timed(f"scan ({label} group maxima)", scan, [(q, mat) for q in q0])
  if plan.group > 1:
    pick = jax.jit(lambda m: knn.ascending(jax.lax.top_k(m, kk)[1]))
    groups = timed(f"top-k of {plan.num_groups} group maxima", pick, [(m,) for m in maxima])
    rescore = jax.jit(lambda q, m, g: knn.rescore_groups(q, m, None, plan.n, g, plan, width, sb,
                                                         kind))
    cands = timed(f"rescore {kk} x {plan.group} rows", rescore,
                  [(q, mat, g) for q, g in zip(q0, groups, strict=True)])
    top = jax.jit(lambda s, r: jnp.take_along_axis(r, jax.lax.top_k(s, kk)[1], axis=-1))
    ids = timed(f"top-k of {kk * plan.group} rescored", top, cands)
  else:
    ids = [jax.lax.top_k(m, kk)[1] for m in maxima]
  inv = index.inv_norm(big)
  rerank = jax.jit(lambda q, db, s, i: jax.lax.top_k(knn.gather_scores(
      normalize_prefix(q, big), db, s, i, big, sb), args.k))
  timed(f"re-rank: gather {kk} x {big} floats + top-{args.k}", rerank,
        [(q, index.database, inv, i) for q, i in zip(batches, ids, strict=True)])


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.devices > 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}")
  import jax

  from mrl_jax.evaluate import retrieval
  from mrl_jax.evaluate.index import PrefixIndex
  from mrl_jax.evaluate.metrics import map_at_k, overlap_at_k, relevance

  funnel_dims = tuple(_dims(args.funnel_dims))
  funnel_keep = tuple(_dims(args.funnel_shortlist))
  faiss_kinds = [] if args.faiss == "none" else [s for s in args.faiss.split(",") if s]
  print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
        f"jax {jax.__version__}")
  print(f"load average (1/5/15 min) before: {_load()}")
  print(f"database: {args.n:,} x {args.dim} float32 ({args.n * args.dim * 4 / 2**30:.2f} GiB), "
        f"{args.queries:,} queries, top-{args.k}, {args.classes} classes")
  t0 = time.perf_counter()
  db, db_labels = synthetic(args.n, args.dim, args.classes, args.seed)
  queries, query_labels = synthetic(args.queries, args.dim, args.classes, args.seed + 1)
  index = PrefixIndex(db)
  index.prepare((args.shortlist_dim, args.dim))
  index.prepare(funnel_dims)
  for d in _dims(args.binary_dims) + _dims(args.faiss_binary_dims):
    index.prepare((d, args.dim), shortlist_codes="ubinary")
  for d in _dims(args.int8_dims):
    index.prepare((d, args.dim), shortlist_codes="int8_symmetric")
  print(f"data + caches: {time.perf_counter() - t0:.1f} s")

  sk, kk, full = args.shortlist_dim, args.shortlist_k, args.dim
  adaptive = lambda d, **kw: dict(dims=(d, full), keeps=(kk, args.k), **kw)
  methods = [("exact", f"{full}-d", dict(dims=(full,), keeps=(args.k,))),
             ("adaptive", f"{sk}->{full}, K={kk}", adaptive(sk))]
  for d in _dims(args.binary_dims):
    methods.append(("adaptive binary", f"{d}->{full}, K={kk}",
                    adaptive(d, shortlist_codes="ubinary")))
  for d in _dims(args.int8_dims):
    methods.append(("adaptive int8", f"{d}->{full}, K={kk}",
                    adaptive(d, shortlist_codes="int8_symmetric")))
  methods.append(("funnel", "->".join(map(str, funnel_dims)) + " / "
                  + "->".join(map(str, funnel_keep)),
                  dict(dims=funnel_dims, keeps=funnel_keep + (funnel_keep[-1],))))
  for kind in faiss_kinds:
    if kind == "ubinary":
      for d in _dims(args.faiss_binary_dims):
        methods.append(("adaptive faiss-binary", f"{d}->{full}, K={kk}",
                        adaptive(d, shortlist_codes="ubinary", backend="faiss")))
    else:
      methods.append((f"adaptive faiss-{kind}", f"{sk}->{full}, K={kk}",
                      adaptive(sk, backend="faiss", faiss_index=kind)))

  rows, exact = [], None
  for name, desc, kw in methods:
    retrieval.cascade_retrieval(queries[:index.query_batch], index, timed=False, **kw)  # compile
    result, wall, cpu = _median_run(
        lambda kw=kw: retrieval.cascade_retrieval(queries, index, timed=False, **kw),
        args.repeats)
    if exact is None:
      exact = result
    recall = overlap_at_k(result.ids, exact.ids, args.k)
    mean_ap = map_at_k(relevance(result.ids, db_labels, query_labels), args.k)
    rows.append((name, desc, result.bytes_per_vector, result.mflops_per_query, wall, cpu, recall,
                 mean_ap))
    print(f"  {name} {desc}: wall {wall:.3f} s, cpu {cpu:.3f} s", flush=True)

  ex_wall, ex_cpu = rows[0][4], rows[0][5]
  print()
  print(f"{'method':<22} {'setting':<30} {'B/vec':>6} {'MFLOPs/q':>9} {'wall s':>8} {'cpu s':>8} "
        f"{'wall x':>7} {'cpu x':>7} {'R@' + str(args.k):>6} {'mAP@' + str(args.k):>7}")
  for name, desc, nbytes, mflops, wall, cpu, recall, mean_ap in rows:
    print(f"{name:<22} {desc:<30} {nbytes:>6} {mflops:>9.2f} {wall:>8.3f} {cpu:>8.3f} "
          f"{ex_wall / wall:>6.1f}x {ex_cpu / cpu:>6.1f}x {recall:>6.3f} {100 * mean_ap:>7.2f}")
  print(f"\nwall s / cpu s: median of {args.repeats} runs over all {args.queries} queries "
        f"(compiled beforehand), wall-clock and process CPU seconds; wall x, cpu x: exact's "
        f"time / the method's; B/vec: bytes per database vector the shortlist stage scans; "
        f"MFLOPs/q: the paper's float count (a code shortlist's bit or int8 operations are not "
        f"in it); R@{args.k}: share of the exact top-{args.k} ids found; mAP@{args.k} (%): "
        f"paper's mAP, relevant = same class.")
  print(f"load average (1/5/15 min) after: {_load()}")
  if args.profile:
    profile(index, queries, args)
    print(f"load average (1/5/15 min) after the profile: {_load()}")


if __name__ == "__main__":
  main()
