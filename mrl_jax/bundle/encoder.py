"""Serve truncated Matryoshka embeddings from any exported bundle (images, text, adaptors).

::

  encoder = Encoder.load("workdir/encoder")
  z = encoder.embed(x, dim=16)                     # [B, 16] float32, unit norm
  q = encoder.embed(x, dim=16, quantize="int8")     # [B, 16] int8, calibrated per dim
  b = encoder.embed(x, dim=16, quantize="ubinary")  # [B, 2] uint8, packed sign bits
  t = text_encoder.embed(["a query", "a doc"], dim=64)   # text bundles take strings
  every = text_encoder.embed(texts, dims=[8, 64])        # {dim: array}, one forward pass

Each call runs the jitted encoder once per chunk, truncates the full embedding to
``dim`` and THEN L2-normalises it (:func:`mrl_jax.core.ops.truncate_normalize`); codes
follow sentence-transformers' ``quantize_embeddings`` (:func:`mrl_jax.core.ops.quantize`).
Batches of any size
are padded to one of a few fixed sizes (and texts to a few lengths), so the
number of compiled programs does not grow with the inputs seen. A text bundle
is a sentence-transformers folder: ``SentenceTransformer(path, truncate_dim=m)``
gives the same embeddings as ``Encoder.load(path).embed(texts, dim=m)``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mrl_jax import models
from mrl_jax.bundle import artifact as export_lib
from mrl_jax.bundle import calibration
from mrl_jax.bundle.artifact import BundleError
from mrl_jax.bundle.hf_folder import load_sentence_transformer
from mrl_jax.core import ops
from mrl_jax.core.heads import FixedFeatureHead, MRLHead
from mrl_jax.core.nesting import Nesting
from mrl_jax.models.adaptor import MatryoshkaAdaptor
from mrl_jax.models.text import TextEncoder
from mrl_jax.tokenizer import check_encodable

# Padded batch sizes: a batch of n rows runs in chunks of the largest size, the
# last chunk padded up to the smallest size that holds it.
DEFAULT_BATCH_SIZES = (1, 8, 64, 256)
QUANTIZATIONS = ops.QUANTIZATIONS
_MIN_TEXT_LENGTH = 16


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


def text_length_bucket(longest: int, max_length: int) -> int:
  """The padded token length for a batch whose longest text has ``longest`` tokens.

  The next power of two (at least 16), capped at ``max_length``: a handful of
  compiled programs instead of one per length.
  """
  return min(max(_MIN_TEXT_LENGTH, 1 << max(longest - 1, 0).bit_length()), max_length)


class Encoder:
  """A loaded bundle: ``embed(inputs, dim)`` at every trained nesting dim.

  Build it with :meth:`load`. Attributes: ``modality`` (``"image"``, ``"text"``
  or ``"embedding"``), ``dims`` (the trained nesting dims), ``embed_dim``
  (``D``), ``is_matryoshka``, ``metadata`` (``mrl_jax.json``), ``config``
  (``config.json``).

  Args:
    forward: ``(variables, inputs, layers) -> z [B, D]`` (pure, jittable).
    variables: the arrays ``forward`` reads.
    metadata: the validated ``mrl_jax.json``; config: the ``config.json``.
    batch_sizes: the padded batch sizes that are compiled (increasing).
  """

  def __init__(self, forward: Callable, variables: Any, metadata: dict[str, Any],
               config: dict[str, Any], *, embed_dim: int, tokenizer: Any = None,
               num_layers: int | None = None, max_length: int | None = None,
               heads: Callable | None = None,
               batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
               prompts: dict[str, str] | None = None, default_prompt_name: str | None = None,
               int8_ranges: dict[int, np.ndarray] | None = None):
    sizes = tuple(int(b) for b in batch_sizes)
    if not sizes or any(b < 1 for b in sizes) or list(sizes) != sorted(set(sizes)):
      raise ValueError(f"batch_sizes must be increasing positive ints, got {batch_sizes!r}")
    self.variables, self.metadata, self.config = variables, metadata, config
    self.modality = metadata["modality"]
    self.batch_sizes = sizes
    self.tokenizer = tokenizer
    self.num_layers = num_layers
    self.max_length = max_length
    self.nesting = Nesting(tuple(metadata["matryoshka_dimensions"]), embed_dim=embed_dim)
    self.is_matryoshka = bool(metadata["is_matryoshka"])
    self._forward = forward
    self._heads = heads
    self.prompts = dict(prompts or {})
    self.default_prompt_name = default_prompt_name
    # Calibrated int8 ranges per dim (ops.int8_ranges), stored in the bundle, or None.
    self.int8_ranges = dict(int8_ranges or {})
    # ONE jitted program per input shape (and layer count): the encoder's full embedding
    # and a per-row finiteness flag. Every dim, normalisation and quantisation is a cheap
    # slice of that output, so none of them compiles the encoder again.
    self.forward_traces = 0
    self._forward_jit = jax.jit(self._forward_checked, static_argnames=("layers",))

  # --- properties -------------------------------------------------------------------

  @property
  def dims(self) -> tuple[int, ...]:
    return self.nesting.dims

  @property
  def embed_dim(self) -> int:
    return int(self.nesting.embed_dim)

  @property
  def input_shape(self) -> tuple[int, ...] | None:
    """One example's shape (image and embedding bundles; None for text)."""
    shape = (self.config.get("input") or {}).get("shape")
    return tuple(shape) if shape else None

  @property
  def preprocessing(self) -> dict[str, Any] | None:
    return self.config.get("preprocessing")

  # --- loading ----------------------------------------------------------------------

  @classmethod
  def load(cls, path: str, *, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
           verify: bool = True) -> Encoder:
    """Read a bundle exported by any task (``WORKDIR/encoder``).

    Args:
      path: the bundle folder.
      batch_sizes: padded batch sizes to compile.
      verify: check every file's SHA-256 against ``mrl_jax.json`` (a flipped
        bit is refused).

    Raises:
      BundleError: naming the file and the problem: missing files, JSON that is
        not UTF-8 or not valid, metadata that is not a valid bundle's, changed
        bytes, or arrays that do not match the model config.
    """
    path = os.path.abspath(path)
    metadata = export_lib.read_metadata(path, verify=verify)
    config = export_lib.read_json(os.path.join(path, export_lib.CONFIG_FILE), "model config")
    if not isinstance(config, dict):
      raise BundleError(f"model config {os.path.join(path, 'config.json')} is not a JSON object")
    loader = {"image": _load_image, "text": _load_text, "embedding": _load_embedding}
    try:
      kwargs = loader[metadata["modality"]](path, config, metadata)
      kwargs["int8_ranges"] = calibration.read_int8_ranges(path, kwargs["embed_dim"])
      return cls(variables=kwargs.pop("variables"), forward=kwargs.pop("forward"),
                 metadata=metadata, config=config, batch_sizes=batch_sizes, **kwargs)
    except BundleError:
      raise
    except (KeyError, TypeError, ValueError) as e:
      raise BundleError(f"bundle {path}: invalid model config or metadata: "
                        f"{type(e).__name__}: {e}") from e

  # --- embedding ----------------------------------------------------------------------

  def _embed_fn(self, variables, inputs, *, dim, normalize, quantize, layers):
    z = self._forward(variables, inputs, layers)
    ranges = self.int8_ranges.get(dim) if quantize == "int8" else None
    if quantize == "int8" and ranges is None:
      raise ValueError(f"quantize='int8' needs calibration ranges for dim={dim}; this bundle "
                       "stores none (use int8_symmetric, or embed and quantise on the host)")
    return ops.quantize(ops.truncate_normalize(z, dim, normalize=normalize), quantize,
                        ranges=ranges)

  def _forward_checked(self, variables, inputs, *, layers):
    """The full float32 embedding ``[B, D]`` plus a per-row flag: is it finite?"""
    self.forward_traces += 1  # runs only while jax traces: counts compiled programs
    z = jnp.asarray(self._forward(variables, inputs, layers), jnp.float32)
    return z, jnp.all(jnp.isfinite(z), axis=-1)

  def _run(self, inputs: Any, rows: int, layers: int | None) -> np.ndarray:
    """One padded chunk through the jitted encoder -> ``[rows, D]`` float32; the model's
    NaN/inf rows are refused (quantised, they would become all-zero codes)."""
    out, finite = self._forward_jit(self.variables, inputs, layers=layers)
    finite = np.asarray(finite)[:rows]
    if not finite.all():
      raise ValueError(f"the model produced NaN/inf embeddings for rows "
                       f"{np.flatnonzero(~finite)[:10].tolist()} of this chunk (finite inputs); "
                       "nothing is served for them")
    return np.asarray(out)[:rows]

  def check_dim(self, dim: int | None, allow_any_dim: bool = False) -> int:
    """``dim`` (default: the largest trained dim) after checking it is servable.

    With ``allow_any_dim`` any size in ``1..embed_dim`` is served, with a warning
    when it was not trained: an interpolated size of a Matryoshka model, or any
    truncation of a model not trained with MRL (``is_matryoshka`` false, e.g. a
    baseline), whose prefixes are not trained representations: an explicit opt-in.

    Raises:
      ValueError: listing the valid dims when ``dim`` is not a trained nesting
        dim; with ``allow_any_dim``, when it is not in ``1..embed_dim``.
    """
    if dim is None:
      return self.dims[-1]
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
      raise ValueError(f"dim must be an int, got {dim!r}; valid dims: {list(self.dims)}")
    if allow_any_dim:
      if not 1 <= dim <= self.embed_dim:
        raise ValueError(f"dim={dim} is outside 1..{self.embed_dim} (embed_dim)")
      if not self.is_matryoshka and int(dim) not in self.dims:
        warnings.warn(f"dim={dim}: this model was not trained with MRL (is_matryoshka=false, "
                      f"trained size {list(self.dims)}); its prefixes are truncations of a "
                      "baseline, not trained representations", stacklevel=3)
      elif int(dim) not in self.dims:
        warnings.warn(f"dim={dim} was not trained (trained: {list(self.dims)}); its quality "
                      "is interpolated, not measured", stacklevel=3)
      return int(dim)
    try:
      self.nesting.index(dim)
    except ValueError as e:
      raise ValueError(f"{e} (allow_any_dim=True truncates to any size up to "
                       f"{self.embed_dim})") from None
    return int(dim)

  def _check_layers(self, layers: int | None) -> int | None:
    if layers is None:
      return None
    if self.modality != "text":
      raise ValueError("layers= applies to text encoders (2-D Matryoshka) only")
    if isinstance(layers, bool) or not isinstance(layers, (int, np.integer)) \
        or not 1 <= layers <= self.num_layers:
      raise ValueError(f"layers={layers!r} must be an int in [1, {self.num_layers}]")
    return None if layers == self.num_layers else int(layers)

  def embed(self, inputs: Any, dim: int | None = None, *, dims: Sequence[int] | None = None,
            quantize: str | None = None, normalize: bool = True, allow_any_dim: bool = False,
            layers: int | None = None, batch_size: int | None = None,
            show_progress_bar: bool | None = None, prompt_name: str | None = None,
            prompt: str | None = None, calibration_embeddings: Any = None
            ) -> np.ndarray | dict[int, np.ndarray]:
    """Embeddings of a batch, truncated to ``dim`` and then L2-normalised.

    The encoder runs once per chunk of inputs (one compiled program per padded
    input shape); every requested dim, the normalisation and the quantisation are
    taken from that one full-width output, so ``dims=[...]`` costs one forward pass
    and asking for another dim or code never compiles the encoder again.

    Args:
      inputs: image bundles: preprocessed float inputs ``[B, *input_shape]``
        (see :meth:`preprocess`; raw integer pixels are refused); text bundles:
        a list of ``str``; embedding (adaptor) bundles: float32 ``[B, D_in]``, or a
        list of ``str`` when the bundle holds a text encoder (``config.text_encoder``
        of the adaptor task: text encoder, full-size L2 normalisation, adaptor).
        Any ``B``, including 0.
      dim: a trained nesting dim (default: the largest); any size up to
        ``embed_dim`` with ``allow_any_dim=True`` (Matryoshka models only).
      dims: several dims at once (instead of ``dim``): returns ``{dim: array}``.
      quantize: one of :data:`QUANTIZATIONS` (sentence-transformers' precisions,
        :func:`mrl_jax.core.ops.quantize`): ``"int8"`` uses ``calibration_embeddings``,
        else the bundle's stored ranges for that dim (:attr:`int8_ranges`), else
        the ranges of these inputs' embeddings (as sentence-transformers).
      normalize: L2-normalise each truncated row.
      layers: text only: run the first ``layers`` Transformer layers (a model
        trained with 2-D Matryoshka).
      batch_size: rows per forward pass (default: the largest of
        ``batch_sizes``); smaller chunks are padded up to one of ``batch_sizes``.
      show_progress_bar: a tqdm bar over the chunks (default: when there are at
        least 8).
      prompt_name: text only: prepend ``prompts[prompt_name]`` (the export's
        ``config_sentence_transformers.json``); default: ``default_prompt_name``.
      prompt: text only: prepend this text instead (overrides ``prompt_name``).
      calibration_embeddings: float ``[N, >= dim]`` embeddings whose per-dim
        ranges calibrate ``"int8"`` (truncated and normalised like the output).

    Returns:
      ``[B, dim]`` float32 (int8 for the int8 kinds), ``[B, ceil(dim / 8)]`` uint8
      for ``"ubinary"`` / int8 for ``"binary"``; with ``dims``, ``{dim: array}``.

    Raises:
      ValueError: a bad ``dim``/``dims``/``quantize``/``layers``/``batch_size``/
        prompt, inputs of the wrong shape or type, or NaN/inf inputs (naming the rows).
    """
    if dims is not None and dim is not None:
      raise ValueError("pass dim= or dims=, not both")
    many = dims is not None
    if many and (isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or not dims):
      raise ValueError(f"dims must be a non-empty sequence of ints, got {dims!r}")
    wanted = [self.check_dim(m, allow_any_dim) for m in (dims if many else [dim])]
    if quantize not in QUANTIZATIONS:
      raise ValueError(f"quantize={quantize!r}; choose one of {QUANTIZATIONS}")
    if quantize == "int8_symmetric" and not normalize:
      raise ValueError("int8_symmetric maps [-1, 1] to [-127, 127] and needs unit-norm "
                       "embeddings: use normalize=True")
    if calibration_embeddings is not None and quantize != "int8":
      raise ValueError("calibration_embeddings apply to quantize='int8' only")
    layers = self._check_layers(layers)
    sizes = self._chunk_sizes(batch_size)
    texts = self.modality == "text" or (self.tokenizer is not None and _is_texts(inputs))
    if texts:
      full = self._embed_texts(self._with_prompt(inputs, prompt_name, prompt), sizes, layers,
                               show_progress_bar)
    else:
      if prompt_name is not None or prompt is not None:
        raise ValueError("prompt_name= / prompt= apply to text inputs only")
      full = self._embed_arrays(self._check_arrays(inputs), sizes, layers, show_progress_bar)
    out = {m: self._finish(full, m, normalize, quantize, calibration_embeddings)
           for m in wanted}
    return out if many else out[wanted[0]]

  def _finish(self, full: np.ndarray, dim: int, normalize: bool, quantize: str | None,
              calibration: Any) -> np.ndarray:
    """Full embeddings ``[B, D]`` -> truncated, normalised, quantised ``[B, ...]`` (host)."""
    if not len(full):
      width = -(-dim // 8) if quantize in ("binary", "ubinary") else dim
      dtype = np.float32 if quantize is None else np.uint8 if quantize == "ubinary" else np.int8
      return np.zeros((0, width), dtype)
    z = ops.truncate_normalize(full, dim, normalize=normalize)
    ranges = None
    if quantize == "int8":
      if calibration is not None:
        c = np.asarray(calibration)
        if c.ndim != 2 or c.shape[1] < dim:
          raise ValueError(f"calibration_embeddings must be [N, >= {dim}], got {c.shape}")
        ranges = ops.int8_ranges(np.asarray(ops.truncate_normalize(
            c.astype(np.float32), dim, normalize=normalize)))
      elif dim in self.int8_ranges and normalize:
        ranges = self.int8_ranges[dim]
    return np.asarray(ops.quantize(z, quantize, check_finite=False, ranges=ranges))

  def _chunk_sizes(self, batch_size: int | None) -> tuple[int, ...]:
    """The padded sizes of the chunks: ``batch_sizes`` below ``batch_size``, then it."""
    if batch_size is None:
      return self.batch_sizes
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
        or batch_size < 1:
      raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return tuple(b for b in self.batch_sizes if b < batch_size) + (int(batch_size),)

  def _with_prompt(self, texts: Any, prompt_name: str | None, prompt: str | None) -> Any:
    """``texts`` with the prompt prepended (as sentence-transformers' ``encode``)."""
    if prompt is None:
      name = prompt_name if prompt_name is not None else self.default_prompt_name
      if name is None:
        return texts
      if name not in self.prompts:
        raise ValueError(f"prompt_name={name!r} is not one of this model's prompts "
                         f"{sorted(self.prompts)} (config_sentence_transformers.json)")
      prompt = self.prompts[name]
    if not isinstance(prompt, str):
      raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt or isinstance(texts, str) or not isinstance(texts, Sequence):
      return texts
    return [prompt + t if isinstance(t, str) else t for t in texts]

  def _progress(self, chunks: list, show: bool | None):
    if show is None:
      show = len(chunks) >= 8
    if not show:
      return chunks
    from tqdm.auto import tqdm

    return tqdm(chunks, desc="embed", unit="batch")

  def _check_arrays(self, x: Any) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind in "iub":
      hint = (" run Encoder.preprocess on raw pixels first" if self.modality == "image"
              else "")
      raise ValueError(f"inputs must be floating point, got {x.dtype};{hint}")
    if x.dtype.kind != "f":
      raise ValueError(f"inputs must be a float array, got dtype {x.dtype}")
    if x.shape[1:] != self.input_shape:
      raise ValueError(f"inputs must have shape [B, {', '.join(map(str, self.input_shape))}], "
                       f"got {x.shape}")
    bad = ~np.isfinite(x.reshape(len(x), int(np.prod(x.shape[1:])))).all(axis=1)
    if bad.any():
      raise ValueError(f"inputs hold NaN or inf in rows {np.flatnonzero(bad)[:10].tolist()}")
    return x.astype(np.float32)

  def _embed_arrays(self, x: np.ndarray, sizes: Sequence[int], layers: int | None,
                    show: bool | None) -> np.ndarray:
    out = [np.zeros((0, self.embed_dim), np.float32)]
    for start, size, padded in self._progress(padded_chunks(len(x), sizes), show):
      chunk = x[start:start + size]
      if padded > size:
        chunk = np.concatenate([chunk, np.zeros((padded - size, *x.shape[1:]), np.float32)])
      out.append(self._run(chunk, size, layers))
    return np.concatenate(out)

  def _embed_texts(self, texts: Any, sizes: Sequence[int], layers: int | None,
                   show: bool | None) -> np.ndarray:
    if isinstance(texts, str) or not isinstance(texts, Sequence) \
        or not all(isinstance(t, str) for t in texts):
      raise ValueError("a text encoder embeds a list of str (one string: wrap it in a list)")
    check_encodable(texts, "inputs")  # a lone surrogate: named, not tokenizers' TypeError
    out = [np.zeros((0, self.embed_dim), np.float32)]
    for start, size, padded in self._progress(padded_chunks(len(texts), sizes), show):
      chunk = list(texts[start:start + size]) + [""] * (padded - size)
      encodings = self.tokenizer.encode_batch(chunk)
      length = text_length_bucket(max(len(e.ids) for e in encodings), self.max_length)
      ids = np.zeros((padded, length), np.int32)
      mask = np.zeros((padded, length), np.int32)
      types = np.zeros((padded, length), np.int32)
      for i, e in enumerate(encodings):
        n = len(e.ids)
        ids[i, :n], mask[i, :n], types[i, :n] = e.ids, e.attention_mask, e.type_ids
      out.append(self._run((ids, mask, types), size, layers))
    return np.concatenate(out)

  def preprocess(self, raw: np.ndarray) -> np.ndarray:
    """Stored examples (e.g. uint8 images ``[B, H, W, C]``) -> float32 model inputs.

    Applies the bundle's ``x * scale + offset`` (scalars, or one entry per
    channel; see :func:`mrl_jax.tasks.classification.preprocessing_info`).
    """
    if self.preprocessing is None:
      raise ValueError(f"a {self.modality} bundle has no preprocessing rule")
    scale = np.asarray(self.preprocessing["scale"], np.float32)
    offset = np.asarray(self.preprocessing["offset"], np.float32)
    return np.asarray(raw, np.float32) * scale + offset

  # --- classification from the bundle's nested heads ------------------------------------

  def logits(self, x: np.ndarray) -> np.ndarray:
    """Nested logits ``[M, B, C]`` of an image bundle's heads (one row per trained dim).

    Raises:
      ValueError: the bundle has no classification heads.
    """
    if self._heads is None:
      raise ValueError("this bundle has no classification heads (only image bundles do)")
    x = self._check_arrays(x)
    out = []
    for start, size, padded in padded_chunks(len(x), self.batch_sizes):
      chunk = x[start:start + size]
      if padded > size:
        chunk = np.concatenate([chunk, np.zeros((padded - size, *x.shape[1:]), np.float32)])
      out.append(np.asarray(self._heads(self.variables, chunk))[:, :size])
    return np.concatenate(out, axis=1)

  # --- serving without mrl_jax ------------------------------------------------------------

  def export(self, dim: int | None = None, *, normalize: bool = True,
             quantize: str | None = None, allow_any_dim: bool = False,
             platforms: Sequence[str] | None = None) -> jax.export.Exported:
    """The embed function at one ``dim`` as serialisable StableHLO (``jax.export``).

    The weights are baked in and the batch size is symbolic, so a serving
    stack runs it without mrl_jax or Flax (image and embedding bundles)::

      blob = encoder.export(dim=16).serialize()       # bytes, store anywhere
      z = jax.export.deserialize(blob).call(x)        # any batch size
    """
    if self.modality == "text":
      raise ValueError("export() serves array inputs; serve text bundles with "
                       "sentence-transformers, TEI or vLLM (the folder is theirs)")
    dim = self.check_dim(dim, allow_any_dim)
    fn = jax.jit(functools.partial(self._embed_fn, self.variables, dim=dim,
                                   normalize=normalize, quantize=quantize, layers=None))
    (batch,) = jax.export.symbolic_shape("batch")
    return jax.export.export(fn, platforms=platforms)(
        jax.ShapeDtypeStruct((batch, *self.input_shape), jnp.float32))


def _is_texts(inputs: Any) -> bool:
  """A list (or tuple) of str: what an embedding bundle with a text encoder embeds as texts."""
  return isinstance(inputs, (list, tuple)) and all(isinstance(t, str) for t in inputs)


# --- loaders per modality -----------------------------------------------------------------


def _single_device(tree: Any) -> Any:
  device = jax.local_devices()[0]
  return jax.tree.map(lambda x: jax.device_put(x, device), tree)


def _validate_common(config: dict, metadata: dict, path: str, embed_dim: int) -> None:
  # A config.json without dims is an ordinary (non-Matryoshka) Hugging Face model.
  if ("matryoshka_dimensions" in config
      and config["matryoshka_dimensions"] != metadata["matryoshka_dimensions"]):
    raise BundleError(f"bundle {path}: matryoshka_dimensions differ between config.json "
                      f"{config.get('matryoshka_dimensions')} and mrl_jax.json "
                      f"{metadata['matryoshka_dimensions']}")
  try:
    Nesting(tuple(metadata["matryoshka_dimensions"]), embed_dim=embed_dim)
  except (TypeError, ValueError) as e:
    raise BundleError(f"bundle {path}: matryoshka_dimensions: {e}") from None
  dims = metadata["matryoshka_dimensions"]
  if list(dims) != sorted(set(dims)):
    raise BundleError(f"bundle {path}: matryoshka_dimensions {dims} must be strictly increasing")


HEAD_KINDS = ("mrl", "mrl_e", "ff")


def _typed(config: dict, path: str, field: str, kind: type | tuple, *, choices=None) -> Any:
  """``config[field]`` when it has JSON type ``kind`` (and is one of ``choices``)."""
  value = config.get(field) if isinstance(config, dict) else None
  ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
  if not ok or (choices is not None and value not in choices):
    want = f"one of {list(choices)}" if choices else {bool: "a JSON bool (true or false)",
                                                     int: "an int", dict: "a JSON object",
                                                     list: "a JSON list"}.get(kind, str(kind))
    raise BundleError(f"bundle {path}: config.json {field}={value!r} must be {want}")
  return value


def _input_shape(config: dict, path: str) -> tuple[int, ...]:
  shape = _typed(_typed(config, path, "input", dict), path, "shape", list)
  if not shape or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                          for n in shape):
    raise BundleError(f"bundle {path}: input.shape {shape!r} must be positive ints")
  if int(np.prod(shape, dtype=np.float64)) > export_lib.MAX_INPUT_ELEMENTS:
    raise BundleError(f"bundle {path}: input.shape {shape} has more than "
                      f"{export_lib.MAX_INPUT_ELEMENTS} elements per example; refusing it "
                      "before building anything")
  return tuple(shape)


