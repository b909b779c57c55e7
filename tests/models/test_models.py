import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testutil import tiny_config

from mrl_jax import experiments, models
from mrl_jax.core.heads import FixedFeatureHead, MRLHead


@pytest.mark.parametrize("name,kwargs", [("mlp", dict(hidden=(16,))), ("cnn", dict(features=(4,)))])
def test_encoders_return_an_embedding(name, kwargs):
  encoder = models.ENCODERS[name](embed_dim=12, **kwargs)
  x = jnp.ones((3, 8, 8, 1))
  variables = encoder.init(jax.random.PRNGKey(0), x)
  assert encoder.apply(variables, x).shape == (3, 12)


@pytest.mark.parametrize("head,rows", [("mrl", 4), ("mrl_e", 4), ("ff", 1)])
def test_classifier_gives_nested_logits_from_one_embedding(head, rows):
  config = experiments.validate_config(tiny_config("unused", head=head))
  model = models.build_classifier(config, num_classes=10)
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 8, 8, 1))
  variables = model.init(jax.random.PRNGKey(1), x)
  logits, z = model.apply(variables, x, return_embedding=True)
  assert logits.shape == (rows, 5, 10) and z.shape == (5, 16)
  np.testing.assert_allclose(model.apply(variables, x, method=models.Classifier.embed), z)
  # The logits are the head applied to that same embedding (one backbone forward).
  head_module = model.head
  head_logits = head_module.apply({"params": variables["params"]["head"]}, z)
  np.testing.assert_allclose(logits, head_logits if head != "ff" else head_logits[None],
                             rtol=1e-6)
  want = (config.ff_dim,) if head == "ff" else config.nesting.dims
  assert models.head_dims(head_module) == want


def test_build_classifier_picks_head_and_dtype():
  config = experiments.validate_config(tiny_config("unused", head="mrl_e", half_precision=True))
  model = models.build_classifier(config, 3)
  assert isinstance(model.head, MRLHead) and model.head.tied
  assert model.head.dtype == jnp.bfloat16
  ff = models.build_classifier(experiments.validate_config(
      tiny_config("unused", head="ff", ff_dim=4)), 3)
  assert isinstance(ff.head, FixedFeatureHead) and ff.head.dim == 4
  bad = experiments.validate_config(tiny_config("unused"))
  bad.unlock()
  bad.encoder.name = "resnet9000"
  with pytest.raises(ValueError, match="unknown encoder 'resnet9000'"):
    models.build_classifier(bad, 3)
