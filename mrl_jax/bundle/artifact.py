"""The ONE exported artifact: a Hugging Face-style folder of safetensors + JSON, never a pickle.

Every task exports its encoder at the end of training to ``WORKDIR/encoder``;
:class:`mrl_jax.bundle.encoder.Encoder` loads any of them. The folder holds:

  config.json         the model config. Text: the Hugging Face BERT config, so the
                      folder IS a sentence-transformers model (with modules.json,
                      1_Pooling/, tokenizer files ...). Images and adaptors:
                      mrl_jax's encoder config. Both carry ``is_matryoshka`` and
                      ``matryoshka_dimensions``, the names serving engines read.
  model.safetensors   the arrays (Hugging Face tensor names for BERT)
  mrl_jax.json        mrl_jax's metadata: format, modality, nesting dims and
                      weights, training config and step, and the SHA-256 of
                      every data file (checked on load: a changed byte is refused)

Loading an untrusted bundle runs no code: safetensors holds raw arrays and
the configs are data, validated on load. Writes go to a temporary folder
beside the target and are swapped in atomically (:func:`write_atomically`),
so an interrupted export never leaves a partial bundle and the previous one
stays complete until the new one is.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from mrl_jax.core import fileio
from mrl_jax.core.version import __version__

FORMAT = "mrl_jax.encoder"
FORMAT_VERSION = 2
METADATA_FILE = "mrl_jax.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODALITIES = ("image", "text", "embedding")
# Files a hosting service adds to a folder (a Hub upload): allowed unlisted, never read.
UNLISTED_ALLOWED = ("README.md", ".gitattributes")
METADATA_DIGEST = "metadata_sha256"  # the SHA-256 of mrl_jax.json's other fields (canonical)
MAX_WEIGHT = 1e6  # nesting weights above this are a corrupt or hand-edited file
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


BundleError = fileio.BundleError  # one error type for every bundle problem


def to_numpy(x: Any) -> np.ndarray:
  """A (possibly multi-host, FSDP-split) array as one host numpy array (a collective)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def write_atomically(out_dir: str, write: Callable[[str], None]) -> str:
  """Run ``write(tmp_dir)`` into a fresh folder beside ``out_dir``, then swap it into place.

  Process 0 writes; the others wait. The swap is :func:`mrl_jax.core.fileio.atomic_replace_dir`
  (one atomic exchange where the OS has it, else rename aside / rename in / delete), so at
  every moment ``out_dir`` (or its ``.old-*`` twin) is a complete bundle and a crash
  never leaves a partial one; Orbax commits checkpoints the same way.

  Returns:
    ``out_dir``.
  """
  out_dir = os.path.abspath(out_dir)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    remove_leftovers(out_dir)
    tmp = fileio.make_temp_dir(out_dir)
    try:
      write(tmp)
      fileio.atomic_replace_dir(tmp, out_dir)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  multihost_utils.sync_global_devices(f"mrl_jax export: wrote {out_dir}")
  return out_dir


