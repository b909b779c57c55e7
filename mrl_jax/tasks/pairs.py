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

The encoder is a local Hugging Face BERT (``config.model_dir``, e.g.
all-MiniLM-L6-v2) or a random one with a word-level vocabulary built from the
data; that vocabulary is saved in ``workdir/assets/`` on the first run and
reused on every resume (never rebuilt from files that may have changed). The
export is a sentence-transformers folder (:mod:`mrl_jax.models.hf_bert`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mrl_jax import config_lib, export
from mrl_jax.data.text import TextTokenizer, read_pairs, read_scored_pairs, tokenize_columns
from mrl_jax.evaluate.text import evaluate_text
from mrl_jax.losses import (
    in_batch_softmax,
    matryoshka,
    matryoshka_2d,
    nested_in_batch_softmax_per_dim,
    sample_nested_indices,
)
from mrl_jax.models.text import POOLINGS, BertConfig, TextEncoder, load_hf_bert
from mrl_jax.tasks import base, register

LOSSES = ("fused", "matryoshka", "2d")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOKENIZER_ASSET = os.path.join("assets", "tokenizer.json")
_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def word_tokenizer(texts: Sequence[str], *, max_length: int) -> TextTokenizer:
  """A lower-casing BERT tokenizer whose vocabulary is every word of ``texts``.

  For training a randomly initialised encoder offline: BERT's normaliser and
  pre-tokenizer, a WordPiece model over ``[PAD] [UNK] [CLS] [SEP] [MASK]`` plus
  the sorted distinct words (unknown words become ``[UNK]``), and ``[CLS] ...
  [SEP]`` around every text.
  """
  from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
  from tokenizers.models import WordPiece

  norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
  words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t))})
  vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *words))}
  tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer, tok.pre_tokenizer = norm, pre
  tok.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]),
                                                 ("[CLS]", vocab["[CLS]"]))
  return TextTokenizer(tok, max_length=max_length)


