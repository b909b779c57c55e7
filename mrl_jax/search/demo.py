"""The demo's last part: the text demo's Matryoshka encoder over its corpus in an embedded
index, and three queries' funnel results with their texts."""

from __future__ import annotations

import json
import os
from typing import Any

from mrl_jax.data.text import read_text_pairs
from mrl_jax.search import layout
from mrl_jax.search.index import SearchIndex


def search_demo(encoder: str, pairs_file: str, out_dir: str, *, num_queries: int = 3,
                k: int = 3, progress: bool = True) -> dict[str, Any]:
  """Index the sources of ``pairs_file`` (anchor = summary, positive = source) with
  ``encoder`` into Qdrant Edge under ``out_dir``, then search the first
  ``num_queries`` summaries with the funnel and print each hit's text.

  The index folder is named after the bundle's SHA-256, so a retrained encoder gets
  a new index and a rerun with the same one adds nothing.

  Returns:
    ``{"index", "stages", "records", "queries": [{"query", "positive_id", "ids",
    "scores", "rank_of_positive"}]}``.

  Raises:
    SearchError, FileNotFoundError: as :meth:`SearchIndex.create` and
      :meth:`SearchIndex.index_corpus`.
  """
  pairs = read_text_pairs(pairs_file)
  os.makedirs(out_dir, exist_ok=True)
  corpus = os.path.join(out_dir, "corpus.jsonl")
  rows = "".join(json.dumps({"id": f"pair{i}", "text": p, "summary": a}) + "\n"
                 for i, (a, p) in enumerate(zip(pairs.anchors, pairs.positives, strict=True)))
  if not os.path.exists(corpus) or open(corpus, encoding="utf-8").read() != rows:
    with open(corpus, "w", encoding="utf-8") as f:  # rewritten only when it changes
      f.write(rows)
  path = os.path.join(out_dir, f"index_{layout.bundle_sha256(encoder)[:12]}")
  with SearchIndex.create(path, encoder=encoder) as index:
    indexed = index.index_corpus(corpus, progress=progress)
    queries = list(pairs.anchors[:num_queries])
    hits = index.query(queries, k=k)
    shortlist = index.plan(k).limits[:-1]
    print(f"\nsearch: {indexed['records']} sources in Qdrant Edge ({path}), funnel "
          + " -> ".join(f"d{m}:{n}" for m, n in zip(index.stages, (*shortlist, k),
                                                    strict=True)))
    out = []
    for i, (q, row) in enumerate(zip(queries, hits, strict=True)):
      ids = [h.id for h in row]
      rank = ids.index(f"pair{i}") + 1 if f"pair{i}" in ids else None
      print(f"\nquery: {q}  (its source ranks {rank or f'> {k}'})")
      for r, h in enumerate(row, 1):
        first = next((line.strip() for line in h.payload["text"].splitlines() if line.strip()),
                     "")
        print(f"  {r}. {h.score:.3f} {h.id:<9} {first[:80]}")
      out.append({"query": q, "positive_id": f"pair{i}", "ids": ids,
                  "scores": [h.score for h in row], "rank_of_positive": rank})
    return {"index": path, "stages": list(index.stages), "records": indexed["records"],
            "queries": out}
