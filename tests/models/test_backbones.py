import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testutil import run_python

from configs import cifar10_resnet18, imagenet_resnet50, imagenet_vit_b16
from mrl_jax import experiments, models
from mrl_jax.models.norm import SubBatchNorm, batch_norm
from mrl_jax.models.resnet import ResidualBlock, ResNet, resnet_embed_dim
from mrl_jax.models.vit import ViT


def _num_params(config, num_classes: int, image_size: int) -> int:
  """Parameter count of the config's classifier, from shapes only (no real init)."""
  model = models.build_classifier(experiments.validate_config(config), num_classes)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)), train=False))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def test_resnet50_has_the_standard_parameter_count():
  config = imagenet_resnet50.get_config()
  config.head, config.ff_dim = "ff", 2048  # the ordinary 1000-class classifier
  plain = _num_params(config, 1000, 224)
  assert plain == 25_557_032  # torchvision's ResNet-50: 23,508,032 + 2048 x 1000 + 1000
  config.head = "mrl_e"  # weight-tied: no extra parameters
  assert _num_params(config, 1000, 224) == plain
  config.head = "mrl"  # one classifier per nesting dim: sum(M) x C weights + M x C biases
  dims = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
  assert _num_params(config, 1000, 224) == plain - 2048_000 - 1000 + sum(dims) * 1000 + 9000


def test_other_backbones_have_their_standard_parameter_counts():
  cifar = cifar10_resnet18.get_config()
  cifar.head = "ff"
  assert _num_params(cifar, 10, 32) == 11_173_962  # ResNet-18 with the CIFAR stem
  vit = imagenet_vit_b16.get_config()
  vit.head = "ff"
  assert _num_params(vit, 1000, 224) == 86_567_656  # ViT-B/16 (timm's count)


def test_resnet_embedding_size_and_options_are_checked():
  x = jnp.ones((1, 32, 32, 3))
  with pytest.raises(ValueError, match="set embed_dim=512"):
    jax.eval_shape(lambda: ResNet(embed_dim=2048, depth=18).init(jax.random.PRNGKey(0), x))
  assert resnet_embed_dim(50) == 2048 and resnet_embed_dim(18, width=4) == 32
  with pytest.raises(ValueError, match="depth=42"):
    jax.eval_shape(lambda: ResNet(depth=42).init(jax.random.PRNGKey(0), x))


@pytest.mark.parametrize("bottleneck", [False, True])
def test_zero_init_residual_blocks_start_as_the_identity(bottleneck, fast_prng):
  conv = lambda *a, **kw: nn.Conv(*a, use_bias=False, **kw)
  block = ResidualBlock(4 if bottleneck else 16, strides=1, bottleneck=bottleneck, conv=conv,
                        norm=batch_norm(train=True, group_size=None, dtype=jnp.float32),
                        zero_init_residual=True)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 4, 4, 16))  # >= 0, so relu(x) = x
  variables = jax.jit(block.init)(jax.random.PRNGKey(1), x)
  last = "bn3" if bottleneck else "bn2"
  assert not np.any(variables["params"][last]["scale"])
  assert np.all(variables["params"]["bn1"]["scale"] == 1)
  y, _ = jax.jit(lambda v, x: block.apply(v, x, mutable=["batch_stats"]))(variables, x)
  np.testing.assert_allclose(y, x, atol=1e-6)


def _norm_apply(module, x):
  variables = module.init(jax.random.PRNGKey(0), x)
  variables = jax.tree.map(lambda v: v + 0.5, variables)  # non-trivial scale/bias/stats
  return module.apply(variables, x, mutable=["batch_stats"]), variables


def test_sub_batch_norm_with_one_group_is_batch_norm():
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 3, 3, 4)) * 3 + 1
  (y, stats), _ = _norm_apply(SubBatchNorm(group_size=8), x)
  (y_ref, stats_ref), _ = _norm_apply(nn.BatchNorm(use_running_average=False, momentum=0.9), x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), stats, stats_ref)


def test_sub_batch_norm_normalises_each_group_on_its_own():
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 3, 3, 4))
  x = x.at[4:].multiply(5.0).at[4:].add(2.0)  # the second "device" sees other statistics
  (y, stats), variables = _norm_apply(SubBatchNorm(group_size=4), x)
  bn = nn.BatchNorm(use_running_average=False, momentum=0.9)
  halves = [bn.apply(variables, x[i:i + 4], mutable=["batch_stats"]) for i in (0, 4)]
  np.testing.assert_allclose(y, jnp.concatenate([h[0] for h in halves]), rtol=1e-5, atol=1e-5)
  # Running statistics: the mean over groups of each group's update.
  want = jax.tree.map(lambda a, b: (a + b) / 2, halves[0][1], halves[1][1])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), stats, want)
  # Eval uses the running statistics, whatever the batch.
  evaluated = SubBatchNorm(group_size=4, use_running_average=True).apply(variables, x[:3])
  reference = nn.BatchNorm(use_running_average=True).apply(variables, x[:3])
  np.testing.assert_allclose(evaluated, reference, rtol=1e-5, atol=1e-5)


