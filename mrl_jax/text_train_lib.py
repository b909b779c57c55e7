"""Matryoshka training of a BERT text encoder on (anchor, positive) pairs.

One encoder forward per step over the anchors and positives together; every
nested size is a slice of the same pooled embedding ``[B, H]``. The step is one
``jax.jit`` over the ``("data",)`` mesh (batch sharded, state replicated and
donated), reusing the classifier stack's :class:`~mrl_jax.train_lib.TrainState`,
non-finite-loss stop, :class:`~mrl_jax.checkpoints.Checkpointer`,
:class:`~mrl_jax.metric_writers.MetricWriter` and :mod:`mrl_jax.optim`.

Losses (``config.loss``), all ``sum_m w_m L_m`` over the nested sizes ``m``
with ``L_m`` the in-batch softmax on truncated, renormalised embeddings:

* ``"fused"``: :func:`~mrl_jax.losses.nested_in_batch_softmax_per_dim`;
* ``"matryoshka"``: the unfused :func:`~mrl_jax.losses.matryoshka` wrapper;
* ``"2d"``: :func:`~mrl_jax.losses.matryoshka_2d` over dims and layers.

After training the encoder is exported to ``workdir/text_encoder/`` (Orbax
arrays, ``tokenizer.json`` and JSON metadata; no pickles) and
:func:`load_text_encoder` reads it back.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

import mrl_jax
from mrl_jax import config_lib, optim, sts, train_lib
from mrl_jax import sharding as sharding_lib
from mrl_jax.checkpoints import Checkpointer
from mrl_jax.data import pipeline
from mrl_jax.data.text import TextTokenizer, read_pairs, read_scored_pairs, tokenize_columns
from mrl_jax.losses import (
  in_batch_softmax,
  matryoshka,
  matryoshka_2d,
  nested_in_batch_softmax_per_dim,
  sample_nested_indices,
)
from mrl_jax.metric_writers import MetricWriter, expand_per_dim
from mrl_jax.models.text import POOLINGS, BertConfig, HFBert, TextEncoder, load_hf_bert
from mrl_jax.nesting import Nesting, default_dims

LOSSES = ("fused", "matryoshka", "2d")
EXPORT_DIRNAME = "text_encoder"
EXPORT_FORMAT = "mrl_jax.text_encoder"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

PairLoss = Callable[..., jax.Array]


# --- Config and encoder --------------------------------------------------------


def validate_text_config(config: ml_collections.ConfigDict, *, hidden_size: int,
                         num_devices: int | None = None) -> ml_collections.ConfigDict:
  """Check a ``configs/text_pairs.py`` config; return a locked copy with dims/weights filled.

  Derived: ``dims`` (powers of two from 8 up to ``hidden_size`` when None)
  and ``weights`` (ones when None).

  Raises:
    ValueError: naming the offending field, e.g. a dim larger than the
      encoder's ``hidden_size`` or a ``weights`` count that differs from ``dims``.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  dims = config.dims
  if dims is None:
    dims = default_dims(hidden_size, start=min(8, hidden_size))
  try:
    nesting = Nesting(tuple(dims), config.weights, embed_dim=hidden_size)
  except ValueError as e:
    raise ValueError(f"config.dims/config.weights: {e} (encoder hidden_size={hidden_size})") \
        from None
  config.dims, config.weights = nesting.dims, nesting.weights
  if config.loss not in LOSSES:
    raise ValueError(f"config.loss={config.loss!r}; choose one of {LOSSES}")
  k = config.n_dims_per_step
  if k is not None and (isinstance(k, bool) or not isinstance(k, int)
                        or not 1 <= k <= len(nesting.dims)):
    raise ValueError(f"config.n_dims_per_step={k!r} must be None or an int in "
                     f"[1, {len(nesting.dims)}]")
  if not config.scale > 0:
    raise ValueError(f"config.scale={config.scale!r} must be positive")
  batch = config_lib._positive_int(config.batch_size, "batch_size")
  if batch < 2:
    raise ValueError("config.batch_size must be >= 2: the other positives are the negatives")
  if num_devices and batch % num_devices:
    raise ValueError(f"batch_size={batch} does not divide evenly over {num_devices} devices")
  for name in ("num_train_steps", "max_length", "eval_batch_size", "log_every_steps",
               "eval_every_steps", "checkpoint_every_steps"):
    config_lib._positive_int(config[name], name)
  if config.optimizer not in config_lib.OPTIMIZERS:
    raise ValueError(f"config.optimizer={config.optimizer!r}; choose one of "
                     f"{config_lib.OPTIMIZERS}")
  if config.pooling is not None and config.pooling not in POOLINGS:
    raise ValueError(f"config.pooling={config.pooling!r}; choose one of {POOLINGS}")
  for name in ("train_file", "eval_file", "eval_pairs_file"):
    path = config[name]
    if (path is not None or name == "train_file") and not os.path.isfile(str(path)):
      raise ValueError(f"config.{name}={path!r} is not a file")
  config.lock()
  return config


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


