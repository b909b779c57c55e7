"""prefix_matmul_nt: nested prefix products against a transposed right operand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrl_jax.core.prefix_matmul import prefix_matmul, prefix_matmul_nt


@pytest.mark.parametrize("dims", [(1, 2, 4, 8, 16), (3, 5, 12), (16,)])
def test_prefix_matmul_nt_matches_per_dim_products_and_gradients(dims):
  kx, ky, kg = jax.random.split(jax.random.PRNGKey(len(dims)), 3)
  x = jax.random.normal(kx, (6, 16))
  y = jax.random.normal(ky, (5, 16))
  xn, yn = np.asarray(x, np.float64), np.asarray(y, np.float64)
  want = np.stack([xn[:, :m] @ yn[:, :m].T for m in dims])
  np.testing.assert_allclose(prefix_matmul_nt(x, y, dims), want, rtol=1e-5, atol=1e-5)
  g = jax.random.normal(kg, (len(dims), 6, 5))
  naive = lambda x, y: jnp.stack([x[:, :m] @ y[:, :m].T for m in dims])
  grad = lambda fn: jax.jit(jax.grad(lambda x, y: jnp.sum(fn(x, y) * g), argnums=(0, 1)))(x, y)
  fused = grad(lambda x, y: prefix_matmul_nt(x, y, dims))
  for got, ref in zip(fused, grad(naive), strict=True):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  # Same as prefix_matmul on the explicitly transposed operand.
  np.testing.assert_allclose(prefix_matmul_nt(x, y, dims), prefix_matmul(x, y.T, dims),
                             rtol=1e-6, atol=1e-6)


def test_prefix_matmul_nt_rejects_bad_shapes():
  with pytest.raises(ValueError, match=r"x\[B, D\] and y\[N, D\]"):
    prefix_matmul_nt(jnp.ones((2, 4)), jnp.ones((4, 3)), (2, 4))
  with pytest.raises(ValueError, match="exceeds the inner size"):
    prefix_matmul_nt(jnp.ones((2, 4)), jnp.ones((3, 4)), (2, 8))