def remove_leftovers(out_dir: str) -> None:
  """Delete ``<out_dir>.tmp-*`` / ``.old-*`` siblings left by a killed export (as Orbax does).

  A leftover ``.old-*`` is only deleted while ``out_dir`` itself is complete; if a
  kill fell between the two renames of a swap, the ``.old-*`` bundle is put back.
  """
  parent, base = os.path.split(out_dir)
  for name in sorted(os.listdir(parent)):
    path = os.path.join(parent, name)
    if name.startswith(f"{base}.tmp-"):
      shutil.rmtree(path, ignore_errors=True)
    elif name.startswith(f"{base}.old-"):
      if os.path.isfile(os.path.join(out_dir, METADATA_FILE)):
        shutil.rmtree(path, ignore_errors=True)
      elif os.path.isfile(os.path.join(path, METADATA_FILE)):
        if os.path.lexists(out_dir):
          shutil.rmtree(out_dir, ignore_errors=True)
        os.rename(path, out_dir)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """``{"a": {"b": x}} -> {"a.b": x}`` (safetensors holds a flat name -> array map)."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, name + "."))
    else:
      flat[name] = np.ascontiguousarray(np.asarray(value))
  return flat


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """The inverse of :func:`flatten`."""
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *scopes, leaf = name.split(".")
    node = tree
    for scope in scopes:
      node = node.setdefault(scope, {})
    node[leaf] = value
  return tree


def sha256_file(path: str) -> str:
  """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def write_metadata(out_dir: str, *, modality: str, dims: list[int], weights: list[float],
                   is_matryoshka: bool, step: int | None, task: str,
                   training_config: dict | None, extra: dict | None = None) -> dict:
  """Write ``mrl_jax.json`` LAST, with the SHA-256 of every other file of the bundle.

  Returns:
    The metadata written.
  """
  if modality not in MODALITIES:
    raise ValueError(f"modality={modality!r}; choose one of {MODALITIES}")
  files = {}
  for root, _, names in os.walk(out_dir):
    for name in sorted(names):
      path = os.path.join(root, name)
      files[os.path.relpath(path, out_dir)] = sha256_file(path)
  metadata = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "mrl_jax_version": __version__, "modality": modality, "task": task,
              "is_matryoshka": bool(is_matryoshka),
              "matryoshka_dimensions": [int(m) for m in dims],
              "matryoshka_weights": [float(w) for w in weights],
              "step": step, "training_config": training_config, "sha256": files,
              **(extra or {})}
  metadata[METADATA_DIGEST] = metadata_digest(metadata)
  fileio.write_json(os.path.join(out_dir, METADATA_FILE), metadata, what=METADATA_FILE)
  return metadata


def read_json(path: str, what: str = "bundle file") -> Any:
  """A JSON file, or :class:`BundleError` naming it (missing, not UTF-8, not JSON)."""
  del what  # fileio's message names the path
  return fileio.read_json(path)


def metadata_digest(metadata: Mapping[str, Any]) -> str:
  """Hex SHA-256 of ``metadata`` without :data:`METADATA_DIGEST`, as canonical JSON.

  Canonical: :func:`mrl_jax.core.fileio.dumps_json` (sorted keys, 2-space indent), so
  the digest does not depend on how the file was formatted, only on its values.
  """
  rest = {k: v for k, v in metadata.items() if k != METADATA_DIGEST}
  return hashlib.sha256(fileio.dumps_json(rest, what=METADATA_FILE).encode("utf-8")).hexdigest()


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def validate_metadata(meta: Any, file: str) -> dict[str, Any]:
  """``mrl_jax.json`` checked field by field (types, domains) and against its own digest.

  Raises:
    BundleError: naming ``file`` and the field.
  """
  bad = lambda field, why: BundleError(f"bundle metadata {file}: {field}={meta.get(field)!r} "
                                       f"{why}")
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise BundleError(f"bundle metadata {file}: not an mrl_jax bundle (format is not {FORMAT!r})")
  if meta.get("format_version") != FORMAT_VERSION:
    raise BundleError(f"bundle metadata {file}: format_version {meta.get('format_version')!r}; "
                      f"this mrl_jax reads {FORMAT_VERSION} (re-export with this version)")
  if meta.get("modality") not in MODALITIES:
    raise BundleError(f"bundle metadata {file}: modality {meta.get('modality')!r} is not one "
                      f"of {MODALITIES}")
  for field in ("mrl_jax_version", "task"):
    if not isinstance(meta.get(field), str):
      raise bad(field, "must be a string")
  if not isinstance(meta.get("is_matryoshka"), bool):
    raise bad("is_matryoshka", "must be a JSON bool (true or false)")
  dims = meta.get("matryoshka_dimensions")
  if not isinstance(dims, list) or not dims or not all(_is_int(d) and d >= 1 for d in dims) \
      or dims != sorted(set(dims)):
    raise bad("matryoshka_dimensions", "must be a non-empty, strictly increasing list of "
              "positive ints")
  weights = meta.get("matryoshka_weights")
  if not isinstance(weights, list) or len(weights) != len(dims) or not all(
      isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
      and 0 <= w <= MAX_WEIGHT for w in weights) or not sum(weights) > 0:
    raise bad("matryoshka_weights", f"must be {len(dims)} numbers in [0, {MAX_WEIGHT:g}] (one "
              "per dim), not all 0")
  step = meta.get("step")
  if step is not None and not (_is_int(step) and step >= 0):
    raise bad("step", "must be null or an int >= 0")
  if meta.get("training_config") is not None and not isinstance(meta["training_config"], dict):
    raise bad("training_config", "must be null or a JSON object")
  if "baselines" in meta:
    validate_baselines(meta["baselines"], dims, file)
  hashes = meta.get("sha256")
  if not isinstance(hashes, dict) or WEIGHTS_FILE not in hashes:
    raise BundleError(f"bundle metadata {file}: no sha256 entry for {WEIGHTS_FILE}")
  for name, want in hashes.items():
    if not isinstance(want, str) or not _HEX64.match(want):
      raise BundleError(f"bundle metadata {file}: sha256[{name!r}]={want!r} is not 64 hex "
                        "digits")
    if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == ".." \
        or name != os.path.normpath(name) or name == METADATA_FILE:
      raise BundleError(f"bundle metadata {file}: file name {name!r} leaves the bundle or is "
                        "not a plain relative path")
  digest = meta.get(METADATA_DIGEST)
  if not isinstance(digest, str) or not _HEX64.match(digest):
    raise BundleError(f"bundle metadata {file}: {METADATA_DIGEST} is missing or not 64 hex "
                      "digits (written by an older mrl_jax, or edited): re-export the bundle")
  if digest.lower() != metadata_digest(meta):
    raise BundleError(f"bundle metadata {file}: its fields changed since export "
                      f"({METADATA_DIGEST} mismatch): corrupt or tampered; re-export it")
  return meta