def test_sub_batch_norm_rejects_batches_that_do_not_split():
  with pytest.raises(ValueError, match="batch of 6 does not split into BatchNorm groups of 4"):
    SubBatchNorm(group_size=4).init(jax.random.PRNGKey(0), jnp.ones((6, 2)))
  assert batch_norm(train=True, group_size=None, dtype=jnp.float32).func is nn.BatchNorm


def test_resnet_per_group_statistics_change_training_not_the_parameters(fast_prng):
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 3))
  x = x.at[2:].multiply(3.0)
  kw = dict(embed_dim=32, depth=18, width=4, stem="cifar")
  global_bn, grouped = ResNet(**kw), ResNet(bn_group_size=2, **kw)
  variables = jax.jit(global_bn.init)(jax.random.PRNGKey(0), x[:1])
  assert jax.tree.structure(jax.eval_shape(grouped.init, jax.random.PRNGKey(0), x[:1])) == \
      jax.tree.structure(variables)
  train = lambda model, x: model.apply(variables, x, train=True, mutable=["batch_stats"])[0]
  z_global = jax.jit(train, static_argnums=0)(global_bn, x)
  z_grouped = jax.jit(train, static_argnums=0)(grouped, x)
  assert z_grouped.shape == (4, 32) and z_grouped.dtype == jnp.float32
  z_first = jax.jit(train, static_argnums=0)(grouped, x[:2])
  np.testing.assert_allclose(z_grouped[:2], z_first, rtol=1e-4, atol=1e-5)  # groups independent
  assert not np.allclose(z_grouped, z_global, atol=1e-3)
  evaluate = jax.jit(lambda model, x: model.apply(variables, x), static_argnums=0)
  np.testing.assert_allclose(evaluate(global_bn, x), evaluate(grouped, x), rtol=1e-5,
                             atol=1e-6)  # eval: the same model


def test_vit_pools_a_token_and_uses_dropout_only_in_training(fast_prng):
  model = ViT(embed_dim=16, patch_size=8, num_layers=1, num_heads=2, mlp_dim=32,
              dropout_rate=0.5)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  assert variables["params"]["pos_embedding"].shape == (1, 5, 16)  # class token + 4 patches
  apply = jax.jit(model.apply, static_argnames="train")
  z = apply(variables, x)
  assert z.shape == (2, 16) and z.dtype == jnp.float32
  np.testing.assert_array_equal(z, apply(variables, x))
  z_train = apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  assert not np.allclose(z, z_train)
  with pytest.raises(ValueError, match="multiples of 8"):
    model.apply(variables, jnp.ones((1, 12, 12, 3)))
  mean = model.clone(pool="mean")
  shapes = jax.eval_shape(mean.init, jax.random.PRNGKey(0), x)
  assert shapes["params"]["pos_embedding"].shape == (1, 4, 16) and "cls" not in shapes["params"]
  assert jax.eval_shape(mean.apply, shapes, x).shape == (2, 16)


def test_every_backbone_is_registered_for_the_shared_heads():
  assert {"mlp", "cnn", "resnet", "vit"} <= set(models.ENCODERS)


MESH_BATCH_NORM = """
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
from mrl_jax.train import sharding
from mrl_jax.models.norm import batch_norm
mesh = sharding.make_mesh()
assert mesh.size == 4
x = jax.random.normal(jax.random.PRNGKey(0), (8, 3)) * jnp.arange(1, 9)[:, None]
xs = jax.device_put(x, sharding.batch_sharding(mesh))
def train(group_size, x):
  norm = batch_norm(train=True, group_size=group_size, dtype=jnp.float32)()
  variables = norm.init(jax.random.PRNGKey(0), x[:2])
  return norm.apply(variables, x, mutable=["batch_stats"])[0]
for group_size, groups in ((None, 1), (2, 4)):  # global default; per device
  got = jax.jit(train, static_argnums=0)(group_size, xs)
  want = jnp.concatenate([train(None, part) for part in jnp.split(x, groups)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_batch_norm_is_global_over_the_mesh_unless_grouped_per_device():
  assert run_python(MESH_BATCH_NORM, devices=4).strip().endswith("ok")
