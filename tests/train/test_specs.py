"""Typed run specs: every shared field parsed once, by type, moved names refused by place."""

import json
import os
import subprocess
import sys

import pytest
from testutil import REPO, tiny_config

from mrl_jax import experiments
from mrl_jax.train import specs
from mrl_jax.train.config import load_config_file, spec_of


def test_run_spec_is_typed_and_frozen():
  spec = spec_of(experiments.validate_config(tiny_config("unused")))
  assert spec.task == "classification" and spec.nesting.dims == (2, 4, 8, 16)
  assert spec.optim == specs.OptimSpec(optimizer="adamw", learning_rate=1e-2, warmup_steps=5)
  assert spec.loop.num_train_steps == 30 and spec.loop.num_epochs is None
  assert spec.mesh.shape == (-1, 1) and spec.checkpoint.every_steps == 10
  with pytest.raises(AttributeError):
    spec.optim.learning_rate = 1.0  # frozen
  json.dumps(spec.to_json())  # what checkpoint metadata stores


@pytest.mark.parametrize("section,values,match", [
    ("optim", {"optimizer": "lamb"}, r"config.optim.optimizer='lamb'; choose one of \('sgd'"),
    ("optim", {"learning_rate": float("nan")}, "config.optim.learning_rate must be a finite"),
    ("optim", {"warmup_steps": True}, "must be an int"),
    ("optim", {"momentum": 1.0}, r"momentum=1.0 must be in \[0, 1\)"),
    ("loop", {"num_train_steps": 0}, "config.loop.num_train_steps must be a positive int"),
    ("loop", {"num_train_steps": None, "num_epochs": None}, "set config.loop.num_train_steps"),
    ("mesh", {"shape": (2, "4")}, r"config.mesh.shape\[1\]='4' must be an int"),
    ("checkpoint", {"best_mode": "lowest"}, "best_mode='lowest'; choose one of"),
    ("checkpoint", {"every_step": 5}, "config.checkpoint has no field 'every_step'"),
])
def test_bad_values_are_named_by_place(section, values, match):
  config = tiny_config("unused")
  for k, v in values.items():
    config[section][k] = v
  with pytest.raises(ValueError, match=match):
    experiments.validate_config(config)


@pytest.mark.parametrize("cls,values,match", [
    (specs.OptimSpec, {"learning_rate": "0.1"},
     "x.learning_rate must be a finite number, got '0.1'"),
    (specs.OptimSpec, {"warmup_steps": 2.0}, r"x.warmup_steps=2.0 must be an int"),
    (specs.MeshSpec, {"shape": "2,4"}, r"x.shape='2,4' must be a tuple"),
    (specs.CheckpointSpec, {"async_save": "false"}, r"x.async_save='false' must be True or False"),
    (specs.LoopSpec, {"num_epochs": float("inf")}, "x.num_epochs must be a finite number"),
])
def test_the_parser_checks_json_types(cls, values, match):
  # What a ConfigDict cannot hold but a stored JSON config can: checked by type, by place.
  with pytest.raises(ValueError, match=match):
    specs.parse(cls, {"num_train_steps": 5, **values} if cls is specs.LoopSpec else values, "x")


def test_old_flat_names_say_where_they_moved():
  config = tiny_config("unused")
  config.learning_rate = 0.1  # a config file written before the namespaces
  with pytest.raises(ValueError, match="config.learning_rate moved to config.optim.learning_rate"):
    experiments.validate_config(config)
  with pytest.raises(ValueError, match="config.mesh_shape moved to config.mesh.shape"):
    load_config_file(os.path.join(REPO, "configs", "digits_mlp.py"), mesh_shape=(1, 1))
  got = subprocess.run(
      [sys.executable, "train.py", "--config=configs/digits_mlp.py", "--workdir=/nonexistent",
       "--config.checkpoint_every_steps=5"], cwd=REPO, capture_output=True, text=True)
  assert got.returncode == 2
  assert got.stderr.strip() == (
      "train.py: error: bad command line: "
      "config.checkpoint_every_steps moved to config.checkpoint.every_steps")


def test_an_earlier_flat_workdir_config_reads_in_place(tmp_path):
  flat = {"task": "classification", "learning_rate": 0.5, "num_train_steps": 7,
          "mesh_shape": [1, 1], "best_metric": "top1/dim_2", "optimizer": "sgd"}
  (tmp_path / "config.json").write_text(json.dumps(flat))
  config = experiments.load_workdir_config(str(tmp_path))
  assert config.optim.learning_rate == 0.5 and config.optim.optimizer == "sgd"
  assert config.loop.num_train_steps == 7 and tuple(config.mesh.shape) == (1, 1)
  assert config.checkpoint.best_metric == "top1/dim_2" and "learning_rate" not in config