def _is_fraction(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1


def validate_baselines(record: Any, dims: list[int], file: str) -> None:
  """``mrl_jax.json``'s ``"baselines"``: the adaptor's held-out metrics beside its baselines.

  The layout of :meth:`mrl_jax.tasks.adaptor.AdaptorTask.baseline_record`: ``dims``
  equal to the bundle's ``matryoshka_dimensions``; per metric, ``"adaptor"`` and every
  baseline a list of one value in [0, 1] per dim, and ``"beats"`` one list of bools
  per baseline that must equal ``adaptor >= baseline`` element-wise.

  Raises:
    BundleError: naming ``file`` and the field.
  """
  where = f"bundle metadata {file}: baselines"
  if not isinstance(record, dict) or record.get("dims") != dims \
      or not isinstance(record.get("metrics"), dict) or not record["metrics"]:
    raise BundleError(f"{where} must be an object with dims={dims} (matryoshka_dimensions) "
                      "and a non-empty metrics object")
  per_dim = lambda v: isinstance(v, list) and len(v) == len(dims)
  for metric, table in record["metrics"].items():
    if not isinstance(table, dict) or not isinstance(table.get("beats"), dict) \
        or "adaptor" not in table:
      raise BundleError(f"{where}.metrics.{metric} must hold 'adaptor', the baselines and "
                        "'beats'")
    for method, values in table.items():
      if method != "beats" and not (per_dim(values) and all(map(_is_fraction, values))):
        raise BundleError(f"{where}.metrics.{metric}.{method} must be {len(dims)} numbers in "
                          "[0, 1] (one per dim)")
    methods = sorted(m for m in table if m not in ("adaptor", "beats"))
    if sorted(table["beats"]) != methods:
      raise BundleError(f"{where}.metrics.{metric}.beats must name the baselines {methods}")
    for method, flags in table["beats"].items():
      want = [a >= b for a, b in zip(table["adaptor"], table[method], strict=True)]
      if not (per_dim(flags) and all(isinstance(f, bool) for f in flags)) or flags != want:
        raise BundleError(f"{where}.metrics.{metric}.beats.{method}={flags!r} must be "
                          f"adaptor >= {method} per dim: {want}")


def bundle_files(path: str) -> list[str]:
  """Every file under the bundle folder ``path`` (relative, sorted); symlinks refused.

  Raises:
    BundleError: naming a symlink (file or folder) or anything that is not a regular
      file or folder: a bundle is read from inside its folder only.
  """
  out = []
  for root, dirs, names in os.walk(path):
    for name in sorted(dirs + names):
      full = os.path.join(root, name)
      rel = os.path.relpath(full, path)
      if os.path.islink(full):
        raise BundleError(f"bundle {path}: {rel} is a symbolic link; a bundle holds regular "
                          "files only (copy the target in and re-export)")
      if name in names:
        if not os.path.isfile(full):
          raise BundleError(f"bundle {path}: {rel} is not a regular file")
        out.append(rel)
  return sorted(out)


def read_metadata(path: str, *, verify: bool = True) -> dict[str, Any]:
  """``mrl_jax.json`` of a bundle, validated field by field, and (``verify``) the bundle whole.

  ``verify`` checks that every file in the folder is listed in ``sha256`` (except
  ``mrl_jax.json``, covered by its own :data:`METADATA_DIGEST`, and
  :data:`UNLISTED_ALLOWED`), that every listed file is a regular file inside the
  folder (no symlinks), and that its SHA-256 matches (hex in any case).

  Raises:
    BundleError: naming the file: missing, unreadable, another format, a field of
      the wrong type or outside its domain, an unlisted or symlinked file, or a
      file whose bytes differ from those written (corruption or tampering).
  """
  file = os.path.join(path, METADATA_FILE)
  if not os.path.isdir(path):
    raise BundleError(f"no exported encoder at {path} (not a folder)")
  if os.path.islink(file):
    raise BundleError(f"bundle {path}: {METADATA_FILE} is a symbolic link; a bundle holds "
                      "regular files only")
  meta = validate_metadata(read_json(file, "bundle metadata"), file)
  hashes = meta["sha256"]
  if verify:
    present = bundle_files(path)
    unlisted = [n for n in present if n not in hashes and n != METADATA_FILE
                and n not in UNLISTED_ALLOWED]
    if unlisted:
      raise BundleError(f"bundle {path}: {unlisted[:5]} not listed in {METADATA_FILE}'s sha256 "
                        "(added or renamed after export); remove them or re-export")
    for name, want in hashes.items():
      target = os.path.join(path, name)
      if name not in present:
        raise BundleError(f"bundle {path}: {name} is missing")
      if sha256_file(target) != want.lower():
        raise BundleError(f"bundle {path}: the bytes of {name} changed since export "
                          "(SHA-256 mismatch): corrupt or tampered; re-export it")
  return meta


def save_weights(out_dir: str, tree: Mapping[str, Any]) -> None:
  """``model.safetensors`` of a nested dict of arrays (names joined with ``.``)."""
  from safetensors.numpy import save_file

  save_file(flatten(tree), os.path.join(out_dir, WEIGHTS_FILE))


def load_weights(path: str) -> dict[str, np.ndarray]:
  """The flat name -> array map of a bundle's ``model.safetensors`` (no code runs)."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  file = os.path.join(path, WEIGHTS_FILE)
  try:
    return load_file(file)
  except (SafetensorError, OSError) as e:
    raise BundleError(f"bundle {path}: cannot read {file}: {e}") from None


def read_header(file: str) -> dict[str, tuple[str, tuple[int, ...]]]:
  """``{name: (dtype, shape)}`` from a safetensors file's header: no array is read.

  Raises:
    BundleError: naming ``file`` when it is missing or not a safetensors file.
  """
  from safetensors import safe_open

  try:
    with safe_open(file, framework="numpy") as f:
      return {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape()))
              for name in f.keys()}
  except Exception as e:  # safetensors raises its own error types
    raise BundleError(f"{file} is not a readable safetensors file: {type(e).__name__}: "
                      f"{e}") from None


# Elements of one example's input above which a config is refused before anything is
# built (2**26 float32: 256 MiB per example, e.g. 4096 x 4096 x 4).
MAX_INPUT_ELEMENTS = 1 << 26


def check_config_ints(config: Any, header: Mapping[str, tuple[str, tuple[int, ...]]],
                      where: str, *, extra_bound: int = 0) -> None:
  """Bound every int in a model config section by the tensors present, before building it.

  A layer count (an int, or the length of a list of widths) cannot exceed the number
  of tensors, and a width cannot exceed the largest tensor dimension: so
  ``num_layers: 1000000`` or a width of ``1e12`` is refused here in microseconds
  instead of building (or overflowing in) a huge model.

  Raises:
    BundleError: naming ``where`` and the field path.
  """
  bound = max([len(header), extra_bound] + [max(s, default=1) for _, s in header.values()])

  def walk(value: Any, name: str) -> None:
    if isinstance(value, bool):
      return
    if isinstance(value, int) and not 0 <= value <= bound:
      raise BundleError(f"{where}: {name}={value} is outside [0, {bound}] (the model's "
                        "tensors allow no more: number of tensors and their largest "
                        "dimension); the config does not match the weights")
    if isinstance(value, dict):
      for k, v in value.items():
        walk(v, f"{name}.{k}")
    elif isinstance(value, list):
      if len(value) > len(header):  # one layer per entry (hidden widths): >= 1 tensor each
        raise BundleError(f"{where}: {name} lists {len(value)} entries, more than the "
                          f"{len(header)} tensors of the weights; the config does not match them")
      for i, v in enumerate(value):
        walk(v, f"{name}[{i}]")

  walk(config, "config")


def check_header(header: Mapping[str, tuple[str, tuple[int, ...]]],
                 expected: Mapping[str, Any], where: str, *, dtype: str = "F32") -> None:
  """The safetensors header against the model's abstract arrays: names, shapes and dtype.

  Raises:
    BundleError: listing missing/unexpected arrays, shape mismatches and arrays
      whose dtype is not ``dtype`` (as exported: float32).
  """
  want = flatten_shapes(expected)
  have = {k: s for k, (_, s) in header.items()}
  problems = [f"{k}: missing (expected shape {want[k]})" for k in want if k not in have]
  problems += [f"{k}: unexpected array of shape {have[k]}" for k in have if k not in want]
  problems += [f"{k}: shape {have[k]}, expected {want[k]}"
               for k in want if k in have and have[k] != want[k]]
  problems += [f"{k}: dtype {d}, exported as {dtype}" for k, (d, _) in header.items()
               if d != dtype]
  if problems:
    raise BundleError(f"{where}: the arrays do not match the model config: "
                      + "; ".join(problems[:5]))


def flatten_shapes(tree: Mapping[str, Any], prefix: str = "") -> dict[str, tuple[int, ...]]:
  """``{"a": {"b": x}} -> {"a.b": shape of x}`` (for abstract arrays too)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten_shapes(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = tuple(np.shape(value))
  return out


def check_tree(stored: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
  """Raise :class:`BundleError` listing missing/unexpected arrays and shape mismatches."""
  flat = lambda tree: {jax.tree_util.keystr(k): tuple(np.shape(v))
                       for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  have, want = flat(stored), flat(expected)
  problems = [f"{k}: missing (expected shape {want[k]})" for k in want if k not in have]
  problems += [f"{k}: unexpected array of shape {have[k]}" for k in have if k not in want]
  problems += [f"{k}: shape {have[k]}, expected {want[k]}"
               for k in want if k in have and have[k] != want[k]]
  if problems:
    raise BundleError(f"{where}: the arrays do not match the model config: "
                      + "; ".join(problems[:5]))
