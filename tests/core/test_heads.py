import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrl_jax.core.heads import FixedFeatureHead, MRLHead
from mrl_jax.core.prefix_matmul import naive_prefix_matmul, prefix_matmul

DIM_LISTS = [(1, 2, 4, 8, 16), (8, 16), (3, 5, 12), (16,), (2, 6)]


def _naive_numpy(x, w, dims):
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  return np.stack([x[:, :m] @ w[:m] for m in dims])


@pytest.mark.parametrize("dims", DIM_LISTS)
def test_prefix_matmul_matches_per_dim_matmuls(dims):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(len(dims)), 3)
  x = jax.random.normal(kx, (6, 16))
  w = jax.random.normal(kw, (16, 5))
  np.testing.assert_allclose(prefix_matmul(x, w, dims), _naive_numpy(x, w, dims),
                             rtol=1e-5, atol=1e-5)
  # Gradients: the hand-written VJP against autodiff of the per-dim version.
  g = jax.random.normal(kg, (len(dims), 6, 5))
  grad = lambda fn: jax.grad(lambda x, w: jnp.sum(fn(x, w, dims) * g), argnums=(0, 1))(x, w)
  for got, want in zip(grad(prefix_matmul), grad(naive_prefix_matmul), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_prefix_matmul_under_jit_and_bf16():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8)).astype(jnp.bfloat16)
  w = jax.random.normal(jax.random.PRNGKey(1), (8, 3)).astype(jnp.bfloat16)
  out = jax.jit(prefix_matmul, static_argnums=2)(x, w, (2, 8))
  assert out.dtype == jnp.bfloat16 and out.shape == (2, 4, 3)
  np.testing.assert_allclose(np.asarray(out, np.float32), _naive_numpy(x, w, (2, 8)),
                             rtol=2e-2, atol=5e-2)


def test_prefix_matmul_rejects_bad_shapes():
  with pytest.raises(ValueError, match="exceeds the inner size"):
    prefix_matmul(jnp.ones((2, 4)), jnp.ones((4, 3)), (2, 8))
  with pytest.raises(ValueError, match=r"x\[B, D\] and w\[D, C\]"):
    prefix_matmul(jnp.ones((2, 4)), jnp.ones((5, 3)), (2, 4))


def test_mrl_e_head_equals_naive_per_dim_computation():
  dims = (2, 4, 8, 16)
  z = jax.random.normal(jax.random.PRNGKey(0), (7, 16))
  head = MRLHead(num_classes=10, dims=dims, tied=True)
  params = head.init(jax.random.PRNGKey(1), z)["params"]
  # One kernel [D, C] and ONE shared bias: no extra parameters.
  assert jax.tree.map(jnp.shape, params) == {"kernel": (16, 10), "bias": (10,)}
  params = {"kernel": params["kernel"], "bias": jax.random.normal(jax.random.PRNGKey(2), (10,))}
  logits = head.apply({"params": params}, z)
  k, b = np.asarray(params["kernel"], np.float64), np.asarray(params["bias"], np.float64)
  want = np.stack([np.asarray(z, np.float64)[:, :m] @ k[:m] + b for m in dims])
  assert logits.shape == (4, 7, 10)
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


def test_mrl_head_has_one_classifier_per_dim():
  dims = (8, 16, 32, 64)
  z = jax.random.normal(jax.random.PRNGKey(0), (3, 64))
  head = MRLHead(num_classes=1000, dims=dims)
  variables = head.init(jax.random.PRNGKey(1), z)
  shapes = jax.tree.map(jnp.shape, variables["params"])
  assert shapes == {f"head_{m}": {"kernel": (m, 1000), "bias": (1000,)} for m in dims}
  n_weights = sum(np.prod(s["kernel"]) for s in shapes.values())
  assert n_weights == sum(dims) * 1000
  logits = head.apply(variables, z)
  p = variables["params"]
  want = np.stack([z[:, :m] @ p[f"head_{m}"]["kernel"] + p[f"head_{m}"]["bias"] for m in dims])
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
  # Each head reads only its prefix: changing z beyond m leaves logits_m alone.
  z2 = z.at[:, 8:].set(0.0)
  np.testing.assert_allclose(head.apply(variables, z2)[0], logits[0], rtol=1e-6)


def test_fixed_feature_head_reads_only_its_prefix():
  z = jax.random.normal(jax.random.PRNGKey(0), (3, 16))
  head = FixedFeatureHead(num_classes=5, dim=4)
  variables = head.init(jax.random.PRNGKey(1), z)
  assert variables["params"]["head"]["kernel"].shape == (4, 5)
  out = head.apply(variables, z)
  np.testing.assert_allclose(out, head.apply(variables, z.at[:, 4:].set(9.0)), rtol=1e-6)
  assert out.shape == (3, 5)


def test_heads_reject_too_small_embedding():
  with pytest.raises(ValueError, match="only 8"):
    MRLHead(3, (4, 16)).init(jax.random.PRNGKey(0), jnp.ones((2, 8)))
  with pytest.raises(ValueError, match=r"z\[B, D\]"):
    FixedFeatureHead(3, 4).init(jax.random.PRNGKey(0), jnp.ones((2, 3, 8)))


@pytest.mark.parametrize("make,match", [
    (lambda: MRLHead(0, (4, 8)), "num_classes must be a positive int, got 0"),
    (lambda: MRLHead(3.5, (4, 8)), "num_classes must be a positive int"),
    (lambda: MRLHead(3, (4, 4)), "distinct, got 4 more than once"),
    (lambda: MRLHead(3, (0, 4)), "positive ints, got 0"),
    (lambda: MRLHead(3, (4, 8), dtype=jnp.int32), "floating dtype"),
    (lambda: FixedFeatureHead(-1, 4), "num_classes must be a positive int"),
    (lambda: FixedFeatureHead(3, 0), "dim must be a positive int, got 0"),
])
def test_heads_refuse_bad_arguments_by_name(make, match):
  with pytest.raises(ValueError, match=match):
    make().init(jax.random.PRNGKey(0), jnp.ones((2, 8)))


def test_heads_refuse_integer_embeddings_and_take_dims_in_any_order():
  with pytest.raises(ValueError, match="floating embedding"):
    MRLHead(3, (4, 8)).init(jax.random.PRNGKey(0), jnp.ones((2, 8), jnp.int32))
  z = jax.random.normal(jax.random.PRNGKey(0), (3, 8))
  head = MRLHead(5, (8, 2, 4), tied=True)
  variables = head.init(jax.random.PRNGKey(1), z)
  k = np.asarray(variables["params"]["kernel"])
  want = np.stack([np.asarray(z)[:, :m] @ k[:m] for m in (2, 4, 8)])  # ascending order
  np.testing.assert_allclose(head.apply(variables, z), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims,match", [
    ((4, 2), "strictly increasing"), ((2, 2), "strictly increasing"), ((), "non-empty"),
    ((0, 4), "positive ints"), ((2.0, 4), "positive ints"),
])
def test_prefix_matmul_refuses_bad_dims(dims, match):
  with pytest.raises(ValueError, match=match):
    prefix_matmul(jnp.ones((2, 4)), jnp.ones((4, 3)), dims)
