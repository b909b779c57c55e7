"""One config schema for every task, validated once at the boundary.

Every config has the shared fields of :func:`base_config` (the task, the
nesting, the optimiser, the batch, the mesh, checkpoints); a task adds its
own (data, model) and checks them in its ``validate``. Everything downstream
reads the config returned by :func:`validate_config` and may trust it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys
import warnings
from typing import TYPE_CHECKING, Any

import ml_collections
from ml_collections.config_dict import placeholder

from mrl_jax.core.nesting import Nesting, default_dims
from mrl_jax.train import specs

if TYPE_CHECKING:
  from mrl_jax.train.task import Task



def base_config(task: str) -> ml_collections.ConfigDict:
  """The fields every task shares, with their defaults; task configs add their own.

  ``nesting.dims`` may be given in any order (sentence-transformers' users write
  ``(768, 512, 256, 128, 64)``); it is stored ascending, weights kept aligned.
  """
  config = ml_collections.ConfigDict()
  config.task = task
  config.seed = 0
  # The embedding is encoder.embed_dim wide for every task (None: the pretrained model's).
  config.encoder = ml_collections.ConfigDict(dict(embed_dim=placeholder(int)))
  config.nesting = ml_collections.ConfigDict(
      # dims None: powers of two from `start` up to encoder.embed_dim.
      dict(dims=placeholder(tuple), start=8, weights=placeholder(tuple)))
  config.half_precision = False
  config.batch_size = 128  # global, over all devices and hosts
  # The namespaces below are typed by mrl_jax.train.specs (field docs there).
  config.optim = ml_collections.ConfigDict(dict(
      optimizer="adamw", learning_rate=1e-3,  # peak
      learning_rate_batch_size=placeholder(int),  # if set, lr scales by batch_size / this
      momentum=0.9,  # sgd only
      weight_decay=1e-4,  # never applied to biases or normalisation scales
      schedule="warmup_cosine", warmup_steps=100,
      warmup_epochs=placeholder(float)))  # if set, overrides warmup_steps
  config.loop = ml_collections.ConfigDict(dict(
      num_train_steps=placeholder(int), num_epochs=placeholder(float),  # one of the two
      log_every_steps=100, eval_every_steps=1000,
      eval_at_start=False))  # also evaluate (and, with best_metric, keep) step 0
  # Scale-out (mrl_jax.train.sharding): a ("data", "fsdp") mesh; -1 takes the remaining devices.
  config.mesh = ml_collections.ConfigDict(dict(
      shape=(-1, 1),  # data parallel; e.g. (2, 4) also splits large arrays over 4
      fsdp_min_size=2**16))  # with fsdp > 1: arrays of at least this many elements are split
  config.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=1000, max_to_keep=2,  # >= 1: the latest kept (plus the best one)
      async_save=True,  # write checkpoints in the background
      # Restore steps without a checksums record unchecked (else refused, naming this field).
      allow_unverified=False,
      best_metric=placeholder(str),  # e.g. "top1/dim_8": also keep the best eval step
      best_mode="max"))  # or "min" (for a loss)
  return config


BINARY_ESTIMATORS = ("tanh", "ste")  # mrl_jax.losses.binary.ESTIMATORS


def add_binary_aware(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The binary-aware fields of a task that trains embeddings, all off (weights 0).

  ``spread_out_weight``: Zhang et al.'s global orthogonal regularizer per nested dim;
  ``binary_weight``: the contrastive loss on relaxed sign codes per nested dim,
  ``binary_estimator`` ``"tanh"`` (``tanh(u / binary_temperature)``) or ``"ste"``
  (sign forward, straight-through backward): :mod:`mrl_jax.losses.binary`.
  """
  config.spread_out_weight = 0.0
  config.binary_weight = 0.0
  config.binary_estimator = "tanh"
  config.binary_temperature = 1.0
  return config


def validate_binary_aware(config: ml_collections.ConfigDict) -> bool:
  """Check the fields of :func:`add_binary_aware`; True when a term is on.

  ``.get`` with the defaults: configs saved before these fields resume with them off.

  Raises:
    ValueError: naming the field: a negative weight, an unknown estimator, a
      temperature that is not a finite number > 0.
  """
  on = False
  for name in ("spread_out_weight", "binary_weight"):
    on |= non_negative(config.get(name, 0.0), name) > 0
  choice(config.get("binary_estimator", "tanh"), "binary_estimator", BINARY_ESTIMATORS)
  temperature = config.get("binary_temperature", 1.0)
  if not (_is_number(temperature) and math.isfinite(temperature) and temperature > 0):
    raise ValueError(f"config.binary_temperature={temperature!r} must be a finite number > 0")
  return on


NONE_VALUES = ("None", "none", "null")


