"""Image preprocessing for training and evaluation, chosen by ``config.input``.

Three styles (``config.input.style``):

* ``"scale"`` (default, small data such as digits): pixels / 255, no
  augmentation, the data set's own image size.
* ``"imagenet"`` (ImageNet-like data of any image size): train =
  Inception-style random-resized crop, horizontal flip, per-channel
  normalisation; eval = resize the shorter side to ``image_size / crop_ratio``
  (256 for 224), centre crop ``image_size``, normalise. Images are read
  encoded and decoded in the pipeline (only the crop window for JPEGs), after
  shuffling, so resuming skips examples without decoding them.
* ``"cifar"`` (small fixed-size images): train = zero-pad by ``pad``, random
  crop back to the original size, flip, normalise; eval = normalise.

Progressive resizing (``"imagenet"`` style): the training image side follows
``train_sizes = (start, end)`` over ``ramp_epochs = (first, last)``, linearly
interpolated per epoch and rounded to a multiple of ``size_multiple``
(the paper: 160 -> 192 over epochs 29-34 in multiples of 32, i.e. 160 px until
epoch 31, 192 from 32). Each batch has one size, so the jitted train step
compiles once per distinct size. Evaluation is always at ``image_size``.

Random choices use stateless TF ops seeded by the example's position in the
seeded stream: a given seed gives the same crops and flips on every run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mrl_jax.core import typed
from mrl_jax.data import pipeline
from mrl_jax.data.image_spec import (  # noqa: F401  (re-exported)
  CIFAR10_MEAN,
  CIFAR10_STD,
  IMAGENET_MEAN,
  IMAGENET_STD,
  STYLES,
  ImageInputSpec,
)


@dataclasses.dataclass(frozen=True)
class ImageInput(ImageInputSpec):
  """The pipelines of one :class:`~mrl_jax.data.image_spec.ImageInputSpec` (``config.input``)."""

  @classmethod
  def from_spec(cls, spec: ImageInputSpec) -> ImageInput:
    """The pipelines of a parsed ``config.input`` (a task spec's ``input``)."""
    return cls(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(ImageInputSpec)})

  @classmethod
  def from_fields(cls, fields: dict | None) -> ImageInput:
    """From the plain dict of ``config.input`` (e.g. a bundle's ``training_config["input"]``).

    Raises:
      ValueError: naming ``config.input.FIELD``: unknown, of the wrong type, out of range.
    """
    return cls.from_spec(typed.parse(ImageInputSpec, dict(fields or {}), "config.input"))

  def train_size(self, epoch: int) -> int:
    """The training image side at 0-based ``epoch`` (``"imagenet"`` style)."""
    if self.train_sizes is None:
      return int(self.image_size)
    first, last = self.ramp_epochs
    side = np.interp(epoch, [first, last], list(self.train_sizes))
    return int(np.round(side / self.size_multiple)) * self.size_multiple

  def model_input_shape(self, image_shape: Sequence[int | None]) -> tuple[int, ...]:
    """``(H, W, C)`` of the model's inputs at evaluation, given the data set's image shape."""
    if self.style == "imagenet":
      return (self.image_size, self.image_size, image_shape[-1])
    if None in image_shape:
      raise ValueError(f"images of varying size {tuple(image_shape)} need "
                       "config.input.style='imagenet' (crop and resize to one size)")
    return tuple(image_shape)

  @property
  def decoders(self) -> dict | None:
    """TFDS decoders of both pipelines: the ``"imagenet"`` style reads images encoded."""
    return {"image": tfds.decode.SkipDecoding()} if self.style == "imagenet" else None

  def train_augment(self, builder: tfds.core.DatasetBuilder,
                    steps_per_epoch: int) -> Callable[[dict, tf.Tensor, tf.Tensor], dict] | None:
    """The random per-example map of training, shared by the tf.data and grain pipelines.

    Returns:
      ``augment(example, rng, step) -> {"image": float32 [S, S, C], "label": int32}``
      in TF ops, where ``example = {"image": uint8 [H, W, C] (encoded bytes in the
      "imagenet" style), "label": int32}``, ``rng`` is a stateless seed ``int64 [2]``
      and ``step`` the 0-based index of the batch of the example; None for the
      ``"scale"`` style (no augmentation).
    """
    if self.style == "scale":
      return None
    channels = self._channels(builder)
    if self.style == "cifar":
      return self._cifar_augment
    last_epoch = math.ceil(self.ramp_epochs[1]) if self.train_sizes else 0
    sizes = tf.constant([self.train_size(e) for e in range(last_epoch + 1)], tf.int32)

    def augment(example: dict, rng: tf.Tensor, step: tf.Tensor) -> dict:
      epoch = tf.minimum(tf.cast(step, tf.int64) // steps_per_epoch, last_epoch)
      crop_rng, flip_rng = tf.unstack(tf.random.experimental.stateless_split(rng, 2))
      image = decode_and_random_crop(example["image"], crop_rng, channels=channels,
                                     area_range=self.area_range,
                                     aspect_range=self.aspect_range)
      size = tf.gather(sizes, epoch)
      image = tf.image.resize(image, tf.stack([size, size]), antialias=True)
      image = tf.image.stateless_random_flip_left_right(image, flip_rng)
      return {"image": normalize(image, self.mean, self.std), "label": _label(example)}

    return augment

  def eval_preprocess(self, builder: tfds.core.DatasetBuilder) -> Callable[[dict], dict]:
    """The deterministic per-example map of evaluation (TF ops), shared by both pipelines.

    Returns:
      ``preprocess(example) -> {"image": float32 [H, W, C], "label": int32}``.
    """
    if self.style == "scale":
      return pipeline._to_float
    if self.style == "cifar":
      return self._cifar_eval
    channels = self._channels(builder)

    def preprocess(example: dict) -> dict:
      image = tf.io.decode_image(example["image"], channels=channels, expand_animations=False)
      image = resize_and_centre_crop(image, self.image_size, self.crop_ratio)
      return {"image": normalize(image, self.mean, self.std), "label": _label(example)}

    return preprocess

  def train_batches(self, builder: tfds.core.DatasetBuilder, split: str, *, batch_size: int,
                    seed: int, shuffle_buffer: int, steps_per_epoch: int,
                    start_step: int = 0) -> Iterator[dict]:
    """Seeded, augmented, per-process train batches (see :func:`pipeline.train_batches`).

    Yields:
      ``{"image": float32 [b, S, S, C], "label": int32 [b]}``; ``S`` follows
      :meth:`train_size` of the batch's epoch in the ``"imagenet"`` style.
    """
    kwargs = dict(batch_size=batch_size, seed=seed, shuffle_buffer=shuffle_buffer,
                  start_step=start_step, cache=self.cache, decoders=self.decoders)
    augment = self.train_augment(builder, steps_per_epoch)
    if augment is None:
      return pipeline.train_batches(builder, split, **kwargs)
    return pipeline.train_batches(builder, split, preprocess=_select, augment=augment, **kwargs)

  def eval_batches(self, builder: tfds.core.DatasetBuilder, split: str, *,
                   batch_size: int) -> Iterator[dict]:
    """One padded, masked pass over ``split`` (see :func:`pipeline.eval_batches`).

    Yields:
      ``{"image": float32 [b, H, W, C], "label": int32 [b], "mask": float32 [b]}``.
    """
    return pipeline.eval_batches(builder, split, batch_size=batch_size,
                                 preprocess=self.eval_preprocess(builder),
                                 decoders=self.decoders)

  def _channels(self, builder: tfds.core.DatasetBuilder) -> int:
    channels = builder.info.features["image"].shape[-1]
    if len(self.mean) != channels:
      raise ValueError(f"config.input.mean has {len(self.mean)} entries for {channels}-channel "
                       f"images of {builder.name!r}")
    return channels

  def _cifar_augment(self, example: dict, rng: tf.Tensor, step: tf.Tensor) -> dict:
    del step  # fixed size throughout
    crop_rng, flip_rng = tf.unstack(tf.random.experimental.stateless_split(rng, 2))
    image = pad_and_random_crop(tf.cast(example["image"], tf.float32), crop_rng, self.pad)
    image = tf.image.stateless_random_flip_left_right(image, flip_rng)
    return {"image": normalize(image, self.mean, self.std), "label": _label(example)}

  def _cifar_eval(self, example: dict) -> dict:
    return {"image": normalize(tf.cast(example["image"], tf.float32), self.mean, self.std),
            "label": _label(example)}


def _label(example: dict) -> tf.Tensor:
  return tf.cast(example["label"], tf.int32)


def _select(example: dict) -> dict:
  """Keep only the image (as stored) and the int32 label, before the cache."""
  return {"image": example["image"], "label": _label(example)}


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """``[H, W, C]`` pixels in 0..255 -> float32 ``(x / 255 - mean) / std`` per channel."""
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def decode_and_random_crop(data: tf.Tensor, rng: tf.Tensor, *, channels: int,
                           area_range: Sequence[float] = (0.08, 1.0),
                           aspect_range: Sequence[float] = (3 / 4, 4 / 3)) -> tf.Tensor:
  """Encoded image -> an Inception-style random crop ``[h, w, C]`` uint8 (not resized).

  The crop covers a uniformly drawn fraction of the area in ``area_range`` with
  an aspect ratio in ``aspect_range`` (up to 10 tries, else the whole image).
  JPEGs decode only the crop window.
  """

  def window(shape: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=rng, min_object_covered=0.0,
        aspect_ratio_range=tuple(aspect_range), area_range=tuple(area_range), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return begin, size

  def jpeg() -> tf.Tensor:
    begin, size = window(tf.image.extract_jpeg_shape(data))
    crop = tf.stack([begin[0], begin[1], size[0], size[1]])
    return tf.image.decode_and_crop_jpeg(data, crop, channels=channels)

  def other() -> tf.Tensor:
    image = tf.io.decode_image(data, channels=channels, expand_animations=False)
    begin, size = window(tf.shape(image))
    return tf.slice(image, begin, size)

  return tf.cond(tf.io.is_jpeg(data), jpeg, other)


def resize_and_centre_crop(image: tf.Tensor, size: int, crop_ratio: float) -> tf.Tensor:
  """``[H, W, C]`` -> float32 ``[size, size, C]``: shorter side to ``size / crop_ratio``, crop."""
  shape = tf.shape(image)
  height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  scale = round(size / crop_ratio) / tf.minimum(height, width)
  new_h = tf.maximum(tf.cast(tf.round(height * scale), tf.int32), size)
  new_w = tf.maximum(tf.cast(tf.round(width * scale), tf.int32), size)
  image = tf.image.resize(image, tf.stack([new_h, new_w]), antialias=True)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return tf.ensure_shape(image[top:top + size, left:left + size], [size, size, None])


def pad_and_random_crop(image: tf.Tensor, rng: tf.Tensor, pad: int) -> tf.Tensor:
  """``[H, W, C]`` -> ``[H, W, C]``: zero-pad by ``pad`` on each side, random crop back."""
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  return tf.image.stateless_random_crop(padded, tf.shape(image), seed=rng)

