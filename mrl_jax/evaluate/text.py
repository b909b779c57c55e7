"""Text-embedding metrics per nested dim: pair retrieval (sentence-transformers'
``InformationRetrievalEvaluator`` metrics: accuracy/recall@k, MRR@10, nDCG@10), the same
retrieval over ``ubinary`` / ``int8_symmetric`` codes of each prefix (recall@10, nDCG@10),
a ``ubinary`` shortlist of each prefix re-ranked in float at the full dim (recall@10),
STS Spearman, and their per-dim plot.

Both evaluators see only an ``embed(texts) -> [N, D]`` function (big_vision's
evaluator pattern), so they serve a training run and an exported
:class:`~mrl_jax.bundle.encoder.Encoder` alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

from mrl_jax.core import ops
from mrl_jax.core.nesting import Nesting
from mrl_jax.evaluate import codes as codes_lib
from mrl_jax.evaluate import metrics, sts
from mrl_jax.evaluate.retrieval import cascade_retrieval

Embed = Callable[[Sequence[str]], np.ndarray]


# sentence-transformers' InformationRetrievalEvaluator names (k in 1 and 10): the same keys
# as its logs and MTEB's, "<score>_<metric>@<k>", here per nested dim.
RETRIEVAL_KS = (1, 10)
RETRIEVAL_METRICS = ("accuracy@1", "accuracy@10", "recall@1", "recall@10", "mrr@10",
                     "ndcg@10")


def retrieval_metric_names(score: str = "cosine") -> list[str]:
  """``["cosine_accuracy@1", ..., "cosine_ndcg@10"]``: the keys (less ``_per_dim``) of
  :func:`pair_retrieval_per_dim`."""
  return [f"{score}_{name}" for name in RETRIEVAL_METRICS]


# The metrics reported over codes (the goals of binary-aware Matryoshka are stated in them).
CODE_METRICS = ("recall@10", "ndcg@10")


def code_metric_names(kinds: Sequence[str] = codes_lib.CODE_KINDS) -> list[str]:
  """``["ubinary_recall@10", ...]``: the keys (less ``_per_dim``) of
  :func:`code_retrieval_per_dim`."""
  return [f"{kind}_{name}" for kind in kinds for name in CODE_METRICS]


def _rank_metrics(rank: np.ndarray, score: str) -> dict[str, float]:
  """The metrics of :data:`RETRIEVAL_METRICS` from each query's rank of its one match."""
  k = max(RETRIEVAL_KS)
  rel = np.zeros((len(rank), k))  # binary relevance of the top k, best first
  hit = rank <= k
  rel[np.flatnonzero(hit), rank[hit] - 1] = 1.0
  one = np.ones(len(rank), np.int64)
  out = {}
  for cut in RETRIEVAL_KS:
    # One relevant document per query: accuracy@k (a hit in the top k) = recall@k.
    out[f"{score}_accuracy@{cut}"] = out[f"{score}_recall@{cut}"] = metrics.recall_at_k(
        rel, cut, one)
  out[f"{score}_mrr@10"] = float(np.mean(np.where(rank <= 10, 1.0 / rank, 0.0)))
  out[f"{score}_ndcg@10"] = metrics.ndcg_at_k(rel, 10, one)
  return out