def split_none_overrides(argv: list[str], flag: str = "config") -> tuple[list[str], list[str]]:
  """Take the ``--config.FIELD=None`` arguments out of ``argv`` (ml_collections cannot parse
  ``None`` for a typed field: ``invalid literal for int()``).

  Returns:
    ``(the other arguments, the FIELD names)``; give the names to
    :func:`apply_none_overrides` once the config is parsed.
  """
  rest, fields = [], []
  for arg in argv:
    name, eq, value = arg.partition("=")
    if eq and name.startswith(f"--{flag}.") and value in NONE_VALUES:
      fields.append(name.removeprefix(f"--{flag}."))
    else:
      rest.append(arg)
  return rest, fields


def apply_none_overrides(config: ml_collections.ConfigDict, fields: list[str]) -> None:
  """Set each dotted ``field`` of ``config`` to None (see :func:`split_none_overrides`).

  Raises:
    ValueError: naming a field the config does not have, or one that cannot be None.
  """
  for field in fields:
    *scopes, leaf = field.split(".")
    node = config
    for scope in scopes:
      if not isinstance(node, ml_collections.ConfigDict) or scope not in node:
        raise ValueError(f"--config.{field}=None: the config has no field {field!r}")
      node = node[scope]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise ValueError(f"--config.{field}=None: the config has no field {field!r}")
    try:
      with node.unlocked() if node.is_locked else contextlib.nullcontext():
        node[leaf] = None
    except (TypeError, ValueError) as e:
      raise ValueError(f"--config.{field}=None: config.{field} cannot be None ({e})") from None


@contextlib.contextmanager
def _importable_from(directory: str):
  """Let a config file import its sibling configs (``from configs import digits_mlp``)."""
  sys.path.insert(0, directory)
  try:
    yield
  finally:
    with contextlib.suppress(ValueError):
      sys.path.remove(directory)


class _NoneOr:
  """A config-flag parser that reads ``None`` as None, anything else with ``inner``."""

  def __init__(self, inner: Any):
    self.inner = inner

  def parse(self, argument: Any) -> Any:
    return None if argument == "None" else self.inner.parse(argument)

  def flag_type(self) -> str:
    return self.inner.flag_type()


def accept_none_on_command_line() -> None:
  """Let ``--config.X=None`` set any int, float, str or tuple field to None.

  ml_collections parses an override with the field's type, so ``None`` is an
  error for an int placeholder (``--config.ff_dim=None``), the string ``"None"``
  for a str one (``--config.eval_file=None``) and ``(None,)`` for a tuple. Called
  by the command-line entry point (``train.py``) before flags are parsed; the
  specs then refuse None where a field is not optional, naming it. A str field
  can no longer be the literal text ``None``.
  """
  from absl import flags
  from ml_collections import config_flags

  for kind, inner in ((int, flags.IntegerParser()), (float, flags.FloatParser()),
                      (str, flags.ArgumentParser()), (tuple, _tuple_parser())):
    config_flags.register_flag_parser_for_type(kind, _NoneOr(inner))


def _tuple_parser() -> Any:
  from ml_collections.config_flags import tuple_parser

  return tuple_parser.TupleParser()


