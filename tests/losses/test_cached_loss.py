"""GradCache (losses.cached): the same loss and parameter gradients as the full batch."""

import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testutil import run_python

from mrl_jax import losses
from mrl_jax.models.text import BertConfig, TextEncoder

DIMS = (4, 8, 16)
CONFIG = BertConfig(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2,
                    intermediate_size=32, max_position_embeddings=8,
                    hidden_dropout=0.2, attention_dropout=0.2)
MODEL = TextEncoder(CONFIG)


def _ids(rng, *shape):
  ids = rng.integers(1, CONFIG.vocab_size, size=shape)
  ids[..., -2:] *= rng.integers(0, 2, size=shape[:-1] + (2,))  # some padding
  return jnp.asarray(ids, jnp.int32)


def _inputs(n, k=2, seq=6, seed=0):
  rng = np.random.default_rng(seed)
  return {"anchor": _ids(rng, n, seq), "positive": _ids(rng, n, seq),
          "negative": _ids(rng, n, k, seq)}


def _embed_fn(train):
  """``embed_fn(params, inputs_chunk, rng) -> {"anchor", "positive", "negative"}``."""

  def encode(params, ids, key):
    flat = ids.reshape(-1, ids.shape[-1])
    rngs = {"dropout": key} if train else {}
    out = MODEL.apply({"params": params}, flat, (flat > 0).astype(jnp.int32), train=train,
                      rngs=rngs)
    return out.reshape(ids.shape[:-1] + out.shape[-1:])

  def embed(params, x, rng):
    keys = jax.random.split(rng, 3) if train else (None,) * 3
    return {name: encode(params, x[name], key)
            for name, key in zip(("anchor", "positive", "negative"), keys, strict=True)}

  return embed


def _loss_fn(symmetric=False):
  def loss(e):
    per_dim = losses.nested_in_batch_softmax_per_dim(
        e["anchor"], e["positive"], DIMS, negatives=e["negative"], symmetric=symmetric)
    return jnp.sum(per_dim), per_dim
  return loss


def _params():
  x = _inputs(2)
  return MODEL.init(jax.random.key(0), x["anchor"], x["anchor"] > 0)["params"]


def _assert_trees_close(got, want, rtol=1e-5):
  """Every leaf within ``rtol`` of the reference, relative to the largest gradient entry.

  (Some leaves, e.g. the attention key bias, have an exactly-zero gradient in theory:
  float noise there is measured against the gradient's overall scale.)
  """
  scale = max(float(np.abs(w).max()) for w in jax.tree.leaves(want))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64),
                               rtol=rtol, atol=rtol * scale)


def test_cached_equals_full_batch_with_dropout_and_hard_negatives():
  # A tiny BERT with dropout on, the fused nested symmetric loss with hard negatives.
  params, inputs, rng = _params(), _inputs(8), jax.random.key(1)
  embed, loss_fn = _embed_fn(train=True), _loss_fn(symmetric=True)
  cached = jax.jit(lambda p, x, r: losses.cached_value_and_grad(
      embed, loss_fn, p, x, r, mini_batch_size=2))
  (loss, per_dim), grads = cached(params, inputs, rng)

  # The full-batch reference with the same rng plumbing (chunk c embedded with fold_in(rng, c)):
  # autodiff straight through every chunk, all activations kept.
  def full(p):
    return loss_fn(losses.embed_in_chunks(embed, p, inputs, rng, mini_batch_size=2))

  (want_loss, want_per_dim), want_grads = jax.jit(jax.value_and_grad(full, has_aux=True))(params)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(per_dim, want_per_dim, rtol=1e-5)
  _assert_trees_close(grads, want_grads)
  assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))
  # Dropout is on: another key changes the loss (so the test would see mismatched masks).
  other = cached(params, inputs, jax.random.key(2))[0][0]
  assert abs(float(other) - float(loss)) > 1e-6


