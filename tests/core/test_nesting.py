import numpy as np
import pytest

from mrl_jax.core.nesting import Nesting, default_dims


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
    (dict(dims=(8, 8)), r"distinct, got 8 more than once in \[8, 8\]"),
    (dict(dims=(64, 8, 16, 8)), "distinct, got 8 more than once"),
    (dict(dims=(0, 8)), "positive ints, got 0"),
    (dict(dims=(8, 16.5)), "positive ints, got 16.5"),
    (dict(dims=(8, True)), "positive ints, got True"),
    (dict(dims=(8, 16), weights=(1.0,)), "got 1 weights for 2 nesting dims"),
    (dict(dims=(8, 16), weights=(1.0, -1.0)), "positive and finite, got -1.0"),
    (dict(dims=(8, 16), weights=(1.0, float("nan"))), "positive and finite, got nan"),
    (dict(dims=(8, 16), weights=(1.0, "a")), "numbers, got 'a'"),
    (dict(dims=(8, 16), weights=(1.0, float("inf"))), "positive and finite, got inf"),
    # Issue 15: --config.nesting.weights='(1.0, nan, 1.0, 1.0)' reaches Nesting as the
    # 1-tuple ml_collections makes of a non-literal, and was reported as "got 1 weights".
    (dict(dims=(8, 16, 32, 64), weights=("(1.0, nan, 1.0, 1.0)",)),
     r"positive and finite, got nan in \[1.0, nan, 1.0, 1.0\]"),
    (dict(dims=(8, 16, 32, 64), weights="(1.0, nan, 1.0, 1.0)"), "positive and finite, got nan"),
    (dict(dims=(8, 16), weights=("(1.0, x)",)), "numbers, got 'x'"),
    (dict(dims=(8, 16), weights="(1.0, 2.0, 3.0)"), "got 3 weights for 2 nesting dims"),
    (dict(dims=(8, 128), embed_dim=64), "128 is larger than the embedding size embed_dim=64"),
])
def test_nesting_validation_names_the_bad_value(kwargs, match):
  with pytest.raises(ValueError, match=match):
    Nesting(**kwargs)


def test_dims_in_any_order_are_stored_ascending_with_their_weights():
  # sentence-transformers users write the dims largest first.
  n = Nesting([768, 512, 256, 128, 64], weights=[5.0, 4.0, 3.0, 2.0, 1.0], embed_dim=768)
  assert n.dims == (64, 128, 256, 512, 768)
  assert n.weights == (1.0, 2.0, 3.0, 4.0, 5.0)
  m = Nesting((16, 4, 8), weights=(0.5, 2.0, 1.0))
  assert dict(zip(m.dims, m.weights, strict=True)) == {16: 0.5, 4: 2.0, 8: 1.0}
  assert Nesting((16, 4, 8)) == Nesting((4, 8, 16))


def test_weights_from_a_flag_string_and_numpy_values_are_accepted():
  # ml_collections hands a literal tuple over as is, a non-literal one as a 1-tuple string.
  assert Nesting((8, 16), weights=("(2.0, 0.5)",)).weights == (2.0, 0.5)
  assert Nesting((8, 16), weights=np.array([2.0, 0.5])).weights == (2.0, 0.5)
  assert Nesting((8, 16), weights=(np.float32(2.0), 1)).weights == (2.0, 1.0)


def test_the_curated_top_level_api_resolves_every_name():
  import mrl_jax

  for name in mrl_jax.__all__:
    assert getattr(mrl_jax, name) is not None, name
