"""Evaluate nested (Matryoshka) representations: per-dim metrics, retrieval, cascades.

* :mod:`~mrl_jax.evaluate.metrics`: 1-NN accuracy, precision@k, recall@k, mAP@k.
* :mod:`~mrl_jax.evaluate.classification`: per-dim top-k from nested logits, 1-NN.
* :mod:`~mrl_jax.evaluate.cascade`: adaptive classification (threshold cascade).
* :mod:`~mrl_jax.evaluate.index`, :mod:`~mrl_jax.evaluate.knn`: exact k-NN in JAX over
  truncated-then-normalised prefixes of one stored database (sharded over devices).
* :mod:`~mrl_jax.evaluate.retrieval`: exact, adaptive and funnel retrieval with
  FLOPs and wall time; optional FAISS shortlist (:mod:`~mrl_jax.evaluate.faiss_backend`).
* :mod:`~mrl_jax.evaluate.plots`: PNG plots; :mod:`~mrl_jax.evaluate.report`:
  :func:`evaluate_nested` (all of the above, ``metrics.json``) and :func:`format_table`.
"""

from mrl_jax.evaluate.cascade import cascade_predict, cascade_report, confidences, tune_thresholds
from mrl_jax.evaluate.classification import (
    nearest_neighbor_accuracy,
    per_dim_accuracy,
    top_k_accuracy,
)
from mrl_jax.evaluate.codes import hamming_search, int8_search, quantize_embeddings
from mrl_jax.evaluate.encoder import evaluate_encoder, evaluate_workdir
from mrl_jax.evaluate.index import PrefixIndex, normalize_prefix
from mrl_jax.evaluate.metrics import (
    average_precision_at_k,
    count_relevant,
    map_at_k,
    ndcg_at_k,
    one_nn_accuracy,
    overlap_at_k,
    precision_at_k,
    recall_at_k,
    relevance,
    retrieval_metrics,
)
from mrl_jax.evaluate.report import default_funnel, evaluate_nested, format_table
from mrl_jax.evaluate.retrieval import (
    RetrievalResult,
    adaptive_retrieval,
    cascade_flops,
    cascade_retrieval,
    exact_search,
    funnel_retrieval,
)
from mrl_jax.evaluate.text import evaluate_text, pair_retrieval_per_dim

__all__ = [
    "PrefixIndex", "RetrievalResult", "adaptive_retrieval", "average_precision_at_k",
    "cascade_flops", "cascade_predict", "cascade_report", "cascade_retrieval", "confidences",
    "count_relevant", "default_funnel", "evaluate_encoder", "evaluate_nested",
    "evaluate_text", "evaluate_workdir", "exact_search", "format_table", "hamming_search",
    "int8_search", "overlap_at_k", "pair_retrieval_per_dim", "quantize_embeddings",
    "funnel_retrieval", "map_at_k", "ndcg_at_k", "nearest_neighbor_accuracy", "normalize_prefix",
    "one_nn_accuracy", "per_dim_accuracy", "precision_at_k", "recall_at_k", "relevance",
    "retrieval_metrics", "top_k_accuracy", "tune_thresholds",
]
