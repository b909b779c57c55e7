"""Two implementations of one backend: Qdrant Edge (embedded) and ``qdrant-client``.

Both build the same layout (:mod:`mrl_jax.search.layout`) and run a funnel as ONE
engine request per query batch: nested prefetches, stage 0 innermost, the final
ranking at the last stage. Each is imported lazily (the ``search`` extra).

Edge keeps its data in ``DIR/shard`` and the manifest in ``DIR/manifest.json``; a
server collection keeps the manifest in the collection's ``metadata``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from mrl_jax.core import fileio
from mrl_jax.search import layout
from mrl_jax.search.layout import Plan, SearchError

MANIFEST_KEY = "mrl_jax_search"
_INSTALL = "install the search extra: pip install 'mrl_jax[search]'"


class Hit(tuple):
  """``(id, score, payload)`` of one result."""
  __slots__ = ()

  id = property(lambda self: self[0])
  score = property(lambda self: self[1])
  payload = property(lambda self: self[2])


def _hits(points) -> list[Hit]:
  return [Hit((str((p.payload or {}).get("id")), float(p.score), dict(p.payload or {})))
          for p in points]


class EdgeBackend:
  """An embedded Qdrant Edge shard in a folder (no server)."""

  def __init__(self, path: str):
    try:
      import qdrant_edge
    except ImportError as e:
      raise ImportError(f"the embedded index needs qdrant-edge-py; {_INSTALL}") from e
    self.q = qdrant_edge
    self.path = os.path.abspath(path)
    self.where = f"--index={path}"
    self._shard = None

  @property
  def _manifest_file(self) -> str:
    return os.path.join(self.path, "manifest.json")

  def read_manifest(self) -> dict[str, Any] | None:
    if os.path.exists(self.path) and not os.path.isdir(self.path):
      raise SearchError(f"{self.where}: a file, not a folder")
    if not os.path.exists(self._manifest_file):
      if os.path.isdir(self.path) and os.listdir(self.path):
        raise SearchError(f"{self.where}: the folder exists and is not an mrl_jax search "
                          "index (no manifest.json); pick a new or empty folder")
      return None
    try:
      return fileio.read_json(self._manifest_file)
    except ValueError as e:
      raise SearchError(f"{self.where}: unreadable manifest: {e}") from None

  def write_manifest(self, manifest: dict[str, Any]) -> None:
    # Written to a temporary file and renamed: a kill leaves the old or the new one.
    tmp = self._manifest_file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(fileio.dumps_json(manifest, what="search manifest") + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self._manifest_file)

  def create(self, manifest: dict[str, Any]) -> None:
    q = self.q
    vectors = {}
    for st in layout.stage_layouts(manifest):
      quant = {None: None,
               "int8": lambda: q.ScalarQuantizationConfig(q.ScalarType.Int8, quantile=0.99,
                                                          always_ram=True),
               "binary": lambda: q.BinaryQuantizationConfig(always_ram=True)}[st.quantization]
      # m=0: no HNSW graph for a stage that only re-scores prefetched points.
      hnsw = None if st.hnsw else q.HnswIndexConfig(m=0, ef_construct=100,
                                                    full_scan_threshold=10000)
      vectors[st.name] = q.EdgeVectorParams(
          size=st.dim, distance=q.Distance.Cosine, on_disk=st.on_disk or None,
          quantization_config=quant and quant(), hnsw_config=hnsw)
    os.makedirs(self.path, exist_ok=True)
    self._shard = q.EdgeShard.create(os.path.join(self.path, "shard"),
                                     q.EdgeConfig(vectors=vectors))
    self.write_manifest(manifest)

  @property
  def shard(self):
    if self._shard is None:
      self._shard = self.q.EdgeShard.load(os.path.join(self.path, "shard"))
    return self._shard

  def upsert(self, ids: Sequence[str], vectors: dict[str, np.ndarray],
             payloads: Sequence[dict]) -> None:
    q = self.q
    points = [q.Point(id=pid, vector={name: v[i].tolist() for name, v in vectors.items()},
                      payload=payloads[i]) for i, pid in enumerate(ids)]
    self.shard.update(q.UpdateOperation.upsert_points(points))

  def payloads(self, ids: Sequence[str]) -> dict[str, dict]:
    records = self.shard.retrieve(list(ids), with_payload=True, with_vector=False)
    return {str(r.id): dict(r.payload or {}) for r in records}

  def flush(self) -> None:
    self.shard.flush()

  def optimize(self) -> None:
    self.shard.optimize()

  def count(self) -> int:
    return int(self.shard.count(self.q.CountRequest(exact=True)))

  def all_payloads(self) -> list[dict]:
    out, offset = [], None
    while True:
      records, offset = self.shard.scroll(self.q.ScrollRequest(
          offset=offset, limit=1000, with_payload=True, with_vector=False))
      out += [dict(r.payload or {}) for r in records]
      if offset is None:
        return out

  def _params(self, plan: Plan, quantized: bool, hnsw_ef: int | None):
    q = self.q
    if plan.exact:
      return q.SearchParams(exact=True, quantization=q.QuantizationSearchParams(ignore=True))
    quant = q.QuantizationSearchParams(rescore=True, oversampling=2.0) if quantized else None
    return q.SearchParams(hnsw_ef=hnsw_ef, quantization=quant)

  def search(self, plan: Plan, queries: dict[str, np.ndarray], *, quantized: bool,
             hnsw_ef: int | None = None) -> list[list[Hit]]:
    q = self.q

    def prefetch(vector, using, limit, i, inner, final=False):
      kwargs = dict(limit=limit, query=q.Query.Nearest(vector, using=using),
                    params=self._params(plan, quantized and i == 0, hnsw_ef),
                    prefetches=None if inner is None else [inner])
      return q.QueryRequest(**kwargs, with_payload=True) if final else q.Prefetch(**kwargs)

    requests = [layout.nest_funnel(plan, queries, row, prefetch,
                                   functools.partial(prefetch, final=True))
                for row in range(len(next(iter(queries.values()))))]
    return [_hits(points) for points in self.shard.query_batch(q.QueryBatchRequest(requests))]

  def close(self) -> None:
    if self._shard is not None:
      self._shard.close()
      self._shard = None


class ClientBackend:
  """A collection on a Qdrant server or cluster through ``qdrant-client`` (or its
  in-process local mode: ``url=":memory:"`` or ``path=``), API key from
  ``QDRANT_API_KEY``."""

  def __init__(self, collection: str, *, url: str | None = None, path: str | None = None,
               shards: int | None = None, replicas: int | None = None):
    try:
      from qdrant_client import QdrantClient, models
    except ImportError as e:
      raise ImportError(f"a Qdrant server needs qdrant-client; {_INSTALL}") from e
    if not collection:
      raise SearchError("--collection must name the collection on the Qdrant server")
    self.models = models
    if url == ":memory:":
      self.client = QdrantClient(":memory:")
    elif path is not None:
      self.client = QdrantClient(path=path)
    else:
      self.client = QdrantClient(url=url, api_key=os.environ.get("QDRANT_API_KEY") or None)
    self.collection, self.shards, self.replicas = collection, shards, replicas
    self.where = f"collection {collection!r} at {url or path}"

  def read_manifest(self) -> dict[str, Any] | None:
    if not self.client.collection_exists(self.collection):
      return None
    info = self.client.get_collection(self.collection)
    manifest = (info.config.metadata or {}).get(MANIFEST_KEY)
    if manifest is None:
      raise SearchError(f"{self.where} exists and is not an mrl_jax search index (no "
                        f"{MANIFEST_KEY!r} in its metadata); use another --collection")
    return manifest

  def write_manifest(self, manifest: dict[str, Any]) -> None:
    fileio.dumps_json(manifest, what="search manifest")  # refuse what JSON cannot hold
    self.client.update_collection(self.collection, metadata={MANIFEST_KEY: manifest})

  def create(self, manifest: dict[str, Any]) -> None:
    m_ = self.models
    vectors = {}
    for st in layout.stage_layouts(manifest):
      quant = {None: None,
               "int8": lambda: m_.ScalarQuantization(scalar=m_.ScalarQuantizationConfig(
                   type=m_.ScalarType.INT8, quantile=0.99, always_ram=True)),
               "binary": lambda: m_.BinaryQuantization(
                   binary=m_.BinaryQuantizationConfig(always_ram=True))}[st.quantization]
      vectors[st.name] = m_.VectorParams(
          size=st.dim, distance=m_.Distance.COSINE, on_disk=st.on_disk or None,
          quantization_config=quant and quant(),
          hnsw_config=None if st.hnsw else m_.HnswConfigDiff(m=0))
    self.client.create_collection(self.collection, vectors_config=vectors,
                                  shard_number=self.shards, replication_factor=self.replicas,
                                  metadata={MANIFEST_KEY: manifest})

  def upsert(self, ids: Sequence[str], vectors: dict[str, np.ndarray],
             payloads: Sequence[dict]) -> None:
    points = [self.models.PointStruct(
        id=pid, vector={name: v[i].tolist() for name, v in vectors.items()},
        payload=payloads[i]) for i, pid in enumerate(ids)]
    self.client.upsert(self.collection, points=points, wait=True)

  def payloads(self, ids: Sequence[str]) -> dict[str, dict]:
    records = self.client.retrieve(self.collection, list(ids), with_payload=True,
                                   with_vectors=False)
    return {str(r.id): dict(r.payload or {}) for r in records}

  def flush(self) -> None:
    """Upserts wait for the server (``wait=True``): nothing to flush."""

  def optimize(self) -> None:
    """The server builds its HNSW segments in the background."""

  def count(self) -> int:
    return int(self.client.count(self.collection, exact=True).count)

  def all_payloads(self) -> list[dict]:
    out, offset = [], None
    while True:
      records, offset = self.client.scroll(self.collection, offset=offset, limit=1000,
                                           with_payload=True, with_vectors=False)
      out += [dict(r.payload or {}) for r in records]
      if offset is None:
        return out

  def _params(self, plan: Plan, quantized: bool, hnsw_ef: int | None):
    m_ = self.models
    if plan.exact:
      return m_.SearchParams(exact=True, quantization=m_.QuantizationSearchParams(ignore=True))
    quant = m_.QuantizationSearchParams(rescore=True, oversampling=2.0) if quantized else None
    return m_.SearchParams(hnsw_ef=hnsw_ef, quantization=quant)

  def search(self, plan: Plan, queries: dict[str, np.ndarray], *, quantized: bool,
             hnsw_ef: int | None = None) -> list[list[Hit]]:
    m_ = self.models

    def prefetch(vector, using, limit, i, inner, final=False):
      kwargs = dict(query=vector, using=using, limit=limit, prefetch=inner,
                    params=self._params(plan, quantized and i == 0, hnsw_ef))
      return m_.QueryRequest(**kwargs, with_payload=True) if final else m_.Prefetch(**kwargs)

    requests = [layout.nest_funnel(plan, queries, row, prefetch,
                                   functools.partial(prefetch, final=True))
                for row in range(len(next(iter(queries.values()))))]
    responses = self.client.query_batch_points(self.collection, requests=requests)
    return [_hits(r.points) for r in responses]

  def close(self) -> None:
    self.client.close()
