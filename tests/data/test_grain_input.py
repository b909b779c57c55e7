"""The grain pipeline: the documented order, O(1) resume, process sharding, the loop."""

import json
import shutil

import grain
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from testutil import tiny

from mrl_jax import experiments
from mrl_jax.data import grain_input, images, pipeline

SEQUENTIAL = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


class CountingSource:
  """A random-access source that records every index it is asked for."""

  def __init__(self, source):
    self.source, self.reads = source, []

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    self.reads.append(int(i))
    return self.source[i]


def _toy(n=10):
  """``n`` records whose image is filled with its index (checks the order exactly)."""
  return [{"image": np.full((2, 2, 1), i, np.uint8), "label": i} for i in range(n)]


def _toy_transform(example, g, s):
  return {"image": np.float32(example["image"][0, 0, 0]), "label": np.int32(example["label"]),
          "position": np.int64(g), "step": np.int64(s)}


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_resume_at_a_late_step_reads_no_skipped_record_and_repeats_the_run():
  """10 records, B=4: step 50 is epoch 20; a resume there reads only its own batches."""
  kw = dict(batch_size=4, seed=7, transform=_toy_transform, read_options=SEQUENTIAL,
            process_index=1, process_count=2)
  straight = _take(grain_input.train_batches(_toy(), **kw), 60)
  source = CountingSource(_toy())
  resumed = grain_input.train_batches(source, start_step=50, **kw)
  assert source.reads == []  # building the iterator reads nothing
  got = _take(resumed, 10)
  assert len(source.reads) == 10 * 2  # exactly the rows yielded: 0 skipped
  for want, have in zip(straight[50:], got, strict=True):
    for key in want:
      np.testing.assert_array_equal(want[key], have[key])
  assert [int(b["step"][0]) for b in got] == list(range(50, 60))
  # With grain's threads, what is read ahead is bounded by the buffer, not the step.
  threaded = CountingSource(_toy())
  _take(grain_input.train_batches(threaded, **{**kw, "read_options": grain.ReadOptions(
      num_threads=2, prefetch_buffer_size=6)}, start_step=10**6), 1)
  assert len(threaded.reads) <= 2 + 6


def test_one_element_per_batch_gives_the_same_batches_and_reads():
  kw = dict(batch_size=4, seed=3, transform=_toy_transform, read_options=SEQUENTIAL,
            process_index=0, process_count=2)
  per_example = _take(grain_input.train_batches(_toy(), start_step=7, **kw), 9)
  source = CountingSource(_toy())
  per_batch = _take(grain_input.train_batches(source, start_step=7, per_batch=True, **kw), 9)
  assert len(source.reads) == 9 * 2  # still only the yielded rows
  for want, have in zip(per_example, per_batch, strict=True):
    for key in want:
      np.testing.assert_array_equal(want[key], have[key])


