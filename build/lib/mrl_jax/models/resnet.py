"""ResNet-18/34/50/101/152 backbones that return the pooled feature as the embedding.

ResNet v1.5 (the stride of a down-sampling bottleneck sits on its 3x3 conv, as
in torchvision and the paper's reference), channels-last ``[B, H, W, C]``.
The representation is the globally average-pooled output of the last stage,
``[B, 8 * width * expansion]`` (2048 for ResNet-50), with no projection: the
MRL heads read its prefixes directly, as in the paper.

Options: the CIFAR stem (3x3 conv, stride 1, no max-pool) for 32x32 inputs;
zero-initialised ``scale`` of the last BatchNorm of every residual branch;
global-batch or per-sub-batch BatchNorm statistics (:mod:`mrl_jax.models.norm`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrl_jax.models.norm import batch_norm

Dtype = Any

# Residual blocks per stage for each standard depth.
STAGE_SIZES: dict[int, tuple[int, ...]] = {
    18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
STEMS = ("imagenet", "cifar")

# torchvision's conv initialisation (He, fan-out).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def uses_bottleneck(depth: int) -> bool:
  """ResNet-50 and deeper use 1x1-3x3-1x1 bottleneck blocks (expansion 4)."""
  return depth >= 50


def resnet_embed_dim(depth: int, width: int = 64) -> int:
  """Size of the pooled feature: ``8 * width`` channels, times 4 for bottleneck nets."""
  return 8 * width * (4 if uses_bottleneck(depth) else 1)


class ResidualBlock(nn.Module):
  """A basic (3x3-3x3) or bottleneck (1x1-3x3-1x1, x4) residual block.

  Attributes:
    features: width of the block's 3x3 conv.
    strides: 1, or 2 to halve the spatial size.
    bottleneck: bottleneck block (output ``4 * features``) or basic block.
    conv: conv factory (dtype and initialiser bound).
    norm: BatchNorm factory (:func:`mrl_jax.models.norm.batch_norm`).
    zero_init_residual: initialise the last BatchNorm's scale to 0, so the
      block starts as the identity.
  """

  features: int
  strides: int
  bottleneck: bool
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``x [B, H, W, C_in] -> [B, H / strides, W / strides, C_out]``."""
    s = (self.strides, self.strides)
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    if self.bottleneck:
      out_features = 4 * self.features
      y = nn.relu(self.norm(name="bn1")(self.conv(self.features, (1, 1), name="conv1")(x)))
      y = self.conv(self.features, (3, 3), s, padding=((1, 1), (1, 1)), name="conv2")(y)
      y = nn.relu(self.norm(name="bn2")(y))
      y = self.conv(out_features, (1, 1), name="conv3")(y)
      y = self.norm(name="bn3", scale_init=last_scale)(y)
    else:
      out_features = self.features
      y = self.conv(self.features, (3, 3), s, padding=((1, 1), (1, 1)), name="conv1")(x)
      y = nn.relu(self.norm(name="bn1")(y))
      y = self.conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
      y = self.norm(name="bn2", scale_init=last_scale)(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != out_features:
      shortcut = self.conv(out_features, (1, 1), s, name="proj_conv")(x)
      shortcut = self.norm(name="proj_bn")(shortcut)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """A ResNet encoder: ``x [B, H, W, C] -> z [B, embed_dim]`` (the pooled feature).

  Attributes:
    embed_dim: ``D``; must equal :func:`resnet_embed_dim` of ``depth`` and
      ``width`` (2048 for ResNet-50), since the paper puts no projection
      after the pooled feature. It is stated in the config so that the
      nesting list can be validated without building the model.
    depth: 18, 34, 50, 101 or 152.
    width: channels of the first stage (64 standard; smaller for tests).
    stem: ``"imagenet"`` (7x7/2 conv, 3x3/2 max-pool) or ``"cifar"`` (3x3/1
      conv, no pooling).
    zero_init_residual: zero ``scale`` of the last BatchNorm of each block.
    bn_group_size: ``None``: BatchNorm statistics over the whole global batch
      (across devices); an int: over each consecutive group of that many
      examples (set ``batch_size // num_devices`` for per-device statistics).
    bn_momentum: running-average decay (0.9 = PyTorch's momentum 0.1).
    bn_epsilon: BatchNorm epsilon.
    dtype: compute dtype (bf16 for mixed precision); parameters stay float32.
  """

  embed_dim: int = 2048
  depth: int = 50
  width: int = 64
  stem: str = "imagenet"
  zero_init_residual: bool = False
  bn_group_size: int | None = None
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """``x [B, H, W, C] -> z [B, embed_dim]`` (float32)."""
    stages = self._check()
    if x.ndim != 4:
      raise ValueError(f"ResNet takes images [B, H, W, C], got shape {x.shape}")
    conv = _conv_factory(self.dtype)
    norm = batch_norm(train=train, group_size=self.bn_group_size, dtype=self.dtype,
                      momentum=self.bn_momentum, epsilon=self.bn_epsilon)
    x = x.astype(self.dtype)
    if self.stem == "imagenet":
      x = conv(self.width, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      x = conv(self.width, (3, 3), padding=((1, 1), (1, 1)), name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
    for i, num_blocks in enumerate(stages):
      for j in range(num_blocks):
        x = ResidualBlock(self.width * 2**i, strides=2 if i > 0 and j == 0 else 1,
                          bottleneck=uses_bottleneck(self.depth), conv=conv, norm=norm,
                          zero_init_residual=self.zero_init_residual,
                          name=f"stage{i + 1}_block{j + 1}")(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

  def _check(self) -> Sequence[int]:
    if self.depth not in STAGE_SIZES:
      raise ValueError(f"ResNet depth={self.depth}; choose one of {sorted(STAGE_SIZES)}")
    if self.stem not in STEMS:
      raise ValueError(f"ResNet stem={self.stem!r}; choose one of {STEMS}")
    want = resnet_embed_dim(self.depth, self.width)
    if self.embed_dim != want:
      raise ValueError(
          f"encoder.embed_dim={self.embed_dim} but ResNet-{self.depth} with width "
          f"{self.width} has a {want}-d pooled feature (no projection): set embed_dim={want}")
    return STAGE_SIZES[self.depth]


def _conv_factory(dtype: Dtype) -> Callable[..., nn.Module]:
  def conv(features: int, kernel: tuple[int, int], strides: tuple[int, int] = (1, 1), *,
           padding: Any = "VALID", name: str) -> nn.Module:
    return nn.Conv(features, kernel, strides, padding=padding, use_bias=False, dtype=dtype,
                   kernel_init=conv_init, name=name)
  return conv
