"""The ONE exported artifact: a Hugging Face-style folder of safetensors + JSON, never a pickle.

Every task exports its encoder at the end of training to ``WORKDIR/encoder``;
:class:`mrl_jax.inference.Encoder` loads any of them. The folder holds:

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
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

import mrl_jax
from mrl_jax import fileio

FORMAT = "mrl_jax.encoder"
FORMAT_VERSION = 2
METADATA_FILE = "mrl_jax.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODALITIES = ("image", "text", "embedding")


BundleError = fileio.BundleError  # one error type for every bundle problem


def to_numpy(x: Any) -> np.ndarray:
  """A (possibly multi-host, FSDP-split) array as one host numpy array (a collective)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def write_atomically(out_dir: str, write: Callable[[str], None]) -> str:
  """Run ``write(tmp_dir)`` into a fresh folder beside ``out_dir``, then swap it into place.

  Process 0 writes; the others wait. The swap is :func:`mrl_jax.fileio.atomic_replace_dir`
  (one atomic exchange where the OS has it, else rename aside / rename in / delete), so at
  every moment ``out_dir`` (or its ``.old-*`` twin) is a complete bundle and a crash
  never leaves a partial one; Orbax commits checkpoints the same way.

  Returns:
    ``out_dir``.
  """
  out_dir = os.path.abspath(out_dir)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    _remove_leftovers(out_dir)
    tmp = fileio.make_temp_dir(out_dir)
    try:
      write(tmp)
      fileio.atomic_replace_dir(tmp, out_dir)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  multihost_utils.sync_global_devices(f"mrl_jax export: wrote {out_dir}")
  return out_dir


def _remove_leftovers(out_dir: str) -> None:
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
              "mrl_jax_version": mrl_jax.__version__, "modality": modality, "task": task,
              "is_matryoshka": bool(is_matryoshka),
              "matryoshka_dimensions": [int(m) for m in dims],
              "matryoshka_weights": [float(w) for w in weights],
              "step": step, "training_config": training_config, "sha256": files,
              **(extra or {})}
  fileio.write_json(os.path.join(out_dir, METADATA_FILE), metadata, what=METADATA_FILE)
  return metadata


def read_json(path: str, what: str = "bundle file") -> Any:
  """A JSON file, or :class:`BundleError` naming it (missing, not UTF-8, not JSON)."""
  del what  # fileio's message names the path
  return fileio.read_json(path)


def read_metadata(path: str, *, verify: bool = True) -> dict[str, Any]:
  """``mrl_jax.json`` of a bundle, its format checked and (``verify``) every file's hash.

  Raises:
    BundleError: naming the file: missing, unreadable, another format, or a
      file whose bytes differ from those written (corruption or tampering).
  """
  file = os.path.join(path, METADATA_FILE)
  if not os.path.isdir(path):
    raise BundleError(f"no exported encoder at {path} (not a folder)")
  meta = read_json(file, "bundle metadata")
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise BundleError(f"bundle metadata {file}: not an mrl_jax bundle (format is not {FORMAT!r})")
  if meta.get("format_version") != FORMAT_VERSION:
    raise BundleError(f"bundle metadata {file}: format_version {meta.get('format_version')!r}; "
                      f"this mrl_jax reads {FORMAT_VERSION} (re-export with this version)")
  if meta.get("modality") not in MODALITIES:
    raise BundleError(f"bundle metadata {file}: modality {meta.get('modality')!r} is not one "
                      f"of {MODALITIES}")
  hashes = meta.get("sha256")
  if not isinstance(hashes, dict) or WEIGHTS_FILE not in hashes:
    raise BundleError(f"bundle metadata {file}: no sha256 entry for {WEIGHTS_FILE}")
  if verify:
    for name, want in hashes.items():
      target = os.path.join(path, name)
      if os.path.normpath(name).startswith("..") or os.path.isabs(name):
        raise BundleError(f"bundle metadata {file}: file name {name!r} leaves the bundle")
      if not os.path.isfile(target):
        raise BundleError(f"bundle {path}: {name} is missing")
      if sha256_file(target) != want:
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


def export_encoder(workdir: str, out_dir: str | None = None, *, step: int | None = None) -> str:
  """Export the encoder of a training workdir (any task) to ``out_dir`` (default ``encoder/``).

  Rebuilds the run from ``workdir/config.json`` and its checkpoints (no
  training), then :meth:`mrl_jax.train_lib.Experiment.export`: the best step
  when the run kept one by ``best_metric``, else the latest (or ``step``).

  Raises:
    FileNotFoundError: ``workdir`` has no ``config.json`` or no checkpoint.
  """
  from mrl_jax import train_lib
  from mrl_jax.evaluate.workdir import load_workdir_config

  experiment = train_lib.Experiment(load_workdir_config(workdir), workdir)
  try:
    return experiment.export(out_dir, step=step)
  finally:
    experiment.close()
