import pytest
from testutil import REPO, tiny_config

from mrl_jax import experiments
from mrl_jax.train import config as config_lib


def test_derived_fields_are_filled_in():
  config = experiments.validate_config(tiny_config("unused"))
  assert config.nesting.dims == (2, 4, 8, 16)
  assert config.nesting.weights == (1.0,) * 4
  ff = experiments.validate_config(tiny_config("unused", head="ff"))
  assert ff.ff_dim == 16


@pytest.mark.parametrize("overrides,match", [
    (dict(head="mrl2"), "config.head='mrl2'"),
    (dict(head="ff", ff_dim=32), "ff_dim=32 is larger than config.encoder.embed_dim=16"),
    (dict(optimizer="lamb"), "optimizer='lamb'"),
    (dict(schedule="step"), "schedule='step'"),
    (dict(label_smoothing=1.0), "label_smoothing=1.0"),
    (dict(batch_size=0), "batch_size must be a positive int, got 0"),
    (dict(num_train_steps=None), "set config.loop.num_train_steps or config.loop.num_epochs"),
    (dict(log_every_steps=0), "log_every_steps must be a positive int"),
])
def test_bad_fields_are_named(overrides, match):
  with pytest.raises(ValueError, match=match):
    experiments.validate_config(tiny_config("unused", **overrides))


def test_nesting_is_validated_against_the_embedding():
  config = tiny_config("unused")
  config.nesting.dims = (4, 32)
  with pytest.raises(ValueError, match="nesting dim 32 is larger than the embedding size"):
    experiments.validate_config(config)
  config.nesting.dims = (8, 4, 8)
  with pytest.raises(ValueError, match="8"):
    experiments.validate_config(config)
  config.nesting.dims = (4, 8)
  config.nesting.weights = (1.0,)
  with pytest.raises(ValueError, match="1 weights for 2 nesting dims"):
    experiments.validate_config(config)


def test_batch_must_divide_over_devices():
  with pytest.raises(ValueError, match="batch_size=32 does not divide evenly over 3 devices"):
    experiments.validate_config(tiny_config("unused"), num_devices=3)


def test_load_config_file_applies_overrides(tmp_path):

  config = config_lib.load_config_file(f"{REPO}/configs/digits_mlp.py", head="mrl_e",
                                       encoder={"embed_dim": 32})
  assert config.head == "mrl_e" and config.encoder.embed_dim == 32
  assert config.encoder.name == "mlp"
  with pytest.raises(FileNotFoundError, match="no config file"):
    config_lib.load_config_file(str(tmp_path / "nope.py"))
  with pytest.raises(ValueError, match="no field 'foo'"):
    config_lib.load_config_file(f"{REPO}/configs/digits_mlp.py", foo=1)
  # A config that imports another config loads from any working directory.
  imagenet = config_lib.load_config_file(f"{REPO}/configs/cifar10_resnet18.py")
  assert imagenet.task == "classification"


def test_every_shipped_config_validates_and_its_step_count_can_be_overridden():
  import glob


  for path in sorted(glob.glob(f"{REPO}/configs/*.py")):
    config = config_lib.load_config_file(path)
    if config.loop.get("num_epochs") is not None:  # README: every field overridable
      config.loop.num_epochs, config.loop.num_train_steps = None, 7
    if config.task == "adaptor":
      continue  # needs an embeddings file
    assert experiments.validate_config(config).loop.num_train_steps is not None, path
