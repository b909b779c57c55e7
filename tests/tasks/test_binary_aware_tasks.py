"""The binary-aware terms in the classification and adaptor tasks: off by default (the loss
unchanged, bit for bit), and when on exactly the weighted reference terms on the task's own
embeddings (classification's ``z`` with labels; the adaptor's ``f(e)`` with neighbours or pairs).
The pairs task's are tested in ``test_pairs_binary_aware.py``."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testutil import REPO, tiny_config

from mrl_jax import experiments
from mrl_jax.losses import (
  binary_relaxed_in_batch_softmax,
  binary_relaxed_supervised_contrastive,
  spread_out_regularizer,
)
from mrl_jax.train import config as config_lib
from mrl_jax.train import sharding as sharding_lib

ON = {"spread_out_weight": 0.3, "binary_weight": 0.7, "binary_temperature": 0.5}


def _loss(task, params, model_state, batch):
  loss, (_, metrics) = jax.jit(task.loss_and_metrics)(params, model_state, batch,
                                                      jax.random.PRNGKey(1))
  return loss, metrics


def _classification(**overrides):
  from mrl_jax.tasks.classification import ClassificationTask

  spec = experiments.task_spec(tiny_config("unused", **overrides))
  return ClassificationTask.without_data(spec, mesh=sharding_lib.make_mesh(), num_classes=4,
                                         input_shape=(8, 8, 1))


def test_classification_terms_are_the_weighted_references_on_z_and_off_by_default():
  off, on = _classification(), _classification(**ON)
  variables = off.init_variables(jax.random.PRNGKey(0))
  params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(16, 8, 8, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 4, 16), jnp.int32)}
  want, want_m = _loss(off, params, state, batch)
  zero, zero_m = _loss(_classification(spread_out_weight=0.0, binary_weight=0.0), params,
                       state, batch)
  assert np.asarray(zero).tobytes() == np.asarray(want).tobytes()
  assert set(zero_m) == set(want_m) == {"loss_per_dim", "top1_per_dim"}

  got, metrics = _loss(on, params, state, batch)
  _, z = off.model.apply(variables, batch["image"], train=True, return_embedding=True,
                         rngs={"dropout": jax.random.PRNGKey(1)}, mutable=list(state))[0]
  labels = np.asarray(batch["label"])
  same = labels[:, None] == labels[None, :]
  dims, w = on.dims, np.asarray(on.weights)
  gor = spread_out_regularizer(z, z, dims, non_matching=~same)
  sup = binary_relaxed_supervised_contrastive(z, same, dims, scale=20.0, temperature=0.5)
  np.testing.assert_allclose(metrics["spread_out_per_dim"], gor, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics["binary_loss_per_dim"], sup, rtol=1e-4)
  np.testing.assert_allclose(got, want + 0.3 * np.sum(w * gor) + 0.7 * np.sum(w * sup),
                             rtol=1e-5)


def _adaptor(tmp_path, supervised=False, **overrides):
  from mrl_jax.tasks.adaptor import AdaptorTask

  rng = np.random.default_rng(0)
  x = rng.normal(size=(120, 16)).astype(np.float32)
  np.save(tmp_path / "x.npy", x)
  config = config_lib.load_config_file(os.path.join(REPO, "configs", "adaptor.py"))
  config.embeddings_file, config.batch_size, config.k = str(tmp_path / "x.npy"), 16, 3
  config.nesting.dims, config.adaptor.init = (4, 8, 16), "identity"
  if supervised:
    np.save(tmp_path / "q.npy", (x[:60] + 0.1 * rng.normal(size=(60, 16))).astype(np.float32))
    np.save(tmp_path / "p.npy", np.stack([np.arange(60), np.arange(60)], 1))
    config.queries_file, config.pairs_file = str(tmp_path / "q.npy"), str(tmp_path / "p.npy")
    config.pair_batch_size = 8
  for key, value in overrides.items():
    config[key] = value
  return AdaptorTask(experiments.task_spec(config), workdir=str(tmp_path),
                     mesh=sharding_lib.make_mesh())


@pytest.mark.parametrize("supervised", [False, True])
def test_adaptor_terms_are_the_weighted_references_on_the_adapted_embeddings(tmp_path,
                                                                              supervised):
  off = _adaptor(tmp_path, supervised)
  on = _adaptor(tmp_path, supervised, **ON)
  # A non-identity adaptor so that f(e) differs from e.
  params = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(jax.random.PRNGKey(7), v.shape),
                        off.init_variables(jax.random.PRNGKey(0))["params"])
  batch = jax.tree.map(jnp.asarray, next(off.train_batches(0)))
  want, want_m = _loss(off, params, {}, batch)
  got, metrics = _loss(on, params, {}, batch)
  assert "binary_loss_per_dim" not in want_m
  adapt = lambda v: off.model.apply({"params": params}, v)
  dims, w = off.dims, np.ones(3)
  if supervised:  # the (query, document) pairs
    q, d = adapt(batch["queries"]), adapt(batch["documents"])
    gor = spread_out_regularizer(q, d, dims)
    rel = binary_relaxed_in_batch_softmax(q, d, dims, scale=20.0, temperature=0.5)
  else:  # rows; positives: each row's 3 nearest rows by full-size cosine, by a numpy loop
    e = np.asarray(batch["embeddings"], np.float64)
    unit = e / np.linalg.norm(e, axis=1, keepdims=True)
    cos = unit @ unit.T
    positive = np.zeros(cos.shape, bool)
    for i, row in enumerate(cos):
      order = [j for j in np.argsort(-row) if j != i]
      positive[i, order[:3]] = True
    f = adapt(batch["embeddings"])
    gor = spread_out_regularizer(f, f, dims, non_matching=~positive & ~np.eye(16, dtype=bool))
    rel = binary_relaxed_supervised_contrastive(f, positive, dims, scale=20.0, temperature=0.5)
  np.testing.assert_allclose(metrics["spread_out_per_dim"], gor, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics["binary_loss_per_dim"], rel, rtol=1e-4)
  np.testing.assert_allclose(got, want + 0.3 * np.sum(w * gor) + 0.7 * np.sum(w * rel),
                             rtol=1e-5)


def test_bad_binary_aware_fields_name_the_field_in_every_task():
  for overrides, match in (({"spread_out_weight": -1.0}, "config.spread_out_weight"),
                           ({"binary_temperature": 0.0}, "config.binary_temperature"),
                           ({"binary_estimator": "sign"}, "binary_estimator")):
    with pytest.raises(ValueError, match=match):
      experiments.validate_config(tiny_config("unused", **overrides))
