"""TFDS + tf.data input pipelines that feed global, sharded batches to jit.

Each process reads its own slice of a split (``tfds.split_for_jax_process``),
batches ``batch_size // process_count`` examples, and the per-process batches
become one global ``jax.Array`` sharded over the mesh's ``"data"`` axis.

Train batches: ``{"image": float32 [B, H, W, C], "label": int32 [B]}``.
Eval batches add ``"mask": float32 [B]`` (0 on padding), so the last partial
batch is padded, never dropped, and no example is counted twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import jax
import tensorflow as tf
import tensorflow_datasets as tfds

from mrl_jax.data import digits

# Builders that prepare themselves offline from data shipped in a package.
LOCAL_BUILDERS = {"sklearn_digits": digits.SklearnDigits}

# Keep TensorFlow off accelerators: JAX owns them (as in Flax's examples).
tf.config.set_visible_devices([], "GPU")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the model and the loop need to know about a data set."""

  num_classes: int
  image_shape: tuple[int, ...]
  num_train_examples: int
  num_eval_examples: int


def get_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The TFDS builder for ``name``; local builders are prepared on first use.

  Other data sets must already be prepared under ``data_dir``: mrl_jax never
  downloads at run time (:func:`dataset_spec` says so if they are not).
  Local builders are written in both TFRecord and ArrayRecord
  (:func:`add_array_record`).
  """
  if name in LOCAL_BUILDERS:
    builder = LOCAL_BUILDERS[name](data_dir=data_dir)
    builder.download_and_prepare()
    add_array_record(builder)  # both formats: tf.data reads TFRecord, grain ArrayRecord
    return builder
  return tfds.builder(name, data_dir=data_dir)


def add_array_record(builder: tfds.core.DatasetBuilder) -> None:
  """Add ArrayRecord copies of a prepared TFRecord data set, in place (no Apache Beam).

  Every shard ``NAME-SPLIT.tfrecord-i-of-n`` is copied record by record to
  ``NAME-SPLIT.array_record-i-of-n`` (the serialised examples unchanged, as
  ``tfds convert_format`` does), and ``array_record`` is added to the
  ``alternativeFileFormats`` of ``dataset_info.json``, so ``as_dataset``
  (tf.data) keeps reading the TFRecords and ``tfds.data_source`` (grain) reads
  the ArrayRecords. Shards already converted are kept (a rerun resumes); a
  data set that already has ArrayRecord files is left alone.

  Raises:
    FileNotFoundError: the data set is not prepared under its ``data_dir``.
  """
  from tensorflow_datasets.core import file_adapters

  info, target = builder.info, file_adapters.FileFormat.ARRAY_RECORD
  if not builder.data_path.joinpath("dataset_info.json").exists():
    raise FileNotFoundError(f"TFDS data set {builder.name!r} is not prepared in "
                            f"data_dir={builder.data_dir!r}")
  on_disk = tfds.builder_from_directory(builder.data_dir).info.available_file_formats()
  if target in on_disk:
    return
  read = file_adapters.ADAPTER_FOR_FORMAT[info.file_format]
  write = file_adapters.ADAPTER_FOR_FORMAT[target]
  for split_info in info.splits.values():
    source = split_info.filename_template
    dest = source.replace(filetype_suffix=target.file_suffix)
    shards = split_info.num_shards
    for i in range(shards):
      out = dest.sharded_filepath(shard_index=i, num_shards=shards)
      if out.exists():
        continue
      records = read.make_tf_data(source.sharded_filepath(shard_index=i, num_shards=shards))
      partial = out.parent / (out.name + ".incomplete")
      write.write_examples(partial, ((k, r.numpy()) for k, r in enumerate(records)))
      partial.rename(out)
  if target not in info.alternative_file_formats:
    info.add_alternative_file_format(target)
  info.write_dataset_info_json(builder.data_dir)


def split_size(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """Number of examples in ``split``, from the builder's info.

  Builders whose info has no split sizes (``tfds.testing.mock_data``) are
  counted by one pass over the split.

  Raises:
    FileNotFoundError: the data set is not prepared under its ``data_dir``.
  """
  try:
    return builder.info.splits[split].num_examples
  except KeyError:
    pass
  try:
    ds = builder.as_dataset(split=split)
  except AssertionError as e:  # TFDS's "call download_and_prepare()" message
    raise FileNotFoundError(
        f"TFDS data set {builder.name!r} is not prepared in data_dir={builder.data_dir!r}; "
        "mrl_jax never downloads at run time: prepare it there (e.g. `tfds build`) and "
        f"pass --config.data_dir ({e})") from e
  return int(ds.reduce(0, lambda n, _: n + 1))


def dataset_spec(builder: tfds.core.DatasetBuilder, train_split: str,
                 eval_split: str) -> DatasetSpec:
  """Class count, image shape and split sizes read from the builder's info."""
  features = builder.info.features
  return DatasetSpec(
      num_classes=features["label"].num_classes,
      image_shape=tuple(features["image"].shape),
      num_train_examples=split_size(builder, train_split),
      num_eval_examples=split_size(builder, eval_split),
  )


