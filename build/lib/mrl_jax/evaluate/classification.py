"""Per-dim classification accuracy: from nested logits, and 1-NN from embeddings.

* top-k accuracy of nested logits ``[M, B, C]`` (one row per nested size): an
  example is correct at ``k`` when its label is among the first ``k`` classes ranked
  by decreasing logit, equal logits ranked by class index (as ``argmax`` and
  ``lax.top_k`` do);
* 1-NN accuracy per prefix size: the database is the train split, the queries the
  test split, and each query takes the label of its nearest database item by cosine
  similarity of the truncated-then-normalised prefixes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mrl_jax.evaluate.codes import refuse_nonfinite
from mrl_jax.evaluate.index import Array, PrefixIndex


def top_k_accuracy(logits: Array, labels: Array, k: int = 1) -> np.ndarray:
  """``mean_b [rank_b < k]``, ``rank_b = #{c : l_c > l_y} + #{c < y : l_c = l_y}``.

  ``l = logits[..., b, :]`` and ``y = labels[b]``; ``rank_b`` is the label's position
  when classes are sorted by decreasing logit, ties by class index.

  Args:
    logits: ``[..., B, C]``, e.g. nested logits ``[M, B, C]``.
    labels: ``[B]`` integer classes in ``[0, C)``.
    k: ``1 <= k <= C``.

  Returns:
    ``[...]`` float64 accuracies (a scalar array for ``[B, C]`` logits).

  Raises:
    ValueError: for shapes that do not match, non-float or non-finite logits (a NaN
      logit would otherwise rank the label first), non-integer labels or labels
      outside ``[0, C)``, or ``k`` not an int in ``[1, C]``.
  """
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  if logits.ndim < 2 or labels.ndim != 1 or logits.shape[-2] != labels.shape[0]:
    raise ValueError(f"need logits [..., B, C] and labels [B], got {logits.shape} and "
                     f"{labels.shape}")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f"logits must be floating point, got {logits.dtype}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integer classes, got {labels.dtype}")
  if labels.shape[0]:
    refuse_nonfinite(jnp.moveaxis(logits, -2, 0), "logits (rows = examples)")
  num_classes = logits.shape[-1]
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= num_classes:
    raise ValueError(f"k={k!r} must be an int in [1, C={num_classes}]")
  if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
    raise ValueError(f"labels must be in [0, {num_classes})")
  return np.asarray(_top_k_accuracy(logits, labels, k), np.float64)


@jax.jit
def _rank_of_label(logits, labels):
  idx = jnp.broadcast_to(labels[:, None].astype(jnp.int32), logits.shape[:-1] + (1,))
  label_logit = jnp.take_along_axis(logits, idx, axis=-1)
  before = jnp.arange(logits.shape[-1]) < idx
  return jnp.sum((logits > label_logit) | ((logits == label_logit) & before), axis=-1)


def _top_k_accuracy(logits, labels, k):
  return jnp.mean((_rank_of_label(logits, labels) < k).astype(jnp.float32), axis=-1)


def per_dim_accuracy(logits: Array, labels: Array, ks: Sequence[int] = (1, 5)
                     ) -> dict[str, np.ndarray]:
  """``{"top1": [M], "top5": [M], ...}`` from nested logits ``[M, B, C]``.

  ``k`` larger than the number of classes is skipped; each ``k`` must be a positive int.
  """
  logits = jnp.asarray(logits)
  if logits.ndim != 3:
    raise ValueError(f"nested logits must be [M, B, C], got shape {logits.shape}")
  if isinstance(ks, (str, bytes)) or any(
      isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
    raise ValueError(f"ks must be positive ints, got {ks!r}")
  return {f"top{k}": top_k_accuracy(logits, labels, k) for k in ks if k <= logits.shape[-1]}


def nearest_neighbor_accuracy(train_embeddings: Array | PrefixIndex, train_labels: Array,
                              test_embeddings: Array, test_labels: Array,
                              dims: Sequence[int]) -> np.ndarray:
  """1-NN accuracy at each prefix size (database = train split, queries = test split).

  Args:
    train_embeddings: ``[N, D]`` or a :class:`PrefixIndex` built on them.
    train_labels: ``[N]``; test_embeddings ``[Q, D]``; test_labels ``[Q]``.
    dims: prefix sizes.

  Returns:
    ``[len(dims)]`` float64: ``mean_q [train_labels[nn_d(q)] == test_labels[q]]``.
  """
  index = train_embeddings if isinstance(train_embeddings, PrefixIndex) else PrefixIndex(
      train_embeddings)
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  if not (np.issubdtype(train_labels.dtype, np.integer)
          and np.issubdtype(test_labels.dtype, np.integer)):
    raise ValueError(f"labels must be integer classes, got {train_labels.dtype} and "
                     f"{test_labels.dtype}")
  if train_labels.shape != (index.n,) or test_labels.shape != (np.shape(test_embeddings)[0],):
    raise ValueError(f"labels must be [N]={index.n} and [Q]={np.shape(test_embeddings)[0]}, "
                     f"got {train_labels.shape} and {test_labels.shape}")
  out = []
  for d in dims:
    _, ids = index.search(test_embeddings, 1, d)
    out.append(np.mean(train_labels[ids[:, 0]] == test_labels))
  return np.asarray(out, np.float64)