def pair_retrieval_per_dim(anchors: np.ndarray, positives: np.ndarray,
                           dims: Sequence[int], *, score: str = "cosine"
                           ) -> dict[str, np.ndarray]:
  """Anchor-to-positive retrieval over ``N`` pairs at each nested size.

  For size ``m`` both sides are truncated to ``[:, :m]`` and then L2-normalised;
  anchor ``i`` ranks all ``N`` positives by cosine. Its rank is
  ``r_i = 1 + #{j != i : cos(a_i, p_j) >= cos(a_i, p_i)}`` (ties count
  against the match). With one relevant document per query, under
  sentence-transformers' ``InformationRetrievalEvaluator`` names:

  * ``cosine_accuracy@k = cosine_recall@k = mean_i [r_i <= k]`` for ``k`` in 1, 10
    (:func:`~mrl_jax.evaluate.metrics.recall_at_k`);
  * ``cosine_mrr@10 = mean_i (1 / r_i if r_i <= 10 else 0)`` (MS MARCO's MRR@10);
  * ``cosine_ndcg@10 = mean_i (1 / log2(1 + r_i) if r_i <= 10 else 0)``
    (:func:`~mrl_jax.evaluate.metrics.ndcg_at_k`, IDCG = 1).

  Args:
    anchors: ``[N, D]``; positives: ``[N, D]``, ``positives[i]`` the match of ``anchors[i]``.
    dims: nested sizes ``<= D``.
    score: the similarity's name in the keys (``"cosine"``).

  Returns:
    ``{f"{score}_{metric}_per_dim": [M] float64}`` for every metric of
    :data:`RETRIEVAL_METRICS`. Uses ``O(N^2)`` memory per size.

  Raises:
    ValueError: shapes differ, are not 2-D, or hold NaN/inf.
  """
  anchors, positives = _check_pairs(anchors, positives)
  dims = Nesting(tuple(dims), embed_dim=anchors.shape[1]).dims
  per_dim: dict[str, list[float]] = {name: [] for name in retrieval_metric_names(score)}
  # float64: float32 rows of any finite scale square safely; the floor only keeps zero
  # rows zero (a fixed 1e-12 would shrink rows scaled by 1e-25)
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
  for m in dims:
    sims = unit(anchors[:, :m]) @ unit(positives[:, :m]).T
    own = np.diagonal(sims)[:, None]
    beaten = (sims >= own) & ~np.eye(len(sims), dtype=bool)
    for name, value in _rank_metrics(1 + beaten.sum(axis=1), score).items():
      per_dim[name].append(value)
  return {f"{name}_per_dim": np.asarray(v) for name, v in per_dim.items()}


def _check_pairs(anchors, positives) -> tuple[np.ndarray, np.ndarray]:
  anchors, positives = np.asarray(anchors, np.float64), np.asarray(positives, np.float64)
  if anchors.ndim != 2 or anchors.shape != positives.shape or not len(anchors):
    raise ValueError(f"anchors and positives must both be [N, D] with N >= 1, got "
                     f"{anchors.shape} and {positives.shape}")
  if not (np.isfinite(anchors).all() and np.isfinite(positives).all()):
    raise ValueError("anchors/positives hold NaN or inf embeddings")
  return anchors, positives


def _code_scores(anchors, positives, m: int, kind: str) -> np.ndarray:
  """``[N, N]`` int64 similarity of the ``kind`` codes of the ``m``-prefixes (larger: closer).

  ``ubinary``: the +-1 inner product ``m - 2 * hamming``; ``int8_symmetric``: the
  integer dot product (the scores of :func:`~mrl_jax.evaluate.codes.hamming_search` /
  :func:`~mrl_jax.evaluate.codes.int8_search`).
  """
  code = lambda x: np.asarray(codes_lib.quantize_embeddings(
      ops.truncate_normalize(np.asarray(x, np.float32), m), kind))
  qa, qp = code(anchors), code(positives)
  if kind == "ubinary":
    sign = lambda c: 2 * np.unpackbits(c, axis=-1)[:, :m].astype(np.int64) - 1
    return sign(qa) @ sign(qp).T
  return qa.astype(np.int64) @ qp.astype(np.int64).T