def build_encoder(config: ml_collections.ConfigDict) -> HFBert:
  """The encoder to fine-tune: a local HF BERT (``config.model_dir``) or a random one.

  Returns:
    An :class:`~mrl_jax.models.text.HFBert`; ``params`` is None for a random
    encoder (initialised with the train state).
  """
  if config.model_dir is not None:
    bert = load_hf_bert(config.model_dir, pooling=config.pooling, max_length=config.max_length)
    return dataclasses.replace(bert, normalize=True)
  texts = [t for row in read_pairs(config.train_file) for t in row]
  for name in ("eval_file", "eval_pairs_file"):
    if config.get(name) and os.path.isfile(config[name]):
      texts += _eval_texts(config[name], name)
  enc = config.encoder
  tokenizer = word_tokenizer(texts, max_length=config.max_length)
  bert_config = BertConfig(
      vocab_size=tokenizer.tokenizer.get_vocab_size(), hidden_size=enc.hidden_size,
      num_layers=enc.num_layers, num_heads=enc.num_heads,
      intermediate_size=enc.intermediate_size, max_position_embeddings=config.max_length,
      hidden_dropout=enc.dropout, attention_dropout=enc.dropout)
  model = TextEncoder(bert_config, pooling=config.pooling or "mean")
  return HFBert(model, None, tokenizer, normalize=True)


def _eval_texts(path: str, name: str) -> list[str]:
  if name == "eval_file":
    a, b, _ = read_scored_pairs(path)
    return a + b
  return [t for row in read_pairs(path) for t in row]


def create_pair_state(rng: jax.Array, model: TextEncoder, tx: optax.GradientTransformation,
                      params: Any | None, mesh: jax.sharding.Mesh) -> train_lib.TrainState:
  """A replicated :class:`~mrl_jax.train_lib.TrainState` (``batch_stats`` empty).

  Args:
    params: pretrained ``params`` to start from, or None to initialise ``model``.
  """

  def init(rng, params):
    init_rng, state_rng = jax.random.split(rng)
    if params is None:
      ones = jnp.ones((1, 2), jnp.int32)
      params = model.init(init_rng, ones, ones)["params"]
    return train_lib.TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                       batch_stats={}, rng=state_rng)

  return jax.jit(init, out_shardings=sharding_lib.replicated(mesh))(rng, params)


# --- Loss and train step -------------------------------------------------------


def make_pair_loss(kind: str, dims: Sequence[int], weights: Sequence[float], *, scale: float,
                   n_dims_per_step: int | None = None, n_layers_per_step: int | None = 1,
                   ) -> PairLoss:
  """``loss(anchors, positives, *, rng) -> float32 scalar`` for ``config.loss == kind``.

  ``"fused"`` and ``"matryoshka"`` take ``[B, H]`` embeddings, ``"2d"`` takes the
  pooled output of every layer ``[L, B, H]``. With ``n_dims_per_step=k`` the sum
  runs over ``k`` sizes drawn per step (the fused loss still computes all sizes
  in its one blocked matmul and zeroes the weights of the others).
  """
  base = functools.partial(in_batch_softmax, scale=scale)
  if kind == "fused":
    w = jnp.asarray(Nesting(tuple(dims), tuple(weights)).weights, jnp.float32)

    def fused(anchors, positives, *, rng):
      per_dim = nested_in_batch_softmax_per_dim(anchors, positives, dims, scale=scale)
      if n_dims_per_step is None:
        return jnp.sum(w * per_dim)
      picked = sample_nested_indices(rng, len(dims), n_dims_per_step)
      return jnp.sum(jnp.zeros_like(w).at[picked].set(w[picked]) * per_dim)

    return fused
  if kind == "matryoshka":
    nested = matryoshka(base, dims, weights, n_dims_per_step=n_dims_per_step)
    if n_dims_per_step is None:
      return lambda a, p, *, rng: nested(a, p)
    return nested
  if kind == "2d":
    return matryoshka_2d(base, dims, weights, n_dims_per_step=n_dims_per_step,
                         n_layers_per_step=n_layers_per_step)
  raise ValueError(f"unknown loss {kind!r}; choose one of {LOSSES}")


