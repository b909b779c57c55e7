"""Matryoshka funnel search in Qdrant Edge vs full-dim HNSW vs mrl_jax's in-memory index.

On synthetic Matryoshka-like vectors (``--n`` x 384, early dims carrying the most
variance, queries = perturbed database points) and, with ``--encoder`` and
``--corpus``, on a text encoder over a real corpus (index throughput with embedding).
Rows, printed side by side (nothing asserted):

* full-dim HNSW: one stage at 384 dims (float32, in RAM);
* funnel 64 -> 384 float: HNSW shortlist at 64 dims, re-rank at 384 (on disk);
* funnel int8 / binary stage 0: the engine's scalar / binary quantization of the
  64-d stage (codes in RAM, floats on disk), rescored, then re-ranked at 384;
* mrl_jax ``adaptive_retrieval`` (in memory, exact 64-d shortlist).

Columns: index throughput (points/s for upsert, then ``optimize`` seconds), the
vector bytes per point held in RAM by the layout, the resident memory (RSS) that
opening the index and serving the queries adds to a fresh process (``RSS+``), queries/s (batches of
``--query_batch``) and recall@10 against exact full-dim search. Each engine row's
queries run in a child process, so its RSS is its own.

  python benchmarks/vector_engine.py --n=20000 --queries=200
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
D, DS = 384, 64


def matryoshka_like(n: int, q: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """``[n, 384]`` database and ``[q, 384]`` queries: 256 clusters, per-dim scale
  ``(j + 1) ** -0.5`` (early dims dominate, as in an MRL model); queries are
  database points plus noise."""
  rng = np.random.default_rng(seed)
  scale = (np.arange(D) + 1.0) ** -0.5
  centers = rng.normal(size=(256, D))
  db = (centers[rng.integers(0, 256, n)] + 0.7 * rng.normal(size=(n, D))) * scale
  queries = db[rng.integers(0, n, q)] + 0.3 * rng.normal(size=(q, D)) * scale
  return db.astype(np.float32), queries.astype(np.float32)


def rss_mib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def build(path: str, stages, precision: str, db: np.ndarray, batch: int = 1000) -> dict:
  from mrl_jax.search import backends, layout

  manifest = layout.make_manifest(sha256="synthetic", encoder_path="synthetic",
                                  dims=(DS, D), embed_dim=D, stages=stages,
                                  precision=precision, on_disk=len(stages) > 1)
  backend = backends.EdgeBackend(path)
  backend.create(manifest)
  tick = time.perf_counter()
  for start in range(0, len(db), batch):
    part = db[start:start + batch]
    ids = [layout.point_id(str(i)) for i in range(start, start + len(part))]
    backend.upsert(ids, layout.stage_vectors(part, stages),
                   [{"id": str(i)} for i in range(start, start + len(part))])
  backend.flush()
  upsert = time.perf_counter() - tick
  tick = time.perf_counter()
  backend.optimize()
  optimize = time.perf_counter() - tick
  backend.close()
  return {"upsert_points_per_s": len(db) / upsert, "optimize_s": optimize}


def serve(path: str, queries_file: str, shortlist: int, k: int, query_batch: int) -> dict:
  """In a fresh process: open the index, run the queries, report qps, ids and RSS."""
  from mrl_jax.search import backends, layout

  backend = backends.EdgeBackend(path)
  manifest = backend.read_manifest()  # the JSON only; the shard opens at the first search
  stages = tuple(manifest["stages"])
  plan = layout.Plan(stages, (shortlist, k)[-len(stages):], False)
  queries = np.load(queries_file)["queries"]
  vectors = layout.stage_vectors(queries, stages)  # imports JAX: before the RSS baseline
  before = rss_mib()
  quantized = manifest["precision"] != "float32"
  backend.search(plan, {n: v[:1] for n, v in vectors.items()}, quantized=quantized)
  tick, ids = time.perf_counter(), []
  for start in range(0, len(queries), query_batch):
    part = {n: v[start:start + query_batch] for n, v in vectors.items()}
    ids += [[int(h.id) for h in row] for row in backend.search(plan, part,
                                                                quantized=quantized)]
  qps = len(queries) / (time.perf_counter() - tick)
  return {"qps": qps, "ids": ids, "rss_mib": rss_mib(), "rss_open_mib": rss_mib() - before}


def recall(ids, truth, k: int = 10) -> float:
  from mrl_jax.evaluate.metrics import overlap_at_k

  return overlap_at_k(np.asarray(ids)[:, :k], np.asarray(truth)[:, :k], k)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--n", type=int, default=500_000)
  p.add_argument("--queries", type=int, default=200)
  p.add_argument("--shortlist", type=int, default=200)
  p.add_argument("--query_batch", type=int, default=50)
  p.add_argument("--workdir", default=None, help="where the indexes go (default: a temp dir)")
  p.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)  # child: path file shortlist k
  args = p.parse_args()
  if args.serve:
    path, file, shortlist, k = args.serve
    print(json.dumps(serve(path, file, int(shortlist), int(k), args.query_batch)))
    return
  import mrl_jax

  root = args.workdir or tempfile.mkdtemp(prefix="vector_engine_")
  os.makedirs(root, exist_ok=True)
  db, queries = matryoshka_like(args.n, args.queries)
  qfile = os.path.join(root, "queries.npz")
  np.savez(qfile, queries=queries)
  truth = np.asarray(mrl_jax.exact_search(queries, db, 10).ids)
  rows = []
  for name, stages, precision, ram_bytes in [
      ("full-dim HNSW d384 float32", (D,), "float32", 4 * D),
      ("funnel d64 -> d384 float32", (DS, D), "float32", 4 * DS),
      ("funnel d64 int8 -> d384", (DS, D), "int8", DS),
      ("funnel d64 binary -> d384", (DS, D), "binary", DS // 8)]:
    path = os.path.join(root, name.split()[0] + "_" + precision + str(len(stages)))
    shutil.rmtree(path, ignore_errors=True)
    built = build(path, stages, precision, db)
    child = subprocess.run([sys.executable, __file__, "--serve", path, qfile,
                            str(args.shortlist), "10", f"--query_batch={args.query_batch}"],
                           capture_output=True, text=True, check=True, cwd=REPO)
    served = json.loads(child.stdout.strip().splitlines()[-1])
    rows.append({"setting": name, **built, "ram_bytes_per_point": ram_bytes,
                 "rss_mib": served["rss_open_mib"], "qps": served["qps"],
                 "recall@10": recall(served["ids"], truth)})
  before, tick = rss_mib(), time.perf_counter()
  index = mrl_jax.PrefixIndex(db)
  mrl_jax.adaptive_retrieval(queries[:1], index, shortlist_dim=DS, rerank_dim=D,
                             shortlist_k=args.shortlist, k=10)
  build_s = time.perf_counter() - tick
  tick = time.perf_counter()
  got = mrl_jax.adaptive_retrieval(queries, index, shortlist_dim=DS, rerank_dim=D,
                                   shortlist_k=args.shortlist, k=10)
  rows.append({"setting": "mrl_jax adaptive_retrieval (in memory)",
               "upsert_points_per_s": args.n / build_s, "optimize_s": 0.0,
               "ram_bytes_per_point": 4 * D, "rss_mib": rss_mib() - before,
               "qps": args.queries / (time.perf_counter() - tick),
               "recall@10": recall(got.ids, truth)})
  full = rows[0]
  print(f"\n{args.n} synthetic Matryoshka-like 384-d points, {args.queries} queries, "
        f"shortlist {args.shortlist}, Qdrant Edge, {os.cpu_count()} CPUs")
  head = (f"{'setting':<40}{'upsert pts/s':>13}{'optimize s':>11}{'RAM B/pt':>9}"
          f"{'(x full)':>9}{'RSS+ MiB':>9}{'qps':>9}{'(x full)':>9}{'recall@10':>10}")
  print(head)
  for r in rows:
    print(f"{r['setting']:<40}{r['upsert_points_per_s']:13.0f}{r['optimize_s']:11.1f}"
          f"{r['ram_bytes_per_point']:9d}"
          f"{r['ram_bytes_per_point'] / full['ram_bytes_per_point']:9.3f}"
          f"{r['rss_mib']:9.0f}{r['qps']:9.1f}{r['qps'] / full['qps']:9.2f}{r['recall@10']:10.3f}")
  print(f"(max RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"
        " MiB)")
  goal = [r["setting"] for r in rows[1:4] if r["recall@10"] >= 0.95 * full["recall@10"]
          and r["ram_bytes_per_point"] <= full["ram_bytes_per_point"] / 4
          and r["qps"] >= full["qps"]]
  print(f"goal (recall >= 0.95 x full, <= 1/4 of its RAM bytes, >= its qps): "
        f"{', '.join(goal) if goal else 'missed by every funnel setting'}")


if __name__ == "__main__":
  main()