def _check_matryoshka_flag(config: dict, metadata: dict, path: str) -> None:
  flag = _typed(config, path, "is_matryoshka", bool)
  if flag != metadata["is_matryoshka"]:
    raise BundleError(f"bundle {path}: is_matryoshka differs between config.json ({flag}) and "
                      f"mrl_jax.json ({metadata['is_matryoshka']})")


def _load_image(path: str, config: dict, metadata: dict) -> dict[str, Any]:
  embed_dim = _typed(config, path, "embed_dim", int)
  _validate_common(config, metadata, path, embed_dim)
  _check_matryoshka_flag(config, metadata, path)
  half = _typed(config, path, "half_precision", bool)
  head_cfg = _typed(config, path, "head", dict)
  kind = _typed(head_cfg, path, "kind", str, choices=HEAD_KINDS)
  shape = _input_shape(config, path)
  # Everything the model's size depends on is bounded by the header before building it.
  header = export_lib.read_header(os.path.join(path, export_lib.WEIGHTS_FILE))
  export_lib.check_config_ints({"encoder": _typed(config, path, "encoder", dict),
                                "embed_dim": embed_dim, "head": head_cfg}, header,
                               f"bundle {path}: config.json")
  pre = config.get("preprocessing") or {}
  for key in ("scale", "offset"):
    values = np.asarray(pre.get(key), dtype=object).reshape(-1)
    if not len(values) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                  and np.isfinite(v) for v in values):
      raise BundleError(f"bundle {path}: preprocessing.{key}={pre.get(key)!r} must be finite "
                        "numbers")
  encoder = models.build_encoder(config["encoder"], half)
  if kind == "ff":
    head = FixedFeatureHead(int(head_cfg["num_classes"]), int(head_cfg["dims"][0]))
  else:
    head = MRLHead(int(head_cfg["num_classes"]), tuple(head_cfg["dims"]), tied=kind == "mrl_e")
  # Abstract inputs: eval_shape allocates nothing (a zeros((1, *shape)) would).
  x0 = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
  want_enc = jax.eval_shape(lambda x: encoder.init(jax.random.PRNGKey(0), x, train=False), x0)
  want_head = jax.eval_shape(lambda: head.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, embed_dim), jnp.float32)))
  want = {"encoder": {k: v for k, v in want_enc.items() if jax.tree.leaves(v)},
          "head": {k: v for k, v in want_head.items() if jax.tree.leaves(v)}}
  export_lib.check_header(header, want, f"bundle {path}: {export_lib.WEIGHTS_FILE}")
  stored = export_lib.unflatten(export_lib.load_weights(path))
  export_lib.check_tree(stored, want, f"bundle {path}")
  variables = _single_device(stored)

  def forward(v, x, layers):
    del layers
    return encoder.apply(v["encoder"], x, train=False)

  def heads(v, x):
    logits = head.apply(v["head"], encoder.apply(v["encoder"], x, train=False))
    return logits[None] if kind == "ff" else logits

  return {"variables": variables, "forward": forward, "embed_dim": embed_dim,
          "heads": jax.jit(heads)}