def test_batches_follow_the_documented_order(digits_dir):
  """A slow reference of the module docstring's order, across an epoch boundary."""
  builder = pipeline.get_builder("sklearn_digits", digits_dir)
  source = grain_input.data_source(builder, "train")
  n, batch, seed, start = len(source), 8, 3, 178  # epoch 1 starts within step 179
  transform = grain_input.image_train_transform(None, seed)  # the "scale" style: x / 255
  for process, count in [(0, 1), (0, 2), (1, 2)]:
    it = grain_input.train_batches(source, batch_size=batch, seed=seed, start_step=start,
                                   transform=transform, process_index=process,
                                   process_count=count)
    local = batch // count
    for step in range(start, start + 3):
      got = next(it)
      rows = range(step * batch + process * local, step * batch + (process + 1) * local)
      records = [np.random.default_rng([seed, g // n]).permutation(n)[g % n] for g in rows]
      want = np.stack([source[r]["image"] for r in records]).astype(np.float32) / 255
      np.testing.assert_array_equal(got["image"], want)
      np.testing.assert_array_equal(got["label"], [source[r]["label"] for r in records])
  assert {g // n for g in range(179 * batch, 180 * batch)} == {0, 1}
  # The task's route (one process here) reads the same batches.
  task_route = grain_input.image_train_batches(images.ImageInput(), builder, "train",
                                               batch_size=batch, seed=seed, steps_per_epoch=1,
                                               start_step=start)
  direct = grain_input.train_batches(source, batch_size=batch, seed=seed, start_step=start,
                                     transform=transform)
  for _ in range(2):
    a, b = next(task_route), next(direct)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_processes_read_disjoint_rows_of_the_same_global_batch():
  kw = dict(batch_size=8, seed=0, transform=_toy_transform, read_options=SEQUENTIAL,
            start_step=3)
  one = _take(grain_input.train_batches(_toy(13), process_index=0, process_count=1, **kw), 4)
  for count in (2, 4):
    parts = [_take(grain_input.train_batches(_toy(13), process_index=p, process_count=count,
                                             **kw), 4) for p in range(count)]
    for step, want in enumerate(one):
      got = {k: np.concatenate([part[step][k] for part in parts]) for k in want}
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])
  with pytest.raises(ValueError, match="batch_size=8 must be positive and divide over 3"):
    grain_input.train_batches(_toy(), process_index=0, process_count=3, **kw)
  with pytest.raises(ValueError, match="seed=-1"):
    grain_input.train_batches(_toy(), **{**kw, "seed": -1})


def test_augmented_styles_equal_the_tf_maps_seeded_by_position(tmp_path):
  """cifar and imagenet styles: each row is the tf.data map run on (seed, g) and step g // B."""
  styles = [("cifar10", images.ImageInput(style="cifar")),
            ("imagenet2012", images.ImageInput(style="imagenet", image_size=32,
                                               train_sizes=(16, 32), ramp_epochs=(1.0, 2.0),
                                               size_multiple=16))]
  for name, image_input in styles:
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
      builder = pipeline.get_builder(name, str(tmp_path))
      source = grain_input.data_source(builder, "train", decoders=image_input.decoders)
      augment = image_input.train_augment(builder, steps_per_epoch=2)
      it = grain_input.image_train_batches(image_input, builder, "train", batch_size=4, seed=5,
                                           steps_per_epoch=2, start_step=3)
      for step in (3, 4):
        got = next(it)
        for row in range(4):
          g = step * 4 + row
          example = source[np.random.default_rng([5, g // 6]).permutation(6)[g % 6]]
          want = augment({"image": tf.constant(example["image"]),
                          "label": tf.constant(example["label"], tf.int32)},
                         tf.constant([5, g], tf.int64), tf.constant(step, tf.int64))
          np.testing.assert_allclose(got["image"][row], want["image"].numpy(), atol=1e-6)
          assert got["label"][row] == example["label"]
        if name == "imagenet2012":  # epoch 1 (step 3) trains at 16 px, epoch 2 at 32 px
          assert got["image"].shape == ((4, 16, 16, 3) if step == 3 else (4, 32, 32, 3))


@pytest.mark.parametrize("batch_size,processes", [(7, 1), (100, 1), (512, 1), (8, 2), (6, 3)])
def test_eval_counts_every_example_exactly_once(digits_dir, batch_size, processes):
  builder = pipeline.get_builder("sklearn_digits", digits_dir)
  source = grain_input.data_source(builder, "test")
  transform = grain_input.image_eval_transform(None)
  per_process = [list(grain_input.eval_batches(source, batch_size=batch_size,
                                               transform=transform, process_index=p,
                                               process_count=processes))
                 for p in range(processes)]
  assert len({len(batches) for batches in per_process}) == 1  # same count everywhere
  labels, masks = [], []
  for batches in per_process:
    assert all(len(b["label"]) == batch_size // processes for b in batches)
    labels += [b["label"][b["mask"] > 0] for b in batches]
    masks += [b["mask"] for b in batches]
  assert np.concatenate(masks).sum() == len(source) == 359
  np.testing.assert_array_equal(np.concatenate(labels), [source[i]["label"] for i in range(359)])


def test_array_record_copy_holds_the_tfrecord_examples_in_order(digits_dir):
  builder = pipeline.get_builder("sklearn_digits", digits_dir)
  source = grain_input.data_source(builder, "test")
  for i, example in enumerate(tfds.as_numpy(builder.as_dataset(split="test",
                                                                shuffle_files=False))):
    np.testing.assert_array_equal(source[i]["image"], example["image"])
    assert source[i]["label"] == example["label"]
  assert i == len(source) - 1 == 358


def test_tfrecord_only_data_is_refused_with_the_commands_that_convert_it(digits_dir, tmp_path):
  builder = pipeline.get_builder("sklearn_digits", digits_dir)
  copy = tmp_path / "sklearn_digits" / "1.0.0"
  shutil.copytree(builder.data_dir, copy,
                  ignore=shutil.ignore_patterns("*.array_record*"))
  info = json.loads((copy / "dataset_info.json").read_text())
  info.pop("alternativeFileFormats")
  (copy / "dataset_info.json").write_text(json.dumps(info))
  old = pipeline.digits.SklearnDigits(data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r"(?s)no ArrayRecord files.*pipeline.add_array_record.*"
                     r"tfds build sklearn_digits --data_dir=NEW_DIR --file_format=array_record"
                     r".*input_pipeline='tf.data'"):
    grain_input.data_source(old, "train")
  pipeline.add_array_record(old)  # what the message proposes, without Apache Beam
  assert len(grain_input.data_source(old, "train")) == 1438
  assert len(list(old.as_dataset(split="test"))) == 359  # tf.data still reads the TFRecords


def test_loop_resumes_exactly_and_reports_a_pipeline_change(digits_dir, tmp_path):
  """The task reads grain by default; its position ignores the process count."""
  kw = dict(schedule="constant", checkpoint_every_steps=5, log_every_steps=5, num_train_steps=10)
  experiment = experiments.create(tiny("classification", digits_dir, **kw),
                                    str(tmp_path / "grain"))
  try:
    position = experiment.task.data_position(5)
  finally:
    experiment.close()
  assert position["input_pipeline"] == "grain" and "process_count" not in position
  experiments.train_and_evaluate(tiny("classification", digits_dir, input_pipeline="tf.data",
                                    **kw), str(tmp_path / "tfdata"), progress=False,
                               export_dir="")
  with pytest.warns(UserWarning, match="different data order.*input_pipeline"):
    experiments.create(tiny("classification", digits_dir, **{**kw, "num_train_steps": 20}),
                         str(tmp_path / "tfdata")).close()
  with pytest.raises(ValueError, match="config.input_pipeline='nope'"):
    experiments.create(tiny("classification", digits_dir, input_pipeline="nope"),
                         str(tmp_path / "bad"))


def test_first_batch_of_a_resume_does_not_depend_on_the_step(digits_dir):
  """The same number of records is read for the first batch at step 0 and step 10**9."""
  builder = pipeline.get_builder("sklearn_digits", digits_dir)
  reads = []
  for start in (0, 10**9):
    source = CountingSource(grain_input.data_source(builder, "train"))
    next(grain_input.train_batches(source, batch_size=32, seed=0, start_step=start,
                                   transform=grain_input.image_train_transform(None, 0),
                                   read_options=SEQUENTIAL, process_index=0, process_count=1))
    reads.append(len(source.reads))
  assert reads == [32, 32]
