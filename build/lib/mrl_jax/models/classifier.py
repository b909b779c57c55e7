"""An encoder composed with a nested (or fixed-feature) classification head."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from mrl_jax.heads import FixedFeatureHead, MRLHead


class Classifier(nn.Module):
  """``encoder`` then ``head``; always returns nested logits ``[M, B, C]``.

  One backbone forward per call: every nested head reads a slice of the same
  embedding. A :class:`~mrl_jax.heads.FixedFeatureHead` gives ``M = 1``.

  Attributes:
    encoder: a module mapping ``(x, train) -> z [B, D]``.
    head: an :class:`~mrl_jax.heads.MRLHead` or
      :class:`~mrl_jax.heads.FixedFeatureHead`.
  """

  encoder: nn.Module
  head: nn.Module

  def __call__(self, x: jax.Array, train: bool = False,
               return_embedding: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``x [B, ...] -> logits [M, B, C]`` (and ``z [B, D]`` if ``return_embedding``)."""
    z = self.encoder(x, train=train)
    logits = self.head(z)
    if isinstance(self.head, FixedFeatureHead):
      logits = logits[None]
    return (logits, z) if return_embedding else logits

  def embed(self, x: jax.Array, train: bool = False) -> jax.Array:
    """``x [B, ...] -> z [B, D]``, the full (untruncated, unnormalised) embedding."""
    return self.encoder(x, train=train)


def head_dims(head: Any) -> tuple[int, ...]:
  """The embedding sizes that the rows of a head's ``[M, B, C]`` logits read."""
  if isinstance(head, MRLHead):
    return tuple(int(m) for m in head.dims)
  if isinstance(head, FixedFeatureHead):
    return (int(head.dim),)
  raise TypeError(f"unknown head type {type(head).__name__}")
