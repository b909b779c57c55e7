"""A BERT-style Transformer text encoder (flax.linen) and a loader for Hugging Face checkpoints.

:class:`TextEncoder` maps token ids ``[B, T]`` to a pooled sentence embedding
``[B, H]`` (mean pooling over the attended tokens, or the ``[CLS]`` token) and,
on request, to the pooled embedding after every layer ``[L, B, H]`` (the input
of 2-D Matryoshka, :func:`mrl_jax.losses.matryoshka_2d`).

:func:`load_hf_bert` reads a local BERT checkpoint directory (``config.json``,
``model.safetensors`` read with ``safetensors``' numpy API, ``tokenizer.json``
read with ``tokenizers``): no PyTorch, no pickles, no network.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mrl_jax.core import fileio, ops
from mrl_jax.tokenizer import TextTokenizer

Dtype = Any

ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}
POOLINGS = ("mean", "cls")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Shape of a BERT encoder (the fields of a Hugging Face BERT ``config.json``).

  Attributes:
    vocab_size: number of token ids.
    hidden_size: ``H``, the width of every layer and of the embedding.
    num_layers: ``L``, Transformer layers.
    num_heads: attention heads; must divide ``hidden_size``.
    intermediate_size: width of the feed-forward block.
    max_position_embeddings: longest supported sequence ``T``.
    type_vocab_size: number of segment (token type) ids.
    layer_norm_eps: LayerNorm epsilon.
    hidden_act: feed-forward activation, one of :data:`ACTIVATIONS`.
    hidden_dropout: dropout after the embeddings and each sub-block (training only).
    attention_dropout: dropout on the attention weights (training only).
  """

  vocab_size: int
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"BertConfig.{name} must be a positive int, got {value!r}")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
    for name in ("hidden_dropout", "attention_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"BertConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
    if not self.layer_norm_eps > 0:
      raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> BertConfig:
    """The config of a Hugging Face ``BertModel`` (``model_type == "bert"``) ``config.json``."""
    model_type = config.get("model_type")
    if model_type != "bert":
      raise ValueError(f"load_hf_bert reads BERT checkpoints (model_type 'bert'), "
                       f"got model_type={model_type!r}")
    position = config.get("position_embedding_type", "absolute")
    if position != "absolute":
      raise ValueError(f"only absolute position embeddings are supported, got {position!r}")
    try:
      return cls(
          vocab_size=config["vocab_size"],
          hidden_size=config["hidden_size"],
          num_layers=config["num_hidden_layers"],
          num_heads=config["num_attention_heads"],
          intermediate_size=config["intermediate_size"],
          max_position_embeddings=config.get("max_position_embeddings", 512),
          type_vocab_size=config.get("type_vocab_size", 2),
          layer_norm_eps=config.get("layer_norm_eps", 1e-12),
          hidden_act=config.get("hidden_act", "gelu"),
          hidden_dropout=config.get("hidden_dropout_prob", 0.1),
          attention_dropout=config.get("attention_probs_dropout_prob", 0.1),
      )
    except KeyError as e:
      raise ValueError(f"config.json lacks the BERT field {e.args[0]!r}") from None


def pool(hidden: jax.Array, attention_mask: jax.Array, how: str) -> jax.Array:
  """``hidden [..., B, T, H]`` -> ``[..., B, H]`` float32.

  ``mean``: ``sum_t mask_t h_t / max(sum_t mask_t, 1e-9)`` (sentence-transformers'
  mean pooling); ``cls``: ``h_0``, the first token. The sum runs in float32
  whatever ``hidden``'s dtype (bf16 compute), so the embeddings the losses get
  are float32.
  """
  hidden = hidden.astype(jnp.float32)
  if how == "cls":
    return hidden[..., 0, :]
  mask = attention_mask.astype(hidden.dtype)[..., None]
  return jnp.sum(hidden * mask, axis=-2) / jnp.maximum(jnp.sum(mask, axis=-2), 1e-9)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Scaled dot-product attention over padded keys: ``softmax(q k^T / sqrt(d), mask) v``.

  ``jax.nn.dot_product_attention`` (XLA on CPU, where it equals the einsum
  form exactly; cuDNN or TPU kernels where JAX picks them). Logits and softmax
  run in float32 for low-precision inputs.

  Args:
    q, k, v: ``[B, T, heads, head_dim]``.
    mask: ``[B, T]`` bool, True for real (attended) key tokens.

  Returns:
    ``[B, T, heads, head_dim]`` in ``v``'s dtype.
  """
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])


def attention_with_dropout(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                           rate: float, rng: jax.Array) -> jax.Array:
  """:func:`attention` with dropout on the attention weights (BERT's training-time dropout).

  ``jax.nn.dot_product_attention`` has no dropout, so this is the explicit
  einsum-softmax form: weights ``softmax(q k^T / sqrt(d))`` (padded keys get
  the dtype's lowest value), each weight kept with probability ``1 - rate``
  and scaled by ``1 / (1 - rate)``. Logits and softmax run in float32 for
  low-precision inputs (as in :func:`attention`).
  """
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  scores = scores / np.sqrt(q.shape[-1]).astype(np.float32)
  scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
  weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
  keep = jax.random.bernoulli(rng, 1.0 - rate, weights.shape)
  weights = jnp.where(keep, weights / (1.0 - rate), 0.0).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class _Layer(nn.Module):
  """One post-LayerNorm BERT layer: self-attention and feed-forward, each with a residual.

  Attention goes through :func:`attention` (``jax.nn.dot_product_attention``),
  except in training with ``attention_dropout > 0``, where
  :func:`attention_with_dropout` drops attention weights as BERT does.
  """

  config: BertConfig
  dtype: Dtype

  @nn.compact
  def __call__(self, h: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
    cfg = self.config
    heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    dense = lambda width, name: nn.Dense(width, dtype=self.dtype, name=name)
    norm = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name=name)
    drop = lambda x, rate: nn.Dropout(rate)(x, deterministic=not train)
    split = lambda x: x.reshape(x.shape[:-1] + (heads, head_dim))
    q, k, v = (split(dense(cfg.hidden_size, n)(h)) for n in ("query", "key", "value"))
    if train and cfg.attention_dropout > 0:
      context = attention_with_dropout(q, k, v, mask, rate=cfg.attention_dropout,
                                       rng=self.make_rng("dropout"))
    else:
      context = attention(q, k, v, mask)
    context = context.reshape(h.shape)
    h = norm("attention_norm")(h + drop(dense(cfg.hidden_size, "attention_output")(context),
                                        cfg.hidden_dropout))
    inner = ACTIVATIONS[cfg.hidden_act](dense(cfg.intermediate_size, "intermediate")(h))
    return norm("output_norm")(h + drop(dense(cfg.hidden_size, "output")(inner),
                                        cfg.hidden_dropout))


class TextEncoder(nn.Module):
  """BERT-style encoder with mean (or CLS) pooling.

  Attributes:
    config: the :class:`BertConfig`.
    pooling: ``"mean"`` over attended tokens, or ``"cls"``.
    dtype: compute dtype; parameters stay float32.
  """

  config: BertConfig
  pooling: str = "mean"
  dtype: Dtype = jnp.float32

  def cut(self, num_layers: int) -> TextEncoder:
    """This encoder cut to its first ``num_layers`` layers (2-D Matryoshka serving).

    The cut model reads the SAME ``params`` (``layer_num_layers`` and above are
    ignored); its output equals ``per_layer[num_layers - 1]`` of the full model's
    ``all_layers=True`` output, at ``num_layers / L`` of the layer cost.

    Raises:
      ValueError: ``num_layers`` not an int in ``[1, config.num_layers]``.
    """
    L = self.config.num_layers
    if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) or not (
        1 <= num_layers <= L):
      raise ValueError(f"num_layers must be an int in [1, {L}], got {num_layers!r}")
    return self.clone(config=dataclasses.replace(self.config, num_layers=int(num_layers)))

  @nn.compact
  def __call__(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array,
      token_type_ids: jax.Array | None = None,
      *,
      train: bool = False,
      all_layers: bool = False,
  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Token ids to sentence embeddings.

    Args:
      input_ids: ``[B, T]`` int token ids.
      attention_mask: ``[B, T]``, 1 for real tokens and 0 for padding.
      token_type_ids: ``[B, T]`` segment ids; zeros when ``None``.
      train: enable dropout (needs a ``"dropout"`` rng).
      all_layers: also return the pooled output of every layer.

    Returns:
      The pooled embedding ``[B, H]`` (unnormalised); with ``all_layers``, the
      pair ``(pooled [B, H], per_layer [L, B, H])`` where ``per_layer[-1] == pooled``.
    """
    cfg = self.config
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling={self.pooling!r} is not one of {POOLINGS}")
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
      raise ValueError(f"input_ids and attention_mask must both be [B, T], got "
                       f"{input_ids.shape} and {attention_mask.shape}")
    seq_len = input_ids.shape[1]
    if seq_len > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings="
                       f"{cfg.max_position_embeddings}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    embed = lambda n, size: nn.Embed(size, cfg.hidden_size, dtype=self.dtype, name=n)
    h = (embed("word_embeddings", cfg.vocab_size)(input_ids)
         + embed("position_embeddings", cfg.max_position_embeddings)(jnp.arange(seq_len))[None]
         + embed("token_type_embeddings", cfg.type_vocab_size)(token_type_ids))
    h = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="embeddings_norm")(h)
    h = nn.Dropout(cfg.hidden_dropout)(h, deterministic=not train)
    mask = attention_mask.astype(bool)
    pooled = []
    for i in range(cfg.num_layers):
      h = _Layer(cfg, self.dtype, name=f"layer_{i}")(h, mask, train)
      if all_layers or i == cfg.num_layers - 1:
        pooled.append(pool(h, attention_mask, self.pooling))
    if all_layers:
      return pooled[-1], jnp.stack(pooled)
    return pooled[-1]


# --- Hugging Face checkpoints -------------------------------------------------

_LAYER_PARTS = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attention_output",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_norm",
}
_EMBEDDING_PARTS = {
    "embeddings.word_embeddings": "word_embeddings",
    "embeddings.position_embeddings": "position_embeddings",
    "embeddings.token_type_embeddings": "token_type_embeddings",
    "embeddings.LayerNorm": "embeddings_norm",
}


def _leaf(module: str, tensor: str, value: np.ndarray) -> tuple[str, str, np.ndarray]:
  """A PyTorch tensor name to the Flax leaf: Linear weights ``[out, in]`` become kernels."""
  if module.endswith("_norm"):
    names = {"weight": "scale", "gamma": "scale", "bias": "bias", "beta": "bias"}
    return module, names[tensor], value
  if module.endswith("_embeddings"):
    return module, "embedding", value
  if tensor == "weight":
    return module, "kernel", value.T
  return module, "bias", value


def convert_hf_bert_params(tensors: Mapping[str, np.ndarray], config: BertConfig) -> dict:
  """Hugging Face ``BertModel`` tensors to :class:`TextEncoder` parameters.

  Accepts the names with or without a ``bert.`` prefix; the pooler and any
  task head are ignored. Raises ``ValueError`` naming missing tensors or a
  tensor whose shape does not match ``config``.
  """
  params: dict[str, dict] = {}
  for name, value in tensors.items():
    name = name.removeprefix("bert.")
    module_path, _, tensor = name.rpartition(".")
    if module_path in _EMBEDDING_PARTS:
      module = _EMBEDDING_PARTS[module_path]
      scope = params
    elif module_path.startswith("encoder.layer."):
      index, _, part = module_path.removeprefix("encoder.layer.").partition(".")
      if part not in _LAYER_PARTS:
        continue
      scope = params.setdefault(f"layer_{int(index)}", {})
      module = _LAYER_PARTS[part]
    else:
      continue  # position_ids buffer, pooler, task heads
    module, leaf, array = _leaf(module, tensor, np.asarray(value, np.float32))
    scope.setdefault(module, {})[leaf] = array
  want = jax.eval_shape(
      lambda: TextEncoder(config).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32),
                                       jnp.ones((1, 2), jnp.int32)))["params"]
  want_shapes = {jax.tree_util.keystr(k): v.shape
                 for k, v in jax.tree_util.tree_leaves_with_path(want)}
  got_shapes = {jax.tree_util.keystr(k): v.shape
                for k, v in jax.tree_util.tree_leaves_with_path(params)}
  missing = sorted(set(want_shapes) - set(got_shapes))
  if missing:
    raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
  for key, shape in want_shapes.items():
    if got_shapes[key] != shape:
      raise ValueError(f"checkpoint tensor {key} has shape {got_shapes[key]}, config says {shape}")
  return jax.tree.map(jnp.asarray, params)


