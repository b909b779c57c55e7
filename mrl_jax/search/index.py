"""`SearchIndex`: an exported Matryoshka encoder over a corpus in a vector engine.

::

  index = SearchIndex.create("workdir/index", encoder="workdir/encoder", stages=(64, 384))
  index.index_corpus("corpus.jsonl")              # streamed, resumable, idempotent
  hits = index.query(["how to parse json"], k=10, shortlist=(200,))
  SearchIndex.open("workdir/index").evaluate("queries.jsonl")

``path`` is a folder (Qdrant Edge, embedded); ``url=`` + ``collection=`` a Qdrant
server or cluster (``qdrant-client``), the same layout and the same one-request
funnel. See :mod:`mrl_jax.search.layout` for the layout and the manifest.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from mrl_jax.bundle.artifact import BundleError
from mrl_jax.bundle.encoder import Encoder
from mrl_jax.evaluate import metrics
from mrl_jax.search import layout
from mrl_jax.search.backends import ClientBackend, EdgeBackend, Hit
from mrl_jax.search.layout import Plan, SearchError

DEFAULT_BATCH_SIZE = 64


def _backend(path: str | None, url: str | None, collection: str | None, *,
             shards: int | None = None, replicas: int | None = None):
  if (path is None) == (url is None):
    raise SearchError("give exactly one of --index=DIR (embedded) or --qdrant_url=URL "
                      "(with --collection)")
  if path is not None:
    if collection is not None or shards is not None or replicas is not None:
      raise SearchError("--collection, --shards and --replicas go with --qdrant_url, not "
                        "--index")
    return EdgeBackend(path)
  for name, v in (("--shards", shards), ("--replicas", replicas)):
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
      raise SearchError(f"{name}={v!r} must be a positive int")
  return ClientBackend(collection, url=url, shards=shards, replicas=replicas)


def _load_encoder(path: str, batch_size: int):
  try:
    # One padded batch size: every batch (the last one padded) runs one program per
    # text-length bucket, never a recompilation per batch or per stage.
    return Encoder.load(path, batch_sizes=(batch_size,))
  except BundleError as e:
    raise SearchError(f"--encoder={path}: {e}") from None


class SearchIndex:
  """A collection laid out for Matryoshka funnel search, and the encoder that fills it.

  Build with :meth:`create` (new or resumed) or :meth:`open` (existing).
  Attributes: ``manifest`` (dict), ``stages`` (tuple of dims), ``encoder``.
  """

  def __init__(self, backend, manifest: dict[str, Any], encoder, batch_size: int):
    self.backend, self.manifest, self.encoder = backend, manifest, encoder
    self.batch_size = batch_size

  @property
  def stages(self) -> tuple[int, ...]:
    return tuple(self.manifest["stages"])

  # --- opening ----------------------------------------------------------------------

  @classmethod
  def create(cls, path: str | None = None, *, encoder: str, stages: Sequence[int] | None = None,
             precision: str = "float32", on_disk: bool = False, url: str | None = None,
             collection: str | None = None, shards: int | None = None,
             replicas: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> SearchIndex:
    """A new index at ``path`` (or ``url``/``collection``), or the existing one built with
    the same bundle, stages and precision (to resume or extend it).

    Args:
      path: folder of an embedded Qdrant Edge index; or url + collection.
      encoder: an exported bundle folder (its ``mrl_jax.json`` SHA-256 is recorded).
      stages: increasing trained nesting dims, shortlist first (default: see
        :func:`mrl_jax.search.layout.check_stages`).
      precision: stage 0 stored as ``"float32"``, ``"int8"`` (scalar quantization) or
        ``"binary"`` (binary quantization), both rescored with the float vectors.
      on_disk: keep the later stages' vectors on disk (mmap) rather than in RAM.
      shards, replicas: the collection's shard number and replication factor
        (server only).
      batch_size: records embedded per step (the last batch padded).

    Raises:
      SearchError: a bad argument, or an existing index built otherwise.
    """
    batch_size = _check_batch_size(batch_size)
    backend = _backend(path, url, collection, shards=shards, replicas=replicas)
    sha = layout.bundle_sha256(encoder)
    enc = _load_encoder(encoder, batch_size)
    wanted = layout.make_manifest(sha256=sha, encoder_path=encoder, dims=enc.dims,
                                  embed_dim=enc.embed_dim,
                                  stages=layout.check_stages(stages, enc.dims),
                                  precision=precision, on_disk=on_disk)
    stored = backend.read_manifest()
    if stored is None:
      backend.create(wanted)
      return cls(backend, wanted, enc, batch_size)
    layout.check_manifest(stored, wanted, backend.where)
    return cls(backend, stored, enc, batch_size)

  @classmethod
  def open(cls, path: str | None = None, *, url: str | None = None,
           collection: str | None = None, encoder: str | None = None,
           batch_size: int = DEFAULT_BATCH_SIZE) -> SearchIndex:
    """An existing index; its encoder is the bundle recorded in the manifest (or
    ``encoder``, which must have the same SHA-256).

    Raises:
      SearchError: no index there, or an encoder other than the one it was built with.
    """
    batch_size = _check_batch_size(batch_size)
    backend = _backend(path, url, collection)
    stored = backend.read_manifest()
    if stored is None:
      raise SearchError(f"{backend.where}: no index there (build it with "
                        "`python -m mrl_jax.search index`)")
    layout.check_manifest(stored, None, backend.where)
    encoder = encoder or stored["encoder"]
    sha = layout.bundle_sha256(encoder)
    if sha != stored["bundle_sha256"]:
      raise SearchError(f"{backend.where} was built with the bundle of SHA-256 "
                        f"{stored['bundle_sha256'][:12]}..., not {encoder} "
                        f"({sha[:12]}...): query it with the encoder that built it")
    return cls(backend, stored, _load_encoder(encoder, batch_size), batch_size)

  def close(self) -> None:
    self.backend.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # --- embedding ----------------------------------------------------------------------

  def embed_full(self, texts: Sequence[str], wheres: Sequence[str] | None = None) -> np.ndarray:
    """Full-width raw embeddings ``[B, D]`` float32 (one pass; stages are cut from it).

    Raises:
      SearchError: a NaN/inf embedding, naming the record's ``path:line``.
    """
    try:
      full = self.encoder.embed(list(texts), normalize=False)
    except ValueError as e:
      if "NaN" not in str(e) or wheres is None:
        raise
      full = None
    bad = np.arange(len(texts)) if full is None else np.flatnonzero(
        ~np.isfinite(full).all(axis=1))
    if wheres is not None and len(bad):
      for i in bad:  # find the culprit when the encoder refused the whole chunk
        row = self.encoder.embed([texts[i]], normalize=False) if full is None else full[i:i + 1]
        if not np.isfinite(row).all():
          raise SearchError(f"{wheres[i]}: the encoder produced a NaN/inf embedding for this "
                            "record; nothing of its batch was written")
    return full

  # --- indexing -----------------------------------------------------------------------

  def index_corpus(self, corpus: str, *, progress: bool = True, optimize: bool = True,
                   text_column: str = "text") -> dict[str, Any]:
    """Embed and write every record of ``corpus`` (JSONL, TSV or Parquet), streamed.

    Each batch is embedded once at the full dim; every stage is cut from that pass
    (:func:`mrl_jax.search.layout.stage_vectors`). Point ids are ``uuid5`` of the
    record id, so a rerun adds nothing; after each batch is written and flushed the
    committed-record count is stored in the manifest, so a rerun after a kill skips
    what is committed and re-writes (idempotently) the rest. A batch is checked whole
    (texts, ids, duplicates, embeddings) before any of it is written.

    Returns:
      ``{"records", "skipped", "seconds", "docs_per_second", "count"}``.

    Raises:
      SearchError: naming ``path:line``: a missing or empty text, bytes that are not
        UTF-8, a duplicate id (also across batches and runs), a NaN embedding.
      FileNotFoundError: no such corpus.
    """
    from tqdm import tqdm

    if not isinstance(corpus, str) or not corpus:
      raise SearchError(f"--corpus={corpus!r} must name a JSONL, TSV or Parquet file")
    if not os.path.isfile(corpus):
      raise SearchError(f"--corpus={corpus}: no such file")
    fingerprint = layout.corpus_fingerprint(corpus)
    committed = self.manifest.get("committed") or {}
    skip = committed.get("records", 0) if committed.get("corpus") == fingerprint else 0
    start, done = time.perf_counter(), 0
    bar = tqdm(desc="indexing", unit="docs", disable=not progress, file=sys.stderr,
               initial=skip)
    for batch in layout.batches(layout.read_corpus(corpus, text_column=text_column),
                                self.batch_size):
      if batch[-1].number < skip:
        continue
      batch = [r for r in batch if r.number >= skip]
      self._write_batch(batch)
      self.backend.flush()
      self.manifest["committed"] = {"corpus": fingerprint, "records": batch[-1].number + 1}
      self.backend.write_manifest(self.manifest)
      done += len(batch)
      bar.update(len(batch))
    bar.close()
    if optimize:
      self.backend.optimize()
    seconds = time.perf_counter() - start
    return {"records": skip + done, "skipped": skip, "seconds": seconds,
            "docs_per_second": done / seconds if seconds > 0 else 0.0,
            "count": self.backend.count()}

  def _write_batch(self, batch: list[layout.Record]) -> None:
    seen: dict[str, layout.Record] = {}
    for r in batch:
      if r.id in seen:
        raise SearchError(f"{r.where}: duplicate id {r.id!r} (also at {seen[r.id].where})")
      seen[r.id] = r
    ids = [layout.point_id(r.id) for r in batch]
    for pid, payload in self.backend.payloads(ids).items():
      r = batch[ids.index(pid)]
      if payload.get("_record") != r.number:  # the same record rewritten is a resume
        raise SearchError(f"{r.where}: duplicate id {r.id!r} (also record "
                          f"{payload.get('_record')} of the corpus, counting from 0)")
    full = self.embed_full([r.text for r in batch], [r.where for r in batch])
    payloads = [{**r.payload, "id": r.id, "text": r.text, "_record": r.number} for r in batch]
    self.backend.upsert(ids, layout.stage_vectors(full, self.stages), payloads)

  # --- querying ---------------------------------------------------------------------

  def plan(self, k: int = 10, shortlist: Sequence[int] | None = None,
           exact: bool = False) -> Plan:
    return layout.make_plan(self.stages, k, shortlist, exact)

  def query_vectors(self, full: np.ndarray, plan: Plan, *,
                    hnsw_ef: int | None = None) -> list[list[Hit]]:
    """The funnel for raw full-width query embeddings ``[Q, D]``: one request per batch."""
    queries = layout.stage_vectors(full, plan.stages)
    out: list[list[Hit]] = []
    quantized = self.manifest["precision"] != "float32"
    for start in range(0, len(full), self.batch_size):
      part = {name: v[start:start + self.batch_size] for name, v in queries.items()}
      out += self.backend.search(plan, part, quantized=quantized, hnsw_ef=hnsw_ef)
    return out

  def query(self, texts: Sequence[str], *, k: int = 10, shortlist: Sequence[int] | None = None,
            exact: bool = False, hnsw_ef: int | None = None) -> list[list[Hit]]:
    """Funnel search for ``texts``: per query, ``k`` hits ``(id, score, payload)`` best first.

    Stage 0 keeps ``shortlist[0]`` (HNSW, or every point with ``exact``), each later
    stage re-ranks the survivors with more dims; the last ranks at ``stages[-1]``.
    Scores are cosine similarities at ``stages[-1]``.

    Raises:
      SearchError: bad ``k``/``shortlist``, or a query that is not a non-empty string.
    """
    if isinstance(texts, str):
      raise SearchError("query() takes a list of strings (one string: wrap it in a list)")
    texts = list(texts)
    for i, t in enumerate(texts):
      if not isinstance(t, str) or not t.strip():
        raise SearchError(f"query {i}: {t!r} is not a non-empty string")
    plan = self.plan(k, shortlist, exact)
    if not texts:
      return []
    return self.query_vectors(self.embed_full(texts), plan, hnsw_ef=hnsw_ef)

  # --- evaluating -------------------------------------------------------------------

  def evaluate(self, queries: str, *, k: int = 10, text_column: str = "text",
               shortlists: Sequence[Sequence[int]] | None = None,
               hnsw_ef: int | None = None) -> list[dict[str, Any]]:
    """Recall@k, MRR@10 and overlap@k with exact full-dim search, per funnel setting.

    ``queries``: a corpus-format file with ``text`` and ``positive_id`` (the id of its
    relevant record). Rows: exact full-dim search (one stage at ``stages[-1]``), then
    per shortlist setting the funnel with HNSW and with every stage exact.

    Returns:
      ``[{"setting", "recall@k", "mrr@10", "overlap@k", "queries_per_second"}]``.
    """
    records = list(layout.read_corpus(queries, text_column=text_column,
                                      required=("positive_id",)))
    if not records:
      raise SearchError(f"--queries={queries}: no queries")
    positives = np.asarray([str(r.payload["positive_id"]) for r in records])
    full = self.embed_full([r.text for r in records])
    depth = max(k, 10)
    exact_plan = Plan((self.stages[-1],), (depth,), True)
    reference = None
    rows = []
    settings = [(f"exact full-dim d{self.stages[-1]}", exact_plan)]
    for s in shortlists or [None]:
      for exact in (False, True):
        plan = layout.make_plan(self.stages, depth, s, exact)
        name = " -> ".join(f"d{m}:{n}" for m, n in zip(plan.stages, plan.limits, strict=True))
        settings.append((f"funnel {name}{' exact' if exact else ''}", plan))
    self.query_vectors(full[:1], exact_plan)  # warm-up: the first request opens segments
    for name, plan in settings:
      tick = time.perf_counter()
      hits = self.query_vectors(full, plan, hnsw_ef=hnsw_ef)
      qps = len(records) / (time.perf_counter() - tick)
      ids = np.asarray([[h.id for h in row] + [""] * (depth - len(row)) for row in hits])
      if reference is None:
        reference = ids
      rel = ids == positives[:, None]
      # One relevant record per query (its positive_id).
      one = np.ones(len(records), np.int64)
      rows.append({"setting": name, f"recall@{k}": metrics.recall_at_k(rel, k, one),
                   "mrr@10": metrics.mrr_at_k(rel, 10),
                   f"overlap@{k}": metrics.overlap_at_k(ids, reference, k),
                   "queries_per_second": qps})
    return rows


def _check_batch_size(batch_size: int) -> int:
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
      or batch_size < 1:
    raise SearchError(f"--batch_size={batch_size!r} must be a positive int")
  return int(batch_size)
