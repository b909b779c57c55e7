"""The ImageNet-style train pipeline: grain (ArrayRecord) vs tf.data (TFRecord), side by side.

  python benchmarks/input_pipeline.py [--num_images 2000] [--batch_size 128] [--batches 12]
                                      [--rounds 3] [--resume_steps 0,10000] [--data_dir DIR]
                                      [--parts throughput,per_example,resume]

1. Builds (once, into ``--data_dir``) a synthetic JPEG data set as a local TFDS
   builder, in TFRecord AND ArrayRecord: ``--num_images`` images of 300-500 px
   sides (smooth colour fields plus noise, JPEG quality 90, ~ImageNet file
   sizes), 1000 classes.
2. Throughput: examples/s of the ``configs/imagenet_resnet50.py`` train pipeline
   at 224 px (JPEG decode of the crop window + Inception random-resized crop +
   flip + normalise, the SAME TF maps in both), tf.data
   (:meth:`ImageInput.train_batches`) and grain
   (:func:`grain_input.image_train_batches`) taking turns for ``--rounds``
   rounds of ``--batches`` batches after two warm-up batches.
3. Resume: wall time from starting a fresh Python process to its first batch
   when resuming at each of ``--resume_steps`` (tf.data reads and skips every
   example before the step; grain reads none).
4. Why grain differs: the per-example cost of the map in one thread, with and
   without grain around it.

The machine is shared: the load average is printed with every result.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time

START = time.perf_counter()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

tf.config.set_visible_devices([], "GPU")

NUM_CLASSES = 1000


class SyntheticJpegs(tfds.core.GeneratorBasedBuilder):
  """Synthetic ImageNet-like JPEGs: a ``train`` split of ``num_images`` examples."""

  VERSION = tfds.core.Version("1.0.0")
  NUM_IMAGES = 2000

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description="synthetic JPEGs for benchmarks/input_pipeline.py",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(self.NUM_IMAGES):
      h, w = rng.integers(300, 500, size=2)
      yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
      base = np.stack([np.sin(xx * rng.uniform(2, 12) + rng.uniform(0, 6))
                       + np.cos(yy * rng.uniform(2, 12)) for _ in range(3)], -1)
      image = 127.5 + 60 * base + rng.normal(0, 12, size=(h, w, 3))
      jpeg = tf.io.encode_jpeg(np.clip(image, 0, 255).astype(np.uint8), quality=90)
      yield i, {"image": jpeg.numpy(), "label": int(rng.integers(NUM_CLASSES))}


def build(data_dir: str, num_images: int) -> tfds.core.DatasetBuilder:
  from mrl_jax.data import pipeline

  SyntheticJpegs.NUM_IMAGES = num_images
  builder = SyntheticJpegs(data_dir=os.path.join(data_dir, f"n{num_images}"))
  builder.download_and_prepare()
  pipeline.add_array_record(builder)
  return builder


def image_input():
  from configs import imagenet_resnet50
  from mrl_jax.data import images

  fields = dict(imagenet_resnet50.get_config().input)
  fields["train_sizes"] = None  # 224 px throughout (the ramp starts at epoch 29)
  return images.ImageInput(**fields)


def batches(pipeline_name: str, builder, *, batch_size: int, start_step: int = 0):
  from mrl_jax.data import grain_input

  kw = dict(batch_size=batch_size, seed=0, steps_per_epoch=max(
      builder.info.splits["train"].num_examples // batch_size, 1), start_step=start_step)
  if pipeline_name == "grain":
    return grain_input.image_train_batches(image_input(), builder, "train", **kw)
  return image_input().train_batches(builder, "train", shuffle_buffer=2048, **kw)


def load() -> str:
  return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def throughput(builder, args) -> None:
  """Each pipeline alone in turn: a fresh iterator, two warm-up batches, then the timing."""
  print(f"\n== throughput: {args.batches} batches of {args.batch_size} at 224 px, "
        f"{os.cpu_count()} CPUs ==")
  rates: dict[str, list[float]] = {"tf.data": [], "grain": []}
  for r in range(args.rounds):
    for name in rates:
      it = batches(name, builder, batch_size=args.batch_size)
      next(it), next(it)  # traces, thread pools, tf.data's shuffle buffer
      tick = time.perf_counter()
      for _ in range(args.batches):
        batch = next(it)
      rates[name].append(args.batches * args.batch_size / (time.perf_counter() - tick))
      if hasattr(it, "close"):
        it.close()  # grain: stop the threads; tf.data: deleting the iterator stops it
      del it
      gc.collect()
      assert batch["image"].shape == (args.batch_size, 224, 224, 3)
      print(f"round {r} {name:8s} {rates[name][-1]:7.1f} examples/s   ({load()})", flush=True)
  best = {name: max(v) for name, v in rates.items()}
  print(f"best: tf.data {best['tf.data']:.1f}/s, grain {best['grain']:.1f}/s, "
        f"grain / tf.data = {best['grain'] / best['tf.data']:.2f}")


def per_example_cost(builder, args) -> None:
  """One thread: the TF map alone, the map as grain calls it, and tf.data's map."""
  from mrl_jax.data import grain_input

  print("\n== one thread, per example (why the pipelines differ) ==")
  inp = image_input()
  source = grain_input.data_source(builder, "train", decoders=inp.decoders)
  transform = grain_input.image_train_transform(inp.train_augment(builder, 10), seed=0)
  n = min(200, len(source))
  tick = time.perf_counter()
  examples = [source[i] for i in range(n)]
  read = (time.perf_counter() - tick) / n
  transform(examples[0], 0, 0)
  tick = time.perf_counter()
  for i, example in enumerate(examples):
    transform(example, i, 0)
  mapped = (time.perf_counter() - tick) / n
  opts = tf.data.Options()
  opts.threading.private_threadpool_size = 1
  ds = builder.as_dataset(split="train", decoders=inp.decoders).take(n)
  augment = inp.train_augment(builder, 10)
  ds = ds.enumerate().map(lambda i, ex: augment(
      {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32)},
      tf.stack([tf.constant(0, tf.int64), i]), tf.constant(0, tf.int64))).with_options(opts)
  for _ in ds.take(2):
    pass
  tick = time.perf_counter()
  for _ in ds:
    pass
  tfdata = (time.perf_counter() - tick) / n
  print(f"ArrayRecord read + TFDS example parse (grain): {1e3 * read:.2f} ms")
  print(f"TF map called per example from Python (grain): {1e3 * mapped:.2f} ms")
  print(f"TFRecord read + parse + the same map in tf.data, 1 thread: {1e3 * tfdata:.2f} ms"
        f"   ({load()})")


