"""The one truncate-then-normalise of the library, and quantisation of its output.

Every serving and evaluation path goes through :func:`truncate_normalize`:
truncate to the first ``dim`` coordinates, THEN divide by the L2 norm
(normalising first and truncating after gives vectors that are not unit
length, the most reported bug of serving stacks; Kusupati et al. 2022 §3 and
sentence-transformers' ``truncate_dim``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NORM_EPS = 1e-12
# sentence-transformers' ``quantize_embeddings`` precisions (same names, same codes), plus
# mrl_jax's fixed-range int8 rule under its own name.
QUANTIZATIONS = (None, "int8", "int8_symmetric", "binary", "ubinary")
# The kinds whose codes depend on calibration ranges (``int8_ranges``).
CALIBRATED = ("int8",)


def max_abs_scale(x: jax.Array, axis: int = -1) -> jax.Array:
  """Per-row ``max |x|`` (1 for all-zero rows), kept as an axis and out of autodiff.

  Dividing a row by it before squaring makes every norm computed here
  scale-safe: ``sum(x**2)`` overflows float32 for entries above ~1.8e19 and
  underflows to 0 below ~1e-19 (a database scaled by 1e20 or 1e-25 then ranks
  at random with scores 0), while ``sum((x / m)**2)`` lies in ``[1, D]``. The
  scale is a constant to autodiff: a normalised row does not depend on it, so
  the gradient is exact.

  Args:
    x: ``[..., D]`` float.
    axis: the reduced axis.

  Returns:
    float32 ``[..., 1]`` (``axis`` kept, size 1), ``> 0``.
  """
  m = jnp.max(jnp.abs(jnp.asarray(x, jnp.float32)), axis=axis, keepdims=True)
  return jax.lax.stop_gradient(jnp.where(m > 0, m, 1.0))


def unit_rows(x: jax.Array, *, eps: float = 0.0) -> jax.Array:
  """``x / ||x||_2`` along the last axis in float32, scale-safe; zero rows stay zero.

  Rescales each row by :func:`max_abs_scale` first, so the result is the same for
  ``x``, ``1e20 * x`` and ``1e-25 * x`` (float32). ``eps > 0`` floors the norm of
  the ORIGINAL row at ``eps`` (rows shorter than ``eps`` are shrunk, not unit).

  Args:
    x: ``[..., D]`` (any float dtype, bfloat16 included).
    eps: floor of the original norm (0: none; an all-zero row stays zero).

  Returns:
    float32 ``[..., D]``.
  """
  x = jnp.asarray(x, jnp.float32)
  m = max_abs_scale(x)
  y = x / m
  sq = jnp.sum(jnp.square(y), axis=-1, keepdims=True)  # in [1, D] for a nonzero row
  if eps > 0:  # ||x|| = m ||y||; floor it at eps without forming m ||y|| (may overflow)
    sq = jnp.maximum(sq, jnp.square(eps / m))
  # rsqrt of a where-guarded sum: a zero row gets a zero gradient, not 0 * inf = NaN.
  return y * jnp.where(sq > 0, jax.lax.rsqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def inverse_norms(x: jax.Array) -> jax.Array:
  """``1 / ||x||_2`` along the last axis (0 for zero rows), float32 ``[...]``, scale-safe.

  ``(1 / m) / ||x / m||`` with ``m = max |x|`` (:func:`max_abs_scale`): finite for every
  finite float32 row whose ``max |x| >= 3e-39``, where ``rsqrt(sum(x**2))`` is inf
  or 0 outside ``|x| ~ [1e-19, 1e19]``.
  """
  x = jnp.asarray(x, jnp.float32)
  m = max_abs_scale(x)
  sq = jnp.sum(jnp.square(x / m), axis=-1)
  inv = jnp.where(sq > 0, jax.lax.rsqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
  return inv / m[..., 0]


def truncate_normalize(z: jax.Array, dim: int | None = None, *, normalize: bool = True,
                       eps: float = 0.0) -> jax.Array:
  """``z[..., :dim] / ||z[..., :dim]||_2`` in float32 (:func:`unit_rows`: scale-safe).

  Args:
    z: embeddings ``[..., D]`` (any float dtype).
    dim: the prefix size ``1 <= dim <= D`` (None: all of ``D``).
    normalize: divide by the L2 norm (False: truncate only).
    eps: floor of the norm (default 0: none; an all-zero row stays zero, and a row
      of any finite scale, 1e-25 or 1e20, comes out unit-norm).

  Returns:
    float32 ``[..., dim]``.

  Raises:
    ValueError: ``dim`` outside ``1..D``.
  """
  width = z.shape[-1]
  if dim is None:
    dim = width
  if isinstance(dim, bool) or not 1 <= int(dim) <= width:
    raise ValueError(f"dim={dim!r} must be an int in [1, {width}]")
  z = jnp.asarray(z, jnp.float32)[..., :int(dim)]
  if normalize:
    z = unit_rows(z, eps=eps)
  return z


def int8_ranges(calibration) -> np.ndarray:
  """sentence-transformers' int8 ``ranges`` of calibration embeddings: ``[2, m]`` float32.

  Row 0 is ``min(c, axis=0)``, row 1 ``max(c, axis=0)``: the array that
  ``quantize_embeddings(..., precision="int8", ranges=...)`` takes and that it
  computes from ``calibration_embeddings=c`` (or from the embeddings themselves).

  Args:
    calibration: float ``[N, m]`` embeddings, ``N >= 1``, finite.

  Raises:
    ValueError: ``calibration`` is not a finite 2-D float array with a row.
  """
  c = np.asarray(calibration)
  if c.ndim != 2 or not len(c) or c.dtype.kind != "f":
    raise ValueError(f"calibration embeddings must be float [N >= 1, m], got dtype {c.dtype} "
                     f"and shape {c.shape}")
  if not np.isfinite(c).all():
    raise ValueError("calibration embeddings hold NaN or inf")
  return np.vstack((c.min(axis=0), c.max(axis=0))).astype(np.float32)


def _starts_steps(ranges, m: int, xp):
  """``ranges [2, m]`` -> ``(starts, steps)``, a zero step (constant dimension) made 1."""
  ranges = xp.asarray(ranges, xp.float32)
  if ranges.shape != (2, m):
    raise ValueError(f"ranges must be [2, {m}] (min row, max row), got shape {ranges.shape}")
  steps = (ranges[1] - ranges[0]) / xp.float32(255)
  return ranges[0], xp.where(steps == 0, xp.float32(1), steps)


def quantize(z: jax.Array, kind: str | None, *, check_finite: bool = True,
             ranges: Any = None) -> jax.Array:
  """Float embeddings ``[..., m]`` -> codes, with sentence-transformers' names and rules.

  As ``sentence_transformers.quantization.quantize_embeddings(z, precision=kind)``:

  * ``None``: unchanged float32.
  * ``"int8"``: per dimension ``clip(floor((z - starts) / steps), 0, 255) - 128`` as
    int8 ``[..., m]`` (sentence-transformers 6.3; values outside the calibrated range
    saturate), ``starts = ranges[0]``, ``steps = (ranges[1] - ranges[0]) / 255`` (0 -> 1),
    with ``ranges [2, m]`` sentence-transformers' own (:func:`int8_ranges` of
    calibration embeddings; default: of the rows of ``z`` itself, as
    sentence-transformers does without ``calibration_embeddings``). Releases before
    6.3 cast ``(z - starts) / steps - 128`` directly (toward zero, wrapping), which
    gives codes one lower for most values.
  * ``"int8_symmetric"``: mrl_jax's fixed-range rule for unit-norm rows,
    ``clip(round(127 z), -127, 127)`` int8 ``[..., m]`` (no calibration; integer
    dot products approximate cosines).
  * ``"ubinary"``: the sign bits ``z > 0`` packed big-endian into uint8
    ``[..., ceil(m / 8)]`` (``np.packbits``).
  * ``"binary"``: ``ubinary - 128`` as int8 ``[..., ceil(m / 8)]`` (the same bits,
    offset; Hamming distances are equal).

  A NaN would quantise to a valid-looking but meaningless code: called on a
  concrete array, rows with a NaN or inf are refused; under ``jit`` the values
  cannot be inspected, so check the inputs first (as
  :meth:`mrl_jax.bundle.encoder.Encoder.embed` does). ``check_finite=False`` is for
  callers that have checked already.

  Raises:
    ValueError: ``kind`` is not one of :data:`QUANTIZATIONS`, ``ranges`` given for
      another kind or not two ``[m]`` arrays, or (outside ``jit``) ``z`` has rows
      with a NaN or inf (naming them).
  """
  if kind not in QUANTIZATIONS:
    raise ValueError(f"quantize={kind!r}; choose one of {QUANTIZATIONS}")
  if ranges is not None and kind not in CALIBRATED:
    raise ValueError(f"ranges (calibration) apply to quantize in {CALIBRATED}, not {kind!r}")
  if check_finite and kind is not None and not isinstance(z, jax.core.Tracer) and np.size(z):
    values = np.atleast_1d(np.asarray(z))
    bad = np.flatnonzero(~np.isfinite(values.reshape(-1, values.shape[-1])).all(axis=1))
    if bad.size:
      raise ValueError(f"cannot quantise non-finite embeddings: rows {bad[:10].tolist()} of z "
                       f"(as [-1, {values.shape[-1]}]) hold NaN or inf")
  if kind == "int8" and not isinstance(z, jax.core.Tracer):
    # Concrete values: numpy's float32 arithmetic, bit for bit sentence-transformers' own
    # (XLA may fuse the division differently and move a value across a code boundary).
    z = np.asarray(z, np.float32)
    starts, steps = _starts_steps(int8_ranges(z.reshape(-1, z.shape[-1])) if ranges is None
                                  else ranges, z.shape[-1], np)
    return jnp.asarray((np.clip(np.floor((z - starts) / steps), 0, 255) - 128).astype(np.int8))
  if kind == "int8":
    z = jnp.asarray(z, jnp.float32)
    if ranges is None:
      flat = z.reshape(-1, z.shape[-1])
      ranges = jnp.stack([flat.min(axis=0), flat.max(axis=0)])
    starts, steps = _starts_steps(ranges, z.shape[-1], jnp)
    codes = jnp.clip(jnp.floor((z - starts) / steps), 0, 255) - 128.0
    return codes.astype(jnp.int8)
  if kind == "int8_symmetric":
    return jnp.clip(jnp.round(z * 127.0), -127, 127).astype(jnp.int8)
  if kind == "ubinary":
    return jnp.packbits(z > 0, axis=-1)
  if kind == "binary":
    return (jnp.packbits(z > 0, axis=-1).astype(jnp.int16) - 128).astype(jnp.int8)
  return z
