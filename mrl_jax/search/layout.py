"""What every search backend shares: the collection layout, its manifest, point ids,
the streamed corpus and the funnel plan of a query.

The layout (Kusupati et al. 2022, adaptive retrieval; Qdrant's documented recipe for
Matryoshka embeddings): one named vector per *stage*, ``d{m}`` holding the first
``m`` dims of the full embedding truncated THEN L2-normalised
(:func:`mrl_jax.core.ops.truncate_normalize`), each ``m`` a trained nesting dim of the
bundle. Stage 0 is the shortlist D_s (HNSW, optionally the engine's own int8/binary
quantization with rescoring); later stages re-rank the survivors (no HNSW graph:
they only score prefetched points; optionally on disk); the last stage is D_r.

The manifest records the bundle's SHA-256 (of its ``mrl_jax.json``, which holds the
SHA-256 of every other bundle file), its trained dims and embed dim, the
normalisation, the stages and precision, and the committed-offset marker of an
interrupted indexing run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from mrl_jax.bundle import artifact as export_lib
from mrl_jax.core import ops
from mrl_jax.data import text as text_data

FORMAT = "mrl_jax.search"
FORMAT_VERSION = 1
NORMALIZATION = "truncate_then_l2"  # mrl_jax.core.ops.truncate_normalize, per stage
PRECISIONS = ("float32", "int8", "binary")
# Namespace of the point ids: uuid5(NAMESPACE, corpus id) is the same on every run.
NAMESPACE = uuid.UUID("5b1f0e0a-7d0c-4c36-9a55-6d72c5f0a1e2")
RESERVED_PAYLOAD = ("id", "text", "_record")


class SearchError(ValueError):
  """A user error about an index, a corpus or a query: its message names the culprit."""


def stage_name(dim: int) -> str:
  return f"d{int(dim)}"


def point_id(record_id: str) -> str:
  """The point id of a corpus id: ``uuid5`` of it (deterministic, so reruns overwrite)."""
  return str(uuid.uuid5(NAMESPACE, record_id))


def bundle_sha256(bundle: str) -> str:
  """SHA-256 of the bundle's ``mrl_jax.json`` (which lists every other file's SHA-256)."""
  path = os.path.join(bundle, export_lib.METADATA_FILE)
  if not os.path.isfile(path):
    raise SearchError(f"--encoder={bundle}: no exported bundle there ({path} is missing)")
  return export_lib.sha256_file(path)


def parse_ints(text: str | Sequence[int] | None, name: str) -> tuple[int, ...] | None:
  """``"64,384"`` (or a sequence) -> ``(64, 384)``; a clear error naming ``name``."""
  if text is None:
    return None
  parts = text.split(",") if isinstance(text, str) else list(text)
  try:
    values = tuple(int(str(p).strip()) for p in parts if str(p).strip())
  except ValueError:
    raise SearchError(f"{name}={text!r}: expected comma-separated positive ints") from None
  if not values or any(v < 1 for v in values):
    raise SearchError(f"{name}={text!r}: expected comma-separated positive ints")
  return values


def check_stages(stages: Sequence[int] | None, dims: Sequence[int]) -> tuple[int, ...]:
  """Stages: strictly increasing trained nesting dims (default: the smallest trained dim
  >= 64, or the smallest, then the largest).

  Raises:
    SearchError: a stage that is not a trained dim, or stages not increasing.
  """
  dims = tuple(int(d) for d in dims)
  if stages is None:
    first = next((d for d in dims if d >= 64), dims[0])
    return (first, dims[-1]) if first < dims[-1] else (dims[-1],)
  stages = tuple(int(s) for s in stages)
  bad = [s for s in stages if s not in dims]
  if bad:
    raise SearchError(f"--stages={','.join(map(str, stages))}: {bad} not trained nesting "
                      f"dims of this bundle (trained: {list(dims)})")
  if list(stages) != sorted(set(stages)):
    raise SearchError(f"--stages={','.join(map(str, stages))} must be strictly increasing")
  return stages


def make_manifest(*, sha256: str, encoder_path: str, dims: Sequence[int], embed_dim: int,
                  stages: Sequence[int], precision: str, on_disk: bool) -> dict[str, Any]:
  if precision not in PRECISIONS:
    raise SearchError(f"--precision={precision!r}; choose one of {PRECISIONS}")
  return {"format": FORMAT, "format_version": FORMAT_VERSION, "bundle_sha256": sha256,
          "encoder": os.path.abspath(encoder_path), "matryoshka_dimensions": list(dims),
          "embed_dim": int(embed_dim), "normalization": NORMALIZATION,
          "distance": "cosine", "stages": [int(s) for s in stages], "precision": precision,
          "on_disk": bool(on_disk), "committed": None}


def check_manifest(stored: dict[str, Any], wanted: dict[str, Any] | None, where: str) -> None:
  """Refuse an index made with another bundle, stages, precision or format.

  ``wanted`` None checks the format only (opening for queries).
  """
  if not isinstance(stored, dict) or stored.get("format") != FORMAT:
    raise SearchError(f"{where}: not an mrl_jax search index (no {FORMAT!r} manifest)")
  if stored.get("format_version") != FORMAT_VERSION:
    raise SearchError(f"{where}: manifest format_version {stored.get('format_version')!r}; "
                      f"this mrl_jax reads {FORMAT_VERSION}")
  if wanted is None:
    return
  for key, what in (("bundle_sha256", "encoder bundle (SHA-256 of its mrl_jax.json)"),
                    ("stages", "stages"), ("precision", "precision"),
                    ("normalization", "normalisation")):
    if stored.get(key) != wanted.get(key):
      raise SearchError(f"{where} was built with {what} {stored.get(key)!r}, not "
                        f"{wanted.get(key)!r}: use the same --encoder/--stages/--precision, "
                        "or a new --index/--collection")


def corpus_fingerprint(path: str) -> dict[str, Any]:
  st = os.stat(path)
  return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# --- The corpus -----------------------------------------------------------------------


@dataclasses.dataclass
class Record:
  """One corpus record: ``where`` (``path:line``), its number from 0, id, text, payload."""
  where: str
  number: int
  id: str
  text: str
  payload: dict[str, Any]


def _record_id(where: str, record: dict[str, Any], number: int) -> str:
  if "id" not in record:
    return str(number)
  value = record["id"]
  if isinstance(value, bool) or not isinstance(value, (str, int, np.integer)):
    raise SearchError(f"{where}: id must be a string or an int, got {value!r}")
  value = str(value)
  if not value.strip():
    raise SearchError(f"{where}: empty id")
  return value


def _payload_value(where: str, key: str, value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    raise SearchError(f"{where}: column {key!r} holds {value!r} (a payload must be finite JSON)")
  if isinstance(value, np.generic):
    return value.item()
  return value


def read_corpus(path: str, *, text_column: str = "text",
                required: Sequence[str] = ()) -> Iterator[Record]:
  """Stream the records of a JSONL, TSV or Parquet corpus (one record in memory at a time).

  Reads through :func:`mrl_jax.data.text.read_records` (strict UTF-8; ``path:line`` in
  every error). A record needs a non-empty string ``text``; ``id`` (default: the
  record number from 0) becomes the output id, as a string; other columns become
  the point's payload.

  Raises:
    SearchError: naming ``path:line``: a missing or empty text, a bad id, a
      reserved payload column (``_record``), bytes that are not UTF-8, a bad line.
    FileNotFoundError: no such file.
  """
  try:
    records = text_data.read_records(path, required=(text_column, *required))
    for number, (where, record) in enumerate(records):
      text = record.get(text_column)
      if not isinstance(text, str) or not text.strip():
        what = ("no" if text_column not in record else "an empty" if isinstance(text, str)
                else f"a non-string ({text!r})")
        raise SearchError(f"{where}: {what} {text_column!r} column (every record needs a "
                          "non-empty text)")
      if "_record" in record:
        raise SearchError(f"{where}: the column name '_record' is reserved")
      rid = _record_id(where, record, number)
      payload = {k: _payload_value(where, k, v) for k, v in record.items()
                 if k not in (text_column, "id")}
      yield Record(where, number, rid, text, payload)
  except SearchError:
    raise
  except ValueError as e:  # the readers' errors already name path:line
    raise SearchError(str(e)) from None


def batches(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
  batch: list[Record] = []
  for r in records:
    batch.append(r)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


# --- The funnel plan of a query ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
  """The funnel of one query, stage 0 first: ``stages[i]`` ranks and keeps ``limits[i]``
  (``limits[-1] = k``), all stages exact or not."""
  stages: tuple[int, ...]
  limits: tuple[int, ...]
  exact: bool

  @property
  def k(self) -> int:
    return self.limits[-1]


def make_plan(stages: Sequence[int], k: int, shortlist: Sequence[int] | None,
              exact: bool) -> Plan:
  """The funnel for an index's ``stages``: ``shortlist`` gives one size per stage but
  the last (default 200, halved per stage); ``k`` is the final limit.

  Raises:
    SearchError: wrong number of shortlist sizes, sizes not non-increasing, or
      below ``k``.
  """
  stages = tuple(stages)
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise SearchError(f"--k={k!r} must be a positive int")
  if shortlist is None:
    shortlist = tuple(max(k, 200 >> i) for i in range(len(stages) - 1))
  shortlist = tuple(int(s) for s in shortlist)
  if len(shortlist) != len(stages) - 1:
    raise SearchError(f"--shortlist={','.join(map(str, shortlist))}: the index has stages "
                      f"{list(stages)}, so give {len(stages) - 1} shortlist size(s) (one per "
                      "stage but the last)")
  limits = (*shortlist, int(k))
  if any(a < b for a, b in zip(limits, limits[1:], strict=False)):
    raise SearchError(f"--shortlist={','.join(map(str, shortlist))} with --k={k}: each stage "
                      "must keep at least as many as the next, and the last at least k")
  return Plan(stages, limits, bool(exact))


def stage_vectors(full: np.ndarray, stages: Sequence[int]) -> dict[str, np.ndarray]:
  """``{"d{m}": [B, m] float32}``: each stage truncated THEN normalised from one full pass."""
  return {stage_name(m): np.asarray(ops.truncate_normalize(full, m)) for m in stages}


@dataclasses.dataclass(frozen=True)
class StageLayout:
  """How one named vector is stored: ``quantization`` (None, ``"int8"``, ``"binary"``),
  ``on_disk`` (the float vectors mmapped), ``hnsw`` (build a graph: stage 0 only; later
  stages only re-score prefetched points)."""
  name: str
  dim: int
  quantization: str | None
  on_disk: bool
  hnsw: bool


def stage_layouts(manifest: dict[str, Any]) -> list[StageLayout]:
  """The named vectors of an index. A quantized stage 0 keeps its codes in RAM and its
  floats (read only to rescore) on disk; later stages go on disk with ``on_disk``."""
  out = []
  for i, m in enumerate(manifest["stages"]):
    quant = manifest["precision"] if i == 0 and manifest["precision"] != "float32" else None
    out.append(StageLayout(stage_name(m), int(m), quant,
                           bool(quant) or (i > 0 and bool(manifest["on_disk"])), i == 0))
  return out


def nest_funnel(plan: Plan, queries: dict[str, np.ndarray], row: int, prefetch, request):
  """The funnel of query ``row`` as one nested request, stage 0 innermost.

  ``prefetch(vector, using, limit, stage, inner)`` builds a stage that keeps ``limit``
  (``inner`` is the previous stage or None); ``request(...)`` (same arguments) builds
  the final ranking at ``plan.stages[-1]`` with ``limit = k``. Returns ``request``'s value.
  """
  inner = None
  last = len(plan.stages) - 1
  for i, (m, limit) in enumerate(zip(plan.stages, plan.limits, strict=True)):
    args = (queries[stage_name(m)][row].tolist(), stage_name(m), limit, i, inner)
    if i == last:
      return request(*args)
    inner = prefetch(*args)
  raise AssertionError("a plan has at least one stage")