def code_retrieval_per_dim(anchors: np.ndarray, positives: np.ndarray, dims: Sequence[int],
                           *, kinds: Sequence[str] = codes_lib.CODE_KINDS
                           ) -> dict[str, np.ndarray]:
  """:func:`pair_retrieval_per_dim` over the codes of each nested prefix: recall@10, nDCG@10.

  For size ``m`` both sides are truncated to ``[:, :m]``, L2-normalised
  (:func:`mrl_jax.core.ops.truncate_normalize`) and quantised by
  :func:`mrl_jax.evaluate.codes.quantize_embeddings` (sentence-transformers'
  ``ubinary`` sign bits, or mrl_jax's fixed-range ``int8_symmetric``); anchor ``i``
  ranks all ``N`` positives' codes by the code similarity (``m - 2 * hamming``, or the
  int8 dot product). Ranks count ties against the match, as for floats: at small
  ``m`` a Hamming distance takes only ``m + 1`` values, and a tie is not a hit.

  Args:
    anchors: ``[N, D]``; positives: ``[N, D]``, ``positives[i]`` the match of ``anchors[i]``.
    dims: nested sizes ``<= D``.
    kinds: code kinds, each in :data:`mrl_jax.evaluate.codes.CODE_KINDS`.

  Returns:
    ``{f"{kind}_{metric}_per_dim": [M] float64}`` for ``metric`` in
    :data:`CODE_METRICS`. Uses ``O(N^2)`` memory per size.

  Raises:
    ValueError: shapes differ, are not 2-D, hold NaN/inf, or an unknown kind.
  """
  anchors, positives = _check_pairs(anchors, positives)
  dims = Nesting(tuple(dims), embed_dim=anchors.shape[1]).dims
  for kind in kinds:
    codes_lib.check_kind(kind)
  per_dim: dict[str, list[float]] = {name: [] for name in code_metric_names(kinds)}
  for kind in kinds:
    for m in dims:
      sims = _code_scores(anchors, positives, m, kind)
      own = np.diagonal(sims)[:, None]
      beaten = (sims >= own) & ~np.eye(len(sims), dtype=bool)
      values = _rank_metrics(1 + beaten.sum(axis=1), kind)
      for name in CODE_METRICS:
        per_dim[f"{kind}_{name}"].append(values[f"{kind}_{name}"])
  return {f"{name}_per_dim": np.asarray(v) for name, v in per_dim.items()}


# The binary-shortlist -> float re-rank metric (the funnel the binary goals are stated in).
RERANK_METRIC = "ubinary_rerank_recall@10"
RERANK_K = 10


def binary_rerank_per_dim(anchors: np.ndarray, positives: np.ndarray, dims: Sequence[int], *,
                          shortlist_k: int) -> dict[str, np.ndarray]:
  """Recall@10 of a binary shortlist at each nested size, re-ranked in float at the full dim.

  The paper's adaptive retrieval (shortlist dim ``D_s``, re-rank dim ``D_r = D``) with a
  binary first stage, run by :func:`mrl_jax.evaluate.retrieval.cascade_retrieval`
  (``dims=(m, D)``, ``keeps=(shortlist_k, 10)``, ``shortlist_codes="ubinary"``): for size
  ``m`` every positive is stored as the ``ubinary`` sign bits of its normalised
  ``m``-prefix (``ceil(m / 8)`` bytes); anchor ``i`` keeps the ``shortlist_k`` positives
  nearest in Hamming distance to its own code (ties: the smaller id first), re-ranks
  them by float cosine at the full dim ``D`` and keeps 10 (ties: the shortlist's order).
  ``ubinary_rerank_recall@10 = mean_i [positive i among them]``. At ``m = D`` it is the
  full dim's bits -> float funnel (384 bits, 48 bytes, for MiniLM).

  Args:
    anchors: ``[N, D]``; positives: ``[N, D]``, ``positives[i]`` the match of ``anchors[i]``.
    dims: nested sizes ``<= D``.
    shortlist_k: the shortlist size ``K``, an int in ``[10, N]``.

  Returns:
    ``{"ubinary_rerank_recall@10_per_dim": [M] float64}``.

  Raises:
    ValueError: shapes differ, are not 2-D, hold NaN/inf, ``N < 10``, or ``shortlist_k``
      outside ``[10, N]``.
  """
  anchors, positives = _check_pairs(anchors, positives)
  n, width = anchors.shape
  dims = Nesting(tuple(dims), embed_dim=width).dims
  if isinstance(shortlist_k, bool) or not isinstance(shortlist_k, (int, np.integer)) or not (
      RERANK_K <= shortlist_k <= n):
    raise ValueError(f"shortlist_k must be an int in [{RERANK_K}, N={n}] (the evaluated "
                     f"pairs), got {shortlist_k!r}")
  queries, database = anchors.astype(np.float32), positives.astype(np.float32)
  # One local device: every process evaluates the same gathered pairs on its own
  # (an index over all processes' devices could not be read back here).
  mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()[:1]), ("db",))
  recall = []
  for m in dims:
    found = cascade_retrieval(queries, database, (m, width), (int(shortlist_k), RERANK_K),
                              shortlist_codes="ubinary", timed=False, mesh=mesh).ids
    recall.append(float(np.mean(np.any(np.asarray(found) == np.arange(n)[:, None], axis=1))))
  return {f"{RERANK_METRIC}_per_dim": np.asarray(recall)}