def _to_float(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  return {"image": tf.cast(example["image"], tf.float32) / 255.0,
          "label": tf.cast(example["label"], tf.int32)}


def train_batches(builder: tfds.core.DatasetBuilder, split: str, *, batch_size: int,
                  seed: int, shuffle_buffer: int, start_step: int = 0,
                  preprocess: Callable[[dict], dict] = _to_float,
                  augment: Callable[[dict, tf.Tensor, tf.Tensor], dict] | None = None,
                  cache: bool = True, decoders: dict | None = None) -> Iterator[dict]:
  """An endless, seeded, per-process iterator of numpy train batches.

  The order depends only on ``seed``, so a run restarted at ``start_step``
  sees exactly the batches an uninterrupted run would have seen from there.

  Args:
    batch_size: the GLOBAL batch size; each process yields its share.
    start_step: how many batches to skip (resuming); skipped examples are
      never augmented.
    preprocess: deterministic per-example map, applied once before the cache.
    augment: random per-example map ``augment(example, rng, step)`` applied
      after shuffling (fresh every epoch): ``rng`` is a stateless-RNG seed
      ``int64 [2]`` unique to the example's position in the global stream,
      ``step`` the 0-based index of the batch the example lands in (so that
      schedules such as progressive resizing can depend on it).
    cache: keep the preprocessed split in memory (small data sets).
    decoders: TFDS decoders, e.g. ``{"image": tfds.decode.SkipDecoding()}``.

  Yields:
    ``{"image": [b, H, W, C] float32, "label": [b] int32}`` with
    ``b = batch_size // jax.process_count()``.
  """
  local = _local_batch_size(batch_size)
  ds = builder.as_dataset(split=tfds.split_for_jax_process(split), shuffle_files=False,
                          decoders=decoders)
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  if cache:
    ds = ds.cache()
  ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
  ds = ds.enumerate().skip(start_step * local)
  if augment is None:
    ds = ds.map(lambda i, ex: ex)
  else:
    processes, process = jax.process_count(), jax.process_index()
    ds = ds.map(lambda i, ex: augment(ex, tf.stack([tf.constant(seed, tf.int64),
                                                    i * processes + process]), i // local),
                num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local, drop_remainder=True)
  options = tf.data.Options()
  options.deterministic = True
  return iter(tfds.as_numpy(ds.with_options(options).prefetch(2)))


def eval_batches(builder: tfds.core.DatasetBuilder, split: str, *, batch_size: int,
                 preprocess: Callable[[dict], dict] = _to_float,
                 decoders: dict | None = None) -> Iterator[dict]:
  """One pass over ``split`` in fixed-size batches, padded and masked.

  Every process yields the same number of batches (collectives need that);
  padding rows have ``mask == 0``.

  Yields:
    ``{"image": [b, ...], "label": [b], "mask": [b] float32}``.
  """
  local = _local_batch_size(batch_size)
  total = split_size(builder, split)
  per_process = -(-total // jax.process_count())
  num_batches = -(-per_process // local)
  ds = builder.as_dataset(split=tfds.split_for_jax_process(split), shuffle_files=False,
                          decoders=decoders)
  ds = ds.map(lambda ex: {**preprocess(ex), "mask": tf.constant(1.0)},
              num_parallel_calls=tf.data.AUTOTUNE)  # order is kept (deterministic)
  pad = tf.data.Dataset.from_tensors(
      tf.nest.map_structure(tf.zeros_like, next(iter(ds.take(1))))).repeat()
  ds = ds.concatenate(pad).take(num_batches * local).batch(local)
  return iter(tfds.as_numpy(ds.prefetch(2)))


def _local_batch_size(batch_size: int) -> int:
  if batch_size % jax.process_count():
    raise ValueError(
        f"batch_size={batch_size} does not divide over {jax.process_count()} processes")
  return batch_size // jax.process_count()