def test_cached_equals_unchunked_full_batch_without_dropout():
  # No dropout: the cached gradient is the plain full-batch one (no chunking at all).
  rng = np.random.default_rng(3)
  x = {"a": rng.normal(size=(12, 8)), "p": rng.normal(size=(12, 8)),
       "n": rng.normal(size=(12, 3, 8))}
  x = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), x)
  model = _MLP()
  params = model.init(jax.random.key(0), x["a"], False)["params"]
  embed = lambda p, xs, r: jax.tree.map(lambda v: model.apply({"params": p}, v, False), xs)

  def loss_fn(e):
    return losses.nested_in_batch_softmax(e["a"], e["p"], (16, 2, 8), (1.0, 2.0, 0.5),
                                          negatives=e["n"]), None

  (loss, _), grads = jax.jit(lambda p: losses.cached_value_and_grad(
      embed, loss_fn, p, x, None, mini_batch_size=4))(params)
  (want, _), want_grads = jax.value_and_grad(
      lambda p: loss_fn(embed(p, x, None)), has_aux=True)(params)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  _assert_trees_close(grads, want_grads)


def test_chunks_are_strided_and_rows_come_back_in_order():
  x = jnp.arange(12.0)[:, None] * jnp.ones((1, 3))
  out = losses.embed_in_chunks(lambda p, c, r: c * p, 2.0, x, None, mini_batch_size=3)
  np.testing.assert_array_equal(out, 2.0 * x)
  # Chunk c holds rows c, c + C, c + 2C (C = 4 chunks of 3 rows).
  firsts = jax.jit(lambda v: losses.cached_value_and_grad(
      lambda p, c, r: jnp.where(c == c[0], p, 0.0) * c,  # keeps the chunk's first row only
      lambda e: (jnp.sum(e), None), 1.0, v, None, mini_batch_size=3))(jnp.arange(12.0))
  # d/dp sum_c first_row(c) = sum of the first rows 0 + 1 + 2 + 3 (strided), not 0+3+6+9.
  np.testing.assert_allclose(firsts[1], 0.0 + 1.0 + 2.0 + 3.0)


@pytest.mark.parametrize("inputs,mini_batch_size,match", [
    ({"a": jnp.ones((10, 3))}, 4, "N=10 is not a multiple of mini_batch_size=4"),
    ({"a": jnp.ones((8, 3)), "b": jnp.ones((6, 3))}, 2, "same leading batch axis"),
    ({"a": jnp.ones((8, 3))}, 0, "mini_batch_size must be a positive int"),
    ({}, 2, "at least one array"),
])
def test_bad_batches_are_refused(inputs, mini_batch_size, match):
  with pytest.raises(ValueError, match=match):
    losses.cached_value_and_grad(lambda p, x, r: x, lambda e: (0.0, None), 1.0, inputs, None,
                                 mini_batch_size=mini_batch_size)


def test_embeddings_must_keep_the_chunk_axis_and_loss_must_be_scalar():
  x = {"a": jnp.ones((8, 3))}
  with pytest.raises(ValueError, match="leading axis mini_batch_size=2"):
    losses.cached_value_and_grad(lambda p, x, r: jnp.sum(x["a"]) * p,
                                 lambda e: (e, None), 1.0, x, None, mini_batch_size=2)
  with pytest.raises(ValueError, match="scalar loss"):
    losses.cached_value_and_grad(lambda p, x, r: x["a"] * p, lambda e: (e, None), 1.0, x,
                                 None, mini_batch_size=2)


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    x = nn.Dropout(0.3)(nn.relu(nn.Dense(32)(x)), deterministic=not train)
    return nn.Dense(16)(x)


_SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from mrl_jax import losses
    from test_cached_loss import _MLP

    model = _MLP()
    rng = np.random.default_rng(0)
    x = {"a": rng.normal(size=(32, 8)).astype(np.float32),
         "p": rng.normal(size=(32, 8)).astype(np.float32),
         "n": rng.normal(size=(32, 2, 8)).astype(np.float32)}
    params = model.init(jax.random.key(0), x["a"], False)["params"]
    embed = lambda p, xs, k: jax.tree.map(
        lambda v, key: model.apply({"params": p}, v, True, rngs={"dropout": key}),
        xs, dict(zip(("a", "n", "p"), jax.random.split(k, 3))))
    loss_fn = lambda e: (losses.nested_in_batch_softmax(e["a"], e["p"], (4, 16),
                                                         negatives=e["n"]), None)
    step = jax.jit(lambda p, xs, k: losses.cached_value_and_grad(
        embed, loss_fn, p, xs, k, mini_batch_size=8))
    key = jax.random.key(1)
    (want, _), want_g = step(params, x, key)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    (got, _), got_g = step(params, sharded, key)
    assert len(sharded["a"].sharding.device_set) == 8
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    print("OK")
""")


def test_cached_step_is_the_same_on_a_batch_sharded_mesh():
  assert "OK" in run_python(_SHARDED, devices=8)
