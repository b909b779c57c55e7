"""``python -m mrl_jax.search index|query|evaluate``: Matryoshka funnel search in Qdrant.

::

  python -m mrl_jax.search index --encoder=BUNDLE --corpus=FILE --index=DIR \\
      [--stages=64,384] [--precision=float32|int8|binary] [--batch_size=64] [--on_disk]
  python -m mrl_jax.search query --index=DIR (--text=... | --queries=FILE) [--k=10] \\
      [--shortlist=200[,K1...]] [--exact] [--output=FILE]
  python -m mrl_jax.search evaluate --index=DIR --queries=FILE [--k=10] [--shortlist=...]

``--qdrant_url=URL --collection=NAME`` (API key from ``QDRANT_API_KEY``; ``--shards``,
``--replicas`` at index time) instead of ``--index`` uses a Qdrant server or cluster.
User errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mrl_jax.search import layout
from mrl_jax.search.index import SearchIndex
from mrl_jax.search.layout import SearchError, parse_ints


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m mrl_jax.search", description=__doc__.split(
      "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)

  def where(s):
    s.add_argument("--index", help="folder of the embedded (Qdrant Edge) index")
    s.add_argument("--qdrant_url", help="a Qdrant server or cluster (instead of --index)")
    s.add_argument("--collection", help="the collection on the server")
    s.add_argument("--batch_size", type=int, default=64, help="texts embedded per step")
    s.add_argument("--text_column", default="text", help="the column holding the texts")

  s = sub.add_parser("index", help="embed a corpus into an index")
  where(s)
  s.add_argument("--encoder", required=True, help="an exported mrl_jax bundle folder")
  s.add_argument("--corpus", required=True, help="JSONL, TSV or Parquet with a text column")
  s.add_argument("--stages", help="trained dims, shortlist first, e.g. 64,384")
  s.add_argument("--precision", default="float32", choices=("float32", "int8", "binary"))
  s.add_argument("--on_disk", action="store_true", help="later stages' vectors on disk")
  s.add_argument("--shards", type=int, help="server: the collection's shard number")
  s.add_argument("--replicas", type=int, help="server: the replication factor")
  s.add_argument("--no_progress", action="store_true")

  def funnel(s):
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--hnsw_ef", type=int, help="HNSW beam width of stage 0")

  s = sub.add_parser("query", help="funnel search")
  where(s)
  funnel(s)
  s.add_argument("--text", help="one query")
  s.add_argument("--queries", help="a file of queries (corpus formats, a text column)")
  s.add_argument("--shortlist", help="stage sizes but the last's, e.g. 200 (default)")
  s.add_argument("--exact", action="store_true", help="every stage exact (to verify)")
  s.add_argument("--output", help="write JSON lines here (default: stdout)")

  s = sub.add_parser("evaluate", help="recall@k and MRR@10 per funnel setting")
  where(s)
  funnel(s)
  s.add_argument("--queries", required=True, help="a file with text and positive_id columns")
  s.add_argument("--shortlist", action="append",
                 help="one funnel setting (repeat for several), e.g. --shortlist=200")
  return p


def _open(args, **kwargs):
  return SearchIndex.open(args.index, url=args.qdrant_url, collection=args.collection,
                          batch_size=args.batch_size, **kwargs)


def _index(args) -> None:
  with SearchIndex.create(args.index, encoder=args.encoder,
                          stages=parse_ints(args.stages, "--stages"), precision=args.precision,
                          on_disk=args.on_disk, url=args.qdrant_url, collection=args.collection,
                          shards=args.shards, replicas=args.replicas,
                          batch_size=args.batch_size) as index:
    out = index.index_corpus(args.corpus, progress=not args.no_progress,
                             text_column=args.text_column)
    print(f"indexed {out['records']} records ({out['skipped']} already committed) into "
          f"{index.backend.where}: {out['count']} points, stages {list(index.stages)}, "
          f"{out['docs_per_second']:.0f} docs/s")


def _query_texts(args) -> list[str]:
  if (args.text is None) == (args.queries is None):
    raise SearchError("give exactly one of --text=... or --queries=FILE")
  if args.text is not None:
    return [args.text]
  return [r.text for r in layout.read_corpus(args.queries, text_column=args.text_column)]


def _query(args) -> None:
  texts = _query_texts(args)
  with _open(args) as index:
    hits = index.query(texts, k=args.k, shortlist=parse_ints(args.shortlist, "--shortlist"),
                       exact=args.exact, hnsw_ef=args.hnsw_ef)
  lines = [json.dumps({"query": t, "ids": [h.id for h in row],
                       "scores": [h.score for h in row]}) for t, row in zip(texts, hits,
                                                                          strict=True)]
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      f.write("".join(line + "\n" for line in lines))
    print(f"wrote {len(lines)} results to {args.output}")
  elif sys.stdout.isatty():
    for t, row in zip(texts, hits, strict=True):
      print(f"\nquery: {t}")
      for rank, h in enumerate(row, 1):
        text = str(h.payload.get("text", "")).replace("\n", " ")[:70]
        print(f"{rank:3d}  {h.score:7.4f}  {h.id:<16}  {text}")
  else:
    print("\n".join(lines))


def _evaluate(args) -> None:
  shortlists = [parse_ints(s, "--shortlist") for s in args.shortlist or []] or None
  with _open(args) as index:
    rows = index.evaluate(args.queries, k=args.k, shortlists=shortlists, hnsw_ef=args.hnsw_ef,
                          text_column=args.text_column)
  keys = [k for k in rows[0] if k != "setting"]
  width = max(len(r["setting"]) for r in rows) + 2
  print("setting".ljust(width) + "".join(f"{k:>20}" for k in keys))
  for r in rows:
    print(r["setting"].ljust(width) + "".join(f"{r[k]:20.4f}" for k in keys))


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    {"index": _index, "query": _query, "evaluate": _evaluate}[args.command](args)
  except (SearchError, FileNotFoundError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.exit(main())
