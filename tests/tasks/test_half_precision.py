"""bf16 compute (``config.half_precision``) in every task: float32 parameters, optimizer
state and losses; the losses, norms and softmax accumulate in float32 given bf16 inputs."""

import copy
import os

import jax
import jax.numpy as jnp
import numpy as np
from testutil import REPO, tiny_config, tiny_text_config

from mrl_jax import experiments
from mrl_jax.core import ops
from mrl_jax.losses import (
  in_batch_softmax,
  l2_normalize,
  matryoshka,
  nested_in_batch_softmax_per_dim,
  nested_loss_per_dim,
)
from mrl_jax.losses.adaptor import adaptor_loss
from mrl_jax.models.text import BertConfig, TextEncoder, pool
from mrl_jax.train import config as config_lib
from mrl_jax.train import loop, optim
from mrl_jax.train import sharding as sharding_lib

DIMS = (4, 8, 32)


def _bf16(rng, *shape):
  """A bf16 array and its exact float64 values (the reference sees the same numbers)."""
  x = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
  return x, np.asarray(x.astype(jnp.float32), np.float64)


def _np_in_batch_softmax(a, p, scale=20.0):
  a = a / np.linalg.norm(a, axis=1, keepdims=True)
  p = p / np.linalg.norm(p, axis=1, keepdims=True)
  logits = scale * a @ p.T
  top = logits.max(1, keepdims=True)
  lse = top[:, 0] + np.log(np.exp(logits - top).sum(1))
  return float(np.mean(lse - np.diag(logits)))


def test_losses_norms_and_softmax_of_bf16_embeddings_are_float32_accumulations():
  rng = np.random.default_rng(0)
  (a, a64), (p, p64) = _bf16(rng, 64, 32), _bf16(rng, 64, 32)
  want = [_np_in_batch_softmax(a64[:, :m], p64[:, :m]) for m in DIMS]
  # A bf16 accumulation would be off by ~1e-2 relative; float32 is within ~1e-5.
  fused = nested_in_batch_softmax_per_dim(a, p, DIMS)
  assert fused.dtype == jnp.float32
  np.testing.assert_allclose(fused, want, rtol=2e-5)
  plain = in_batch_softmax(a, p)
  assert plain.dtype == jnp.float32
  np.testing.assert_allclose(plain, want[-1], rtol=2e-5)
  nested = matryoshka(in_batch_softmax, DIMS, embedding_args=(0, 1))(a, p)
  assert nested.dtype == jnp.float32
  np.testing.assert_allclose(nested, sum(want), rtol=2e-5)
  for out in (l2_normalize(a), ops.truncate_normalize(a, 8)):
    assert out.dtype == jnp.float32
    ref = a64[:, :out.shape[1]]
    np.testing.assert_allclose(out, ref / np.linalg.norm(ref, axis=1, keepdims=True),
                               rtol=1e-6, atol=1e-7)
  # Classification: bf16 nested logits [M, B, C] -> float32 log-softmax cross-entropy.
  logits, logits64 = _bf16(rng, 3, 16, 10)
  labels = rng.integers(0, 10, 16)
  shifted = logits64 - logits64.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  ce = nested_loss_per_dim(logits, jnp.asarray(labels))
  assert ce.dtype == jnp.float32
  np.testing.assert_allclose(ce, -logp[:, np.arange(16), labels].mean(1), rtol=1e-5)
  # Adaptor losses on bf16 embeddings: float32 terms.
  loss, terms = adaptor_loss(a, p, DIMS, k=4)
  assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in terms.values())


def test_mean_pooling_of_bf16_hidden_states_sums_in_float32():
  rng = np.random.default_rng(1)
  hidden, h64 = _bf16(rng, 4, 128, 16)
  mask = (np.arange(128)[None] < np.array([128, 100, 7, 1])[:, None]).astype(np.int32)
  out = pool(hidden, jnp.asarray(mask), "mean")
  assert out.dtype == jnp.float32
  want = (h64 * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
  assert pool(hidden, jnp.asarray(mask), "cls").dtype == jnp.float32


def test_bf16_text_encoder_gives_float32_embeddings_close_to_float32_compute():
  config = BertConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                      intermediate_size=64, max_position_embeddings=16, hidden_dropout=0.1,
                      attention_dropout=0.1)
  ids = jnp.asarray(np.random.default_rng(2).integers(5, 50, (4, 16)), jnp.int32)
  mask = jnp.ones_like(ids).at[1, 10:].set(0)
  full, half = TextEncoder(config), TextEncoder(config, dtype=jnp.bfloat16)
  params = full.init(jax.random.PRNGKey(0), ids, mask)["params"]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  want = full.apply({"params": params}, ids, mask)
  for train in (False, True):  # True: the dropout-attention path
    got = half.apply({"params": params}, ids, mask, train=train,
                     rngs={"dropout": jax.random.PRNGKey(3)})
    assert got.dtype == jnp.float32 and np.isfinite(np.asarray(got)).all()
  got = half.apply({"params": params}, ids, mask)
  np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05)