def _load_text(path: str, config: dict, metadata: dict) -> dict[str, Any]:
  try:
    bert, info = load_sentence_transformer(path)
  except BundleError:
    raise
  except (FileNotFoundError, ValueError, OSError) as e:
    raise BundleError(f"bundle {path}: {e}") from e
  cfg = bert.model.config
  _validate_common(config, metadata, path, cfg.hidden_size)
  if config.get("is_matryoshka", False) is not metadata["is_matryoshka"]:  # typed: bools only
    raise BundleError(f"bundle {path}: config.json is_matryoshka="
                      f"{config.get('is_matryoshka', False)!r} differs from mrl_jax.json's "
                      f"{metadata['is_matryoshka']} (both must be JSON bools)")
  models_by_layers: dict[int | None, TextEncoder] = {None: bert.model}

  def forward(v, inputs, layers):
    if layers not in models_by_layers:
      models_by_layers[layers] = TextEncoder(dataclasses.replace(cfg, num_layers=layers),
                                             pooling=bert.model.pooling)
    return models_by_layers[layers].apply({"params": v}, *inputs)

  tokenizer = bert.tokenizer.tokenizer
  return {"variables": _single_device(bert.params), "forward": forward,
          "embed_dim": cfg.hidden_size, "tokenizer": tokenizer, "num_layers": cfg.num_layers,
          "max_length": bert.tokenizer.max_length, "prompts": info.prompts,
          "default_prompt_name": info.default_prompt_name}


