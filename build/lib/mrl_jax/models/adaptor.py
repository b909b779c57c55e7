"""Matryoshka-Adaptor: a residual MLP that gives frozen embeddings nested dimensions.

Yoon, Sinha, Arik, Pfister, "Matryoshka-Adaptor: Unsupervised and Supervised
Tuning for Smaller Embedding Dimensions", EMNLP 2024 (arXiv:2407.20243), Sec. 3:
the adaptor is a shallow MLP with a skip connection, ``f(e) = e + g(e)``, applied
to embeddings ``e`` of any (possibly black-box) model, and trained so that every
prefix ``f(e)[:, :m]``, truncated then L2-normalised, keeps the similarity structure
of the full ``e`` (losses in :mod:`mrl_jax.losses.adaptor`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}


class MatryoshkaAdaptor(nn.Module):
  """``f(e) = e + g(e)``, ``g`` a shallow MLP whose last layer starts at zero.

  ``g = Dense(D) o act o Dense(hidden[-1]) o ... o act o Dense(hidden[0])``; with
  ``hidden=()`` it is one affine layer, ``f(e) = e + e @ W + b``. The last layer
  (``"out"``: kernel and bias) is zero-initialised, so ``f`` is the identity at
  step 0: training starts from the frozen model's embeddings (truncation) and
  only moves away from them as far as the losses ask.

  Attributes:
    hidden: widths of the hidden layers of ``g`` (may be empty).
    activation: one of :data:`ACTIVATIONS` (``"relu"``, ``"gelu"``, ``"silu"``,
      ``"tanh"``, ``"identity"``).
    dtype: compute dtype of the dense layers; the skip connection and the
      output are float32.
  """

  hidden: Sequence[int] = (512,)
  activation: str = "relu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, e: jax.Array) -> jax.Array:
    """``e [N, D] -> f(e) [N, D]`` float32.

    Raises:
      ValueError: ``e`` is not ``[N, D]``, an activation or width is invalid.
    """
    if e.ndim != 2:
      raise ValueError(f"MatryoshkaAdaptor takes embeddings [N, D], got shape {e.shape}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, "
                       f"got {self.activation!r}")
    for w in self.hidden:
      if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise ValueError(f"hidden widths must be positive ints, got {tuple(self.hidden)}")
    act = ACTIVATIONS[self.activation]
    e = jnp.asarray(e, jnp.float32)
    h = e.astype(self.dtype)
    for i, width in enumerate(self.hidden):
      h = act(nn.Dense(width, dtype=self.dtype, name=f"hidden_{i}")(h))
    delta = nn.Dense(e.shape[-1], dtype=self.dtype, kernel_init=nn.initializers.zeros,
                     bias_init=nn.initializers.zeros, name="out")(h)
    return e + delta.astype(jnp.float32)
