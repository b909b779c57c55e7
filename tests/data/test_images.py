import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mrl_jax.data import images, pipeline

# Normalised pixels lie in [(0 - mean) / std, (1 - mean) / std] per channel.
LOW = float(np.min(-np.array(images.IMAGENET_MEAN) / np.array(images.IMAGENET_STD)))
HIGH = float(np.max((1 - np.array(images.IMAGENET_MEAN)) / np.array(images.IMAGENET_STD)))


def tiny_imagenet_input(**overrides) -> images.ImageInput:
  """ImageNet style at 32 px: 16 px training for epochs 0-1, 32 px from epoch 2."""
  kw = dict(style="imagenet", image_size=32, train_sizes=(16, 32), ramp_epochs=(1.0, 2.0),
            size_multiple=16)
  return images.ImageInput(**{**kw, **overrides})


def test_paper_progressive_resizing_schedule():
  paper = images.ImageInput(style="imagenet", image_size=224, train_sizes=(160, 192),
                            ramp_epochs=(29.0, 34.0), size_multiple=32)
  sizes = [paper.train_size(epoch) for epoch in range(40)]
  assert sizes == [160] * 32 + [192] * 8  # 160 px until epoch 31, 192 from epoch 32
  fixed = images.ImageInput(style="imagenet", image_size=224)
  assert {fixed.train_size(epoch) for epoch in range(40)} == {224}


def _train(builder, image_input, seed=0, start_step=0):
  return image_input.train_batches(builder, "train", batch_size=4, seed=seed, shuffle_buffer=16,
                                   steps_per_epoch=2, start_step=start_step)


