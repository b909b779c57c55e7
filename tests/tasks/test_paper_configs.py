"""The paper configs build and train on mocked TFDS data, shrunk to seconds on CPU."""

import numpy as np
import pytest
from testutil import mock_tfds

from configs import cifar10_resnet18, imagenet_resnet50, imagenet_vit_b16
from mrl_jax import experiments
from mrl_jax.train import optim
from mrl_jax.train.config import spec_of

MOCK_EXAMPLES = 8


def _shrink(config, data_dir: str, **encoder):
  """Same recipe and code paths; tiny images, encoder, batch and run."""
  config.data_dir = data_dir
  config.batch_size = 4
  config.loop.num_epochs = None
  config.loop.num_train_steps = 2
  config.shuffle_buffer = 8
  config.loop.log_every_steps = config.loop.eval_every_steps = config.checkpoint.every_steps = 2
  config.encoder.update(encoder)
  if config.input.style == "imagenet":
    config.input.image_size = 32
    config.input.size_multiple = 16
    if config.input.train_sizes is not None:
      config.input.train_sizes = (16, 32)
      config.input.ramp_epochs = (1.0, 2.0)
  return config


def _run(config, workdir: str):
  with mock_tfds(MOCK_EXAMPLES):  # mock examples, real file system (see conftest)
    experiment = experiments.create(config, workdir)
    return experiment, experiment.train(progress=False)


# imagenet_resnet50 trains in the progressive-resizing test below (with a tiny
# CNN) and, with its own bottleneck ResNet-50, in the slow test.
@pytest.mark.parametrize("module,encoder,dims", [
    (cifar10_resnet18, dict(embed_dim=32, width=4), [8, 16, 32]),
    (imagenet_vit_b16, dict(embed_dim=16, patch_size=8, num_layers=1, num_heads=2, mlp_dim=32),
     [8, 16]),
])
def test_config_trains_and_evaluates_on_mock_data(module, encoder, dims, tmp_path, fast_prng):
  config = _shrink(module.get_config(), str(tmp_path / "tfds"), **encoder)
  experiment, result = _run(config, str(tmp_path / "work"))
  assert result["step"] == 2 and result["dims"] == dims and result["task"] == "classification"
  assert result["eval"]["num_examples"] == MOCK_EXAMPLES
  assert np.all(np.isfinite(result["eval"]["loss_per_dim"]))
  assert experiment.config.half_precision  # the recipe's bf16 compute


@pytest.mark.slow
@pytest.mark.parametrize("head", ["mrl", "mrl_e", "ff"])
def test_resnet50_bottleneck_config_trains_each_head(head, tmp_path, fast_prng):
  config = _shrink(imagenet_resnet50.get_config(), str(tmp_path / "tfds"), embed_dim=64,
                   width=2, bn_group_size=2)
  config.head = head
  config.ff_dim = 16 if head == "ff" else None
  _, result = _run(config, str(tmp_path / "work"))
  assert result["dims"] == ([16] if head == "ff" else [8, 16, 32, 64])
  assert np.all(np.isfinite(result["eval"]["loss_per_dim"]))


def test_progressive_resizing_compiles_the_train_step_once_per_size(tmp_path, fast_prng):
  # The ImageNet recipe with a tiny CNN. 8 mock examples / batch 4 = 2 steps per
  # epoch: epochs 0-1 train at 16 px, epoch 2 at 32 px, evaluation at 32 px.
  config = _shrink(imagenet_resnet50.get_config(), str(tmp_path / "tfds"))
  config.encoder = dict(name="cnn", embed_dim=16, features=(4,))
  config.nesting.start = 4
  config.loop.num_train_steps = 6
  config.loop.log_every_steps = 1
  experiment, result = _run(config, str(tmp_path / "work"))
  assert result["step"] == 6 and result["eval"]["num_examples"] == MOCK_EXAMPLES
  assert np.all(np.isfinite(result["eval"]["loss_per_dim"]))
  assert experiment.train_step_fn._cache_size() == 2  # 16 px and 32 px, not once per step


def test_paper_learning_rate_at_its_key_points():
  config = experiments.validate_config(imagenet_resnet50.get_config())
  steps_per_epoch = 1_281_167 // 1024  # ImageNet-1K train at global batch 1024: 1251
  lr = optim.learning_rate_schedule(spec_of(config), steps_per_epoch)
  total, warmup = optim.total_and_warmup_steps(spec_of(config), steps_per_epoch)
  assert (total, warmup) == (40 * 1251, 2 * 1251)
  np.testing.assert_allclose(lr(0), 0.425 * 1e-4, rtol=1e-4)  # start: 1e-4 x peak
  np.testing.assert_allclose(lr(warmup), 0.425, rtol=1e-6)  # end of warm-up: the peak
  np.testing.assert_allclose(lr(warmup + (total - warmup) // 2), 0.425 / 2, rtol=1e-3)
  np.testing.assert_allclose(lr(total), 0.0, atol=1e-9)  # end: 0
  half = imagenet_resnet50.get_config()
  half.batch_size = 512
  spec = spec_of(experiments.validate_config(half))
  assert optim.peak_learning_rate(spec) == pytest.approx(0.2125)


def test_recipe_fields_match_the_paper():
  config = experiments.validate_config(imagenet_resnet50.get_config())
  optim_config = config.optim
  assert (optim_config.optimizer, optim_config.momentum, optim_config.weight_decay) == (
      "sgd", 0.9, 1e-4)
  assert (config.label_smoothing, config.batch_size, config.loop.num_epochs) == (0.1, 1024, 40.0)
  assert config.nesting.dims == (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
  assert config.input.train_sizes == (160, 192) and config.input.image_size == 224
  assert round(config.input.image_size / config.input.crop_ratio) == 256
  start16 = imagenet_resnet50.get_config()
  start16.nesting.start = 16
  assert experiments.validate_config(start16).nesting.dims[0] == 16
  assert list(config.nesting.weights) == [1.0] * 9
