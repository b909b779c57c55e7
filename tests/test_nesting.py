import numpy as np
import pytest

from mrl_jax.nesting import Nesting, default_dims


def test_default_dims_is_the_papers_list():
  assert default_dims(2048) == tuple(2**i for i in range(3, 12))
  assert default_dims(64, start=1) == (1, 2, 4, 8, 16, 32, 64)
  assert default_dims(768, start=64) == (64, 128, 256, 512, 768)
  assert default_dims(8) == (8,)


@pytest.mark.parametrize("embed_dim,start,match", [
    (0, 8, "embed_dim"), (64, 3, "power of two"), (4, 8, "larger than embed_dim"),
])
def test_default_dims_errors(embed_dim, start, match):
  with pytest.raises(ValueError, match=match):
    default_dims(embed_dim, start=start)


def test_nesting_defaults_and_accessors():
  n = Nesting((8, 16, 32), embed_dim=32)
  assert n.weights == (1.0, 1.0, 1.0)
  assert n.num_dims == 3
  np.testing.assert_array_equal(n.weights_array(), np.ones(3, np.float32))
  assert n.index(16) == 1
  with pytest.raises(ValueError, match=r"valid dims: \[8, 16, 32\]"):
    n.index(12)
  assert Nesting([1, 2], weights=[2, 0.5]).weights == (2.0, 0.5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(dims=()), "non-empty"),
    (dict(dims="816"), "non-empty"),
    (dict(dims=(8, 8)), "strictly increasing, got 8 after 8"),
    (dict(dims=(16, 8)), "strictly increasing, got 8 after 16"),
    (dict(dims=(0, 8)), "positive ints, got 0"),
    (dict(dims=(8, 16.5)), "positive ints, got 16.5"),
    (dict(dims=(8, True)), "positive ints, got True"),
    (dict(dims=(8, 16), weights=(1.0,)), "got 1 weights for 2 nesting dims"),
    (dict(dims=(8, 16), weights=(1.0, -1.0)), "positive and finite, got -1.0"),
    (dict(dims=(8, 16), weights=(1.0, float("nan"))), "positive and finite, got nan"),
    (dict(dims=(8, 16), weights=(1.0, "a")), "numbers, got 'a'"),
    (dict(dims=(8, 128), embed_dim=64), "128 is larger than the embedding size embed_dim=64"),
])
def test_nesting_validation_names_the_bad_value(kwargs, match):
  with pytest.raises(ValueError, match=match):
    Nesting(**kwargs)