def test_imagenet_train_batches_shapes_ranges_sizes_and_determinism(tmp_path):
  with tfds.testing.mock_data(num_examples=10):  # random-sized JPEGs, 1000 classes
    builder = pipeline.get_builder("imagenet2012", str(tmp_path))
    image_input = tiny_imagenet_input()
    a = [next(it) for it in [_train(builder, image_input)] for _ in range(6)]
    b = [next(it) for it in [_train(builder, image_input)] for _ in range(6)]
    c = [next(it) for it in [_train(builder, image_input, seed=1)] for _ in range(6)]
    resumed = [next(it) for it in [_train(builder, image_input, start_step=3)] for _ in range(3)]
  # Steps 0-3 are epochs 0-1 (16 px), steps 4-5 epoch 2 (32 px).
  assert [x["image"].shape for x in a] == [(4, 16, 16, 3)] * 4 + [(4, 32, 32, 3)] * 2
  for x in a:
    assert x["image"].dtype == np.float32 and x["label"].dtype == np.int32
    assert LOW - 1e-4 <= x["image"].min() and x["image"].max() <= HIGH + 1e-4
    assert x["image"].std() > 0.1 and np.all((0 <= x["label"]) & (x["label"] < 1000))
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c, strict=True))
  for x, y in zip(a[3:], resumed, strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


@pytest.mark.parametrize("batch_size", [3, 4, 10, 16])
def test_imagenet_eval_counts_every_example_exactly_once(tmp_path, batch_size):
  image_input = tiny_imagenet_input()
  with tfds.testing.mock_data(num_examples=10):
    builder = pipeline.get_builder("imagenet2012", str(tmp_path))
    batches = list(image_input.eval_batches(builder, "validation", batch_size=batch_size))
    raw = list(builder.as_dataset(split="validation", shuffle_files=False,
                                  decoders={"image": tfds.decode.SkipDecoding()}))
  assert all(b["image"].shape == (batch_size, 32, 32, 3) for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  assert len(mask) == -(-10 // batch_size) * batch_size
  assert np.all(mask[:10] == 1) and np.all(mask[10:] == 0)
  got = np.concatenate([b["image"] for b in batches])[mask > 0]
  want = np.stack([images.normalize(
      images.resize_and_centre_crop(tf.io.decode_image(ex["image"], channels=3), 32, 0.875),
      images.IMAGENET_MEAN, images.IMAGENET_STD).numpy() for ex in raw])
  np.testing.assert_allclose(got, want, atol=1e-5)  # the split, in order, each once
  labels = np.concatenate([b["label"] for b in batches])[mask > 0]
  np.testing.assert_array_equal(labels, [ex["label"].numpy() for ex in raw])


def test_resize_and_centre_crop_takes_the_middle():
  # A 40 x 20 image whose pixels hold their row number. The shorter side goes
  # to round(32 / 0.875) = 37 (scale 1.85, 74 x 37), then rows 21..52 and
  # columns 2..33 are kept: original rows (21.5 / 1.85 - 0.5) .. (52.5 / 1.85 - 0.5).
  image = tf.cast(tf.tile(tf.range(40)[:, None, None], [1, 20, 3]), tf.uint8)
  out = images.resize_and_centre_crop(image, 32, 0.875).numpy()
  assert out.shape == (32, 32, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out[:, 5, 0], out[:, 20, 0])  # constant along rows
  assert np.all(np.diff(out[:, 0, 0]) > 0)
  np.testing.assert_allclose([out[0, 0, 0], out[-1, 0, 0]], [11.1, 27.9], atol=0.6)


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_random_crop_respects_area_and_aspect_and_seed(fmt):
  image = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
  encode = tf.io.encode_jpeg if fmt == "jpeg" else tf.io.encode_png
  data = encode(image)
  for i in range(20):
    rng = tf.constant([7, i], tf.int64)
    crop = images.decode_and_random_crop(data, rng, channels=3)
    h, w = crop.shape[:2]
    assert 0.08 * 60 * 80 * 0.9 <= h * w <= 60 * 80 and crop.shape[2] == 3
    assert (h, w) == (60, 80) or 3 / 4 * 0.85 <= w / h <= 4 / 3 * 1.15
    again = images.decode_and_random_crop(data, rng, channels=3)
    np.testing.assert_array_equal(crop.numpy(), again.numpy())


def test_pad_and_random_crop_is_a_shift_with_zero_fill():
  image = tf.constant(np.random.default_rng(0).uniform(1, 2, (8, 8, 3)), tf.float32)
  for i in range(5):
    out = images.pad_and_random_crop(image, tf.constant([0, i], tf.int64), pad=2).numpy()
    padded = np.pad(image.numpy(), [(2, 2), (2, 2), (0, 0)])
    shifts = [(dy, dx) for dy in range(5) for dx in range(5)
              if np.array_equal(padded[dy:dy + 8, dx:dx + 8], out)]
    assert len(shifts) == 1


def test_cifar_style_train_and_eval(tmp_path):
  cifar = images.ImageInput(style="cifar", mean=images.CIFAR10_MEAN, std=images.CIFAR10_STD)
  with tfds.testing.mock_data(num_examples=6):
    builder = pipeline.get_builder("cifar10", str(tmp_path))
    x = next(_train(builder, cifar))
    y = next(_train(builder, cifar))
    evals = list(cifar.eval_batches(builder, "test", batch_size=4))
  assert x["image"].shape == (4, 32, 32, 3) and x["image"].dtype == np.float32
  np.testing.assert_array_equal(x["image"], y["image"])
  assert [e["mask"].tolist() for e in evals] == [[1, 1, 1, 1], [1, 1, 0, 0]]
  assert cifar.model_input_shape((32, 32, 3)) == (32, 32, 3)


def test_scale_style_is_the_default_and_needs_fixed_sizes():
  default = images.ImageInput()
  assert default.style == "scale" and default.model_input_shape((8, 8, 1)) == (8, 8, 1)
  with pytest.raises(ValueError, match="varying size"):
    default.model_input_shape((None, None, 3))
  assert tiny_imagenet_input().model_input_shape((None, None, 3)) == (32, 32, 3)


@pytest.mark.parametrize("fields,match", [
    (dict(style="autoaugment"), "style='autoaugment'"),
    (dict(style="imagenet"), "needs a positive evaluation image size"),
    (dict(style="imagenet", image_size=224, crop_ratio=1.5), "crop_ratio=1.5"),
    (dict(style="imagenet", image_size=224, train_sizes=(16, 192)), "train_sizes"),
    (dict(style="imagenet", image_size=224, ramp_epochs=(5, 2)), "ramp_epochs"),
    (dict(style="scale", mean=(0.5,), std=(0.2, 0.2)), "one entry per channel"),
    (dict(colour_jitter=0.4), "config.input has no field 'colour_jitter'"),
    (dict(pad="4"), "config.input.pad='4' must be an int"),
])
def test_bad_input_fields_are_named(fields, match):
  with pytest.raises(ValueError, match=match):
    images.ImageInput.from_fields(fields)

