"""Matryoshka-Adaptor: nested dimensions for the stored embeddings of a frozen model.

Yoon, Sinha, Arik, Pfister, "Matryoshka-Adaptor: Unsupervised and Supervised Tuning
for Smaller Embedding Dimensions", EMNLP 2024 (arXiv:2407.20243). The data are
embeddings ``e`` ``[N, D]`` of any model (``config.embeddings_file``, ``.npy``);
the model is ``f(e) = e + g(e)`` (:class:`~mrl_jax.models.adaptor.MatryoshkaAdaptor`,
the identity at step 0); the loss is :func:`~mrl_jax.losses.adaptor.adaptor_loss`:
top-k and pairwise similarity preservation between the full ``e`` and every
truncated, renormalised prefix ``f(e)[:, :m]``, a reconstruction regulariser and,
with (query, document) pairs (``config.queries_file`` + ``config.pairs_file``), the
in-batch ranking loss at every nested dim; optionally the binary-aware terms
(``config.spread_out_weight``, ``config.binary_weight``: :mod:`mrl_jax.losses.binary`).

Held-out rows (a fixed random share of the file, or ``config.eval_rows_file``) are
never trained on; evaluation reports, per nested dim, the neighbour recall@k of the
full-size exact neighbours among the held-out rows (and, supervised, recall@k and
nDCG@k of the held-out pairs) for the adaptor and, computed once, for raw
truncation and PCA fit on the training rows (:mod:`mrl_jax.evaluate.adaptor`).
Each evaluation also writes ``workdir/plots/<metric>.png`` (so at the end of a run
the plots show the final numbers of ``final_metrics.json``).

Export: an ``"embedding"`` bundle; ``Encoder.load(path).embed(e, dim=m)`` maps raw
embeddings ``[B, D]`` to ``f(e)[:, :m]``, L2-normalised. With ``config.text_encoder``
(an exported mrl_jax text bundle whose full-size, unit-norm embeddings are the
``embeddings_file``) a copy of that bundle goes into the export, which then also
embeds a list of texts: text encoder, L2 normalisation, adaptor, truncation,
normalisation.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import warnings
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mrl_jax.bundle import artifact
from mrl_jax.core import fileio
from mrl_jax.evaluate.adaptor import (
  check_embeddings,
  check_pairs,
  compare_reductions,
  fit_pca,
  format_reduction_table,
)
from mrl_jax.losses.adaptor import GAPS, adaptor_loss, neighbour_mask
from mrl_jax.models.adaptor import ACTIVATIONS, MatryoshkaAdaptor
from mrl_jax.tasks import register
from mrl_jax.tasks.specs import AdaptorSpec
from mrl_jax.train import config as config_lib
from mrl_jax.train import specs
from mrl_jax.train import task as base

_SPLIT_TAG = 0x5EED  # the held-out rows depend on N only, not on config.seed
_ROWS_TAG, _PAIRS_TAG = 1, 2
PCA_MAX_ROWS = 50_000  # PCA baselines are fit on at most this many training rows
EVAL_CHUNK = 1024  # rows per jitted adaptor call in evaluation (one compiled shape)
INITS = ("identity", "pca", "pca_centred")  # config.adaptor.init
TEXT_ENCODER_DIR = "text_encoder"  # the copied text bundle inside a composed export
METRICS = ("neighbor_recall", "pair_recall", "pair_ndcg")
BASELINES = ("truncate", "pca", "pca_uncentred")
# The scalar that configs/adaptor.py selects the step by (config.checkpoint.best_metric):
# the held-out metric the adaptor is for, averaged over the nested dims.
SELECTION_SCORE = "selection_score"
RECORD_FIELD = "baselines"  # the export's per-dim adaptor-vs-baselines record (mrl_jax.json)


class BelowBaselineWarning(UserWarning):
  """The exported adaptor is below a baseline (raw truncation, PCA) at some nested dim."""


# -- data ----------------------------------------------------------------------------------


def load_npy(path: Any, field: str) -> np.ndarray:
  """``np.load(path, allow_pickle=False)``; a ValueError naming ``config.<field>`` otherwise."""
  if not isinstance(path, str) or not path:
    raise ValueError(f"config.{field}={path!r} must be the path of a .npy file")
  if not os.path.isfile(path):
    raise ValueError(f"config.{field}={path!r} is not a file")
  try:
    array = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f"config.{field}={path!r} is not a readable .npy array (object arrays "
                     f"and pickles are refused): {e}") from None
  if not isinstance(array, np.ndarray):
    raise ValueError(f"config.{field}={path!r} holds several arrays (.npz); give one .npy")
  return array


def held_out_rows(num_rows: int, *, eval_fraction: float, eval_max_rows: int) -> np.ndarray:
  """The sorted evaluation rows: ``min(max(1, round(eval_fraction * N)), eval_max_rows)`` ids.

  A random subset from ``np.random.default_rng([0x5EED, N])``: the same for every
  ``config.seed``, so runs with different seeds are evaluated on the same rows.
  """
  count = min(max(1, int(round(eval_fraction * num_rows))), int(eval_max_rows), num_rows)
  rng = np.random.default_rng([_SPLIT_TAG, int(num_rows)])
  return np.sort(rng.permutation(num_rows)[:count])


@dataclasses.dataclass(frozen=True)
class AdaptorData:
  """The checked arrays of a run and their train/eval split.

  Attributes:
    embeddings: ``[N, D]`` float32, every row of ``config.embeddings_file``.
    train_rows, eval_rows: ``[N_train]``, ``[N_eval]`` row ids (disjoint, sorted).
    queries: ``[Q, D]`` float32 or None (unsupervised).
    train_pairs: ``[P_train, 2]`` (query row, embeddings row) whose document is a
      training row and whose query has no held-out document; None if unsupervised.
    eval_queries: ``[Q_eval]`` query rows of the held-out pairs.
    eval_pairs: ``[P_eval, 2]`` held-out pairs as (index into ``eval_queries``,
      index into ``eval_rows``): every pair whose document is a held-out row.
  """

  embeddings: np.ndarray
  train_rows: np.ndarray
  eval_rows: np.ndarray
  queries: np.ndarray | None = None
  train_pairs: np.ndarray | None = None
  eval_queries: np.ndarray | None = None
  eval_pairs: np.ndarray | None = None

  @property
  def supervised(self) -> bool:
    return self.queries is not None


def read_data(config: AdaptorSpec) -> AdaptorData:
  """Load and check the files of ``config``, then split them (see :class:`AdaptorData`).

  Raises:
    ValueError: naming the field: a missing or unreadable file, an array of the
      wrong shape or dtype, NaN/inf rows (their ids), pair ids out of range, a
      split too small for ``batch_size`` / ``eval_k``.
  """
  embeddings = check_embeddings(load_npy(config.embeddings_file, "embeddings_file"),
                                "config.embeddings_file")
  n, d = embeddings.shape
  if config.eval_rows_file is not None:
    eval_rows = load_npy(config.eval_rows_file, "eval_rows_file")
    if eval_rows.ndim != 1 or not np.issubdtype(eval_rows.dtype, np.integer) \
        or eval_rows.size < 1:
      raise ValueError(f"config.eval_rows_file must hold a non-empty int array [E], got "
                       f"{eval_rows.shape} {eval_rows.dtype}")
    bad = eval_rows[(eval_rows < 0) | (eval_rows >= n)]
    if bad.size:
      raise ValueError(f"config.eval_rows_file has row ids outside [0, {n}): "
                       f"{bad[:10].tolist()}")
    eval_rows = np.unique(eval_rows)
  else:
    eval_rows = held_out_rows(n, eval_fraction=config.eval_fraction,
                              eval_max_rows=config.eval_max_rows)
  is_eval = np.zeros(n, bool)
  is_eval[eval_rows] = True
  train_rows = np.flatnonzero(~is_eval)
  if train_rows.size < config.batch_size:
    raise ValueError(f"config.batch_size={config.batch_size} is larger than the "
                     f"{train_rows.size} training rows ({n} rows, {eval_rows.size} held out)")
  if eval_rows.size < config.eval_k + 1:
    raise ValueError(f"config.eval_k={config.eval_k} needs at least {config.eval_k + 1} "
                     f"held-out rows, got {eval_rows.size}: raise config.eval_fraction")
  if (config.queries_file is None) != (config.pairs_file is None):
    raise ValueError("the supervised mode needs both config.queries_file and "
                     "config.pairs_file (or neither)")
  if config.queries_file is None:
    return AdaptorData(embeddings, train_rows, eval_rows)
  queries = check_embeddings(load_npy(config.queries_file, "queries_file"),
                             "config.queries_file", embed_dim=d)
  try:
    pairs = check_pairs(load_npy(config.pairs_file, "pairs_file"), queries.shape[0], n)
  except ValueError as e:
    if str(e).startswith("config."):
      raise
    raise ValueError(f"config.pairs_file={config.pairs_file!r}: {e} (queries_file rows, "
                     "embeddings_file rows)") from None
  held = is_eval[pairs[:, 1]]
  eval_queries = np.unique(pairs[held, 0])
  train_pairs = pairs[~held & ~np.isin(pairs[:, 0], eval_queries)]
  if not held.any():
    raise ValueError("config.pairs_file: no pair has its document among the held-out rows, "
                     "so the pairs cannot be evaluated: raise config.eval_fraction")
  min_pairs = 2 if config.pair_batch_size is None else config.pair_batch_size
  if train_pairs.shape[0] < min_pairs:
    raise ValueError(f"config.pairs_file: {train_pairs.shape[0]} training pairs (documents "
                     f"not held out, queries without held-out documents), need "
                     f">= {min_pairs} (config.pair_batch_size)")
  position = np.full(n, -1)
  position[eval_rows] = np.arange(eval_rows.size)
  eval_pairs = np.stack([np.searchsorted(eval_queries, pairs[held, 0]),
                         position[pairs[held, 1]]], axis=1)
  return AdaptorData(embeddings, train_rows, eval_rows, queries, train_pairs, eval_queries,
                     eval_pairs)


def check_text_encoder(path: Any, embed_dim: int) -> None:
  """``config.text_encoder`` must be an exported text bundle of ``embed_dim`` dims.

  Raises:
    ValueError: naming ``config.text_encoder``: not a folder, not a readable text
      bundle (changed files included), or another width than the embeddings.
  """
  if not isinstance(path, str) or not os.path.isdir(path):
    raise ValueError(f"config.text_encoder={path!r} is not a folder (an exported text bundle)")
  try:
    meta = artifact.read_metadata(path)
    if meta["modality"] != "text":
      raise ValueError(f"config.text_encoder={path!r} is a bundle of modality "
                       f"{meta['modality']!r}, not 'text'")
    width = int(artifact.read_json(os.path.join(path, artifact.CONFIG_FILE))["hidden_size"])
  except (artifact.BundleError, KeyError, TypeError) as e:
    raise ValueError(f"config.text_encoder={path!r}: not a readable text bundle: {e}") from None
  if width != embed_dim:
    raise ValueError(f"config.text_encoder={path!r} embeds {width} dims, config.embeddings_file "
                     f"has D={embed_dim}")


class EpochBatches:
  """Batches of ``batch_size`` of ``num`` items, a fresh seeded permutation every epoch.

  Batch ``s`` is ``perm_e[c B : (c + 1) B]`` with ``e, c = divmod(s, num // B)`` and
  ``perm_e = np.random.default_rng([seed, tag, e]).permutation(num)``: it depends
  only on ``(seed, tag, s)``, so resuming at step ``s`` costs one permutation
  (the last ``num mod B`` items of each epoch's order are skipped that epoch).
  """

  def __init__(self, num: int, batch_size: int, *, seed: int, tag: int):
    if not 1 <= batch_size <= num:
      raise ValueError(f"batch_size={batch_size} must be in [1, {num}]")
    self.num, self.batch_size, self.seed, self.tag = int(num), int(batch_size), int(seed), tag
    self.batches_per_epoch = self.num // self.batch_size
    self._permutation = functools.lru_cache(maxsize=2)(self._permutation_uncached)

  def _permutation_uncached(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, self.tag, epoch]).permutation(self.num)

  def __call__(self, step: int) -> np.ndarray:
    """The ``[batch_size]`` item ids of global batch ``step``."""
    epoch, c = divmod(int(step), self.batches_per_epoch)
    return self._permutation(epoch)[c * self.batch_size:(c + 1) * self.batch_size]


# -- the task --------------------------------------------------------------------------------


@register
class AdaptorTask(base.Task):
  """``config.task = "adaptor"`` (``configs/adaptor.py``).

  Batches: ``{"embeddings": float32 [B, D]}`` rows of the training split, plus
  ``{"queries", "documents"}`` float32 ``[B_pairs, D]`` in the supervised mode.
  """

  name = "adaptor"
  spec_class = AdaptorSpec

  @classmethod
  def validate(cls, config: ml_collections.ConfigDict) -> None:
    hidden = config.adaptor.hidden
    if not isinstance(hidden, (tuple, list)) or not all(
        isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in hidden):
      raise ValueError(f"config.adaptor.hidden={hidden!r} must be a tuple of positive ints "
                       "(() for one affine layer)")
    config.adaptor.hidden = tuple(hidden)
    config_lib.choice(config.adaptor.activation, "adaptor.activation", tuple(ACTIVATIONS))
    config_lib.choice(config.adaptor.init, "adaptor.init", INITS)
    if config.adaptor.init != "identity" and config.adaptor.hidden:
      raise ValueError(f"config.adaptor.init={config.adaptor.init!r} needs "
                       f"config.adaptor.hidden=() (a linear adaptor), got {config.adaptor.hidden}")
    config_lib.positive_int(config.k, "k")
    if config.k > config.batch_size - 1:
      raise ValueError(f"config.k={config.k} must be < config.batch_size={config.batch_size} "
                       "(the neighbours are the other rows of the batch)")
    for name in ("topk_weight", "pair_weight", "reconstruction_weight", "rank_weight"):
      config_lib.non_negative(config[name], name)
    if not (config.topk_weight or config.pair_weight or config.reconstruction_weight
            or (config.rank_weight and config.pairs_file is not None)):
      raise ValueError("every loss weight is 0 (config.topk_weight, pair_weight, "
                       "reconstruction_weight, rank_weight): nothing to train")
    if not (isinstance(config.scale, (int, float)) and not isinstance(config.scale, bool)
            and np.isfinite(config.scale) and config.scale > 0):
      raise ValueError(f"config.scale={config.scale!r} must be a finite number > 0")
    config_lib.choice(config.gap, "gap", GAPS)
    config_lib.validate_binary_aware(config)
    f = config.eval_fraction
    if not (isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f < 1):
      raise ValueError(f"config.eval_fraction={f!r} must be in (0, 1)")
    config_lib.positive_int(config.eval_max_rows, "eval_max_rows")
    config_lib.positive_int(config.eval_k, "eval_k")
    if config.pair_batch_size is not None:
      config_lib.positive_int(config.pair_batch_size, "pair_batch_size")
      if config.pair_batch_size < 2:
        raise ValueError("config.pair_batch_size must be >= 2: the other documents are the "
                         "negatives")
    if config.embeddings_file is None:
      raise ValueError("config.embeddings_file is required: a .npy float32 array [N, D] "
                       "(--config.embeddings_file=PATH)")
    data = read_data(cls.parse_spec(config))  # embed_dim and nesting still None here
    d = data.embeddings.shape[1]
    if config.encoder.embed_dim not in (None, d):
      raise ValueError(f"config.encoder.embed_dim={config.encoder.embed_dim} differs from "
                       f"D={d} of config.embeddings_file (leave it None)")
    config_lib.fill_nesting(config, d)
    if config.select_max_dim is not None:
      config_lib.positive_int(config.select_max_dim, "select_max_dim")
      if config.select_max_dim < min(config.nesting.dims):
        raise ValueError(f"config.select_max_dim={config.select_max_dim} is below every "
                         f"nested dim {tuple(config.nesting.dims)}: nothing to select by")
    if config.text_encoder is not None:
      check_text_encoder(config.text_encoder, d)

  def __init__(self, config: AdaptorSpec, *, workdir: str, mesh: jax.sharding.Mesh):
    super().__init__(config, workdir=workdir, mesh=mesh)
    self.data = data = read_data(config)
    self.dims = tuple(config.nesting.dims)
    self.embed_dim = int(config.encoder.embed_dim)
    # bf16 dense layers with config.half_precision; the skip and the output stay float32.
    self.model = MatryoshkaAdaptor(
        hidden=tuple(config.adaptor.hidden), activation=config.adaptor.activation,
        dtype=jnp.bfloat16 if config.half_precision else jnp.float32)
    self.rows = EpochBatches(data.train_rows.size, config.batch_size, seed=config.seed,
                             tag=_ROWS_TAG)
    self.steps_per_epoch = self.rows.batches_per_epoch
    self.pairs = None
    if data.supervised:
      size = config.pair_batch_size
      if size is None:  # batch_size, capped at the training pairs (a multiple of the devices)
        size = min(config.batch_size, data.train_pairs.shape[0] // mesh.size * mesh.size)
      if size < 2 or size % mesh.size:
        raise ValueError(f"config.pair_batch_size={size} must be >= 2 and divide evenly over "
                         f"{mesh.size} devices ({data.train_pairs.shape[0]} training pairs)")
      self.pairs = EpochBatches(data.train_pairs.shape[0], size, seed=config.seed,
                                tag=_PAIRS_TAG)
    self._apply = jax.jit(lambda params, x: self.model.apply({"params": params}, x))
    # None unless a binary-aware weight is > 0.
    self.binary_terms = config.binary_aware(self.dims, tuple(config.nesting.weights),
                                            scale=config.scale)
    self._baselines: dict[str, dict] | None = None

  # --- model and loss -----------------------------------------------------------------

  def init_variables(self, rng: jax.Array) -> base.Variables:
    return self.model.init(rng, jnp.zeros((1, self.embed_dim), jnp.float32))

  def pretrained_variables(self) -> base.Variables | None:
    """With ``config.adaptor.init="pca"`` / ``"pca_centred"``: the linear adaptor that starts
    as the ``pca_uncentred`` / ``pca`` baseline.

    ``f(e) = e + e W + b`` with ``W = V^T - I``, ``b = -mu V^T`` and ``V`` the
    principal axes of the training rows (:func:`~mrl_jax.evaluate.adaptor.fit_pca`,
    the rows of ``V`` sorted by variance), ``mu`` their mean (``"pca_centred"``) or 0
    (``"pca"``, ``center=False``): ``f(e) = (e - mu) V^T``, whose ``m``-prefix is PCA to
    ``m`` dims. Uncentred, ``f`` is orthogonal (full-size cosines kept exactly);
    centred, the translation by ``mu`` changes cosines but classical PCA's prefixes
    are what the step starts from. Training then starts from that baseline instead
    of truncation.
    """
    init = self.config.adaptor.init
    if init == "identity":
      return None
    fit = fit_pca(self._pca_rows(), center=init == "pca_centred")
    kernel = fit.components.T - np.eye(self.embed_dim, dtype=np.float32)
    bias = -fit.mean @ fit.components.T
    return {"params": {"out": {"kernel": kernel.astype(np.float32),
                               "bias": bias.astype(np.float32)}}}

  def _pca_rows(self) -> np.ndarray:
    """At most :data:`PCA_MAX_ROWS` training rows (a fixed random subset), for PCA fits."""
    train = self.data.train_rows
    if train.size > PCA_MAX_ROWS:
      train = np.sort(np.random.default_rng([_SPLIT_TAG, 3]).permutation(train)[:PCA_MAX_ROWS])
    return self.data.embeddings[train]

  def loss_and_metrics(self, params, model_state, batch, rng):
    """:func:`~mrl_jax.losses.adaptor.adaptor_loss` of one global batch.

    One adaptor forward over the rows, queries and documents together; plus the
    binary-aware terms when on (:class:`~mrl_jax.losses.BinaryAware`: on the pairs
    in the supervised mode, else on the rows with their ``k`` full-size neighbours
    as positives). Metrics: ``topk_per_dim``, ``pair_per_dim`` (``rank_per_dim``,
    ``spread_out_per_dim``, ``binary_loss_per_dim``) ``[M]`` for the terms with a
    non-zero weight, and the scalar ``reconstruction``.
    """
    del rng
    c = self.config
    e = batch["embeddings"]
    parts = [e] if self.pairs is None else [e, batch["queries"], batch["documents"]]
    adapted = self.model.apply({"params": params}, jnp.concatenate(parts))
    kwargs = {}
    if self.pairs is not None:
      size = batch["queries"].shape[0]
      kwargs = dict(adapted_queries=adapted[e.shape[0]:e.shape[0] + size],
                    adapted_documents=adapted[e.shape[0] + size:])
    loss, terms = adaptor_loss(
        e, adapted[:e.shape[0]], self.dims, tuple(c.nesting.weights), k=c.k,
        topk_weight=c.topk_weight, pair_weight=c.pair_weight,
        reconstruction_weight=c.reconstruction_weight, rank_weight=c.rank_weight,
        scale=c.scale, gap=c.gap, **kwargs)
    metrics = {f"{name}_per_dim": jnp.stack([terms[f"{name}/dim_{m}"] for m in self.dims])
               for name in ("topk", "pair", "rank") if f"{name}/dim_{self.dims[0]}" in terms}
    metrics["reconstruction"] = terms["reconstruction"]
    if self.binary_terms is not None:
      if kwargs:  # supervised: the (query, document) pairs
        extra, binary = self.binary_terms.pairs(kwargs["adapted_queries"],
                                                kwargs["adapted_documents"])
      else:  # each row's k full-size neighbours in the batch are its positives
        extra, binary = self.binary_terms.grouped(adapted[:e.shape[0]],
                                                  neighbour_mask(e, c.k))
      loss = loss + extra
      metrics.update(binary)
    return loss, (model_state, metrics)

  # --- data ---------------------------------------------------------------------------

  def train_batches(self, start_step: int) -> Iterator[base.Batch]:
    """Global batch ``s``: training rows ``EpochBatches(s)`` (and pairs); this process's slice."""
    data, count, index = self.data, jax.process_count(), jax.process_index()
    step = start_step
    while True:
      rows = data.train_rows[self.rows(step)]
      local = rows.size // count
      batch = {"embeddings": data.embeddings[rows[index * local:(index + 1) * local]]}
      if self.pairs is not None:
        pairs = data.train_pairs[self.pairs(step)]
        local = pairs.shape[0] // count
        pairs = pairs[index * local:(index + 1) * local]
        batch["queries"] = data.queries[pairs[:, 0]]
        batch["documents"] = data.embeddings[pairs[:, 1]]
      yield batch
      step += 1

  def data_position(self, step: int) -> dict[str, Any]:
    position = {**super().data_position(step), "embeddings_file": self.config.embeddings_file,
                "num_rows": int(self.data.embeddings.shape[0]),
                "num_eval_rows": int(self.data.eval_rows.size)}
    if self.pairs is not None:
      position.update(pairs_file=self.config.pairs_file, pair_batch_size=self.pairs.batch_size,
                      num_train_pairs=int(self.data.train_pairs.shape[0]))
    return position

  # --- evaluation ---------------------------------------------------------------------

  def adapt(self, params: Any, x: np.ndarray) -> np.ndarray:
    """``f(x)`` ``[N, D]`` float32 in fixed-size chunks (one compiled program)."""
    out = []
    for start in range(0, x.shape[0], EVAL_CHUNK):
      chunk = x[start:start + EVAL_CHUNK]
      padded = np.pad(chunk, ((0, EVAL_CHUNK - chunk.shape[0]), (0, 0)))
      out.append(np.asarray(self._apply(params, padded))[:chunk.shape[0]])
    return np.concatenate(out).astype(np.float32)

  def _compare(self, transforms: dict) -> dict[str, dict[str, list[float]]]:
    """``{metric: {method: [value per dim]}}`` on the held-out rows (and pairs)."""
    data, k = self.data, self.config.eval_k
    kwargs = {}
    if data.supervised:
      kwargs = dict(pair_queries=data.queries[data.eval_queries],
                    pair_documents=data.embeddings[data.eval_rows], pairs=data.eval_pairs)
    results = compare_reductions(transforms, data.embeddings[data.eval_rows], self.dims, k=k,
                                 **kwargs)
    names = {f"neighbor_recall@{k}": "neighbor_recall", f"pair_recall@{k}": "pair_recall",
             f"pair_ndcg@{k}": "pair_ndcg"}
    return {names[metric]: {method: [float(per_dim[m]) for m in self.dims]
                            for method, per_dim in by_method.items()}
            for metric, by_method in results.items()}

  def baselines(self) -> dict[str, dict[str, list[float]]]:
    """Raw truncation and PCA (centred, uncentred; fit on training rows), computed once.

    PCA is fit on at most :data:`PCA_MAX_ROWS` training rows (a fixed random subset).
    """
    if self._baselines is None:
      fit = self._pca_rows()
      self._baselines = self._compare({"truncate": lambda x: x, "pca": fit_pca(fit),
                                       "pca_uncentred": fit_pca(fit, center=False)})
    return self._baselines

  def evaluate(self, variables: base.Variables) -> dict[str, Any]:
    """Per nested dim: the adaptor's metrics and the baselines', as ``*_per_dim`` arrays.

    ``neighbor_recall_per_dim`` (recall@``eval_k`` of the full-size exact neighbours
    among the held-out rows) and, supervised, ``pair_recall_per_dim`` /
    ``pair_ndcg_per_dim``; the baselines as ``<metric>_<method>_per_dim``
    (``truncate``, ``pca``, ``pca_uncentred``); and the adaptor's mean over the
    nested dims as the scalar ``<metric>_mean``; and ``selection_score``, the mean
    of :attr:`selection_metric` over :attr:`selection_dims` (what
    ``configs/adaptor.py`` selects the exported step by). Process 0 also writes
    ``workdir/plots/<metric>.png``.
    """
    params = variables["params"]
    adaptor = self._compare({"adaptor": functools.partial(self.adapt, params)})
    table = {metric: {**self.baselines()[metric], **by_method}
             for metric, by_method in adaptor.items()}
    out = {}
    for metric, by_method in table.items():
      for method, values in by_method.items():
        key = metric if method == "adaptor" else f"{metric}_{method}"
        out[f"{key}_per_dim"] = np.asarray(values, np.float32)
      out[f"{metric}_mean"] = float(np.mean(by_method["adaptor"]))  # the console's one number
    out[SELECTION_SCORE] = float(np.mean(
        [v for m, v in zip(self.dims, table[self.selection_metric]["adaptor"], strict=True)
         if m in self.selection_dims]))
    if jax.process_index() == 0:
      self.write_plots(table)
    return out

  def write_plots(self, table: dict[str, dict[str, list[float]]]) -> list[str]:
    """``workdir/plots/<metric>.png``: each method's metric (%) against the nested dim."""
    # matplotlib: imported only when a plot is written.
    from mrl_jax.evaluate.plots import plot_accuracy_vs_dim

    k, paths = self.config.eval_k, []
    for metric, by_method in table.items():
      label = {"neighbor_recall": f"neighbour recall@{k} (%)",
               "pair_recall": f"pair recall@{k} (%)", "pair_ndcg": f"pair nDCG@{k} (%)"}[metric]
      curves = {method: (self.dims, [100 * v for v in values])
                for method, values in by_method.items()}
      paths.append(plot_accuracy_vs_dim(
          curves, os.path.join(self.workdir, "plots", f"{metric}.png"), ylabel=label,
          title=f"Matryoshka-Adaptor, {self.data.eval_rows.size} held-out rows"))
    return paths

  @property
  def selection_metric(self) -> str:
    """The held-out metric of model selection: what the run trains for.

    ``"pair_ndcg"`` when pairs are given and trained on (``rank_weight > 0``), else
    ``"neighbor_recall"`` (pairs with ``rank_weight=0`` are only evaluated);
    ``selection_score`` is its mean over the nested dims.
    """
    return "pair_ndcg" if self.data.supervised and self.config.rank_weight > 0 \
        else "neighbor_recall"

  @property
  def selection_dims(self) -> tuple[int, ...]:
    """The nested dims ``<= config.select_max_dim`` (all of them when it is None)."""
    top = self.config.select_max_dim
    return tuple(m for m in self.dims if top is None or m <= top)

  def eval_metric_names(self) -> list[str]:
    metrics = METRICS if self.data.supervised else METRICS[:1]
    keys = [f"{metric}{suffix}" for metric in metrics
            for suffix in ("", *(f"_{method}" for method in BASELINES))]
    return [*(f"{metric}_mean" for metric in metrics), SELECTION_SCORE,
            *(f"{key}/dim_{m}" for key in keys for m in self.dims)]

  def describe(self, result: dict[str, Any]) -> str:
    """The comparison table (one row per nested dim) and where the plots are."""
    ev, k = result["eval"], self.config.eval_k
    tables = {}
    for metric in METRICS:
      if f"{metric}_per_dim" not in ev:
        continue
      by_method = {}
      for method in (*BASELINES, "adaptor"):
        key = metric if method == "adaptor" else f"{metric}_{method}"
        by_method[method] = dict(zip(self.dims, ev[f"{key}_per_dim"], strict=True))
      tables[f"{metric}@{k}"] = by_method
    return (f"held-out rows: {self.data.eval_rows.size}\n" + format_reduction_table(tables)
            + f"\nplots: {os.path.join(self.workdir, 'plots')}")

  # --- export ---------------------------------------------------------------------------

  def checkpoint_metadata(self) -> dict[str, Any]:
    return {"embed_dim": self.embed_dim, "num_rows": int(self.data.embeddings.shape[0])}

  def model_config(self) -> dict[str, Any]:
    """``config.json`` of an embedding bundle: what :class:`~mrl_jax.bundle.encoder.Encoder`
    rebuilds."""
    c = self.config
    return {
        "model_type": "mrl_jax_embedding_adaptor",
        "embed_dim": self.embed_dim,
        "is_matryoshka": True,
        "matryoshka_dimensions": [int(m) for m in self.dims],
        "adaptor": {"hidden": [int(w) for w in self.model.hidden],
                    "activation": self.model.activation},
        "input": {"shape": [self.embed_dim], "dtype": "float32"},
        "data": {"embeddings_file": c.embeddings_file, "queries_file": c.queries_file,
                 "pairs_file": c.pairs_file},
        # A copy of config.text_encoder: texts -> full-size unit-norm embedding -> adaptor.
        "text_encoder": None if c.text_encoder is None else {
            "path": TEXT_ENCODER_DIR, "source": os.path.abspath(c.text_encoder),
            "adaptor_input": "full-size L2-normalised text embedding"},
    }

  def baseline_record(self, params: Any, *, step: int) -> dict[str, Any]:
    """The held-out metrics of ``params`` beside the baselines', per nested dim.

    Returns:
      ``{"step", "eval_k", "num_eval_rows", "dims", "selection_metric",
      "selection_dims", "metrics":
      {metric: {"adaptor": [M], "truncate": [M], "pca": [M], "pca_uncentred": [M],
      "beats": {baseline: [M] bools}}}}``; ``beats[b][i]`` is ``adaptor[i] >= b[i]``
      (values are in [0, 1], the metrics of :meth:`evaluate` on the held-out rows).
    """
    adaptor = self._compare({"adaptor": functools.partial(self.adapt, params)})
    metrics = {}
    for metric, by_method in adaptor.items():
      ours = by_method["adaptor"]
      base_values = {b: self.baselines()[metric][b] for b in BASELINES}
      metrics[metric] = {"adaptor": ours, **base_values,
                         "beats": {b: [bool(a >= v) for a, v in zip(ours, values, strict=True)]
                                   for b, values in base_values.items()}}
    return {"step": int(step), "eval_k": int(self.config.eval_k),
            "num_eval_rows": int(self.data.eval_rows.size), "dims": [int(m) for m in self.dims],
            "selection_metric": self.selection_metric,
            "selection_dims": [int(m) for m in self.selection_dims], "metrics": metrics}

  def warn_below_baselines(self, record: dict[str, Any]) -> list[str]:
    """One :class:`BelowBaselineWarning` per metric listing the dims below a baseline.

    Returns:
      The warning lines (empty when the adaptor is >= every baseline at every dim).
    """
    lines = []
    for metric, table in record["metrics"].items():
      dims, details = [], []
      for i, m in enumerate(record["dims"]):
        lost = [f"{b} {table[b][i]:.4f}" for b in BASELINES if not table["beats"][b][i]]
        if lost:
          dims.append(m)
          details.append(f"dim {m}: {table['adaptor'][i]:.4f} < " + ", ".join(lost))
      if dims:
        lines.append(f"the exported adaptor (step {record['step']}) is below a baseline in "
                     f"held-out {metric}@{record['eval_k']} at dims {dims} ("
                     + "; ".join(details) + "): at those dims the baseline serves better")
    for line in lines:
      warnings.warn(line, BelowBaselineWarning, stacklevel=3)
    return lines

  def export(self, variables: base.Variables, out_dir: str, *, step: int) -> None:
    """``config.json``, ``model.safetensors`` (``{"params": ...}``), ``mrl_jax.json``.

    With ``config.text_encoder`` its bundle is copied into ``out_dir/text_encoder``
    (covered by this bundle's hashes) and the export embeds texts too. ``mrl_jax.json``
    records, under ``"baselines"``, the held-out metrics of the exported step beside
    raw truncation and PCA per nested dim (:meth:`baseline_record`), and a
    :class:`BelowBaselineWarning` names every dim where the adaptor is below one.
    """
    if self.config.text_encoder is not None:
      check_text_encoder(self.config.text_encoder, self.embed_dim)  # unchanged since training
      shutil.copytree(self.config.text_encoder, os.path.join(out_dir, TEXT_ENCODER_DIR))
    model_config = self.model_config()
    fileio.write_json(os.path.join(out_dir, artifact.CONFIG_FILE), model_config,
                      what=artifact.CONFIG_FILE)
    artifact.save_weights(out_dir, {"params": variables["params"]})
    record = self.baseline_record(variables["params"], step=step)
    artifact.write_metadata(
        out_dir, modality="embedding", dims=model_config["matryoshka_dimensions"],
        weights=[float(w) for w in self.config.nesting.weights], is_matryoshka=True, step=step,
        task=self.name, training_config=specs.as_json(self.config), extra={RECORD_FIELD: record})
    self.warn_below_baselines(record)
