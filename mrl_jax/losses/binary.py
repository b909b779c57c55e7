"""Binary-aware nested terms: keep the sign bits of every Matryoshka prefix useful.

Vector engines store nested prefixes as sign bits (sentence-transformers'
``ubinary``, :func:`mrl_jax.core.ops.quantize`); a model trained only with the float
loss gives no guarantee that those bits rank well. Two per-dim terms, added to the
nested loss with their own weights (``config.spread_out_weight`` /
``config.binary_weight`` of the pairs task):

* :func:`spread_out_regularizer`: the global orthogonal regularizer of Zhang et al.
  2017 ("Learning Spread-out Local Feature Descriptors", eq. 4; used by
  jina-embeddings-v5 so that binary codes lose little), at every nested dim;
* :func:`binary_relaxed_in_batch_softmax`: the in-batch softmax on a relaxed sign of
  every prefix (``tanh`` or sign with a straight-through estimator).

Both return ``[M]`` float32, one value per nested dim in ascending order (as
:func:`~mrl_jax.losses.nested_in_batch_softmax_per_dim`), and are pure and jittable.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mrl_jax.core import ops
from mrl_jax.core.checks import check_positive
from mrl_jax.core.nesting import Nesting
from mrl_jax.losses.embedding import check_pair, softmax_ce_diagonal

ESTIMATORS = ("tanh", "ste")


def _checked_dims(anchors, positives, dims) -> tuple[int, ...]:
  check_pair(anchors, positives, "anchors", "positives")
  if np.shape(anchors)[0] < 2:
    raise ValueError(f"anchors and positives need B >= 2 rows (the other rows are the "
                     f"non-matching pairs), got B = {np.shape(anchors)[0]}")
  return Nesting(tuple(dims), embed_dim=np.shape(anchors)[1]).dims


def spread_out_regularizer(anchors: jax.Array, positives: jax.Array,
                           dims: Sequence[int]) -> jax.Array:
  """Global orthogonal regularizer (Zhang et al. 2017, eq. 4) at every nested dim: ``[M]``.

  At size ``m`` both sides are truncated to ``[:, :m]`` then L2-normalised
  (:func:`mrl_jax.core.ops.truncate_normalize`); the non-matching pairs are the
  ``B (B - 1)`` pairs ``(a_i, p_j)``, ``i != j``, with inner products ``s_ij``:

  ``GOR_m = M1^2 + max(0, M2 - 1/m)``, ``M1 = mean_{i != j} s_ij``,
  ``M2 = mean_{i != j} s_ij^2``.

  Two independent uniform unit vectors of ``R^m`` have ``E[s] = 0`` and
  ``E[s^2] = 1/m``: the term pushes non-matching descriptors to spread over the
  sphere like that, which keeps their sign bits apart.

  Args:
    anchors: ``[B, D]`` float embeddings (any scale), ``B >= 2``.
    positives: ``[B, D]``; ``positives[i]`` is the match of ``anchors[i]``.
    dims: nested sizes in any order (sorted ascending), distinct, ``<= D``.

  Returns:
    ``[M]`` float32, in ascending order of ``dims``.

  Raises:
    ValueError: mismatched shapes, ``B < 2``, or bad ``dims``.
  """
  dims = _checked_dims(anchors, positives, dims)
  batch = np.shape(anchors)[0]
  off = 1.0 - jnp.eye(batch, dtype=jnp.float32)
  pairs = batch * (batch - 1)
  out = []
  for m in dims:
    s = ops.truncate_normalize(anchors, m) @ ops.truncate_normalize(positives, m).T
    m1 = jnp.sum(s * off) / pairs
    m2 = jnp.sum(jnp.square(s) * off) / pairs
    out.append(jnp.square(m1) + jnp.maximum(0.0, m2 - 1.0 / m))
  return jnp.stack(out).astype(jnp.float32)


def relaxed_sign(v: jax.Array, estimator: str) -> jax.Array:
  """A differentiable stand-in for the sign bits ``+1 if v > 0 else -1``.

  * ``"tanh"``: ``tanh(v)``;
  * ``"ste"``: forward exactly ``where(v > 0, 1, -1)`` (the bits of
    :func:`mrl_jax.core.ops.quantize`'s ``ubinary``), backward the straight-through
    estimator of ``hardtanh``: gradient 1 where ``|v| <= 1``, 0 outside (Hubara et al.
    2016, "Binarized Neural Networks").

  Raises:
    ValueError: ``estimator`` not in :data:`ESTIMATORS`.
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator={estimator!r}; choose one of {ESTIMATORS}")
  if estimator == "tanh":
    return jnp.tanh(v)
  clipped = jnp.clip(v, -1.0, 1.0)
  return clipped + jax.lax.stop_gradient(jnp.where(v > 0, 1.0, -1.0) - clipped)


def binary_relaxed_in_batch_softmax(anchors: jax.Array, positives: jax.Array,
                                    dims: Sequence[int], *, scale: float = 20.0,
                                    temperature: float = 1.0,
                                    estimator: str = "tanh") -> jax.Array:
  """In-batch softmax (MultipleNegativesRankingLoss) on relaxed sign codes, per dim: ``[M]``.

  At size ``m`` each row's prefix is truncated, L2-normalised and multiplied by
  ``sqrt(m)`` (unit RMS per coordinate, so ``temperature`` means the same at every
  dim): ``u = sqrt(m) x[:m] / ||x[:m]||``; its relaxed code is
  ``b = relaxed_sign(u / temperature)`` (:func:`relaxed_sign`). The similarity of
  two codes is ``<b_a, b_p> / m`` in ``[-1, 1]``: for sign codes exactly
  ``1 - 2 * hamming / m`` (the ranking of a Hamming scan over ``ubinary`` codes),
  and the ``tanh`` codes tend to it as ``temperature -> 0``. Then, as
  :func:`~mrl_jax.losses.in_batch_softmax`,
  ``L_m = mean_i [lse_j (scale * sim(a_i, p_j)) - scale * sim(a_i, p_i)]``.

  Args:
    anchors: ``[B, D]`` float embeddings, ``B >= 2``.
    positives: ``[B, D]``; ``positives[i]`` is the match of ``anchors[i]``.
    dims: nested sizes in any order (sorted ascending), distinct, ``<= D``.
    scale: inverse temperature of the softmax, ``> 0``.
    temperature: of the relaxation, ``> 0`` (smaller: closer to the sign).
    estimator: ``"tanh"`` or ``"ste"`` (sign forward, straight-through backward).

  Returns:
    ``[M]`` float32, in ascending order of ``dims``.

  Raises:
    ValueError: mismatched shapes, ``B < 2``, bad ``dims``, ``scale``,
      ``temperature`` or ``estimator``.
  """
  dims = _checked_dims(anchors, positives, dims)
  check_positive("scale", scale)
  check_positive("temperature", temperature)
  if estimator not in ESTIMATORS:
    raise ValueError(f"estimator={estimator!r}; choose one of {ESTIMATORS}")
  out = []
  for m in dims:
    code = lambda x, m=m: relaxed_sign(
        np.sqrt(m) * ops.truncate_normalize(x, m) / temperature, estimator)
    sims = code(anchors) @ code(positives).T / m
    out.append(softmax_ce_diagonal(scale * sims))
  return jnp.stack(out).astype(jnp.float32)
