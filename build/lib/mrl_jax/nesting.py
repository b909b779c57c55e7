"""The nesting list: which prefixes of the embedding are trained, and their weights.

Matryoshka Representation Learning trains every prefix ``z[:, :m]`` for ``m`` in a
list ``M`` of increasing sizes (the paper: 8, 16, ..., 2048) with a relative
importance weight ``c_m`` per size. :class:`Nesting` holds that list, validated
once at the boundary so that the rest of the library can trust it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


def default_dims(embed_dim: int, start: int = 8) -> tuple[int, ...]:
  """The paper's nesting list: powers of two from ``start`` up to ``embed_dim``.

  ``embed_dim`` is always included as the last size, even when it is not a power
  of two (``default_dims(768, start=64)`` ends ``..., 512, 768``).

  Args:
    embed_dim: size ``D`` of the full embedding.
    start: the smallest nested size; a power of two, ``<= embed_dim``.

  Returns:
    The strictly increasing sizes, e.g. ``(8, 16, ..., 2048)`` for ``2048``.
  """
  if not isinstance(embed_dim, (int, np.integer)) or embed_dim < 1:
    raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
  if not isinstance(start, (int, np.integer)) or start < 1 or start & (start - 1):
    raise ValueError(f"start must be a positive power of two, got {start!r}")
  if start > embed_dim:
    raise ValueError(f"start={start} is larger than embed_dim={embed_dim}")
  dims = []
  m = int(start)
  while m < embed_dim:
    dims.append(m)
    m *= 2
  dims.append(int(embed_dim))
  return tuple(dims)


@dataclasses.dataclass(frozen=True)
class Nesting:
  """A validated nesting list with one positive weight per size.

  ``dims`` may be given in any order (sentence-transformers users write
  ``[768, 512, 256, 128, 64]``); they are stored ascending, with ``weights``
  permuted along so that each weight stays with its size.

  Attributes:
    dims: distinct positive sizes, stored strictly increasing ``(m_1, ..., m_M)``.
    weights: one positive finite float per size (``c_m``), aligned with ``dims``
      as given; all 1.0 by default, as in every run of the paper. The nested
      loss is ``sum_m c_m * L_m``. A string such as ``"(1.0, nan, 1.0)"`` (or a
      1-tuple holding one, which is what ml_collections makes of a tuple flag
      that is not a Python literal) is parsed as comma-separated numbers, so
      that the error names the bad value.
    embed_dim: size ``D`` of the full embedding, if known; then ``m_M <= D``.

  Raises:
    ValueError: empty, non-integer, non-positive or repeated dims; a weight
      count that differs from the dims'; a weight that is not a positive finite
      number; ``m_M > embed_dim``. The message names the bad value.
  """

  dims: tuple[int, ...]
  weights: tuple[float, ...] | None = None
  embed_dim: int | None = None

  def __post_init__(self):
    given = _validate_dims(self.dims)
    weights = _validate_weights(self.weights, given)
    order = sorted(range(len(given)), key=given.__getitem__)
    dims = tuple(given[i] for i in order)
    object.__setattr__(self, "dims", dims)
    object.__setattr__(self, "weights", tuple(weights[i] for i in order))
    if self.embed_dim is not None:
      if not isinstance(self.embed_dim, (int, np.integer)) or self.embed_dim < 1:
        raise ValueError(f"embed_dim must be a positive int, got {self.embed_dim!r}")
      if dims[-1] > self.embed_dim:
        raise ValueError(
            f"nesting dim {dims[-1]} is larger than the embedding size "
            f"embed_dim={self.embed_dim}; dims={list(dims)}")
      object.__setattr__(self, "embed_dim", int(self.embed_dim))

  @property
  def num_dims(self) -> int:
    """``M``, the number of nested sizes."""
    return len(self.dims)

  def weights_array(self) -> np.ndarray:
    """The weights as a float32 array ``[M]`` (device-agnostic: numpy)."""
    return np.asarray(self.weights, np.float32)

  def index(self, dim: int) -> int:
    """Position of ``dim`` in :attr:`dims`; ``ValueError`` listing them if absent."""
    try:
      return self.dims.index(int(dim))
    except ValueError:
      raise ValueError(
          f"dim={dim} is not a trained nesting dim; valid dims: {list(self.dims)}") from None


def _parse_numbers(value, name: str):
  """A tuple from a string of comma-separated numbers (``"(1.0, nan)"``), else ``value``.

  ml_collections parses a tuple flag with ``ast.literal_eval``; ``nan`` and
  ``inf`` are not literals, so ``--config.nesting.weights='(1.0, nan)'`` arrives
  as the 1-tuple ``('(1.0, nan)',)``. Both that and a bare string are parsed
  here (``float`` accepts ``nan``/``inf``); anything else is returned as is.
  """
  if isinstance(value, Sequence) and len(value) == 1 and isinstance(value[0], str):
    value = value[0]
  if not isinstance(value, str):
    return value
  text = value.strip()
  if text[:1] in "([" and text[-1:] in ")]":
    text = text[1:-1]
  items = [t.strip() for t in text.split(",")]
  if items and not items[-1]:
    items = items[:-1]  # "(8,)"
  out = []
  for item in items:
    try:
      number = float(item)
    except ValueError:
      raise ValueError(f"{name} must be numbers, got {item!r} in {value!r}") from None
    out.append(number)
  return tuple(out)


def _validate_dims(dims: Sequence[int]) -> tuple[int, ...]:
  """Positive distinct ints, in the order given."""
  if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or not dims:
    raise ValueError(f"dims must be a non-empty sequence of ints, got {dims!r}")
  out = []
  for d in dims:
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
      raise ValueError(f"nesting dims must be positive ints, got {d!r} in {list(dims)}")
    out.append(int(d))
  repeated = sorted({d for d in out if out.count(d) > 1})
  if repeated:
    raise ValueError(f"nesting dims must be distinct, got {repeated[0]} more than once in {out}")
  return tuple(out)


def _validate_weights(weights, dims: tuple[int, ...]) -> tuple[float, ...]:
  if weights is None:
    return (1.0,) * len(dims)
  weights = _parse_numbers(weights, "weights")
  if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
    try:
      weights = tuple(weights)
    except TypeError:
      raise ValueError(f"weights must be a sequence of numbers, got {weights!r}") from None
  weights = tuple(weights)
  out = []
  for w in weights:
    if hasattr(w, "dtype") and np.shape(w) == () and not isinstance(w, (bool, np.bool_)):
      w = np.asarray(w).item()  # a 0-d numpy or JAX array
    if isinstance(w, bool) or not isinstance(w, (int, float, np.number)):
      raise ValueError(f"weights must be numbers, got {w!r} in {list(weights)}")
    if not np.isfinite(w) or w <= 0:
      raise ValueError(f"weights must be positive and finite, got {w!r} in {list(weights)}")
    out.append(float(w))
  if len(out) != len(dims):
    raise ValueError(
        f"got {len(out)} weights for {len(dims)} nesting dims "
        f"(weights={out}, dims={list(dims)})")
  return tuple(out)
