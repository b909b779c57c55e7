import numpy as np
import pytest
import tensorflow_datasets as tfds

from mrl_jax.data import digits, pipeline


def test_stratified_split_is_deterministic_and_balanced():
  labels = np.repeat(np.arange(10), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
  train, test = digits.stratified_split(labels)
  train2, test2 = digits.stratified_split(labels)
  np.testing.assert_array_equal(test, test2)
  assert len(set(train) & set(test)) == 0 and len(train) + len(test) == len(labels)
  for c in range(10):
    frac = np.mean(labels[test] == c) / np.mean(labels == c)
    assert abs(frac - 1.0) < 0.05


def test_digits_builder_serves_real_images(digits_dir):
  builder = pipeline.get_builder("sklearn_digits", digits_dir)
  spec = pipeline.dataset_spec(builder, "train", "test")
  assert spec == pipeline.DatasetSpec(10, (8, 8, 1), 1438, 359)
  from sklearn.datasets import load_digits

  ref = load_digits()
  _, test_idx = digits.stratified_split(ref.target)
  images = np.concatenate([b["image"][b["mask"] > 0]
                           for b in pipeline.eval_batches(builder, "test", batch_size=100)])
  # Same examples (as a multiset) as the scikit-learn rows of the test split.
  want = np.round(ref.images[test_idx] * 255 / 16) / 255
  got_sorted = np.sort(images.reshape(len(images), -1), axis=0)
  np.testing.assert_allclose(got_sorted, np.sort(want.reshape(len(want), -1), axis=0), atol=1e-6)


def test_train_batches_are_seeded_and_resumable(digits_dir):
  builder = pipeline.get_builder("sklearn_digits", digits_dir)
  make = lambda seed, start=0: pipeline.train_batches(
      builder, "train", batch_size=64, seed=seed, shuffle_buffer=512, start_step=start)
  a = [next(it)["label"] for it in [make(0)] for _ in range(30)]
  b = [next(it)["label"] for it in [make(0)] for _ in range(30)]
  c = [next(it)["label"] for it in [make(1)] for _ in range(30)]
  resumed = make(0, start=25)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))
  for want in a[25:]:
    np.testing.assert_array_equal(next(resumed)["label"], want)


@pytest.mark.parametrize("batch_size", [7, 100, 359, 512])
def test_eval_counts_every_example_exactly_once(digits_dir, batch_size):
  builder = pipeline.get_builder("sklearn_digits", digits_dir)
  batches = list(pipeline.eval_batches(builder, "test", batch_size=batch_size))
  assert all(len(b["label"]) == batch_size for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 359 and len(mask) == -(-359 // batch_size) * batch_size
  assert np.all(mask[:359] == 1) and np.all(mask[359:] == 0)


def test_mock_data_path(tmp_path):
  with tfds.testing.mock_data(num_examples=12):
    builder = pipeline.get_builder("mnist", str(tmp_path))
    spec = pipeline.dataset_spec(builder, "train", "test")
    assert spec.image_shape == (28, 28, 1) and spec.num_eval_examples == 12
    batch = next(pipeline.train_batches(builder, "train", batch_size=4, seed=0,
                                        shuffle_buffer=8))
    assert batch["image"].shape == (4, 28, 28, 1) and batch["image"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_unprepared_dataset_says_it_never_downloads(tmp_path):
  builder = pipeline.get_builder("mnist", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="never downloads"):
    pipeline.dataset_spec(builder, "train", "test")
