"""Calibrated int8 ranges stored in a bundle (``int8_ranges.safetensors``).

sentence-transformers' ``quantize_embeddings(x, precision="int8",
calibration_embeddings=c)`` maps each dimension's range over ``c`` onto the 256
int8 codes (:func:`mrl_jax.core.ops.int8_ranges`). The range of a dimension depends on
the prefix size (each prefix is L2-normalised after truncation), so a bundle
stores one ``ranges [2, m]`` array (min row, max row: sentence-transformers' own
``ranges=`` argument) per nesting dim, computed at export from calibration
embeddings (training texts). :meth:`mrl_jax.bundle.encoder.Encoder.embed`
uses them for ``quantize="int8"``: the codes of every query and document then
share one scale, as an index needs.

Layout: one float32 tensor ``dim_<m>`` ``[2, m]`` per dim, so
``quantize_embeddings(z, precision="int8", ranges=load_file(f)[f"dim_{m}"])`` gives the
same codes; the file is data (safetensors), hashed in ``mrl_jax.json`` like every
bundle file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

from mrl_jax.core import ops
from mrl_jax.core.fileio import BundleError

INT8_RANGES_FILE = "int8_ranges.safetensors"
_NAME = re.compile(r"dim_([1-9][0-9]*)")


def int8_ranges_per_dim(embeddings, dims: Sequence[int]) -> dict[int, np.ndarray]:
  """``{m: int8_ranges(truncate_normalize(embeddings, m))}`` for every ``m`` in ``dims``.

  Args:
    embeddings: float ``[N, D]`` full-size calibration embeddings (N >= 1).
    dims: prefix sizes ``1 <= m <= D``.
  """
  e = np.asarray(embeddings, np.float32)
  return {int(m): ops.int8_ranges(np.asarray(ops.truncate_normalize(e, int(m))))
          for m in dims}


def write_int8_ranges(out_dir: str, ranges: Mapping[int, np.ndarray]) -> str:
  """Write ``{m: ranges [2, m]}`` to ``out_dir/int8_ranges.safetensors``; returns its path."""
  from safetensors.numpy import save_file

  tensors = {}
  for m, r in ranges.items():
    r = np.asarray(r, np.float32)
    if r.shape != (2, m) or not np.isfinite(r).all():
      raise ValueError(f"int8 ranges of dim {m} must be finite [2, {m}], got shape {r.shape}")
    tensors[f"dim_{m}"] = np.ascontiguousarray(r)
  path = os.path.join(out_dir, INT8_RANGES_FILE)
  save_file(tensors, path)
  os.chmod(path, os.stat(out_dir).st_mode & 0o666)  # safetensors writes 0600
  return path


def read_int8_ranges(path: str, embed_dim: int) -> dict[int, np.ndarray]:
  """The ranges stored in a bundle (``{}`` when it has no ``int8_ranges.safetensors``).

  Raises:
    BundleError: naming the file when it is unreadable, has unknown tensor names,
      a dim above ``embed_dim``, wrong shapes or dtypes, or non-finite values.
  """
  file = os.path.join(path, INT8_RANGES_FILE)
  if not os.path.lexists(file):
    return {}
  from safetensors.numpy import load_file

  try:
    tensors = load_file(file)
  except Exception as e:  # safetensors raises its own error types
    raise BundleError(f"{file} is not a readable safetensors file: {e}") from None
  out = {}
  for name, value in sorted(tensors.items()):
    match = _NAME.fullmatch(name)
    if not match or int(match.group(1)) > embed_dim:
      raise BundleError(f"{file}: unexpected tensor {name!r} (want dim_<m> with m <= "
                        f"{embed_dim})")
    m = int(match.group(1))
    if value.shape != (2, m) or value.dtype != np.float32 or not np.isfinite(value).all():
      raise BundleError(f"{file}: {name} must be finite float32 [2, {m}] (min, max rows), got "
                        f"{value.dtype} {value.shape}")
    out[m] = value
  return out
