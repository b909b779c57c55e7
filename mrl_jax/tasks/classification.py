"""Image classification with nested heads (MRL, MRL-E, FF-k): the paper's task.

Data: a TFDS data set read by grain over ArrayRecord files (:mod:`mrl_jax.data.grain_input`,
exact resume without re-reading; the default) or by tf.data
(``config.input_pipeline = "tf.data"``, :mod:`mrl_jax.data.pipeline`), with the image
styles of :mod:`mrl_jax.data.images`.
Model: ``encoder -> z [B, D] -> head`` (:class:`mrl_jax.models.Classifier`);
loss: the summed, weighted nested softmax cross-entropy with label smoothing
(Kusupati et al. 2022, eq. 1), plus, when their weights are > 0, the binary-aware
terms on ``z`` (:mod:`mrl_jax.losses.binary`). Metrics per nested dim: loss and top-1.
Export: the encoder AND its nested heads, so per-dim top-1 and the cascade
come from the bundle (:class:`mrl_jax.bundle.encoder.Encoder`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mrl_jax import models
from mrl_jax.bundle import artifact
from mrl_jax.core import fileio
from mrl_jax.losses import nested_loss_per_dim, softmax_cross_entropy_per_dim
from mrl_jax.losses.binary import same_label_mask
from mrl_jax.tasks import register
from mrl_jax.tasks.specs import ClassificationSpec
from mrl_jax.train import config as config_lib
from mrl_jax.train import sharding as sharding_lib
from mrl_jax.train import specs
from mrl_jax.train import task as base

HEADS = ("mrl", "mrl_e", "ff")


@register
class ClassificationTask(base.Task):
  """``config.task = "classification"`` (``configs/digits_mlp.py``, the ImageNet configs).

  Batches: ``{"image": float32 [B, H, W, C], "label": int32 [B]}``.
  """

  name = "classification"
  spec_class = ClassificationSpec

  @classmethod
  def validate(cls, config: ml_collections.ConfigDict) -> None:
    # TensorFlow / grain (the images extra): imported only when data is read.
    from mrl_jax.data import grain_input, images

    config_lib.choice(config.input_pipeline, "input_pipeline",
                      grain_input.PIPELINES)
    config_lib.choice(config.head, "head", HEADS)
    nesting = config_lib.fill_nesting(config, config.encoder.embed_dim)
    if config.head == "ff":
      ff_dim = nesting.embed_dim if config.ff_dim is None else config.ff_dim
      config.ff_dim = config_lib.positive_int(ff_dim, "ff_dim")
      if config.ff_dim > nesting.embed_dim:
        raise ValueError(f"config.ff_dim={config.ff_dim} is larger than "
                         f"config.encoder.embed_dim={nesting.embed_dim}")
    config_lib.probability(config.label_smoothing, "label_smoothing")
    config_lib.validate_binary_aware(config)
    config_lib.positive_int(config.shuffle_buffer, "shuffle_buffer")
    for name in ("dataset", "train_split", "eval_split"):
      if not isinstance(config[name], str) or not config[name]:
        raise ValueError(f"config.{name}={config[name]!r} must be a non-empty string")
    images.ImageInput.from_fields(config.to_dict().get("input"))  # checks config.input

  def __init__(self, config: ClassificationSpec, *, workdir: str, mesh: jax.sharding.Mesh):
    # TensorFlow / grain (the images extra): imported only when data is read.
    from mrl_jax.data import grain_input, images, pipeline

    super().__init__(config, workdir=workdir, mesh=mesh)
    self.builder = pipeline.get_builder(config.dataset, config.data_dir)
    self.spec = pipeline.dataset_spec(self.builder, config.train_split, config.eval_split)
    self.input = images.ImageInput.from_spec(config.input)
    self.input_pipeline = config.input_pipeline
    if self.input_pipeline == "grain":  # no ArrayRecord files: says how to add them
      grain_input.data_source(self.builder, config.train_split, decoders=self.input.decoders)
    self.steps_per_epoch = max(self.spec.num_train_examples // config.batch_size, 1)
    self._build(self.spec.num_classes, self.input.model_input_shape(self.spec.image_shape))

  @classmethod
  def without_data(cls, config: ClassificationSpec, *, mesh: jax.sharding.Mesh,
                   num_classes: int, input_shape: tuple[int, ...],
                   steps_per_epoch: int = 1) -> ClassificationTask:
    """The model, loss and step of a spec (:meth:`parse_spec`), with no data set (benchmarks,
    tests)."""
    task = cls.__new__(cls)
    base.Task.__init__(task, config, workdir="", mesh=mesh)
    task.steps_per_epoch = steps_per_epoch
    task.input_pipeline = config.input_pipeline
    task._build(num_classes, tuple(input_shape))
    return task

  def _build(self, num_classes: int, input_shape: tuple[int, ...]) -> None:
    config, mesh = self.config, self.mesh
    self.num_classes, self.input_shape = num_classes, input_shape
    self.model = models.build_classifier(config, num_classes)
    self.dims = (config.ff_dim,) if config.head == "ff" else tuple(config.nesting.dims)
    self.weights = jnp.asarray((1.0,) if config.head == "ff" else config.nesting.weights,
                               jnp.float32)
    # On z at the trained dims (FF-k: its one dim); None unless a binary-aware weight is > 0.
    self.binary_terms = config.binary_aware(self.dims, tuple(np.asarray(self.weights)))
    self._to_global = functools.partial(sharding_lib.as_global,
                                        sharding=sharding_lib.batch_sharding(mesh))
    self._eval_step = jax.jit(self._eval_sums, out_shardings=sharding_lib.replicated(mesh))

  # --- model and loss ---------------------------------------------------------------

  def init_variables(self, rng: jax.Array) -> base.Variables:
    return self.model.init(rng, jnp.zeros((1, *self.input_shape), jnp.float32), train=False)

  def loss_and_metrics(self, params, model_state, batch, rng):
    """The weighted nested cross-entropy, plus the binary-aware terms on ``z`` when on.

    Metrics: ``loss_per_dim``, ``top1_per_dim`` ``[M]`` (and ``spread_out_per_dim`` /
    ``binary_loss_per_dim`` for the binary-aware terms that are on).
    """
    (logits, z), updates = self.model.apply(
        {"params": params, **model_state}, batch["image"], train=True,
        mutable=list(model_state), rngs={"dropout": rng}, return_embedding=True)
    per_dim = nested_loss_per_dim(logits, batch["label"],
                                  label_smoothing=self.config.label_smoothing)
    top1 = jnp.mean(jnp.argmax(logits, -1) == batch["label"][None], axis=1)
    metrics = {"loss_per_dim": per_dim, "top1_per_dim": top1}
    loss = jnp.sum(self.weights * per_dim)
    if self.binary_terms is not None:  # different labels are the non-matching pairs
      extra, terms = self.binary_terms.grouped(z.astype(jnp.float32),
                                               same_label_mask(batch["label"]))
      loss = loss + extra
      metrics.update(terms)
    return loss, (dict(updates), metrics)

  # --- data -------------------------------------------------------------------------

  def train_batches(self, start_step: int) -> Iterator[base.Batch]:
    """grain: reads no record before ``start_step``; tf.data: reads and skips them."""
    # TensorFlow / grain (the images extra): imported only when data is read.
    from mrl_jax.data import grain_input

    c = self.config
    if self.input_pipeline == "grain":
      return grain_input.image_train_batches(
          self.input, self.builder, c.train_split, batch_size=c.batch_size, seed=c.seed,
          steps_per_epoch=self.steps_per_epoch, start_step=start_step)
    return self.input.train_batches(
        self.builder, c.train_split, batch_size=c.batch_size, seed=c.seed,
        shuffle_buffer=c.shuffle_buffer, steps_per_epoch=self.steps_per_epoch,
        start_step=start_step)

  def data_position(self, step: int) -> dict[str, Any]:
    """grain's order is global: the process count and shuffle buffer do not change it."""
    position = {**super().data_position(step), "train_split": self.config.train_split}
    if self.input_pipeline == "grain":
      del position["process_count"]
      return {**position, "input_pipeline": "grain"}
    return {**position, "shuffle_buffer": self.config.shuffle_buffer}

  def eval_batches(self, split: str | None = None) -> Iterable[dict]:
    """A padded, masked pass over ``split`` (default: the config's eval split)."""
    # TensorFlow / grain (the images extra): imported only when data is read.
    from mrl_jax.data import grain_input

    split = split or self.config.eval_split
    if self.input_pipeline == "grain":
      return grain_input.image_eval_batches(self.input, self.builder, split,
                                            batch_size=self.config.batch_size)
    return self.input.eval_batches(self.builder, split, batch_size=self.config.batch_size)

  # --- evaluation ---------------------------------------------------------------------

  def _eval_sums(self, variables, batch):
    logits = self.model.apply(variables, batch["image"], train=False)
    mask = batch["mask"]
    ce = softmax_cross_entropy_per_dim(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"][None]).astype(jnp.float32)
    return {"loss_per_dim": jnp.sum(ce * mask, 1), "correct_per_dim": jnp.sum(correct * mask, 1),
            "count": jnp.sum(mask)}

  def evaluate(self, variables: base.Variables) -> dict[str, Any]:
    """Mean loss and top-1 per nested dim over a padded, masked pass of the eval split."""
    totals = None
    for batch in self.eval_batches():
      sums = jax.device_get(self._eval_step(variables, self._to_global(batch)))
      totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    count = max(float(totals["count"]), 1.0)
    return {"loss_per_dim": totals["loss_per_dim"] / count,
            "top1_per_dim": totals["correct_per_dim"] / count,
            "loss": float(np.sum(totals["loss_per_dim"]) / count),
            "num_examples": float(totals["count"])}

  def eval_metric_names(self) -> list[str]:
    return ["loss", *(f"{name}/dim_{m}" for name in ("loss", "top1") for m in self.dims)]

  def predict(self, variables: base.Variables, split: str) -> dict[str, np.ndarray]:
    """Embeddings, nested logits and labels of every (unpadded) example of ``split``.

    Returns:
      ``{"embedding": [N, D], "logits": [M, N, C], "label": [N]}`` as numpy arrays,
      gathered from all processes.
    """
    fn = jax.jit(lambda v, x: self.model.apply(v, x, train=False, return_embedding=True))
    zs, logits, labels = [], [], []
    for batch in self.eval_batches(split):
      gbatch = self._to_global(batch)
      out = multihost_utils.process_allgather(fn(variables, gbatch["image"]), tiled=True)
      meta = multihost_utils.process_allgather(
          {"label": gbatch["label"], "mask": gbatch["mask"]}, tiled=True)
      keep = np.asarray(meta["mask"]) > 0
      logits.append(np.asarray(out[0])[:, keep])
      zs.append(np.asarray(out[1])[keep])
      labels.append(np.asarray(meta["label"])[keep])
    return {"embedding": np.concatenate(zs), "logits": np.concatenate(logits, axis=1),
            "label": np.concatenate(labels)}

  # --- export ---------------------------------------------------------------------------

  def checkpoint_metadata(self) -> dict[str, Any]:
    return {"num_classes": self.spec.num_classes, "image_shape": list(self.spec.image_shape)}

  def model_config(self) -> dict[str, Any]:
    """``config.json`` of an image bundle: what :class:`~mrl_jax.bundle.encoder.Encoder`
    rebuilds."""
    c = self.config
    return {
        "model_type": "mrl_jax_image_encoder",
        "encoder": specs.as_json(c.encoder),
        "embed_dim": int(c.encoder.embed_dim),
        "half_precision": bool(c.half_precision),
        "is_matryoshka": c.head != "ff",
        "matryoshka_dimensions": [int(m) for m in self.dims],
        "head": {"kind": c.head, "num_classes": int(self.num_classes),
                 "dims": [int(m) for m in self.dims]},
        "input": {"shape": [int(n) for n in self.input_shape], "dtype": "float32"},
        "preprocessing": preprocessing_info(specs.as_json(c)),
        "data": {"dataset": c.dataset, "data_dir": c.data_dir, "train_split": c.train_split,
                 "eval_split": c.eval_split},
    }

  def export(self, variables: base.Variables, out_dir: str, *, step: int) -> None:
    model_config = self.model_config()
    fileio.write_json(os.path.join(out_dir, artifact.CONFIG_FILE), model_config,
                      what=artifact.CONFIG_FILE)
    artifact.save_weights(out_dir, split_variables(variables))
    artifact.write_metadata(
        out_dir, modality="image", dims=model_config["matryoshka_dimensions"],
        weights=[float(w) for w in np.asarray(self.weights)],
        is_matryoshka=model_config["is_matryoshka"], step=step, task=self.name,
        training_config=specs.as_json(self.config))


def split_variables(variables: base.Variables) -> dict[str, Any]:
  """``{"params": {"encoder", "head"}, "batch_stats": {"encoder"}}`` -> per-module trees.

  Returns:
    ``{"encoder": {"params": ..., ["batch_stats": ...]}, "head": {"params": ...}}``.
  """
  out: dict[str, dict] = {"encoder": {}, "head": {}}
  for collection, tree in variables.items():
    for module in ("encoder", "head"):
      if module in tree and jax.tree.leaves(tree[module]):
        out[module][collection] = tree[module]
  return out


def preprocessing_info(config_dict: dict) -> dict[str, Any]:
  """How the training pipeline turned stored uint8 pixels into model inputs.

  Every style of :mod:`mrl_jax.data.images` is ``x * scale + offset`` on the
  pixel values: ``"scale"`` (the default) divides by 255; ``"imagenet"`` and
  ``"cifar"`` compute ``(x / 255 - mean) / std`` per channel, i.e.
  ``scale = 1 / (255 * std)`` and ``offset = -mean / std`` (one entry per
  channel). :meth:`mrl_jax.bundle.encoder.Encoder.preprocess` applies the rule; for
  ``"imagenet"`` it expects images already resized to ``eval_resize`` (shorter
  side) and centre-cropped to ``eval_crop``, as the eval pipeline does.
  """
  spec = config_dict.get("input") or {}
  if spec.get("style", "scale") == "scale":
    return {"kind": "rescale", "from_dtype": "uint8", "scale": 1.0 / 255.0, "offset": 0.0}
  mean, std = [float(m) for m in spec["mean"]], [float(s) for s in spec["std"]]
  rule = {"kind": "normalize", "from_dtype": "uint8",
          "scale": [1.0 / (255.0 * s) for s in std],
          "offset": [-m / s for m, s in zip(mean, std, strict=True)]}
  if spec["style"] == "imagenet":
    rule["eval_resize"] = int(round(spec["image_size"] / spec["crop_ratio"]))
    rule["eval_crop"] = int(spec["image_size"])
  return rule