def load_config_file(path: str, **overrides: Any) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file (e.g. ``configs/digits_mlp.py``), then ``overrides``.

  The programmatic twin of ``--config=path --config.FIELD=VALUE`` for notebooks
  and scripts. Nested fields are overridden with dicts:
  ``load_config_file(p, encoder={"embed_dim": 32})``. The folder above the
  file's folder is importable while it loads, so configs may import each other.

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: an override names a field the config does not have.
  """
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config file at {path}")
  spec = importlib.util.spec_from_file_location(
      f"mrl_jax_config_{os.path.splitext(os.path.basename(path))[0]}", path)
  module = importlib.util.module_from_spec(spec)
  with _importable_from(os.path.dirname(os.path.dirname(path))):
    spec.loader.exec_module(module)
  config = module.get_config()
  specs.check_no_moved_fields(overrides)
  for key, value in overrides.items():
    if key not in config:
      raise ValueError(f"config has no field {key!r}; fields: {sorted(config.keys())}")
    if isinstance(value, dict):
      config[key].update(value)
    else:
      config[key] = value
  return config


def validate_config(config: ml_collections.ConfigDict, task: type[Task],
                    num_devices: int | None = None) -> ml_collections.ConfigDict:
  """Check ``config`` and return a locked copy with derived fields filled in.

  Shared fields are checked here, then the task's own by its ``validate``
  (which also derives ``encoder.embed_dim`` and the nesting when they are None).

  Args:
    config: a config from one of the ``configs/*.py`` files.
    task: the :class:`~mrl_jax.train.task.Task` class that ``config.task`` names
      (the caller looks it up: :func:`mrl_jax.experiments.validate_config`).
    num_devices: number of devices in the mesh; the global batch must divide
      evenly over them.

  Raises:
    ValueError: naming the offending field and value (``config.NAME=value``).
  """
  config = ml_collections.ConfigDict(config.to_dict())  # a mutable copy
  if config.get("task") != task.name:
    raise ValueError(f"config.task={config.get('task')!r} but the task given is {task.name!r}")
  _check_shared(config, num_devices)
  task.validate(config)
  if config.encoder.get("embed_dim") is None:
    raise ValueError(f"the {config.task!r} task did not set config.encoder.embed_dim")
  task.parse_spec(config)  # unknown fields and wrong types refused here, by name
  config.lock()
  return config


def _check_shared(config: ml_collections.ConfigDict, num_devices: int | None) -> None:
  specs.check_no_moved_fields(config.keys())
  for name, cls in (("optim", specs.OptimSpec), ("loop", specs.LoopSpec),
                    ("mesh", specs.MeshSpec), ("checkpoint", specs.CheckpointSpec)):
    specs.parse(cls, dict(config.get(name) or {}), f"config.{name}")
  batch = positive_int(config.batch_size, "batch_size")
  if num_devices and batch % num_devices:
    raise ValueError(f"config.batch_size={batch} does not divide evenly over {num_devices} "
                     "devices")
  loop = config.loop
  if loop.num_train_steps is not None:
    if loop.num_epochs is not None:
      # Documented precedence (a step count wins, e.g. --config.loop.num_train_steps=7 over a
      # paper config's epochs), said out loud: a --config.loop.num_epochs=E is never lost.
      warnings.warn(f"config.loop.num_epochs={loop.num_epochs!r} is ignored: "
                    f"config.loop.num_train_steps={loop.num_train_steps} is set and wins; to "
                    "train by epochs pass --config.loop.num_train_steps=None", UserWarning,
                    stacklevel=2)
    loop.num_epochs = None


def fill_nesting(config: ml_collections.ConfigDict, embed_dim: int) -> Nesting:
  """Set ``config.encoder.embed_dim`` and the validated, ascending ``config.nesting``.

  Raises:
    ValueError: naming ``config.nesting`` and the problem (a dim above
      ``embed_dim``, a duplicate, a non-finite weight, ...).
  """
  config.encoder.embed_dim = positive_int(embed_dim, "encoder.embed_dim")
  dims = config.nesting.dims
  try:
    if dims is None:
      dims = default_dims(embed_dim, start=config.nesting.get("start", 8))
    nesting = Nesting(tuple(dims), config.nesting.weights, embed_dim=embed_dim)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.nesting: {e}") from None
  config.nesting.dims = nesting.dims
  config.nesting.weights = nesting.weights
  return nesting


def nesting_of(config: ml_collections.ConfigDict) -> Nesting:
  """The validated :class:`Nesting` of a config passed through :func:`validate_config`."""
  return Nesting(tuple(config.nesting.dims), config.nesting.weights,
                 embed_dim=config.encoder.embed_dim)


def mesh_spec_of(config: ml_collections.ConfigDict) -> specs.MeshSpec:
  """``config.mesh`` typed (needed before :func:`validate_config`: the batch must divide
  over the mesh).

  Raises:
    ValueError: naming the field.
  """
  specs.check_no_moved_fields(config.keys())
  return specs.parse(specs.MeshSpec, dict(config.get("mesh") or {}), "config.mesh")


def spec_of(config: ml_collections.ConfigDict) -> specs.RunSpec:
  """The typed :class:`~mrl_jax.train.specs.RunSpec` of a config passed through
  :func:`validate_config` (what the loop, the optimiser and checkpoints read)."""
  return specs.run_spec(config, nesting_of(config))


def to_json(config: ml_collections.ConfigDict) -> str:
  """A stable JSON rendering (tuples become lists) for metadata and comparisons."""
  return json.dumps(plain(config.to_dict()), sort_keys=True, indent=1)


def plain(x: Any) -> Any:
  """A JSON-able copy: tuples become lists, unknown objects their str()."""
  if isinstance(x, dict):
    return {str(k): plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [plain(v) for v in x]
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  return str(x)


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def positive_int(value: Any, name: str) -> int:
  """``value`` if it is an int >= 1, else a ValueError naming ``config.<name>``."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"config.{name} must be a positive int, got {value!r}")
  return value


def non_negative(value: Any, name: str) -> float:
  """``value`` if it is a finite number >= 0, else a ValueError naming ``config.<name>``."""
  if not (_is_number(value) and math.isfinite(value) and value >= 0):
    raise ValueError(f"config.{name} must be a finite number >= 0, got {value!r}")
  return float(value)


def probability(value: Any, name: str) -> float:
  """``value`` if it is a number in [0, 1), else a ValueError naming ``config.<name>``."""
  if not (_is_number(value) and 0.0 <= value < 1.0):
    raise ValueError(f"config.{name}={value!r} must be in [0, 1)")
  return float(value)


def choice(value: Any, name: str, choices: tuple) -> Any:
  """``value`` if it is one of ``choices``, else a ValueError naming ``config.<name>``."""
  if value not in choices:
    raise ValueError(f"config.{name}={value!r}; choose one of {choices}")
  return value