def _hidden_size_of(model_dir: str) -> int:
  path = os.path.join(model_dir, "config.json")
  try:
    with open(path, encoding="utf-8") as f:
      return int(json.load(f)["hidden_size"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"config.model_dir={model_dir!r}: cannot read hidden_size from {path}: "
                     f"{e}") from None


def n_dims_per_step(config: ml_collections.ConfigDict) -> int | None:
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

  @classmethod
  def validate(cls, config: ml_collections.ConfigDict) -> None:
    for name in ("train_file", "eval_file", "eval_pairs_file"):
      path = config[name]
      if (path is not None or name == "train_file") and not os.path.isfile(str(path)):
        raise ValueError(f"config.{name}={path!r} is not a file")
    if config.model_dir is not None:
      if not os.path.isdir(config.model_dir):
        raise ValueError(f"config.model_dir={config.model_dir!r} is not a folder")
      hidden = _hidden_size_of(config.model_dir)
      if config.encoder.embed_dim not in (None, hidden):
        raise ValueError(f"config.encoder.embed_dim={config.encoder.embed_dim} differs from "
                         f"the hidden size {hidden} of config.model_dir")
      embed_dim = hidden
    else:
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
    if config.max_length < 2:
      raise ValueError(f"config.max_length={config.max_length} must be >= 2 ([CLS] and [SEP])")

  def __init__(self, config: ml_collections.ConfigDict, *, workdir: str,
               mesh: jax.sharding.Mesh):
    super().__init__(config, workdir=workdir, mesh=mesh)
    self.dims = tuple(config.nesting.dims)
    self.weights = jnp.asarray(config.nesting.weights, jnp.float32)
    self.train_pairs = read_pairs(config.train_file)
    self._pretrained = None
    if config.model_dir is not None:
      bert = load_hf_bert(config.model_dir, pooling=config.pooling, max_length=config.max_length)
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
          pooling=config.pooling or "mean")
    num = len(self.train_pairs)
    if num < config.batch_size:
      raise ValueError(f"config.batch_size={config.batch_size} is larger than the {num} "
                       f"training pairs in {config.train_file}")
    self.steps_per_epoch = num // config.batch_size
    self._loss = make_pair_loss(config, self.dims)
    self._encode = jax.jit(lambda params, *args: self.model.apply({"params": params}, *args))
    self._scored, self._eval_pairs = eval_data(config)
    self._arrays = None

  def _run_tokenizer(self) -> TextTokenizer:
    """The run's word vocabulary: read from ``workdir/assets`` if saved, else built and saved."""
    path = os.path.join(self.workdir, TOKENIZER_ASSET)
    if os.path.isfile(path):
      return TextTokenizer.from_file(path, max_length=self.config.max_length)
    texts = [t for row in self.train_pairs for t in row]
    if self.config.eval_file:
      a, b, _ = read_scored_pairs(self.config.eval_file)
      texts += a + b
    if self.config.eval_pairs_file:
      texts += [t for row in read_pairs(self.config.eval_pairs_file) for t in row]
    tokenizer = word_tokenizer(texts, max_length=self.config.max_length)
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tokenizer.tokenizer.save(path + ".tmp")
      os.replace(path + ".tmp", path)
    return tokenizer

  # --- model and loss ---------------------------------------------------------------

  def init_variables(self, rng: jax.Array) -> base.Variables:
    ones = jnp.ones((1, 2), jnp.int32)
    return self.model.init(rng, ones, ones)

  def pretrained_variables(self) -> base.Variables | None:
    return self._pretrained

  def loss_and_metrics(self, params, model_state, batch, rng):
    dropout_rng, loss_rng = jax.random.split(rng)
    size = batch["anchor"]["input_ids"].shape[0]
    all_layers = self.config.loss == "2d"
    joined = [jnp.concatenate([batch["anchor"][k], batch["positive"][k]]) for k in _TOKEN_KEYS]
    out = self.model.apply({"params": params}, *joined, train=True, all_layers=all_layers,
                           rngs={"dropout": dropout_rng})
    pooled, layers = out if all_layers else (out, None)
    args = (layers[:, :size], layers[:, size:]) if all_layers else (pooled[:size], pooled[size:])
    loss = self._loss(*args, rng=loss_rng)
    pooled = jax.lax.stop_gradient(pooled)
    per_dim = nested_in_batch_softmax_per_dim(pooled[:size], pooled[size:], self.dims,
                                              scale=self.config.scale)
    return loss, (model_state, {"loss_per_dim": per_dim})

  # --- data -------------------------------------------------------------------------

  def train_batches(self, start_step: int) -> Iterator[base.Batch]:
    if self._arrays is None:
      self._arrays = tokenize_columns(self.tokenizer, self.train_pairs,
                                      pad_to=self.config.max_length)
    return pair_batches(self._arrays, batch_size=self.config.batch_size, seed=self.config.seed,
                        start_step=start_step)

  def data_position(self, step: int) -> dict[str, Any]:
    return {**super().data_position(step), "train_file": self.config.train_file,
            "num_pairs": len(self.train_pairs)}

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
                         scored=self._scored, pairs=self._eval_pairs)

  def eval_metric_names(self) -> list[str]:
    names = []
    if self.config.eval_file:
      names.append("spearman")
    if self.config.eval_pairs_file:
      names += ["recall_at_1", "recall_at_10", "mrr_at_10"]
    return [f"{n}/dim_{m}" for n in names for m in self.dims]

  def checkpoint_metadata(self) -> dict[str, Any]:
    return {"bert_config": dataclasses.asdict(self.model.config), "pooling": self.model.pooling}

  def export(self, variables: base.Variables, out_dir: str, *, step: int) -> None:
    from mrl_jax.models.hf_bert import save_sentence_transformer

    save_sentence_transformer(
        out_dir, params=variables["params"], config=self.model.config,
        tokenizer=self.tokenizer.tokenizer, pooling=self.model.pooling,
        max_seq_length=self.tokenizer.max_length, matryoshka_dimensions=self.dims,
        normalize=True, overwrite=True)
    export.write_metadata(
        out_dir, modality="text", dims=list(self.dims),
        weights=[float(w) for w in np.asarray(self.weights)], is_matryoshka=True, step=step,
        task=self.name, training_config=config_lib.plain(self.config.to_dict()))