def _one_step(config, task):
  """``(loss, state)`` of one jitted train step of the loop on ``task``'s first batch;
  ``config`` is the task's spec."""
  mesh = task.mesh
  schedule = optim.learning_rate_schedule(config, task.steps_per_epoch)
  state = loop.create_train_state(task, jax.random.PRNGKey(0),
                                       optim.make_optimizer(config.optim, schedule), mesh)
  step = loop.jit_train_step(task, schedule, mesh, jax.tree.map(lambda x: x.sharding, state))
  batch = sharding_lib.as_global(next(task.train_batches(0)), sharding_lib.batch_sharding(mesh))
  state, metrics = step(state, batch)
  return float(metrics["loss"]), state


def _check_pair_of_runs(make_task, config):
  """The bf16 step's loss is finite, close to float32's; params and optimizer stay float32."""
  losses = {}
  for half in (False, True):
    c = copy.deepcopy(config)
    c.half_precision = half
    c = experiments.task_spec(c)
    task = make_task(c)
    loss, state = _one_step(c, task)
    assert np.isfinite(loss)
    floats = [x for x in jax.tree.leaves((state.params, state.opt_state))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)
    losses[half] = loss
  np.testing.assert_allclose(losses[True], losses[False], rtol=2e-2)
  return losses


def test_pairs_task_step_in_bf16(tmp_path):
  from mrl_jax.tasks.pairs import PairsTask

  config = tiny_text_config(batch_size=16, encoder={"dropout": 0.0})
  losses = _check_pair_of_runs(lambda c: PairsTask(c, workdir=str(tmp_path),
                                                   mesh=sharding_lib.make_mesh()), config)
  assert losses[True] != losses[False]  # the switch reached the encoder


def test_pairs_task_uses_bf16_in_the_encoder(tmp_path):
  from mrl_jax.tasks.pairs import PairsTask

  for half, dtype in ((False, jnp.float32), (True, jnp.bfloat16)):
    config = experiments.task_spec(tiny_text_config(half_precision=half))
    task = PairsTask(config, workdir=str(tmp_path), mesh=sharding_lib.make_mesh())
    assert task.model.dtype == dtype


def test_classification_task_step_in_bf16():
  from mrl_jax.tasks.classification import ClassificationTask

  config = tiny_config("unused", head="mrl")
  mesh = sharding_lib.make_mesh()
  rng = np.random.default_rng(0)
  images = rng.normal(size=(32, 8, 8, 1)).astype(np.float32)
  labels = rng.integers(0, 10, 32).astype(np.int32)

  def make(c):
    task = ClassificationTask.without_data(c, mesh=mesh, num_classes=10, input_shape=(8, 8, 1))
    task.train_batches = lambda start: iter([{"image": images, "label": labels}])
    return task

  _check_pair_of_runs(make, config)


def test_adaptor_task_step_in_bf16(tmp_path):
  from mrl_jax.tasks.adaptor import AdaptorTask

  path = str(tmp_path / "x.npy")
  np.save(path, np.random.default_rng(0).normal(size=(200, 32)).astype(np.float32))
  config = config_lib.load_config_file(os.path.join(REPO, "configs", "adaptor.py"))
  config.embeddings_file, config.batch_size, config.nesting.dims = path, 32, (8, 16, 32)
  config.adaptor.hidden, config.adaptor.init, config.eval_fraction = (16,), "identity", 0.2
  mesh = sharding_lib.make_mesh()
  tasks = {}

  def make(c):
    task = AdaptorTask(c, workdir=str(tmp_path), mesh=mesh)
    # Non-zero output layer: at its zero init f(e) = e and bf16 would not show.
    init = task.init_variables
    task.init_variables = lambda rng: jax.tree.map(
        lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(7), x.shape), init(rng))
    tasks[bool(c.half_precision)] = task
    return task

  losses = _check_pair_of_runs(make, config)
  assert tasks[True].model.dtype == jnp.bfloat16 and losses[True] != losses[False]
