"""``config.input``: how images are prepared, as a typed spec (no TensorFlow import).

The fields and their checks; :class:`mrl_jax.data.images.ImageInput` adds the
TF pipelines on top. The styles are described in :mod:`mrl_jax.data.images`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

STYLES = ("scale", "imagenet", "cifar")
# Per-channel statistics of [0, 1] RGB pixels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclasses.dataclass(frozen=True)
class ImageInputSpec:
  """How images are prepared; the fields are those of ``config.input``.

  Attributes:
    style: ``"scale"``, ``"imagenet"`` or ``"cifar"`` (see the module docstring).
    image_size: ``"imagenet"`` style: the side of evaluation images (and of
      training images without progressive resizing). Unused otherwise: the
      data set's own size is kept.
    crop_ratio: evaluation centre-crop fraction: resize the shorter side to
      ``round(image_size / crop_ratio)``, then crop ``image_size``.
    train_sizes: ``(start, end)`` training sides of progressive resizing;
      ``None``: ``image_size`` throughout.
    ramp_epochs: ``(first, last)`` epochs of the ramp from start to end size.
    size_multiple: training sides are rounded to multiples of this.
    area_range: random-resized-crop area, as fractions of the image.
    aspect_range: random-resized-crop aspect ratios (width / height).
    pad: ``"cifar"`` style padding before the random crop.
    mean: per-channel mean of [0, 1] pixels, subtracted (not in ``"scale"``).
    std: per-channel standard deviation, divided by.
    cache: keep the (encoded) train split in memory after the first epoch.
  """

  style: Literal["scale", "imagenet", "cifar"] = "scale"
  image_size: int | None = None
  crop_ratio: float = 0.875
  train_sizes: tuple[int, int] | None = None
  ramp_epochs: tuple[float, float] = (29.0, 34.0)
  size_multiple: int = 32
  area_range: tuple[float, float] = (0.08, 1.0)
  aspect_range: tuple[float, float] = (3 / 4, 4 / 3)
  pad: int = 4
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD
  cache: bool = True

  def __post_init__(self):
    if self.style not in STYLES:
      raise ValueError(f"config.input.style={self.style!r}; choose one of {STYLES}")
    for name in ("train_sizes", "ramp_epochs", "area_range", "aspect_range", "mean", "std"):
      value = getattr(self, name)
      if value is not None:
        object.__setattr__(self, name, tuple(value))
    if len(self.mean) != len(self.std) or min(self.std) <= 0:
      raise ValueError(f"config.input.mean={self.mean} and std={self.std} must have one "
                       "entry per channel, std > 0")
    if self.style == "imagenet":
      self._check_imagenet()
    if self.style == "cifar" and self.pad < 0:
      raise ValueError(f"config.input.pad={self.pad} must be >= 0")

  def _check_imagenet(self) -> None:
    if not isinstance(self.image_size, int) or self.image_size < 1:
      raise ValueError(f"config.input.image_size={self.image_size!r}: the 'imagenet' style "
                       "needs a positive evaluation image size")
    if not 0.0 < self.crop_ratio <= 1.0:
      raise ValueError(f"config.input.crop_ratio={self.crop_ratio} must be in (0, 1]")
    if self.train_sizes is not None and (
        len(self.train_sizes) != 2 or min(self.train_sizes) < self.size_multiple):
      raise ValueError(f"config.input.train_sizes={self.train_sizes} must be (start, end), "
                       f"each >= size_multiple={self.size_multiple}")
    if self.size_multiple < 1:
      raise ValueError(f"config.input.size_multiple={self.size_multiple} must be >= 1")
    first, last = self.ramp_epochs
    if not 0 <= first <= last:
      raise ValueError(f"config.input.ramp_epochs={self.ramp_epochs} must be (first, last) "
                       "with 0 <= first <= last")
    lo, hi = self.area_range
    if not 0.0 < lo <= hi <= 1.0:
      raise ValueError(f"config.input.area_range={self.area_range} must be in (0, 1]")
