"""grain input pipelines over TFDS ArrayRecord data: exact resume without re-reading.

The tf.data pipeline (:mod:`mrl_jax.data.pipeline`) reaches a resume step by
reading and discarding every batch before it. Here every example is read by
random access (``tfds.data_source`` over ArrayRecord files, read by grain's
``MapDataset`` with a thread pool), and its position in the training stream is
a formula of the step, so resuming at step ``s`` costs the same as starting:
no record before it is read, and the iterator state is the step itself
(stored in each checkpoint as ``data_position``).

The order (the tests compare the batches to a slow reference of it):

* ``N`` records in the split; global stream positions ``g = 0, 1, 2, ...``;
  epoch ``e = g // N`` reads record ``permutation(seed, e)[g % N]`` with
  ``permutation(seed, e) = np.random.default_rng([seed, e]).permutation(N)``
  (:func:`epoch_permutation`): every record once per epoch, a new order each
  epoch; batches run across epoch boundaries.
* Global batch ``s`` holds positions ``[s * B, (s + 1) * B)``; process ``p`` of
  ``P`` reads rows ``[p * B / P, (p + 1) * B / P)`` of it and nothing else.
* The example at position ``g`` is augmented with the stateless seed
  ``(seed, g)`` and knows its batch ``s = g // B`` (progressive resizing).

So batch ``s`` depends on the data, ``seed``, ``B`` and ``s`` only: the same
global batch, bit for bit, for ANY number of processes (a run may resume on
another process count), and the same on every resume.

Data prepared as TFRecord only (``tfds build`` without ``--file_format``) is
refused with the commands that convert it (:data:`CONVERT_HELP`); the
tf.data pipeline still reads it (``config.input_pipeline = "tf.data"``).
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

PIPELINES = ("grain", "tf.data")

CONVERT_HELP = (
    "config.input_pipeline='grain' reads TFDS data as ArrayRecord files (random access, "
    "exact resume without re-reading). Add them to the TFRecord data already prepared "
    "(no Apache Beam needed) with\n"
    "  python -c \"import tensorflow_datasets as tfds; from mrl_jax.data import pipeline; "
    "pipeline.add_array_record(tfds.builder('{name}', data_dir='{data_dir}'))\"\n"
    "or prepare the data set again into an empty data_dir with\n"
    "  tfds build {name} --data_dir=NEW_DIR --file_format=array_record\n"
    "(ImageNet: add --manual_dir=DIR_WITH_THE_TARS); or keep reading the TFRecords with "
    "config.input_pipeline='tf.data' (a resume then re-reads every batch before its step).")

# A per-example map of the training stream: (example, position g, step s) -> numpy arrays.
TrainTransform = Callable[[dict, int, int], dict]


class _QuietOpenCVNotice(logging.Filter):
  """TFDS logs "OpenCV is not installed ... Defaulting to PIL" on every run that decodes
  images; PIL is what mrl_jax uses, so that one notice is noise."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "OpenCV is not installed" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietOpenCVNotice())


def data_source(builder: tfds.core.DatasetBuilder, split: str, *,
                decoders: dict | None = None) -> Sequence[dict]:
  """Random access to ``split`` of a prepared data set (``tfds.data_source``).

  Reads the ArrayRecord files of the data set, also when they were added to
  TFRecord data (``alternativeFileFormats`` of ``dataset_info.json``, which a
  builder defined in code does not read back in tfds 4.9), through a builder
  read from its folder: ``builder`` itself is left alone (``as_data_source``
  switches the builder's file format, and its ``as_dataset`` would then fail).

  Args:
    split: a TFDS split, slices included (``"test[:64]"``).
    decoders: TFDS decoders, e.g. ``{"image": tfds.decode.SkipDecoding()}``.

  Returns:
    A sequence of examples (numpy arrays and Python scalars).

  Raises:
    ValueError: the data set has no ArrayRecord files (says how to add them).
  """
  if builder.data_path.joinpath("dataset_info.json").exists():
    builder = tfds.builder_from_directory(builder.data_dir)
  # else: not prepared, or a mock (tfds.testing.mock_data) that serves it anyway.
  try:
    return builder.as_data_source(split=split, decoders=decoders)
  except NotImplementedError:
    raise ValueError(
        f"TFDS data set {builder.name!r} in {builder.data_dir} has no ArrayRecord files. "
        + CONVERT_HELP.format(name=builder.name, data_dir=builder.data_dir_root)) from None