@dataclasses.dataclass(frozen=True)
class HFBert:
  """A loaded checkpoint: the Flax module, its parameters and its tokenizer.

  Attributes:
    model: the :class:`TextEncoder` (pooling from the checkpoint's
      sentence-transformers ``1_Pooling/config.json`` when present, else mean).
    params: the ``params`` collection for ``model.apply``.
    tokenizer: a :class:`~mrl_jax.tokenizer.TextTokenizer`.
    normalize: whether the checkpoint's sentence-transformers pipeline ends with
      L2 normalisation (a ``Normalize`` module in ``modules.json``).
  """

  model: TextEncoder
  params: Any
  tokenizer: TextTokenizer
  normalize: bool = False

  def embed(self, texts: Sequence[str], *, dim: int | None = None,
            layers: int | None = None) -> np.ndarray:
    """``texts`` to ``[B, dim or H]``: encode, truncate, then normalise if the model does.

    Args:
      texts: the texts.
      dim: keep the first ``dim`` dims (``None``: all ``H``).
      layers: run only the first ``layers`` layers (:meth:`TextEncoder.cut`);
        ``None``: all.
    """
    model = self.model if layers is None else self.model.cut(layers)
    batch = self.tokenizer(texts)
    out = _encode(model, self.params, batch["input_ids"], batch["attention_mask"],
                  batch["token_type_ids"])
    if dim is not None and not 1 <= dim <= out.shape[-1]:
      raise ValueError(f"dim must be in [1, {out.shape[-1]}], got {dim}")
    return np.asarray(ops.truncate_normalize(out, dim, normalize=self.normalize))