def _load_embedding(path: str, config: dict, metadata: dict) -> dict[str, Any]:
  embed_dim = _typed(config, path, "embed_dim", int)
  _validate_common(config, metadata, path, embed_dim)
  if list(_input_shape(config, path)) != [embed_dim]:
    raise BundleError(f"bundle {path}: input.shape {config['input']['shape']!r} must be "
                      f"[{embed_dim}] (embed_dim)")
  spec = _typed(config, path, "adaptor", dict)
  unknown = set(spec) - {"hidden", "activation"}
  if unknown:
    raise BundleError(f"bundle {path}: unknown adaptor fields {sorted(unknown)}")
  header = export_lib.read_header(os.path.join(path, export_lib.WEIGHTS_FILE))
  export_lib.check_config_ints({"adaptor": spec, "embed_dim": embed_dim}, header,
                               f"bundle {path}: config.json")
  model = MatryoshkaAdaptor(hidden=tuple(spec.get("hidden", (512,))),
                            activation=spec.get("activation", "relu"))
  want = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                           jnp.zeros((1, embed_dim), jnp.float32)))
  export_lib.check_header(header, dict(want), f"bundle {path}: {export_lib.WEIGHTS_FILE}")
  stored = export_lib.unflatten(export_lib.load_weights(path))
  export_lib.check_tree(stored, dict(want), f"bundle {path}")
  if config.get("text_encoder") is None:
    def forward(v, x, layers):
      del layers
      return model.apply(v, x)

    return {"variables": _single_device(stored), "forward": forward, "embed_dim": embed_dim}
  # A text encoder composed with the adaptor: its bundle is the subfolder named in config.json;
  # the adaptor reads the text encoder's full-size, L2-normalised embedding.
  sub = config["text_encoder"]["path"]
  if not isinstance(sub, str) or os.path.isabs(sub) or os.path.normpath(sub).startswith(".."):
    raise BundleError(f"bundle {path}: text_encoder.path {sub!r} must be a subfolder")
  sub = os.path.join(path, sub)
  sub_meta = export_lib.read_metadata(sub, verify=False)  # its files are in this bundle's hashes
  if sub_meta["modality"] != "text":
    raise BundleError(f"bundle {path}: text_encoder {sub} is a {sub_meta['modality']} bundle")
  text = _load_text(sub, export_lib.read_json(os.path.join(sub, export_lib.CONFIG_FILE)),
                    sub_meta)
  if text["embed_dim"] != embed_dim:
    raise BundleError(f"bundle {path}: the text encoder embeds {text['embed_dim']} dims, the "
                      f"adaptor takes {embed_dim}")
  text_forward = text.pop("forward")

  def composed(v, inputs, layers):
    if isinstance(inputs, tuple):  # token arrays: text encoder, then normalise
      inputs = ops.truncate_normalize(text_forward(v["text"], inputs, layers))
    return model.apply(v["adaptor"], inputs)

  return {**text, "variables": {"adaptor": _single_device(stored), "text": text["variables"]},
          "forward": composed, "embed_dim": embed_dim}
