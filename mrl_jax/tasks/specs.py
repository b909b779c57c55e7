"""Each built-in task's typed spec: its config, parsed once at the boundary into frozen dataclasses.

:func:`mrl_jax.train.config.validate_config` checks a config (filling derived
fields such as ``encoder.embed_dim`` and the nesting), then the task's spec
class parses it (:meth:`mrl_jax.train.task.Task.parse_spec`); the task, its
model builder and its data readers see only the spec. Field names are those
of the config (``--config.encoder.depth=18`` sets ``spec.encoder.depth``);
closed choices are ``Literal`` types; a field no spec has is refused by name.
Defaults are those of the shipped ``configs/*.py``. This module imports no
TensorFlow and no model code, so specs parse on the text path too.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from mrl_jax.data.image_spec import ImageInputSpec
from mrl_jax.losses.binary import BinaryAware
from mrl_jax.train.specs import TaskSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class BinaryAwareSpec:
  """The binary-aware fields of every task that trains embeddings (off by default).

  :func:`mrl_jax.train.config.add_binary_aware` sets them in a config; the terms
  are :class:`mrl_jax.losses.BinaryAware`. The relaxed-code softmax runs at the
  task's ``scale`` (pairs, adaptor) or 20 (classification: sentence-transformers'
  in-batch softmax default).

  Attributes:
    spread_out_weight: weight (>= 0; 0: off) of the spread-out regularizer per nested dim
      (:func:`~mrl_jax.losses.spread_out_regularizer`).
    binary_weight: weight (>= 0; 0: off) of the contrastive loss on relaxed sign codes
      per nested dim (:func:`~mrl_jax.losses.binary_relaxed_in_batch_softmax`,
      :func:`~mrl_jax.losses.binary_relaxed_supervised_contrastive`).
    binary_estimator: ``"tanh"`` or ``"ste"`` (sign with a straight-through estimator).
    binary_temperature: of the ``tanh`` / STE relaxation, > 0.
  """

  spread_out_weight: float = 0.0
  binary_weight: float = 0.0
  binary_estimator: Literal["tanh", "ste"] = "tanh"
  binary_temperature: float = 1.0

  def binary_aware(self, dims, weights, *, scale: float = 20.0) -> BinaryAware | None:
    """The :class:`mrl_jax.losses.BinaryAware` terms of this spec, or None when both are off."""
    return BinaryAware.create(
        dims, weights, spread_out_weight=self.spread_out_weight,
        binary_weight=self.binary_weight, scale=scale, temperature=self.binary_temperature,
        estimator=self.binary_estimator)


# --- classification: one encoder section per backbone, chosen by encoder.name ------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLPEncoderSpec:
  """``config.encoder`` with ``name="mlp"`` (:class:`mrl_jax.models.MLP`).

  Attributes:
    name: ``"mlp"``.
    embed_dim: the embedding width ``D``.
    hidden: widths of the hidden layers.
  """

  name: Literal["mlp"] = "mlp"
  embed_dim: int = 64
  hidden: tuple[int, ...] = (256, 256)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CNNEncoderSpec:
  """``config.encoder`` with ``name="cnn"`` (:class:`mrl_jax.models.CNN`).

  Attributes:
    name: ``"cnn"``.
    embed_dim: the embedding width ``D``.
    features: channels of the conv layers.
  """

  name: Literal["cnn"] = "cnn"
  embed_dim: int = 64
  features: tuple[int, ...] = (32, 64)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResNetEncoderSpec:
  """``config.encoder`` with ``name="resnet"`` (:class:`mrl_jax.models.ResNet`).

  Attributes:
    name: ``"resnet"``.
    embed_dim: the pooled feature width ``D`` (2048 for ResNet-50).
    depth: 18, 34, 50, 101 or 152.
    width: channels of the first stage.
    stem: ``"imagenet"`` (7x7/2 conv, max-pool) or ``"cifar"`` (3x3/1 conv).
    zero_init_residual: zero the last norm scale of each block.
    bn_group_size: BatchNorm statistics over groups of this many examples
      (None: the whole global batch).
    bn_momentum: BatchNorm running-average momentum.
    bn_epsilon: BatchNorm epsilon.
  """

  name: Literal["resnet"] = "resnet"
  embed_dim: int = 2048
  depth: int = 50
  width: int = 64
  stem: Literal["imagenet", "cifar"] = "imagenet"
  zero_init_residual: bool = False
  bn_group_size: int | None = None
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTEncoderSpec:
  """``config.encoder`` with ``name="vit"`` (:class:`mrl_jax.models.ViT`).

  Attributes:
    name: ``"vit"``.
    embed_dim: the token width ``D`` (768 for ViT-B).
    patch_size: side of the square patches, pixels.
    num_layers, num_heads, mlp_dim: the transformer's shape.
    dropout_rate: dropout in the MLP blocks.
    pool: ``"cls"`` (class token) or ``"mean"`` (mean of the patch tokens).
  """

  name: Literal["vit"] = "vit"
  embed_dim: int = 768
  patch_size: int = 16
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  dropout_rate: float = 0.0
  pool: Literal["cls", "mean"] = "cls"


ImageEncoderSpec = MLPEncoderSpec | CNNEncoderSpec | ResNetEncoderSpec | ViTEncoderSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClassificationSpec(TaskSpec, BinaryAwareSpec):
  """``config.task = "classification"`` (``configs/digits_mlp.py``, the ImageNet / CIFAR configs).

  Attributes:
    dataset: the TFDS name (``"sklearn_digits"``, ``"imagenet2012"``, ...).
    data_dir: TFDS's data folder (None: its default, ``~/tensorflow_datasets``).
    train_split, eval_split: TFDS split names.
    shuffle_buffer: tf.data only: examples in the shuffle buffer, per process.
    input_pipeline: ``"grain"`` (ArrayRecord, exact resume) or ``"tf.data"``.
    encoder: the backbone, chosen by ``encoder.name``.
    head: ``"mrl"``, ``"mrl_e"`` (weight-tied) or ``"ff"`` (one fixed-feature head).
    ff_dim: ``head="ff"``: the k of FF-k (set to ``embed_dim`` when None).
    label_smoothing: in [0, 1), in every nested head.
    input: how images are prepared (:class:`~mrl_jax.data.image_spec.ImageInputSpec`).
    spread_out_weight, binary_weight, binary_estimator, binary_temperature: the
      binary-aware terms on the embedding ``z`` (:class:`BinaryAwareSpec`): the
      non-matching pairs are rows of different labels; the relaxed-code term is the
      supervised contrastive loss over same-label rows.
  """

  task: Literal["classification"] = "classification"
  dataset: str = "sklearn_digits"
  data_dir: str | None = None
  train_split: str = "train"
  eval_split: str = "test"
  shuffle_buffer: int = 2048
  input_pipeline: Literal["grain", "tf.data"] = "grain"
  encoder: ImageEncoderSpec = MLPEncoderSpec()
  head: Literal["mrl", "mrl_e", "ff"] = "mrl"
  ff_dim: int | None = None
  label_smoothing: float = 0.1
  input: ImageInputSpec = ImageInputSpec()


# --- pairs -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextEncoderSpec:
  """``config.encoder`` of the pairs task: the shape of a randomly initialised BERT.

  With ``config.model_dir`` the checkpoint's shape is used and only
  ``embed_dim`` is read (None before validation: the checkpoint's hidden size).

  Attributes:
    embed_dim: the hidden size ``D``.
    num_layers, num_heads, intermediate_size: the transformer's shape.
    dropout: hidden and attention dropout, in [0, 1).
  """

  embed_dim: int | None = 32
  num_layers: int = 2
  num_heads: int = 2
  intermediate_size: int = 64
  dropout: float = 0.1


@dataclasses.dataclass(frozen=True)
class ExportSpec:
  """``config.export`` of the pairs task: what the exported sentence-transformers folder serves.

  Attributes:
    max_seq_length: the served sequence length (None: the base model's, else the
      position table); never silently the training ``max_length``.
    prompts: sentence-transformers' ``prompts`` (e.g. ``{"query": "query: "}``).
    default_prompt_name: the prompt applied when none is named.
    calibration_size: training texts that calibrate the stored int8 ranges (0: none).
  """

  max_seq_length: int | None = None
  prompts: dict[str, str] | None = None
  default_prompt_name: str | None = None
  calibration_size: int = 256


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairsSpec(TaskSpec, BinaryAwareSpec):
  """``config.task = "pairs"`` (``configs/text_pairs.py``, ``configs/text_stdlib.py``).

  Attributes:
    train_file: (anchor, positive[, negatives]) JSONL/TSV files, comma-separated.
    train_weights: sampling weight per train file (None: by size).
    eval_file: STS file (sentence1, sentence2, score); None: skip.
    eval_pairs_file: retrieval pairs; None: skip.
    max_length: longest text, tokens.
    prepared_dir: where train files are tokenized into ArrayRecord shards, one folder
      per file's base name (None: ``workdir/prepared``).
    input_workers: grain worker processes building batches (0: threads), >= 0.
    batch_sampler: ``"default"`` or ``"no_duplicates"`` (no text twice in a global
      batch: sentence-transformers' ``NoDuplicatesBatchSampler``).
    model_dir: a local Hugging Face BERT folder to start from (None: random init).
    pooling: ``"mean"`` or ``"cls"`` (None: the checkpoint's, else mean).
    encoder: the BERT shape (random init) and ``embed_dim``.
    scale: inverse temperature of the in-batch softmax, > 0.
    n_dims_per_step: sentence-transformers' convention: -1 (or None) every dim each
      step, else that many sampled dims.
    loss: ``"fused"``, ``"matryoshka"`` (unfused wrapper) or ``"2d"`` (dims x layers).
    symmetric: also positive -> anchor (MultipleNegativesSymmetricRankingLoss).
    n_layers_per_step: ``loss="2d"``: layers sampled per step.
    spread_out_weight, binary_weight, binary_estimator, binary_temperature: the
      binary-aware terms on the anchors and positives (:class:`BinaryAwareSpec`).
    shortlist_k: the evaluation's ``ubinary`` shortlist, re-ranked in float at the full
      dim (>= 10; clipped to the eval pairs; :func:`mrl_jax.evaluate.text.binary_rerank_per_dim`).
    mini_batch_size: GradCache chunk (None: the whole batch at once).
    eval_batch_size: texts per evaluation batch.
    export: what the exported folder serves (:class:`ExportSpec`).
  """

  task: Literal["pairs"] = "pairs"
  train_file: str
  train_weights: tuple[float, ...] | None = None
  eval_file: str | None = None
  eval_pairs_file: str | None = None
  max_length: int = 32
  prepared_dir: str | None = None
  input_workers: int = 0
  batch_sampler: Literal["default", "no_duplicates"] = "default"
  model_dir: str | None = None
  pooling: Literal["mean", "cls"] | None = None
  encoder: TextEncoderSpec = TextEncoderSpec()
  scale: float = 20.0
  n_dims_per_step: int | None = -1
  loss: Literal["fused", "matryoshka", "2d"] = "fused"
  symmetric: bool = False
  n_layers_per_step: int = 1
  shortlist_k: int = 100
  mini_batch_size: int | None = None
  eval_batch_size: int = 64
  export: ExportSpec = ExportSpec()


# --- adaptor ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmbeddingSpec:
  """``config.encoder`` of the adaptor task: only the width of the stored embeddings.

  Attributes:
    embed_dim: ``D`` of ``config.embeddings_file`` (None before validation: read from it).
  """

  embed_dim: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaptorModelSpec:
  """``config.adaptor``: the residual map ``g`` of ``f(e) = e + g(e)``
  (:class:`mrl_jax.models.adaptor.MatryoshkaAdaptor`).

  Attributes:
    hidden: hidden widths of ``g`` (``()``: linear).
    activation: between hidden layers.
    init: ``"pca"`` (linear only: start at the uncentred-PCA rotation), ``"pca_centred"``
      (linear only: start at classical, centred PCA) or ``"identity"``.
  """

  hidden: tuple[int, ...] = ()
  activation: Literal["relu", "gelu", "silu", "tanh", "identity"] = "relu"
  init: Literal["identity", "pca", "pca_centred"] = "pca"


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaptorSpec(TaskSpec, BinaryAwareSpec):
  """``config.task = "adaptor"`` (``configs/adaptor.py``).

  Attributes:
    embeddings_file: float32 ``[N, D]`` ``.npy`` (required).
    queries_file: float32 ``[Q, D]`` ``.npy``: the supervised mode (with ``pairs_file``).
    pairs_file: int ``[P, 2]`` ``.npy`` of (queries_file row, embeddings_file row).
    pair_batch_size: pairs per step (None: ``batch_size``, capped).
    eval_fraction: held-out share of the rows, in (0, 1).
    eval_max_rows: at most this many held-out rows.
    eval_rows_file: int ``[E]`` ``.npy`` of held-out rows (instead of the fraction).
    eval_k: recall@k / nDCG@k cut-off.
    select_max_dim: ``selection_score`` (the exported step's criterion) averages the
      held-out metric over the nested dims ``<= select_max_dim`` (None: every dim).
    adaptor: the adaptor's shape.
    text_encoder: an exported text bundle whose embeddings ``embeddings_file`` holds
      (the exported adaptor then embeds text).
    encoder: the embedding width.
    k: neighbours per row of the top-k loss, within the global batch.
    topk_weight, pair_weight, reconstruction_weight, rank_weight: loss weights, >= 0
      (``rank_weight`` in the supervised mode only).
    scale: inverse temperature of the ranking loss, > 0.
    gap: ``"squared"`` or ``"abs"`` (the paper's ``|S - S_m|``).
    spread_out_weight, binary_weight, binary_estimator, binary_temperature: the
      binary-aware terms on the adapted embeddings (:class:`BinaryAwareSpec`): on the
      (query, document) pairs in the supervised mode; else on the rows, each row's
      ``k`` full-size neighbours in the batch its positives.
  """

  task: Literal["adaptor"] = "adaptor"
  embeddings_file: str | None = None
  queries_file: str | None = None
  pairs_file: str | None = None
  pair_batch_size: int | None = None
  eval_fraction: float = 0.1
  eval_max_rows: int = 5000
  eval_rows_file: str | None = None
  eval_k: int = 10
  select_max_dim: int | None = None
  adaptor: AdaptorModelSpec = AdaptorModelSpec()
  text_encoder: str | None = None
  encoder: EmbeddingSpec = EmbeddingSpec()
  k: int = 10
  topk_weight: float = 1.0
  pair_weight: float = 1.0
  reconstruction_weight: float = 0.0
  rank_weight: float = 0.05
  scale: float = 20.0
  gap: Literal["squared", "abs"] = "squared"