def epoch_permutation(seed: int, epoch: int, num_records: int) -> np.ndarray:
  """The record order of ``epoch``: ``np.random.default_rng([seed, epoch]).permutation(N)``.

  Returns:
    int64 ``[num_records]``: position ``g`` of the stream reads record
    ``epoch_permutation(seed, g // N, N)[g % N]``.

  Raises:
    ValueError: a negative ``seed`` or ``epoch``, or ``num_records < 1``.
  """
  if seed < 0 or epoch < 0 or num_records < 1:
    raise ValueError(f"seed={seed} and epoch={epoch} must be >= 0 and "
                     f"num_records={num_records} >= 1")
  return np.random.default_rng([seed, epoch]).permutation(num_records)


class _Order:
  """Position -> record (:func:`epoch_permutation`), keeping the epochs around the last one.

  Thread-safe: grain's threads ask for positions near each other, at most a
  few batches apart.
  """

  def __init__(self, num_records: int, seed: int):
    self.num_records, self.seed = num_records, seed
    self._lock = threading.Lock()
    self._cache: dict[int, np.ndarray] = {}

  def __call__(self, position: int) -> int:
    epoch, i = divmod(position, self.num_records)
    with self._lock:
      perm = self._cache.get(epoch)
      if perm is None:
        perm = epoch_permutation(self.seed, epoch, self.num_records)
        self._cache = {e: p for e, p in self._cache.items() if abs(e - epoch) <= 1}
        self._cache[epoch] = perm
    return int(perm[i])


def global_position(local_index: int, *, batch_size: int, process_index: int,
                    process_count: int) -> int:
  """Global stream position of the ``local_index``-th example a process reads from step 0.

  ``local_index = s * b + r`` (step ``s``, row ``r`` of the local batch of
  ``b = batch_size // process_count`` rows) -> ``s * batch_size + process_index * b + r``.

  Raises:
    ValueError: ``batch_size`` does not divide over the processes, or a bad index.
  """
  local = _local_batch_size(batch_size, process_count)
  if local_index < 0 or not 0 <= process_index < process_count:
    raise ValueError(f"local_index={local_index} must be >= 0 and process_index="
                     f"{process_index} in [0, {process_count})")
  step, row = divmod(local_index, local)
  return step * batch_size + process_index * local + row


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  count = jax.process_count() if process_count is None else process_count
  index = jax.process_index() if process_index is None else process_index
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"process_index={index} must be in [0, process_count={count})")
  return index, count


def _local_batch_size(batch_size: int, process_count: int) -> int:
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} must be positive and divide over "
                     f"{process_count} processes")
  return batch_size // process_count


