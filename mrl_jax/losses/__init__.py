"""Nested (Matryoshka) losses, as pure functions over arrays.

The Matryoshka objective is a weighted **sum** over the nested sizes of an
ordinary loss computed on each prefix: ``L = sum_m c_m * L(head_m(z[:, :m]), y)``.

Modules:

* :mod:`~mrl_jax.losses.classification`: the nested cross-entropy of MRL / MRL-E heads.
* :mod:`~mrl_jax.losses.embedding`: in-batch softmax (with hard negatives),
  its symmetric form, CoSENT, MSE distillation, the layer KL.
* :mod:`~mrl_jax.losses.matryoshka`: the Matryoshka wrapper of any embedding
  loss and its 2-D (layers x sizes) version.
* :mod:`~mrl_jax.losses.fused`: the fused nested in-batch softmax (one blocked
  matmul and a hand-written backward for every size).
* :mod:`~mrl_jax.losses.binary`: binary-aware terms per nested dim (the spread-out
  regularizer, the in-batch softmax on relaxed sign codes).
* :mod:`~mrl_jax.losses.cached`: GradCache, the full-batch gradient of a
  batch-wide loss with one mini-batch's memory.
"""

from mrl_jax.losses.binary import (
    BinaryAware,
    binary_relaxed_in_batch_softmax,
    binary_relaxed_supervised_contrastive,
    spread_out_regularizer,
)
from mrl_jax.losses.cached import cached_value_and_grad, embed_in_chunks
from mrl_jax.losses.classification import (
    nested_loss_per_dim,
    nested_softmax_cross_entropy,
    softmax_cross_entropy_per_dim,
)
from mrl_jax.losses.embedding import (
    cosent,
    in_batch_softmax,
    l2_normalize,
    layer_kl_divergence,
    mse_distillation,
    symmetric_in_batch_softmax,
)
from mrl_jax.losses.fused import nested_in_batch_softmax, nested_in_batch_softmax_per_dim
from mrl_jax.losses.matryoshka import (
    LAYER_WEIGHTINGS,
    EmbeddingLoss,
    adaptive_layer,
    matryoshka,
    matryoshka_2d,
    sample_nested_indices,
)

__all__ = [
    "EmbeddingLoss",
    "LAYER_WEIGHTINGS",
    "adaptive_layer",
    "BinaryAware",
    "binary_relaxed_in_batch_softmax",
    "binary_relaxed_supervised_contrastive",
    "cached_value_and_grad",
    "cosent",
    "embed_in_chunks",
    "in_batch_softmax",
    "l2_normalize",
    "layer_kl_divergence",
    "matryoshka",
    "matryoshka_2d",
    "mse_distillation",
    "nested_in_batch_softmax",
    "nested_in_batch_softmax_per_dim",
    "nested_loss_per_dim",
    "nested_softmax_cross_entropy",
    "sample_nested_indices",
    "softmax_cross_entropy_per_dim",
    "spread_out_regularizer",
    "symmetric_in_batch_softmax",
]
