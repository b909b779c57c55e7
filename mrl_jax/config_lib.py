"""Validate a training config once, at the boundary, and fill in derived fields.

Everything downstream (model building, the train step, checkpoints) reads the
config returned by :func:`validate_config` and may trust it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import ml_collections

from mrl_jax.nesting import Nesting, default_dims

HEADS = ("mrl", "mrl_e", "ff")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("warmup_linear", "warmup_cosine", "constant")


def load_config_file(path: str, **overrides: Any) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file (e.g. ``configs/digits_mlp.py``), then ``overrides``.

  The programmatic twin of ``--config=path --config.FIELD=VALUE`` for notebooks
  and scripts. Nested fields are overridden with dicts:
  ``load_config_file(p, encoder={"embed_dim": 32})``.
  """
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config file at {path}")
  spec = importlib.util.spec_from_file_location(
      f"mrl_jax_config_{os.path.splitext(os.path.basename(path))[0]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in overrides.items():
    if isinstance(value, dict):
      config[key].update(value)
    else:
      config[key] = value
  return config


def validate_config(config: ml_collections.ConfigDict,
                    num_devices: int | None = None) -> ml_collections.ConfigDict:
  """Check ``config`` and return a locked copy with derived fields filled in.

  Derived: ``nesting.dims`` (from ``nesting.start`` and ``encoder.embed_dim``
  when ``None``), ``nesting.weights`` (ones when ``None``) and ``ff_dim``
  (the embedding size when ``None`` and ``head == "ff"``).

  Args:
    config: a config from one of the ``configs/*.py`` files.
    num_devices: number of devices in the mesh; the global batch must divide
      evenly over them.

  Raises:
    ValueError: naming the offending field and value.
  """
  config = ml_collections.ConfigDict(config.to_dict())  # a mutable copy
  embed_dim = _positive_int(config.encoder.embed_dim, "encoder.embed_dim")
  if config.head not in HEADS:
    raise ValueError(f"config.head={config.head!r}; choose one of {HEADS}")
  dims = config.nesting.dims
  if dims is None:
    dims = default_dims(embed_dim, start=config.nesting.get("start", 8))
  nesting = Nesting(tuple(dims), config.nesting.weights, embed_dim=embed_dim)
  config.nesting.dims = nesting.dims
  config.nesting.weights = nesting.weights
  if config.head == "ff":
    ff_dim = embed_dim if config.ff_dim is None else config.ff_dim
    config.ff_dim = _positive_int(ff_dim, "ff_dim")
    if config.ff_dim > embed_dim:
      raise ValueError(f"ff_dim={config.ff_dim} is larger than encoder.embed_dim={embed_dim}")
  if config.optimizer not in OPTIMIZERS:
    raise ValueError(f"config.optimizer={config.optimizer!r}; choose one of {OPTIMIZERS}")
  if config.schedule not in SCHEDULES:
    raise ValueError(f"config.schedule={config.schedule!r}; choose one of {SCHEDULES}")
  if not 0.0 <= config.label_smoothing < 1.0:
    raise ValueError(f"config.label_smoothing={config.label_smoothing} must be in [0, 1)")
  batch = _positive_int(config.batch_size, "batch_size")
  if num_devices and batch % num_devices:
    raise ValueError(
        f"batch_size={batch} does not divide evenly over {num_devices} devices")
  if (config.num_train_steps is None) == (config.num_epochs is None):
    raise ValueError("set exactly one of config.num_train_steps and config.num_epochs")
  for name in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
    _positive_int(config[name], name)
  config.lock()
  return config


def nesting_of(config: ml_collections.ConfigDict) -> Nesting:
  """The validated :class:`Nesting` of a config passed through :func:`validate_config`."""
  return Nesting(tuple(config.nesting.dims), config.nesting.weights,
                 embed_dim=config.encoder.embed_dim)


def eval_dims(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The embedding sizes read by the rows of the model's ``[M, B, C]`` logits."""
  return (config.ff_dim,) if config.head == "ff" else tuple(config.nesting.dims)


def loss_weights(config: ml_collections.ConfigDict) -> tuple[float, ...]:
  """One weight per row of the logits: the nesting weights, or ``(1.0,)`` for FF-k."""
  return (1.0,) if config.head == "ff" else tuple(config.nesting.weights)


def to_json(config: ml_collections.ConfigDict) -> str:
  """A stable JSON rendering (tuples become lists) for metadata and comparisons."""
  return json.dumps(_plain(config.to_dict()), sort_keys=True, indent=1)


def _plain(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  return str(x)


def _positive_int(value: Any, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"config.{name} must be a positive int, got {value!r}")
  return value
