"""Serve truncated Matryoshka embeddings from an exported bundle.

::

  encoder = Encoder.load("workdir/encoder")
  z = encoder.embed(x, dim=16)                     # [B, 16] float32, unit norm
  q = encoder.embed(x, dim=16, quantize="int8")    # [B, 16] int8
  b = encoder.embed(x, dim=16, quantize="binary")  # [B, 2] uint8, packed sign bits

Each call runs one jitted forward of the encoder, truncates the embedding to
``dim`` and THEN L2-normalises it (normalising first and truncating after
gives vectors that are not unit length: the most reported bug of serving
stacks). Batches of any size are padded to one of a few fixed sizes, so the
number of compiled programs does not grow with the number of batch sizes seen.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mrl_jax import models
from mrl_jax.export import (
    FORMAT,
    FORMAT_VERSION,
    METADATA_FILE,
    VARIABLES_DIR,
    BundleError,
    abstract_variables,
)
from mrl_jax.nesting import Nesting

# Padded batch sizes: a batch of n rows runs in chunks of the largest size, the
# last chunk padded up to the smallest size that holds it.
DEFAULT_BATCH_SIZES = (1, 8, 64, 256)
QUANTIZATIONS = (None, "int8", "binary")
_EPS = 1e-12


def embed_fn(model: nn.Module, variables: dict, x: jax.Array, *, dim: int, normalize: bool,
             quantize: str | None) -> jax.Array:
  """``x [B, ...] -> [B, dim]``: encode, truncate to ``dim``, then L2-normalise and quantise.

  Args:
    model: the encoder, ``x -> z [B, D]``.
    variables: its ``{"params": ..., "batch_stats": ...}``.
    dim: prefix size ``m <= D``.
    normalize: divide each truncated row by its L2 norm.
    quantize: ``None`` (float32 ``[B, m]``), ``"int8"`` (``round(127 * z)``,
      int8 ``[B, m]``; needs ``normalize``) or ``"binary"`` (the sign bits
      ``z > 0`` packed big-endian into uint8 ``[B, ceil(m / 8)]``, as
      ``np.packbits``).
  """
  z = model.apply(variables, x, train=False).astype(jnp.float32)[:, :dim]
  if normalize:
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), _EPS)
  if quantize == "int8":
    return jnp.clip(jnp.round(z * 127.0), -127, 127).astype(jnp.int8)
  if quantize == "binary":
    return jnp.packbits(z > 0, axis=-1)
  return z


class Encoder:
  """A loaded bundle: ``embed(x, dim)`` for every trained nesting dim.

  Build it with :meth:`load`. Attributes: ``dims`` (the trained nesting dims),
  ``embed_dim`` (``D``), ``input_shape`` (one example), ``preprocessing`` and
  ``metadata`` (the bundle's JSON).

  Args:
    model: the encoder module.
    variables: its arrays.
    metadata: the validated bundle metadata.
    batch_sizes: the padded batch sizes that are compiled (increasing).
  """

  def __init__(self, model: nn.Module, variables: dict, metadata: dict[str, Any],
               batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES):
    sizes = tuple(int(b) for b in batch_sizes)
    if not sizes or any(b < 1 for b in sizes) or list(sizes) != sorted(set(sizes)):
      raise ValueError(f"batch_sizes must be increasing positive ints, got {batch_sizes!r}")
    self.model = model
    self.variables = variables
    self.metadata = metadata
    self.batch_sizes = sizes
    self.nesting = Nesting(tuple(metadata["matryoshka_dimensions"]),
                           embed_dim=metadata["embed_dim"])
    self.input_shape = tuple(metadata["input"]["shape"])
    self.preprocessing = metadata["preprocessing"]
    self._embed = jax.jit(functools.partial(embed_fn, model),
                          static_argnames=("dim", "normalize", "quantize"))

  @property
  def dims(self) -> tuple[int, ...]:
    return self.nesting.dims

  @property
  def embed_dim(self) -> int:
    return int(self.nesting.embed_dim)

  @classmethod
  def load(cls, path: str, *, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES) -> Encoder:
    """Read a bundle written by :func:`mrl_jax.export.export_encoder`.

    Raises:
      BundleError: naming the path and the problem: missing files, metadata
        that is not a valid bundle's, or arrays that do not match the model
        config in the metadata.
    """
    path = os.path.abspath(path)
    metadata = _read_metadata(path)
    try:
      model = models.build_encoder(metadata["encoder"], metadata["half_precision"])
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      abstract = abstract_variables(model, tuple(metadata["input"]["shape"]), sharding)
    except (TypeError, ValueError) as e:
      raise BundleError(f"bundle {path}: cannot build the encoder {metadata['encoder']}: "
                        f"{e}") from e
    return cls(model, _read_variables(path, abstract, metadata["encoder"]), metadata,
               batch_sizes)

  def check_dim(self, dim: int | None, allow_any_dim: bool = False) -> int:
    """``dim`` (default: the largest trained dim) after checking it is servable.

    Raises:
      ValueError: listing the valid dims when ``dim`` is not a trained nesting
        dim (or, with ``allow_any_dim``, not in ``1..embed_dim``).
    """
    if dim is None:
      return self.dims[-1]
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
      raise ValueError(f"dim must be an int, got {dim!r}; valid dims: {list(self.dims)}")
    if allow_any_dim:
      if not 1 <= dim <= self.embed_dim:
        raise ValueError(f"dim={dim} is outside 1..{self.embed_dim} (embed_dim)")
      return int(dim)
    try:
      self.nesting.index(dim)
    except ValueError as e:
      raise ValueError(f"{e} (allow_any_dim=True truncates to any size up to "
                       f"{self.embed_dim})") from None
    return int(dim)

  def preprocess(self, raw: np.ndarray) -> np.ndarray:
    """Stored examples (e.g. uint8 images ``[B, H, W, C]``) -> float32 model inputs.

    Applies the bundle's ``x * scale + offset`` (scalars, or one entry per
    channel; see :func:`mrl_jax.export.preprocessing_info`).
    """
    rule = self.preprocessing
    scale = np.asarray(rule["scale"], np.float32)
    offset = np.asarray(rule["offset"], np.float32)
    return np.asarray(raw, np.float32) * scale + offset

  def embed(self, x: np.ndarray, dim: int | None = None, *, normalize: bool = True,
            quantize: str | None = None, allow_any_dim: bool = False) -> np.ndarray:
    """Embeddings of a batch, truncated to ``dim`` and then L2-normalised.

    Args:
      x: preprocessed inputs ``[B, *input_shape]`` (see :meth:`preprocess`);
        any ``B``, including 0.
      dim: a trained nesting dim (default: the largest); any size up to
        ``embed_dim`` with ``allow_any_dim=True``.
      normalize: L2-normalise each truncated row.
      quantize: ``None``, ``"int8"`` or ``"binary"`` (see :func:`embed_fn`).

    Returns:
      ``[B, dim]`` float32 (or int8), or ``[B, ceil(dim / 8)]`` uint8 for
      ``"binary"``.
    """
    dim = self.check_dim(dim, allow_any_dim)
    self._check_options(normalize, quantize)
    x = np.asarray(x, np.float32)
    if x.shape[1:] != self.input_shape:
      raise ValueError(f"inputs must have shape [B, {', '.join(map(str, self.input_shape))}], "
                       f"got {x.shape}")
    out = []
    for start, size, padded in padded_chunks(len(x), self.batch_sizes):
      chunk = x[start:start + size]
      if padded > size:
        chunk = np.concatenate([chunk, np.zeros((padded - size, *self.input_shape), np.float32)])
      z = self._embed(self.variables, chunk, dim=dim, normalize=normalize, quantize=quantize)
      out.append(np.asarray(z)[:size])
    if not out:
      width = -(-dim // 8) if quantize == "binary" else dim
      dtype = {None: np.float32, "int8": np.int8, "binary": np.uint8}[quantize]
      return np.zeros((0, width), dtype)
    return np.concatenate(out)

  def export(self, dim: int | None = None, *, normalize: bool = True,
             quantize: str | None = None, allow_any_dim: bool = False,
             platforms: Sequence[str] | None = None) -> jax.export.Exported:
    """The embed function at one ``dim`` as serialisable StableHLO (``jax.export``).

    The weights are baked in and the batch size is symbolic, so a serving
    stack runs it without mrl_jax or Flax::

      blob = encoder.export(dim=16).serialize()       # bytes, store anywhere
      fn = jax.export.deserialize(blob)
      z = fn.call(x)                                  # any batch size

    Args:
      platforms: lower for these (e.g. ``("cpu", "tpu", "cuda")``); default:
        the current backend.
    """
    dim = self.check_dim(dim, allow_any_dim)
    self._check_options(normalize, quantize)
    fn = jax.jit(functools.partial(embed_fn, self.model, self.variables, dim=dim,
                                   normalize=normalize, quantize=quantize))
    (batch,) = jax.export.symbolic_shape("batch")
    return jax.export.export(fn, platforms=platforms)(
        jax.ShapeDtypeStruct((batch, *self.input_shape), jnp.float32))

  @staticmethod
  def _check_options(normalize: bool, quantize: str | None) -> None:
    if quantize not in QUANTIZATIONS:
      raise ValueError(f"quantize={quantize!r}; choose one of {QUANTIZATIONS}")
    if quantize == "int8" and not normalize:
      raise ValueError("int8 quantisation maps [-1, 1] to [-127, 127] and needs unit-norm "
                       "embeddings: use normalize=True")


def padded_chunks(n: int, sizes: Sequence[int]) -> list[tuple[int, int, int]]:
  """``(start, rows, padded_rows)`` per chunk of a batch of ``n`` rows.

  Full chunks have ``sizes[-1]`` rows; the last one is padded up to the
  smallest size that holds it.
  """
  chunks = []
  for start in range(0, n, sizes[-1]):
    rows = min(sizes[-1], n - start)
    chunks.append((start, rows, next(b for b in sizes if b >= rows)))
  return chunks


def _read_metadata(path: str) -> dict[str, Any]:
  file = os.path.join(path, METADATA_FILE)
  try:
    with open(file) as f:
      metadata = json.load(f)
  except FileNotFoundError:
    raise BundleError(f"no encoder bundle at {path}: {METADATA_FILE} is missing") from None
  except (OSError, json.JSONDecodeError) as e:
    raise BundleError(f"bundle metadata {file} is unreadable: {e}") from e
  _validate_metadata(metadata, file)
  return metadata


def _validate_metadata(m: Any, file: str) -> None:
  """Check the JSON's structure and types (it is data from outside)."""

  def fail(problem: str):
    raise BundleError(f"bundle metadata {file}: {problem}")

  if not isinstance(m, dict) or m.get("format") != FORMAT:
    fail(f"not an mrl_jax encoder bundle (format is not {FORMAT!r})")
  if m.get("format_version") != FORMAT_VERSION:
    fail(f"format_version {m.get('format_version')!r}; this mrl_jax reads {FORMAT_VERSION}")
  if not isinstance(m.get("encoder"), dict) or m["encoder"].get("name") not in models.ENCODERS:
    fail(f"encoder {m.get('encoder')!r} must name one of {sorted(models.ENCODERS)}")
  if not isinstance(m.get("half_precision"), bool):
    fail(f"half_precision {m.get('half_precision')!r} is not a bool")
  embed_dim = m.get("embed_dim")
  if embed_dim != m["encoder"].get("embed_dim"):
    fail(f"embed_dim {embed_dim!r} differs from the encoder's {m['encoder'].get('embed_dim')!r}")
  try:
    Nesting(tuple(m.get("matryoshka_dimensions") or ()), embed_dim=embed_dim)
  except (TypeError, ValueError) as e:
    fail(f"matryoshka_dimensions: {e}")
  shape = (m.get("input") or {}).get("shape")
  if not isinstance(shape, list) or not shape or not all(
      isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
    fail(f"input.shape {shape!r} must be a list of positive ints")
  pre = m.get("preprocessing")
  if not isinstance(pre, dict) or not all(_is_number_or_numbers(pre.get(k))
                                          for k in ("scale", "offset")):
    fail(f"preprocessing {pre!r} needs numeric scale and offset (numbers or per-channel lists)")


def _is_number_or_numbers(x: Any) -> bool:
  is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  return is_number(x) or (isinstance(x, list) and bool(x) and all(map(is_number, x)))


def _read_variables(path: str, abstract: dict, encoder_config: dict) -> dict:
  """Restore the arrays into ``abstract``'s shapes, naming every mismatch."""
  directory = os.path.join(path, VARIABLES_DIR)
  if not os.path.isdir(directory):
    raise BundleError(f"bundle {path}: the arrays folder {directory} is missing")
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      stored = checkpointer.metadata(directory).item_metadata.tree
    except Exception as e:  # orbax raises many types
      raise BundleError(f"bundle {path}: cannot read {directory}: {type(e).__name__}: {e}") from e
    problems = _tree_mismatches(stored, abstract)
    if problems:
      raise BundleError(
          f"bundle {path}: its arrays do not match its model config (encoder "
          f"{json.dumps(encoder_config, sort_keys=True)}): {'; '.join(problems[:5])}")
    try:
      return checkpointer.restore(directory, abstract)
    except Exception as e:
      raise BundleError(f"bundle {path}: cannot read the arrays in {directory}: "
                        f"{type(e).__name__}: {e}") from e


def _tree_mismatches(stored: Any, expected: Any) -> list[str]:
  """Human-readable differences in paths and shapes between two trees of arrays."""
  flat = lambda tree: {jax.tree_util.keystr(k): tuple(v.shape)
                       for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  have, want = flat(stored), flat(expected)
  problems = [f"{k}: missing (expected shape {want[k]})" for k in want if k not in have]
  problems += [f"{k}: unexpected array of shape {have[k]}" for k in have if k not in want]
  problems += [f"{k}: shape {have[k]}, expected {want[k]}"
               for k in want if k in have and have[k] != want[k]]
  return problems