@functools.partial(jax.jit, static_argnums=0)
def _encode(model: TextEncoder, params: Any, input_ids: jax.Array, attention_mask: jax.Array,
            token_type_ids: jax.Array) -> jax.Array:
  return model.apply({"params": params}, input_ids, attention_mask, token_type_ids)


def _read_json(path: str) -> Any:
  return fileio.read_json(path)  # strict: duplicate keys, NaN, deep nesting refused


def load_hf_bert(local_dir: str, *, pooling: str | None = None, max_length: int | None = None,
                 dtype: Dtype = jnp.float32) -> HFBert:
  """Load a local Hugging Face BERT checkpoint into :class:`TextEncoder`.

  Reads ``config.json``, ``model.safetensors`` (``safetensors.numpy``: arrays
  only, no code runs) and ``tokenizer.json``. The sentence-transformers files,
  when present, set the defaults: ``1_Pooling/config.json`` the pooling,
  ``sentence_bert_config.json`` the maximum sequence length, ``modules.json``
  whether embeddings are L2-normalised.

  Args:
    local_dir: the checkpoint directory.
    pooling: ``"mean"`` or ``"cls"``; overrides the checkpoint's pooling.
    max_length: truncate token sequences to this length; overrides the checkpoint's.
    dtype: compute dtype of the encoder.

  Returns:
    An :class:`HFBert`.
  """
  from safetensors.numpy import load_file

  def path(*parts):
    return os.path.join(local_dir, *parts)

  for required in ("config.json", "model.safetensors", "tokenizer.json"):
    if not os.path.isfile(path(required)):
      raise FileNotFoundError(f"{required} not found in {local_dir}")
  config = BertConfig.from_hf(_read_json(path("config.json")))
  if pooling is None:
    pooling = "mean"
    if os.path.isfile(path("1_Pooling", "config.json")):
      pool_cfg = _read_json(path("1_Pooling", "config.json"))
      modes = [k for k in ("mean_tokens", "cls_token", "max_tokens", "mean_sqrt_len_tokens")
               if pool_cfg.get(f"pooling_mode_{k}")]
      if modes not in (["mean_tokens"], ["cls_token"]):
        raise ValueError(f"unsupported sentence-transformers pooling {modes}; pass pooling=")
      pooling = "mean" if modes == ["mean_tokens"] else "cls"
  if max_length is None:
    max_length = config.max_position_embeddings
    if os.path.isfile(path("sentence_bert_config.json")):
      max_length = int(_read_json(path("sentence_bert_config.json")).get("max_seq_length",
                                                                          max_length))
  normalize = False
  if os.path.isfile(path("modules.json")):
    normalize = any(m.get("type", "").endswith("Normalize")
                    for m in _read_json(path("modules.json")))
  params = convert_hf_bert_params(load_file(path("model.safetensors")), config)
  tokenizer = TextTokenizer.from_file(path("tokenizer.json"),
                                      max_length=min(max_length, config.max_position_embeddings))
  return HFBert(TextEncoder(config, pooling=pooling, dtype=dtype), params, tokenizer, normalize)
