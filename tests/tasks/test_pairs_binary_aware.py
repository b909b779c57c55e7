"""The pairs task's binary-aware terms: off by default (the loss unchanged), weighted per
nested dim when on, exact under GradCache, refused where unsupported, and trainable."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testutil import tiny_text_config

from mrl_jax import experiments
from mrl_jax.losses import binary_relaxed_in_batch_softmax, spread_out_regularizer
from mrl_jax.tasks.pairs import PairsTask
from mrl_jax.train import sharding as sharding_lib

NESTING = {"dims": (8, 16, 32), "weights": (1.0, 2.0, 0.5)}


def _task(tmp_path, **overrides):
  config = experiments.task_spec(tiny_text_config(nesting=NESTING, batch_size=8, **overrides))
  return PairsTask(config, workdir=str(tmp_path), mesh=sharding_lib.make_mesh())


def _batch(task):
  return jax.tree.map(jnp.asarray, next(task.train_batches(0)))


def test_terms_add_their_weighted_per_dim_values_and_are_off_by_default(tmp_path):
  off = _task(tmp_path / "off")
  zero = _task(tmp_path / "zero", spread_out_weight=0.0, binary_weight=0.0,
               binary_estimator="ste")
  on = _task(tmp_path / "on", spread_out_weight=0.3, binary_weight=0.7, binary_estimator="ste",
             binary_temperature=0.5)
  params = off.init_variables(jax.random.PRNGKey(0))["params"]
  batch, rng = _batch(off), jax.random.PRNGKey(1)
  want, (_, want_m) = jax.jit(off.loss_and_metrics)(params, {}, batch, rng)
  got, (_, got_m) = jax.jit(zero.loss_and_metrics)(params, {}, batch, rng)
  # Weights at 0: the same program, the same bits, no extra metrics.
  assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
  assert set(got_m) == set(want_m) == {"loss_per_dim"}

  loss, (_, metrics) = jax.jit(on.loss_and_metrics)(params, {}, batch, rng)
  embed = lambda col: on.model.apply({"params": params}, *(batch[col][k] for k in (
      "input_ids", "attention_mask", "token_type_ids")))
  a, p = embed("anchor"), embed("positive")
  gor = spread_out_regularizer(a, p, NESTING["dims"])
  bits = binary_relaxed_in_batch_softmax(a, p, NESTING["dims"], scale=20.0, temperature=0.5,
                                         estimator="ste")
  w = np.asarray(NESTING["weights"])
  np.testing.assert_allclose(metrics["spread_out_per_dim"], gor, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics["binary_loss_per_dim"], bits, rtol=1e-4)
  np.testing.assert_allclose(loss, want + 0.3 * np.sum(w * gor) + 0.7 * np.sum(w * bits),
                             rtol=1e-5)


def test_cached_step_equals_the_full_batch_step_with_the_terms_on(tmp_path):
  terms = {"spread_out_weight": 0.5, "binary_weight": 1.0}
  full = _task(tmp_path / "a", **terms)
  cached = _task(tmp_path / "b", mini_batch_size=2, **terms)
  params = full.init_variables(jax.random.PRNGKey(0))["params"]
  batch, rng = _batch(cached), jax.random.PRNGKey(3)  # one padded length
  (want, (_, want_m)), want_g = jax.jit(full.value_and_grad)(params, {}, batch, rng)
  (got, (_, got_m)), got_g = jax.jit(cached.value_and_grad)(params, {}, batch, rng)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got_m["binary_loss_per_dim"], want_m["binary_loss_per_dim"],
                             rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
               got_g, want_g)


def test_bad_binary_aware_fields_name_the_field():
  cases = [({"spread_out_weight": -1.0}, "config.spread_out_weight"),
           ({"binary_weight": float("nan")}, "config.binary_weight"),
           ({"binary_estimator": "sign"}, "config.binary_estimator"),
           ({"binary_temperature": 0.0}, "config.binary_temperature"),
           ({"binary_weight": 1.0, "loss": "2d"}, "not '2d'"),
           ({"shortlist_k": 9}, "config.shortlist_k"),
           ({"shortlist_k": True}, "shortlist_k")]
  for overrides, match in cases:
    with pytest.raises(ValueError, match=match):
      experiments.validate_config(tiny_text_config(**overrides))
  experiments.validate_config(tiny_text_config(loss="2d"))  # off: 2d as before


def test_one_training_step_with_the_binary_term_runs_and_changes_the_loss(tmp_path):
  out = {}
  for name, weight in (("off", 0.0), ("on", 1.0)):
    experiment = experiments.create(tiny_text_config(num_train_steps=1, binary_weight=weight),
                                    str(tmp_path / name))
    try:
      batch = sharding_lib.as_global(next(experiment.task.train_batches(0)),
                                     sharding=sharding_lib.batch_sharding(experiment.mesh))
      before = jax.tree.map(np.asarray, experiment.state.params)
      state, metrics = experiment.train_step_fn(experiment.state, batch)
      out[name] = jax.device_get(metrics)
      moved = jax.tree.map(lambda x, y: bool(np.any(np.asarray(x) != y)), state.params, before)
      assert bool(metrics["finite"]) and any(jax.tree.leaves(moved))
    finally:
      experiment.close()
  assert out["on"]["loss"] != out["off"]["loss"]
  assert "binary_loss_per_dim" in out["on"] and "binary_loss_per_dim" not in out["off"]
  np.testing.assert_allclose(out["on"]["loss_per_dim"], out["off"]["loss_per_dim"], rtol=1e-5)
