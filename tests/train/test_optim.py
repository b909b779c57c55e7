import jax.numpy as jnp
import numpy as np
import optax
import pytest
from testutil import tiny_config

from mrl_jax import experiments
from mrl_jax.train import optim
from mrl_jax.train.config import spec_of


def _spec(config):
  return spec_of(experiments.validate_config(config))


def test_paper_schedule_key_points():
  # The paper: 1e-4 * peak at step 0, peak at the end of warm-up, 0 at the end.
  config = tiny_config("unused", schedule="warmup_linear", learning_rate=0.425,
                       num_train_steps=None, num_epochs=40.0, warmup_epochs=2.0)
  steps_per_epoch = 100
  lr = optim.learning_rate_schedule(_spec(config), steps_per_epoch)
  assert optim.total_and_warmup_steps(_spec(config), steps_per_epoch) == (4000, 200)
  np.testing.assert_allclose(lr(0), 0.425e-4, rtol=1e-4)
  np.testing.assert_allclose(lr(100), 0.425 * (1e-4 + (1 - 1e-4) * 0.5), rtol=1e-5)
  np.testing.assert_allclose(lr(200), 0.425, rtol=1e-6)
  np.testing.assert_allclose(lr(2100), 0.425 * 0.5, rtol=1e-5)
  np.testing.assert_allclose(lr(4000), 0.0, atol=1e-9)


def test_learning_rate_scales_with_batch():
  config = tiny_config("unused", learning_rate=0.425, learning_rate_batch_size=1024,
                       batch_size=256)
  assert optim.peak_learning_rate(_spec(config)) == pytest.approx(0.425 / 4)


def test_weight_decay_skips_biases_and_norm_scales():
  params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
            "bn": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
            "conv": {"kernel": jnp.ones((3, 3, 1, 2))}}
  mask = optim.weight_decay_mask(params)
  assert mask == {"dense": {"kernel": True, "bias": False},
                  "bn": {"scale": False, "bias": False}, "conv": {"kernel": True}}


def test_sgd_is_pytorch_style_coupled_decay():
  config = tiny_config("unused", optimizer="sgd", momentum=0.9, weight_decay=0.1)
  tx = optim.make_optimizer(_spec(config).optim, optax.constant_schedule(0.5))
  params = {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)}
  grads = {"kernel": jnp.full((2, 2), 1.0), "bias": jnp.full((2,), 1.0)}
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  # By hand: v1 = g + wd*p0; p1 = p0 - lr*v1; v2 = 0.9*v1 + g + wd*p1; p2 = p1 - lr*v2.
  p, v = 2.0, 0.0
  for _ in range(2):
    v = 0.9 * v + 1.0 + 0.1 * p
    p = p - 0.5 * v
  np.testing.assert_allclose(params["kernel"], p, rtol=1e-6)
  np.testing.assert_allclose(params["bias"], 2.0 - 0.5 * (1 + 1.9), rtol=1e-6)