def plot_text_metrics(results: dict[str, np.ndarray], dims: Sequence[int], path: str, *,
                      label: str = "model") -> str:
  """The per-dim plot of a text evaluation (as the image evaluation's accuracy_vs_dim.png):
  every ``*_per_dim`` metric of ``results`` against the nested dim, one line each."""
  from mrl_jax.evaluate import plots  # matplotlib (the train extra): only when plotting

  curves = {f"{label} {name[:-len('_per_dim')]}": (list(dims), [float(v) for v in values])
            for name, values in results.items() if name.endswith("_per_dim")
            and not name.startswith("loss")}
  return plots.plot_accuracy_vs_dim(curves, path, ylabel="metric",
                                    title="text evaluation per nested dim")


def evaluate_text(embed: Embed, dims: Sequence[int], *,
                  scored: tuple[Sequence[str], Sequence[str], np.ndarray] | None = None,
                  pairs: tuple[Sequence[str], Sequence[str]] | None = None,
                  codes: Sequence[str] = codes_lib.CODE_KINDS,
                  shortlist_k: int | None = None) -> dict[str, np.ndarray]:
  """Spearman of cosine vs gold scores and pair retrieval, per nested size.

  Args:
    embed: texts -> raw (or normalised) embeddings ``[N, D]``; truncation and
      renormalisation per dim happen here.
    scored: ``(texts_a, texts_b, gold_scores [N])`` for Spearman.
    pairs: ``(anchors, positives)`` for :func:`pair_retrieval_per_dim`.
    codes: code kinds for :func:`code_retrieval_per_dim` on ``pairs`` (``()``: none).
    shortlist_k: the shortlist size of :func:`binary_rerank_per_dim` on ``pairs``, an int
      ``>= 10``, clipped to the number of pairs (None: not run; fewer than 10 pairs: not run).

  Returns:
    ``spearman_per_dim`` ``[M]`` when ``scored`` is given, and the
    :func:`pair_retrieval_per_dim` and :func:`code_retrieval_per_dim` entries when
    ``pairs`` is given; with ``shortlist_k``, also ``ubinary_rerank_recall@10_per_dim``
    ``[M]``.

  Raises:
    ValueError: ``shortlist_k`` not an int >= 10 or None, or bad embeddings.
  """
  if shortlist_k is not None and (isinstance(shortlist_k, bool) or not isinstance(
      shortlist_k, (int, np.integer)) or shortlist_k < RERANK_K):
    raise ValueError(f"shortlist_k must be an int >= {RERANK_K} or None, got {shortlist_k!r}")
  out: dict[str, np.ndarray] = {}
  if scored is not None:
    texts_a, texts_b, scores = scored
    rho = sts.spearman_per_dim(embed(texts_a), embed(texts_b), scores, dims)
    out["spearman_per_dim"] = np.asarray([rho[m] for m in dims])
  if pairs is not None:
    anchors, positives = embed(pairs[0]), embed(pairs[1])
    out.update(pair_retrieval_per_dim(anchors, positives, dims))
    if codes:
      out.update(code_retrieval_per_dim(anchors, positives, dims, kinds=codes))
    if shortlist_k is not None and len(anchors) >= RERANK_K:
      k = min(int(shortlist_k), len(anchors))  # a small eval file: the whole database
      out.update(binary_rerank_per_dim(anchors, positives, dims, shortlist_k=k))
  return out
