"""The one truncate-then-normalise of the library, and quantisation of its output.

Every serving and evaluation path goes through :func:`truncate_normalize`:
truncate to the first ``dim`` coordinates, THEN divide by the L2 norm
(normalising first and truncating after gives vectors that are not unit
length, the most reported bug of serving stacks; Kusupati et al. 2022 §3 and
sentence-transformers' ``truncate_dim``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NORM_EPS = 1e-12
QUANTIZATIONS = (None, "int8", "binary")


def truncate_normalize(z: jax.Array, dim: int | None = None, *, normalize: bool = True,
                       eps: float = NORM_EPS) -> jax.Array:
  """``z[..., :dim] / max(||z[..., :dim]||_2, eps)`` in float32.

  Args:
    z: embeddings ``[..., D]`` (any float dtype).
    dim: the prefix size ``1 <= dim <= D`` (None: all of ``D``).
    normalize: divide by the L2 norm (False: truncate only).
    eps: floor of the norm, so an all-zero row stays zero instead of NaN.

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
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), eps)
  return z


def quantize(z: jax.Array, kind: str | None, *, check_finite: bool = True) -> jax.Array:
  """Unit-norm float embeddings ``[..., m]`` -> codes (as sentence-transformers' quantize).

  ``None``: unchanged float32; ``"int8"``: ``clip(round(127 z), -127, 127)`` int8
  ``[..., m]``; ``"binary"``: the sign bits ``z > 0`` packed big-endian into
  uint8 ``[..., ceil(m / 8)]`` (as ``np.packbits``).

  A NaN would quantise to an all-zero code (and an inf to a saturated one), a
  valid-looking but meaningless vector: called on a concrete array, rows with
  a NaN or inf are refused; under ``jit`` the values cannot be inspected, so
  check the inputs first (as :meth:`mrl_jax.bundle.encoder.Encoder.embed` does).
  ``check_finite=False`` is for callers that have checked already.

  Raises:
    ValueError: ``kind`` is not one of :data:`QUANTIZATIONS`, or (outside
      ``jit``) ``z`` has rows with a NaN or inf (naming them).
  """
  if kind not in QUANTIZATIONS:
    raise ValueError(f"quantize={kind!r}; choose one of {QUANTIZATIONS}")
  if check_finite and kind is not None and not isinstance(z, jax.core.Tracer) and np.size(z):
    values = np.atleast_1d(np.asarray(z))
    bad = np.flatnonzero(~np.isfinite(values.reshape(-1, values.shape[-1])).all(axis=1))
    if bad.size:
      raise ValueError(f"cannot quantise non-finite embeddings: rows {bad[:10].tolist()} of z "
                       f"(as [-1, {values.shape[-1]}]) hold NaN or inf")
  if kind == "int8":
    return jnp.clip(jnp.round(z * 127.0), -127, 127).astype(jnp.int8)
  if kind == "binary":
    return jnp.packbits(z > 0, axis=-1)
  return z