def train_batches(source: Sequence[dict], *, batch_size: int, seed: int,
                  transform: TrainTransform, start_step: int = 0,
                  read_options: grain.ReadOptions | None = None,
                  process_index: int | None = None,
                  process_count: int | None = None, per_batch: bool = False) -> Iterator[dict]:
  """This process's rows of every global train batch from ``start_step`` on (endless).

  Reads only the records of the batches it yields (plus ``read_options``'
  prefetch ahead): the first batch of a resumed run costs what step 0 costs.

  Args:
    source: random access to the split (:func:`data_source`), ``len(source) = N``.
    batch_size: the GLOBAL batch size ``B``.
    seed: the order and augmentation seed, ``0 <= seed < 2**63``.
    transform: ``transform(example, g, s) -> dict of numpy arrays``: the
      example at global position ``g`` of batch ``s`` (augment it with the
      seed ``(seed, g)``).
    start_step: the first batch (resuming).
    read_options: grain's threads and prefetch buffer (default: 16 threads, two
      local batches ahead); ``num_threads=0`` reads in the calling thread, nothing ahead.
    process_index, process_count: default ``jax.process_index()``/``process_count()``.
    per_batch: one grain element per batch instead of per example (for an
      in-memory source with a cheap transform, where grain's per-element
      overhead would dominate); the same batches either way.

  Returns:
    A grain ``DatasetIterator`` (``close()`` stops its threads) yielding
    ``transform``'s dicts stacked: ``[b, ...]`` with ``b = B // process_count``.

  Raises:
    ValueError: an empty source, a bad ``batch_size``, ``seed`` or ``start_step``.
  """
  index, count = _processes(process_index, process_count)
  local = _local_batch_size(batch_size, count)
  if not 0 <= seed < 2**63:
    raise ValueError(f"seed={seed} must be in [0, 2**63) for the grain pipeline")
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0")
  if len(source) == 0:
    raise ValueError("the training split is empty")
  order = _Order(len(source), seed)
  position = functools.partial(global_position, batch_size=batch_size, process_index=index,
                               process_count=count)

  def read(local_index: int) -> dict:
    g = position(local_index)
    return transform(source[order(g)], g, g // batch_size)

  if per_batch:
    def read_batch(step: int) -> dict:
      rows = [read(step * local + i) for i in range(local)]
      return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    ds = grain.MapDataset.range(start_step, sys.maxsize).map(read_batch)
    return iter(ds.to_iter_dataset(read_options or grain.ReadOptions(
        num_threads=2, prefetch_buffer_size=2)))
  ds = grain.MapDataset.range(start_step * local, sys.maxsize).map(read)
  ds = ds.to_iter_dataset(read_options or _read_options(local))
  return iter(ds.batch(local, drop_remainder=True))


def eval_batches(source: Sequence[dict], *, batch_size: int,
                 transform: Callable[[dict], dict],
                 read_options: grain.ReadOptions | None = None,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict]:
  """One pass over ``source`` in padded, masked batches, in record order.

  Process ``p`` reads records ``[p * q, min((p + 1) * q, N))`` with
  ``q = ceil(N / P)``; every process yields ``ceil(q / b)`` batches (collectives
  need the same number), padding rows are zeros with ``mask == 0``.

  Yields:
    ``{**transform(example), "mask": float32}`` stacked: ``[b, ...]``, ``b = B // P``.
  """
  index, count = _processes(process_index, process_count)
  local = _local_batch_size(batch_size, count)
  total = len(source)
  share = -(-total // count)
  first, stop = min(index * share, total), min((index + 1) * share, total)
  num_batches = -(-share // local)

  @functools.cache
  def padding() -> dict:
    row = transform(source[0])
    return {**{k: np.zeros_like(v) for k, v in row.items()}, "mask": np.float32(0.0)}

  def read(i: int) -> dict:
    if first + i >= stop:
      return padding()
    return {**transform(source[first + i]), "mask": np.float32(1.0)}

  ds = grain.MapDataset.range(num_batches * local).map(read)
  return iter(ds.to_iter_dataset(read_options or _read_options(local)).batch(local))


def _read_options(local_batch_size: int) -> grain.ReadOptions:
  """16 threads (TF's kernels release the GIL), about two batches read ahead."""
  return grain.ReadOptions(num_threads=16, prefetch_buffer_size=max(2 * local_batch_size, 16))


def tf_example_fn(fn: Callable[..., dict]) -> Callable[..., dict]:
  """Run a per-example TF function (``tf.data`` style) on numpy inputs, traced once.

  The first call traces ``fn`` for inputs of its dtypes and ranks with every
  dimension unknown (images of any size), under a lock: grain's threads then
  share one concrete function.

  Returns:
    ``call(*args) -> dict of numpy arrays`` for ``fn(*args) -> dict of tensors``.
  """
  lock = threading.Lock()
  traced: list = []

  def call(*args: Any) -> dict:
    tensors = tf.nest.map_structure(tf.convert_to_tensor, args)
    if not traced:
      with lock:
        if not traced:
          specs = tf.nest.map_structure(
              lambda t: tf.TensorSpec([None] * t.shape.rank, t.dtype), tensors)
          traced.append(tf.function(fn).get_concrete_function(*specs))
    return {k: v.numpy() for k, v in traced[0](*tensors).items()}

  return call


def image_train_transform(augment: Callable | None, seed: int) -> TrainTransform:
  """The :data:`TrainTransform` of an image style (:meth:`ImageInput.train_augment`).

  ``augment=None`` (the ``"scale"`` style): ``image / 255`` in numpy, as the
  tf.data path. Otherwise ``augment(example, rng=[seed, g], step=s)`` in TF.
  """
  if augment is None:
    return lambda example, g, s: _scale(example)
  call = tf_example_fn(augment)

  def transform(example: dict, g: int, s: int) -> dict:
    image = example["image"]
    return call({"image": image, "label": np.int32(example["label"])},
                np.array([seed, g], np.int64), np.int64(s))

  return transform


def image_eval_transform(preprocess: Callable | None) -> Callable[[dict], dict]:
  """The eval map of an image style: ``None`` is the ``"scale"`` style, else TF ops."""
  if preprocess is None:
    return _scale
  call = tf_example_fn(preprocess)
  return lambda example: call({"image": example["image"],
                               "label": np.int32(example["label"])})


def _scale(example: dict) -> dict:
  return {"image": np.asarray(example["image"], np.float32) / np.float32(255.0),
          "label": np.int32(example["label"])}


def _maybe_in_memory(source: Sequence[dict], cache: bool) -> Sequence[dict]:
  """The whole split decoded once into a list when ``cache`` (``config.input.cache``).

  For small data sets (the digits: 1,438 records in 0.1 s) decoding each record
  on every read costs more than the training step; reading the split once at
  start costs O(N), never O(resume step).
  """
  if not cache:
    return source
  keys = list(range(len(source)))
  try:  # one batched read where the source has it (TFDS ArrayRecord sources do)
    return list(source.__getitems__(keys))
  except (AttributeError, TypeError):  # e.g. tfds.testing.mock_data's sources
    return [source[i] for i in keys]


def image_train_batches(image_input, builder: tfds.core.DatasetBuilder, split: str, *,
                        batch_size: int, seed: int, steps_per_epoch: int, start_step: int = 0,
                        read_options: grain.ReadOptions | None = None) -> Iterator[dict]:
  """:func:`train_batches` of an image style (a :class:`mrl_jax.data.images.ImageInput`).

  The same per-example maps as the tf.data pipeline
  (:meth:`~mrl_jax.data.images.ImageInput.train_augment`), in the order of
  this module.

  Yields:
    ``{"image": float32 [b, S, S, C], "label": int32 [b]}``.
  """
  source = _maybe_in_memory(data_source(builder, split, decoders=image_input.decoders),
                            image_input.cache)
  transform = image_train_transform(image_input.train_augment(builder, steps_per_epoch), seed)
  return train_batches(source, batch_size=batch_size, seed=seed, transform=transform,
                       start_step=start_step, read_options=read_options,
                       per_batch=image_input.cache)


def image_eval_batches(image_input, builder: tfds.core.DatasetBuilder, split: str, *,
                       batch_size: int,
                       read_options: grain.ReadOptions | None = None) -> Iterator[dict]:
  """:func:`eval_batches` of an image style (the tf.data pipeline's eval maps).

  Yields:
    ``{"image": float32 [b, H, W, C], "label": int32 [b], "mask": float32 [b]}``.
  """
  source = _maybe_in_memory(data_source(builder, split, decoders=image_input.decoders),
                            image_input.cache)
  preprocess = None if image_input.style == "scale" else image_input.eval_preprocess(builder)
  return eval_batches(source, batch_size=batch_size, transform=image_eval_transform(preprocess),
                      read_options=read_options)