def eval_data(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """``(scored, pairs)`` for :func:`~mrl_jax.evaluate.text.evaluate_text` from the eval files.

  ``scored = (texts_a, texts_b, gold [N])`` from ``config.eval_file``;
  ``pairs = (anchors, positives)`` from ``config.eval_pairs_file``; None where unset.
  """
  scored = read_scored_pairs(config.eval_file) if config.get("eval_file") else None
  rows = read_pairs(config.eval_pairs_file) if config.get("eval_pairs_file") else None
  return scored, ([r[0] for r in rows], [r[1] for r in rows]) if rows else None


def make_pair_loss(config: ml_collections.ConfigDict, dims: tuple[int, ...]):
  """``loss(anchors, positives, *, rng) -> float32 scalar`` for ``config.loss``.

  ``"fused"`` and ``"matryoshka"`` take ``[B, D]`` embeddings, ``"2d"`` takes the
  pooled output of every layer ``[L, B, D]``. With ``n_dims_per_step=k`` the sum
  runs over ``k`` sizes drawn per step (the fused loss still computes all sizes
  in its one blocked matmul and zeroes the weights of the others).
  """
  weights, scale, k = tuple(config.nesting.weights), config.scale, n_dims_per_step(config)
  base_loss = functools.partial(in_batch_softmax, scale=scale)
  if config.loss == "fused":
    w = jnp.asarray(weights, jnp.float32)

    def fused(anchors, positives, *, rng):
      per_dim = nested_in_batch_softmax_per_dim(anchors, positives, dims, scale=scale)
      if k is None:
        return jnp.sum(w * per_dim)
      picked = sample_nested_indices(rng, len(dims), k)
      return jnp.sum(jnp.zeros_like(w).at[picked].set(w[picked]) * per_dim)

    return fused
  if config.loss == "matryoshka":
    nested = matryoshka(base_loss, dims, weights, n_dims_per_step=k)
    return (lambda a, p, *, rng: nested(a, p)) if k is None else nested
  return matryoshka_2d(base_loss, dims, weights, n_dims_per_step=k,
                       n_layers_per_step=config.n_layers_per_step)


def pair_batches(arrays: Mapping[str, Mapping[str, np.ndarray]], *, batch_size: int, seed: int,
                 start_step: int = 0) -> Iterator[dict]:
  """An endless, seeded iterator of this process's share of each global batch.

  Epoch ``e`` visits the rows in the order ``default_rng([seed, e]).permutation(N)``
  (the last partial batch dropped), so batch ``s`` depends only on ``seed`` and
  ``s``: a run resumed at ``start_step`` reads nothing before it.

  Args:
    arrays: ``{column: {key: [N, T]}}`` from :func:`~mrl_jax.data.text.tokenize_columns`.
    batch_size: the GLOBAL batch size ``<= N``.

  Yields:
    ``{column: {key: [b, T]}}`` with ``b = batch_size // jax.process_count()``.
  """
  num = len(next(iter(next(iter(arrays.values())).values())))
  per_epoch = num // batch_size
  if per_epoch < 1:
    raise ValueError(f"batch_size={batch_size} is larger than the {num} training pairs")
  local = batch_size // jax.process_count()
  offset = jax.process_index() * local
  step = start_step
  while True:
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num)
    rows = order[i * batch_size:(i + 1) * batch_size][offset:offset + local]
    yield jax.tree.map(lambda x, rows=rows: x[rows], dict(arrays))
    step += 1