def _joined(batch: Mapping[str, Mapping[str, jax.Array]]) -> list[jax.Array]:
  """Anchors then positives along the batch axis: ``[2B, T]`` ids, mask, types."""
  keys = ("input_ids", "attention_mask", "token_type_ids")
  return [jnp.concatenate([batch["anchor"][k], batch["positive"][k]]) for k in keys]


def pair_train_step(state: train_lib.TrainState, batch: dict[str, dict[str, jax.Array]], *,
                    loss_fn: PairLoss, all_layers: bool, dims: tuple[int, ...], scale: float,
                    learning_rate_fn: optax.Schedule,
                    ) -> tuple[train_lib.TrainState, dict[str, jax.Array]]:
  """One optimisation step on a batch of pairs.

  Args:
    state: replicated train state of a :class:`TextEncoder`.
    batch: ``{"anchor": {...}, "positive": {...}}``, each ``{"input_ids",
      "attention_mask", "token_type_ids"}`` int32 ``[B, T]``, sharded over ``"data"``.
    loss_fn: from :func:`make_pair_loss`; ``all_layers`` for the ``"2d"`` loss.

  Returns:
    The new state and metrics: ``loss`` (scalar), ``loss_per_dim`` ``[M]`` (the
    unweighted in-batch softmax at each size, for monitoring), ``learning_rate``.
  """
  dropout_rng, loss_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
  size = batch["anchor"]["input_ids"].shape[0]

  def loss_of(params):
    out = state.apply_fn({"params": params}, *_joined(batch), train=True,
                         all_layers=all_layers, rngs={"dropout": dropout_rng})
    pooled, layers = out if all_layers else (out, None)
    args = (layers[:, :size], layers[:, size:]) if all_layers else (pooled[:size], pooled[size:])
    return loss_fn(*args, rng=loss_rng), pooled

  (loss, pooled), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads)
  pooled = jax.lax.stop_gradient(pooled)
  per_dim = nested_in_batch_softmax_per_dim(pooled[:size], pooled[size:], dims, scale=scale)
  return state, {"loss": loss, "loss_per_dim": per_dim,
                 "learning_rate": learning_rate_fn(state.step - 1)}


