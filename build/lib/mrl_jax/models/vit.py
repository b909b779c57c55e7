"""Vision Transformer (ViT-B/16 by default) returning a pooled token as the embedding.

Patches of ``patch_size`` pixels are embedded by a strided conv, a learned
position embedding is added (its length is fixed by the image size at init:
train and evaluate at one resolution), then ``num_layers`` pre-LayerNorm
Transformer blocks and a final LayerNorm. The representation is the class
token (``pool="cls"``) or the mean of the patch tokens (``pool="mean"``, no
class token), ``[B, embed_dim]`` with no projection; the MRL heads read its
prefixes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
POOLS = ("cls", "mean")


class EncoderBlock(nn.Module):
  """Pre-LN self-attention and MLP sub-blocks, each with a residual connection.

  Attributes:
    num_heads: attention heads.
    mlp_dim: hidden width of the MLP.
    dropout_rate: dropout after attention and in the MLP (training only).
    dtype: compute dtype.
  """

  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """``x [B, N, D] -> [B, N, D]``."""
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="ln1")(x)
    y = nn.MultiHeadDotProductAttention(
        self.num_heads, dtype=self.dtype, dropout_rate=self.dropout_rate,
        deterministic=not train, name="attention")(y)
    x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="ln2")(x)
    y = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp1")(y))
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = nn.Dense(x.shape[-1], dtype=self.dtype, name="mlp2")(y)
    return x + nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class ViT(nn.Module):
  """A ViT encoder: ``x [B, H, W, C] -> z [B, embed_dim]``.

  Attributes:
    embed_dim: ``D``, the Transformer width (768 for ViT-B).
    patch_size: side of a square patch (16 for /16).
    num_layers: Transformer blocks.
    num_heads: attention heads per block.
    mlp_dim: MLP hidden width (``4 * D`` in ViT-B).
    dropout_rate: dropout rate inside the blocks.
    pool: ``"cls"`` (class token) or ``"mean"`` (mean of patch tokens).
    dtype: compute dtype; parameters stay float32.
  """

  embed_dim: int = 768
  patch_size: int = 16
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  dropout_rate: float = 0.0
  pool: str = "cls"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """``x [B, H, W, C] -> z [B, embed_dim]`` (float32); ``H, W`` multiples of the patch."""
    if self.pool not in POOLS:
      raise ValueError(f"ViT pool={self.pool!r}; choose one of {POOLS}")
    if x.ndim != 4 or x.shape[1] % self.patch_size or x.shape[2] % self.patch_size:
      raise ValueError(
          f"ViT takes images [B, H, W, C] with H, W multiples of {self.patch_size}, "
          f"got shape {x.shape}")
    p = (self.patch_size, self.patch_size)
    x = nn.Conv(self.embed_dim, p, strides=p, padding="VALID", dtype=self.dtype,
                name="patch_embedding")(x.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, self.embed_dim)  # [B, N, D]
    if self.pool == "cls":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.embed_dim), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, x.shape[2])),
                           x], axis=1)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, *x.shape[1:]),
                     jnp.float32)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x + pos.astype(x.dtype))
    for i in range(self.num_layers):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout_rate, dtype=self.dtype,
                       name=f"block{i + 1}")(x, train)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="ln_final")(x)
    z = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
    return z.astype(jnp.float32)
