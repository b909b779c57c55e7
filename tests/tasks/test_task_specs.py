"""Each task's typed spec: the shipped configs parse, bad values and unknown fields are named."""

import dataclasses
import glob
import os
import types
import typing

import pytest
from absl import flags
from ml_collections import config_flags
from testutil import REPO

from mrl_jax import tasks
from mrl_jax.tasks import specs as task_specs
from mrl_jax.train import config as config_lib
from mrl_jax.train.specs import SpecError

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def _load(name: str):
  return config_lib.load_config_file(os.path.join(REPO, "configs", f"{name}.py"))


def _parse(config):
  return tasks.get_task(config.task).parse_spec(config)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_shipped_config_parses_into_its_tasks_spec(path):
  config = config_lib.load_config_file(path)
  spec = _parse(config)
  assert isinstance(spec, tasks.get_task(config.task).spec_class)
  assert spec.task == config.task and spec.batch_size == config.batch_size
  assert spec.optim.learning_rate == config.optim.learning_rate
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.batch_size = 1


def test_nested_sections_are_typed_and_the_encoder_is_chosen_by_name():
  resnet = _parse(_load("imagenet_resnet50"))
  assert isinstance(resnet, task_specs.ClassificationSpec)
  assert isinstance(resnet.encoder, task_specs.ResNetEncoderSpec)
  assert (resnet.encoder.depth, resnet.encoder.bn_group_size) == (50, None)
  assert resnet.input.style == "imagenet" and resnet.input.train_sizes == (160, 192)
  assert isinstance(_parse(_load("imagenet_vit_b16")).encoder, task_specs.ViTEncoderSpec)
  digits = _parse(_load("digits_mlp"))
  assert digits.encoder == task_specs.MLPEncoderSpec(embed_dim=64, hidden=(256, 256))
  assert digits.input.style == "scale"  # no config.input: the default section
  pairs = _parse(_load("text_pairs"))
  # Before validation embed_dim keeps the placeholder None (a checkpoint sets it).
  assert pairs.encoder == dataclasses.replace(task_specs.TextEncoderSpec(), embed_dim=None)
  assert pairs.loss == "fused"
  adaptor = _parse(_load("adaptor"))
  assert adaptor.adaptor == task_specs.AdaptorModelSpec(hidden=(), activation="relu",
                                                        init="pca")


@pytest.mark.parametrize("name,field,value,match", [
    ("digits_mlp", "head", "mrl_x", r"config.head='mrl_x'; choose one of \('mrl', 'mrl_e', 'ff'\)"),
    ("digits_mlp", "input_pipeline", "tfdata", r"config.input_pipeline='tfdata'; choose one"),
    ("digits_mlp", "label_smoothing", "0.1", r"config.label_smoothing must be a finite number"),
    ("imagenet_resnet50", "encoder.depth", "50", r"config.encoder.depth='50' must be an int"),
    ("imagenet_resnet50", "encoder.stem", "tiny", r"config.encoder.stem='tiny'; choose one"),
    ("imagenet_resnet50", "encoder.name", "convnext", r"config.encoder.name='convnext'; choose"),
    ("imagenet_resnet50", "input.area_range", (0.1,), r"config.input.area_range=.* 2 entries"),
    ("text_pairs", "symmetric", "yes", r"config.symmetric='yes' must be True or False"),
    ("text_pairs", "pooling", "max", r"config.pooling='max'; choose one of \('mean', 'cls'\)"),
    ("text_pairs", "encoder.num_layers", 2.0, r"config.encoder.num_layers=2.0 must be an int"),
    ("adaptor", "adaptor.activation", "relu6", r"config.adaptor.activation='relu6'; choose"),
    ("adaptor", "gap", "cube", r"config.gap='cube'; choose one of"),
    ("adaptor", "nesting.dims", (8, "16"), r"config.nesting.dims\[1\]='16' must be an int"),
])
def test_a_wrong_type_or_choice_is_named_by_place(name, field, value, match):
  config = _load(name)
  section, _, leaf = field.rpartition(".")
  target = config[section] if section else config
  target.unlock() if hasattr(target, "unlock") else None
  with target.ignore_type():
    target[leaf] = value
  with pytest.raises(SpecError, match=match):
    _parse(config)


@pytest.mark.parametrize("name,field,match", [
    ("digits_mlp", "dropout", r"config has no field 'dropout'"),
    ("digits_mlp", "encoder.features", r"config.encoder has no field 'features'"),  # a CNN's
    ("imagenet_resnet50", "input.colour_jitter", r"config.input has no field 'colour_jitter'"),
    ("text_pairs", "temperature", r"config has no field 'temperature'"),
    ("adaptor", "adaptor.depth", r"config.adaptor has no field 'depth'"),
])
def test_an_unknown_field_is_refused_by_name(name, field, match):
  config = _load(name)
  section, _, leaf = field.rpartition(".")
  (config[section] if section else config)[leaf] = 1
  with pytest.raises(SpecError, match=match):
    _parse(config)


def _optional_fields(cls, prefix=""):
  """Dotted names of every field of ``cls`` (and its nested sections) that may be None."""
  for f in dataclasses.fields(cls):
    hint = typing.get_type_hints(cls)[f.name]
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union,
                                                                    types.UnionType) else ()
    if type(None) in options:
      yield prefix + f.name
    elif dataclasses.is_dataclass(hint):
      yield from _optional_fields(hint, f"{prefix}{f.name}.")


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_optional_field_of_a_shipped_config_is_settable_to_none(path):
  config = config_lib.load_config_file(path)
  spec_class = tasks.get_task(config.task).spec_class
  missing = []
  for name in _optional_fields(spec_class):
    section, _, leaf = name.rpartition(".")
    if section and section not in config:
      continue  # a section the config leaves at its defaults (digits has no config.input)
    if leaf not in (config[section] if section else config):
      missing.append(name)
  assert not missing, f"{os.path.basename(path)} has no placeholder for {missing}"


def _command_line(*overrides):
  """The config ``train.py`` builds from ``--config=configs/text_pairs.py OVERRIDES``."""
  argv = ["train.py", f"--config={REPO}/configs/text_pairs.py", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


def test_none_on_the_command_line_sets_optional_fields_of_every_type():
  config_lib.accept_none_on_command_line()
  spec = _parse(_command_line(
      "--config.eval_file=None",  # a str field
      "--config.pooling=None",  # a str placeholder
      "--config.train_weights=None",  # a tuple placeholder
      "--config.encoder.embed_dim=None",  # an int
      "--config.mini_batch_size=8"))
  assert spec.eval_file is None and spec.pooling is None and spec.train_weights is None
  assert spec.encoder.embed_dim is None and spec.mini_batch_size == 8
  assert _parse(_command_line("--config.mini_batch_size=None")).mini_batch_size is None
  with pytest.raises(SpecError, match=r"config.train_file=None must be a string"):
    _parse(_command_line("--config.train_file=None"))


def test_task_spec_json_is_plain_and_reparses():
  from mrl_jax.train import specs

  spec = _parse(_load("imagenet_resnet50"))
  plain = specs.as_json(spec)
  assert plain["encoder"]["name"] == "resnet" and plain["input"]["train_sizes"] == [160, 192]
  assert specs.parse(task_specs.ClassificationSpec, plain, "config") == spec