def pair_batches(arrays: Mapping[str, Mapping[str, np.ndarray]], *, batch_size: int, seed: int,
                 start_step: int = 0) -> Iterator[dict]:
  """An endless, seeded iterator of this process's share of each global batch.

  Epoch ``e`` visits the rows in the order ``default_rng([seed, e]).permutation(N)``
  (the last partial batch dropped), so batch ``s`` depends only on ``seed`` and
  ``s``: a run resumed at ``start_step`` sees what an uninterrupted run would.

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


# --- Evaluation ------------------------------------------------------------------


def embed_texts(encode: Callable, params: Any, tokenizer: TextTokenizer, texts: Sequence[str], *,
                batch_size: int) -> np.ndarray:
  """Raw pooled embeddings ``[N, H]`` (not normalised) in fixed-shape batches.

  Every batch is padded to ``batch_size`` rows and ``tokenizer.max_length``
  tokens, so ``encode(params, ids, mask, types)`` compiles once.
  """
  out = []
  for start in range(0, len(texts), batch_size):
    chunk = list(texts[start:start + batch_size])
    tok = tokenizer(chunk, pad_to=tokenizer.max_length)
    pad = ((0, batch_size - len(chunk)), (0, 0))
    args = [np.pad(tok[k], pad) for k in ("input_ids", "attention_mask", "token_type_ids")]
    out.append(np.asarray(encode(params, *args))[:len(chunk)])
  return np.concatenate(out).astype(np.float32)


def retrieval_metrics_per_dim(anchors: np.ndarray, positives: np.ndarray,
                              dims: Sequence[int]) -> dict[str, np.ndarray]:
  """Anchor-to-positive retrieval over ``N`` pairs at each nested size.

  For size ``m`` both sides are truncated to ``[:, :m]`` and then L2-normalised;
  anchor ``i`` ranks all ``N`` positives by cosine. Its rank is
  ``r_i = 1 + #{j != i : cos(a_i, p_j) >= cos(a_i, p_i)}`` (ties count
  against the match). Then

  * ``recall_at_k = mean_i [r_i <= k]`` (one relevant item per query, so this is
    also the hit rate / accuracy@k), for ``k`` in 1 and 10;
  * ``mrr_at_10 = mean_i (1 / r_i if r_i <= 10 else 0)``.

  Args:
    anchors: ``[N, D]``; positives: ``[N, D]``, ``positives[i]`` the match of ``anchors[i]``.
    dims: nested sizes ``<= D``.

  Returns:
    ``{"recall_at_1_per_dim", "recall_at_10_per_dim", "mrr_at_10_per_dim"}``,
    each ``[M]`` float64. Uses ``O(N^2)`` memory per size.
  """
  dims = Nesting(tuple(dims), embed_dim=np.shape(anchors)[1]).dims
  out: dict[str, list[float]] = {"recall_at_1_per_dim": [], "recall_at_10_per_dim": [],
                                 "mrr_at_10_per_dim": []}
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  for m in dims:
    sims = unit(np.asarray(anchors, np.float64)[:, :m]) @ unit(
        np.asarray(positives, np.float64)[:, :m]).T
    own = np.diagonal(sims)[:, None]
    beaten = (sims >= own) & ~np.eye(len(sims), dtype=bool)
    rank = 1 + beaten.sum(axis=1)
    out["recall_at_1_per_dim"].append(float(np.mean(rank <= 1)))
    out["recall_at_10_per_dim"].append(float(np.mean(rank <= 10)))
    out["mrr_at_10_per_dim"].append(float(np.mean(np.where(rank <= 10, 1.0 / rank, 0.0))))
  return {k: np.asarray(v) for k, v in out.items()}


def evaluate_text(encode: Callable, params: Any, tokenizer: TextTokenizer, dims: Sequence[int], *,
                  scored: tuple[list[str], list[str], np.ndarray] | None,
                  pairs: list[tuple[str, ...]] | None, batch_size: int) -> dict[str, np.ndarray]:
  """Spearman of cosine vs gold scores and retrieval metrics, per nested size.

  Returns:
    ``spearman_per_dim`` ``[M]`` (:func:`mrl_jax.sts.spearman_per_dim`) when
    ``scored`` is given, and the :func:`retrieval_metrics_per_dim` entries when
    ``pairs`` is given.
  """
  embed = functools.partial(embed_texts, encode, params, tokenizer, batch_size=batch_size)
  out: dict[str, np.ndarray] = {}
  if scored is not None:
    texts_a, texts_b, scores = scored
    rho = sts.spearman_per_dim(embed(texts_a), embed(texts_b), scores, dims)
    out["spearman_per_dim"] = np.asarray([rho[m] for m in dims])
  if pairs is not None:
    out.update(retrieval_metrics_per_dim(embed([p[0] for p in pairs]),
                                         embed([p[1] for p in pairs]), dims))
  return out


# --- Export ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextEncoderBundle(HFBert):
  """An exported Matryoshka text encoder: :class:`HFBert` plus the trained ``dims``.

  ``embed(texts, dim=m)`` encodes, truncates to ``m`` and L2-normalises.
  """

  dims: tuple[int, ...] = ()


def save_text_encoder(directory: str, params: Any, model: TextEncoder, tokenizer: TextTokenizer,
                      *, dims: Sequence[int]) -> None:
  """Write ``params`` (Orbax), ``tokenizer.json`` and ``metadata.json`` under ``directory``.

  ``metadata.json``: ``{"format", "mrl_jax_version", "bert_config": {...},
  "pooling", "dims", "max_length", "normalize": true}``. Replaces an earlier export.
  """
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(directory, "params"), jax.device_get(params), force=True)
  tokenizer.tokenizer.save(os.path.join(directory, "tokenizer.json"))
  meta = {"format": EXPORT_FORMAT, "mrl_jax_version": mrl_jax.__version__,
          "bert_config": dataclasses.asdict(model.config), "pooling": model.pooling,
          "dims": [int(m) for m in dims], "max_length": tokenizer.max_length, "normalize": True}
  with open(os.path.join(directory, "metadata.json"), "w") as f:
    json.dump(meta, f, indent=1)


def load_text_encoder(directory: str) -> TextEncoderBundle:
  """Read an export of :func:`save_text_encoder`; loading runs no code from the files.

  Raises:
    ValueError: the metadata is not a valid text-encoder export.
  """
  from tokenizers import Tokenizer

  with open(os.path.join(directory, "metadata.json"), encoding="utf-8") as f:
    meta = json.load(f)
  if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
    raise ValueError(f"{directory} is not an {EXPORT_FORMAT} export")
  try:
    config = BertConfig(**meta["bert_config"])
  except TypeError as e:
    raise ValueError(f"{directory}: bad bert_config in metadata.json: {e}") from None
  if meta.get("pooling") not in POOLINGS:
    raise ValueError(f"{directory}: pooling {meta.get('pooling')!r} is not one of {POOLINGS}")
  dims = Nesting(tuple(meta["dims"]), embed_dim=config.hidden_size).dims
  model = TextEncoder(config, pooling=meta["pooling"])
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  ones = jnp.ones((1, 2), jnp.int32)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          jax.eval_shape(model.init, jax.random.PRNGKey(0), ones, ones)["params"])
  with ocp.StandardCheckpointer() as ckpt:
    params = ckpt.restore(os.path.join(os.path.abspath(directory), "params"), abstract)
  tokenizer = TextTokenizer(Tokenizer.from_file(os.path.join(directory, "tokenizer.json")),
                            max_length=int(meta["max_length"]))
  return TextEncoderBundle(model, params, tokenizer, normalize=True, dims=dims)


# --- The experiment ------------------------------------------------------------------


class PairExperiment:
  """Encoder, data, optimiser and state from a text-pairs config.

  ``PairExperiment(config, workdir)`` restores the latest checkpoint in
  ``workdir/checkpoints`` when there is one; :meth:`train` runs to
  ``num_train_steps``, evaluates and exports the encoder.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.mesh = sharding_lib.make_mesh()
    self.bert = build_encoder(config)
    model = self.bert.model
    self.config = config = validate_text_config(
        config, hidden_size=model.config.hidden_size, num_devices=self.mesh.size)
    self.workdir, self.dims = workdir, tuple(config.dims)
    self.total_steps = int(config.num_train_steps)
    self.schedule = optim.learning_rate_schedule(config, steps_per_epoch=1)
    self.state = create_pair_state(jax.random.PRNGKey(config.seed), model,
                                   optim.make_optimizer(config, self.schedule),
                                   self.bert.params, self.mesh)
    self.checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        {"config": json.loads(config_lib.to_json(config)), "dims": list(self.dims),
         "bert_config": dataclasses.asdict(model.config)},
        max_to_keep=config.max_to_keep)
    latest = self.checkpointer.latest_step()
    if latest is not None:
      self.state = self.checkpointer.restore(latest, self.state)
    self._to_global = functools.partial(
        pipeline.as_global, sharding=sharding_lib.batch_sharding(self.mesh))
    repl = sharding_lib.replicated(self.mesh)
    loss_fn = make_pair_loss(config.loss, self.dims, config.weights, scale=config.scale,
                             n_dims_per_step=config.n_dims_per_step,
                             n_layers_per_step=config.n_layers_per_step)
    self._train_step = jax.jit(
        functools.partial(pair_train_step, loss_fn=loss_fn, all_layers=config.loss == "2d",
                          dims=self.dims, scale=config.scale, learning_rate_fn=self.schedule),
        in_shardings=(repl, sharding_lib.batch_sharding(self.mesh)),
        out_shardings=(repl, repl), donate_argnums=0)
    self._encode = jax.jit(lambda params, *args: model.apply({"params": params}, *args))
    self._scored = read_scored_pairs(config.eval_file) if config.eval_file else None
    self._eval_pairs = read_pairs(config.eval_pairs_file) if config.eval_pairs_file else None

  @property
  def step(self) -> int:
    return int(jax.device_get(self.state.step))

  def evaluate(self) -> dict[str, np.ndarray]:
    """:func:`evaluate_text` of the current parameters on the config's eval files."""
    return evaluate_text(self._encode, self.state.params, self.bert.tokenizer, self.dims,
                         scored=self._scored, pairs=self._eval_pairs,
                         batch_size=self.config.eval_batch_size)

  def _train_arrays(self) -> dict:
    pairs = read_pairs(self.config.train_file)
    return tokenize_columns(self.bert.tokenizer, pairs, pad_to=self.config.max_length)

  def train(self, *, progress: bool = True) -> dict[str, Any]:
    """Run to ``num_train_steps``; evaluate; export to ``workdir/text_encoder``.

    Raises:
      NonFiniteLossError: as the classifier loop (the last good checkpoint survives).
    """
    config, main = self.config, jax.process_index() == 0
    writer = MetricWriter(self.workdir, enabled=main, echo=tqdm.write if progress else None)
    if main:
      train_lib.write_config(self.workdir, config)
    batches = pair_batches(self._train_arrays(), batch_size=config.batch_size,
                           seed=config.seed, start_step=self.step)
    pending, history = [], []
    bar = tqdm(total=self.total_steps, initial=self.step, disable=not (progress and main),
               desc="train pairs", unit="step")
    tick = time.perf_counter()
    try:
      for step in range(self.step + 1, self.total_steps + 1):
        self.state, metrics = self._train_step(self.state, self._to_global(next(batches)))
        pending.append((step, metrics["loss"]))
        history.append(metrics)
        bar.update(1)
        due = lambda every, step=step: step % every == 0 or step == self.total_steps
        if due(config.log_every_steps) or due(config.checkpoint_every_steps):
          train_lib.check_finite(pending, self.checkpointer)
          pending = []
        if due(config.log_every_steps):
          scalars = expand_per_dim(train_lib.mean_metrics(history), self.dims)
          scalars["pairs_per_sec"] = len(history) * config.batch_size / (
              time.perf_counter() - tick)
          writer.write_scalars(step, scalars, prefix="train/")
          history, tick = [], time.perf_counter()
        if due(config.eval_every_steps):
          writer.write_scalars(step, expand_per_dim(self.evaluate(), self.dims), prefix="eval/")
        if due(config.checkpoint_every_steps):
          self.checkpointer.save(step, self.state)
    finally:
      bar.close()
      writer.close()
      self.checkpointer.close()
    return self._finish(main)

  def _finish(self, main: bool) -> dict[str, Any]:
    ev = self.evaluate()
    result = {"step": self.step, "dims": list(self.dims), "loss": self.config.loss,
              "eval": {k: np.asarray(v).tolist() for k, v in ev.items()},
              "export_dir": os.path.abspath(os.path.join(self.workdir, EXPORT_DIRNAME))}
    if main:
      save_text_encoder(result["export_dir"], self.state.params, self.bert.model,
                        self.bert.tokenizer, dims=self.dims)
      train_lib.write_final_metrics(self.workdir, result)
    return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       progress: bool = True) -> dict[str, Any]:
  """Train a text-pairs config in ``workdir`` (resuming), evaluate and export the encoder.

  Returns:
    ``{"step", "dims", "loss", "export_dir", "eval": {"spearman_per_dim",
    "recall_at_1_per_dim", "recall_at_10_per_dim", "mrr_at_10_per_dim"}}``
    (lists over ``dims``), also written to ``workdir/final_metrics.json``.
  """
  os.makedirs(workdir, exist_ok=True)
  return PairExperiment(config, workdir).train(progress=progress)


def format_result(result: Mapping[str, Any]) -> str:
  """One line per eval metric: ``name: dim_m=value, ...`` for the console."""
  lines = []
  for name, values in result["eval"].items():
    cells = ", ".join(f"{m}: {v:.3f}" for m, v in zip(result["dims"], values, strict=True))
    lines.append(f"final eval {name.removesuffix('_per_dim')} per dim: {cells}")
  return "\n".join(lines + [f"encoder exported to {result['export_dir']}"])