def resume(args) -> None:
  print(f"\n== resume: process start -> first batch (batch {args.batch_size}, "
        f"{args.num_images} images = {args.num_images / args.batch_size:.1f} steps/epoch) ==")
  steps = [int(s) for s in args.resume_steps.split(",")]
  for step in steps:
    for name in ("tf.data", "grain"):
      tick = time.perf_counter()
      out = subprocess.run(
          [sys.executable, __file__, "--first_batch", f"{name},{step}", "--data_dir",
           args.data_dir, "--num_images", str(args.num_images), "--batch_size",
           str(args.batch_size)], capture_output=True, text=True, check=True,
          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
      total = time.perf_counter() - tick
      inner = out.stdout.strip().splitlines()[-1]
      print(f"step {step:5d} {name:8s} {total:6.1f} s to the first batch ({inner})   "
            f"({load()})", flush=True)


def first_batch(args) -> None:
  name, step = args.first_batch.split(",")
  builder = build(args.data_dir, args.num_images)
  ready = time.perf_counter()
  next(batches(name, builder, batch_size=args.batch_size, start_step=int(step)))
  done = time.perf_counter()
  print(f"start-up {ready - START:.1f} s, pipeline to the first batch {done - ready:.1f} s")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_images", type=int, default=2000)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--batches", type=int, default=12)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--resume_steps", default="0,10000")
  parser.add_argument("--parts", default="throughput,per_example,resume",
                      help="comma-separated subset of throughput,per_example,resume")
  parser.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(),
                                                         "mrl_jax_input_benchmark"))
  parser.add_argument("--first_batch", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.first_batch:
    return first_batch(args)
  tick = time.perf_counter()
  builder = build(args.data_dir, args.num_images)
  sizes = [os.path.getsize(f) for f in tf.io.gfile.glob(
      os.path.join(builder.data_dir, "*.array_record*"))]
  print(f"data: {args.num_images} JPEGs, {sum(sizes) / args.num_images / 1e3:.0f} kB each "
        f"on average, in {builder.data_dir} (ready in {time.perf_counter() - tick:.0f} s)")
  print(load())
  parts = args.parts.split(",")
  if "throughput" in parts:
    throughput(builder, args)
  if "per_example" in parts:
    per_example_cost(builder, args)
  if "resume" in parts:
    resume(args)


if __name__ == "__main__":
  main()
