"""Write an inference bundle: the encoder's arrays plus JSON metadata, nothing else.

A bundle is a folder::

  out_dir/
    encoder.json   format and version, the encoder's config, the trained nesting
                   dims, embed_dim, input shape and preprocessing, provenance
    variables/     Orbax arrays {"params": ..., "batch_stats": ...} of the encoder
                   only: no classifier heads, no optimizer state

Nothing in it is pickled, so loading an untrusted bundle runs no code; the
config in ``encoder.json`` is data that :class:`mrl_jax.inference.Encoder`
validates, and the arrays must match the shapes it implies.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

import mrl_jax
from mrl_jax import config_lib, models
from mrl_jax.checkpoints import Checkpointer

FORMAT = "mrl_jax.encoder"
FORMAT_VERSION = 1
METADATA_FILE = "encoder.json"
VARIABLES_DIR = "variables"


class BundleError(ValueError):
  """An inference bundle that cannot be used: missing files, bad metadata, wrong arrays."""


def preprocessing_info(config_dict: dict) -> dict[str, Any]:
  """How the training pipeline turned stored uint8 pixels into model inputs.

  Every style of :mod:`mrl_jax.data.images` is ``x * scale + offset`` on the
  pixel values: ``"scale"`` (the default) divides by 255; ``"imagenet"`` and
  ``"cifar"`` compute ``(x / 255 - mean) / std`` per channel, i.e.
  ``scale = 1 / (255 * std)`` and ``offset = -mean / std`` (one entry per
  channel). :meth:`mrl_jax.inference.Encoder.preprocess` applies the rule; for
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


def abstract_variables(encoder: Any, input_shape: tuple[int, ...], sharding: Any = None) -> dict:
  """``jax.ShapeDtypeStruct`` tree of ``encoder``'s variables for inputs ``[B, *input_shape]``.

  Only non-empty collections are kept (an MLP has ``params`` and no
  ``batch_stats``).
  """
  shapes = jax.eval_shape(lambda: encoder.init(
      jax.random.PRNGKey(0), jnp.zeros((1, *input_shape), jnp.float32), train=False))
  return {name: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
      for name, tree in shapes.items() if jax.tree.leaves(tree)}


def bundle_metadata(config_dict: dict, input_shape: tuple[int, ...],
                    step: int | None) -> dict[str, Any]:
  """The JSON written to ``encoder.json`` for a (validated, JSON-rendered) training config."""
  config = ml_collections.ConfigDict(config_dict)
  dims = [int(m) for m in config_lib.eval_dims(config)]
  return {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "mrl_jax_version": mrl_jax.__version__,
      "encoder": dict(config_dict["encoder"]),
      "half_precision": bool(config_dict.get("half_precision", False)),
      "embed_dim": int(config_dict["encoder"]["embed_dim"]),
      # The names serving engines read to allow truncation.
      "is_matryoshka": config_dict["head"] != "ff",
      "matryoshka_dimensions": dims,
      "input": {"shape": [int(n) for n in input_shape], "dtype": "float32"},
      "preprocessing": preprocessing_info(config_dict),
      "source": {"step": step, "dataset": config_dict.get("dataset"),
                 "head": config_dict["head"], "training_config": config_dict},
  }


def export_encoder(source: str | Any, out_dir: str, *,
                   config: ml_collections.ConfigDict | None = None,
                   input_shape: tuple[int, ...] | None = None, step: int | None = None,
                   overwrite: bool = False) -> str:
  """Write the encoder of a training run as an inference bundle in ``out_dir``.

  Call it on every process of a multi-host job (Orbax and the gathers are
  collective); process 0 writes the JSON.

  Args:
    source: a training workdir (its ``checkpoints/`` are read: only the
      encoder arrays of ``step``, default the latest), or a
      :class:`mrl_jax.train_lib.TrainState` (then pass ``config`` and
      ``input_shape``).
    out_dir: the bundle folder.
    config: the (validated) training config, for a ``TrainState`` source.
    input_shape: one example's shape, e.g. ``(8, 8, 1)``, for a ``TrainState``.
    step: which checkpoint of a workdir to export (default: the latest).
    overwrite: replace an existing bundle in ``out_dir``.

  Returns:
    ``out_dir``.

  Raises:
    FileNotFoundError: the workdir has no checkpoint.
    FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
  """
  if isinstance(source, str):
    variables, config_dict, input_shape, step = _from_workdir(source, step)
  else:
    if config is None or input_shape is None:
      raise ValueError("export_encoder(state, ...) needs config= and input_shape=")
    config_dict = json.loads(config_lib.to_json(config))
    step = int(jax.device_get(source.step))
    variables = {"params": source.params["encoder"],
                 "batch_stats": source.batch_stats.get("encoder", {})}
    variables = {k: v for k, v in variables.items() if jax.tree.leaves(v)}
  variables = jax.tree.map(_to_numpy, variables)
  _write_bundle(out_dir, variables, bundle_metadata(config_dict, tuple(input_shape), step),
                overwrite=overwrite)
  return out_dir


def _from_workdir(workdir: str, step: int | None) -> tuple[dict, dict, tuple[int, ...], int]:
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints to export in {workdir} ({directory} is missing)")
  checkpointer = Checkpointer(directory, read_only=True)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint to export in {directory}")
    stored = checkpointer.read_metadata(step)
    config_dict, input_shape = stored["config"], tuple(stored["image_shape"])
    encoder = models.build_encoder(config_dict["encoder"], config_dict.get("half_precision"))
    abstract = abstract_variables(encoder, input_shape,
                                  jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    restored = checkpointer.restore_subtree(
        step, {name: {"encoder": tree} for name, tree in abstract.items()})
  finally:
    checkpointer.close()
  return ({name: tree["encoder"] for name, tree in restored.items()}, config_dict, input_shape,
          step)


def _to_numpy(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:  # split over hosts (FSDP)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _write_bundle(out_dir: str, variables: dict, metadata: dict, *, overwrite: bool) -> None:
  out_dir = os.path.abspath(out_dir)
  main = jax.process_index() == 0
  if os.path.exists(out_dir):
    if not overwrite:
      raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace the bundle there")
    if main:
      shutil.rmtree(out_dir)
  multihost_utils.sync_global_devices(f"mrl_jax export: cleared {out_dir}")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(out_dir, VARIABLES_DIR), variables)
    checkpointer.wait_until_finished()
  if main:
    with open(os.path.join(out_dir, METADATA_FILE), "w") as f:
      json.dump(metadata, f, indent=1, sort_keys=True)
  multihost_utils.sync_global_devices(f"mrl_jax export: wrote {out_dir}")
