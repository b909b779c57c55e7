"""Write (and validate) a text encoder as a Hugging Face / sentence-transformers folder.

:func:`save_sentence_transformer` writes a :class:`~mrl_jax.models.text.TextEncoder`'s
parameters, config and tokenizer as the folder that sentence-transformers,
text-embeddings-inference and vLLM load, and that
:func:`~mrl_jax.models.text.load_hf_bert` reads back bit for bit::

  out_dir/
    config.json                        Hugging Face BertModel config, plus
                                       "is_matryoshka" and "matryoshka_dimensions"
    model.safetensors                  float32 tensors with Hugging Face BERT names,
                                       the BertModel pooler included
    tokenizer.json                     the tokenizers library's own file
    tokenizer_config.json              transformers' tokenizer settings
    special_tokens_map.json
    vocab.txt                          WordPiece vocabularies only, one token a line
    modules.json                       Transformer -> Pooling (-> Normalize)
    1_Pooling/config.json              pooling mode and embedding width
    2_Normalize/config.json            the Normalize module's folder (when normalize)
    sentence_bert_config.json          max_seq_length (the SERVED length), do_lower_case
    config_sentence_transformers.json  versions, prompts, similarity function, dims
    README.md                          the model card (when given; mrl_jax.bundle.model_card)
    mrl_jax.json                       mrl_jax's own metadata (only when given)

The file names and keys are those of the all-MiniLM-L6-v2 folder (the classic
sentence-transformers layout that every release 2.x-6.x, text-embeddings-inference
and vLLM read) plus every module folder that sentence-transformers 6.3's
``save()`` writes; 6.3 loads it without a warning (tests/fixtures/make_st_reference.py).
vLLM accepts a ``dimensions`` request only for a config with
``is_matryoshka: true`` and checks it against ``matryoshka_dimensions``.

Everything is data: JSON and safetensors, never a pickle; reading a folder runs
no code from it. :func:`read_sentence_transformer` validates a folder from
outside and raises :class:`~mrl_jax.core.fileio.BundleError` naming the bad file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mrl_jax.bundle.artifact import read_header
from mrl_jax.core import fileio
from mrl_jax.core.fileio import BundleError
from mrl_jax.core.nesting import Nesting
from mrl_jax.core.version import __version__
from mrl_jax.models.text import (
  _EMBEDDING_PARTS,
  _LAYER_PARTS,
  POOLINGS,
  BertConfig,
  HFBert,
  TextEncoder,
  load_hf_bert,
)
from mrl_jax.tokenizer import TextTokenizer

# The releases this folder was written for and checked against by loading it
# (tests/fixtures/make_st_reference.py: sentence-transformers 6.3.0 with transformers 5.25.0,
# torch 2.13.0 CPU, prints no warning and matches at every dim). They go in
# config_sentence_transformers.json's "__version__" as SentenceTransformer.save() writes
# it; sentence-transformers reads it only to warn when it is newer than the installed one.
SENTENCE_TRANSFORMERS_VERSION = "6.3.0"
TRANSFORMERS_VERSION = "5.25.0"
TORCH_VERSION = "2.13.0"
# The oldest sentence-transformers release that reads every field written here
# (``similarity_fn_name`` arrived in 3.0; ``truncate_dim`` in 2.7).
MIN_SENTENCE_TRANSFORMERS = "3.0.0"
POOLER_NAMES = ("pooler.dense.weight", "pooler.dense.bias")
MODEL_CARD = "README.md"
MRL_METADATA_FILE = "mrl_jax.json"
POOLING_DIR = "1_Pooling"
NORMALIZE_DIR = "2_Normalize"
# Every file that read_sentence_transformer requires (plus the Pooling module's config).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "modules.json", "sentence_bert_config.json",
                  "config_sentence_transformers.json")
_SPECIAL_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                   "cls_token": "[CLS]", "mask_token": "[MASK]"}
_REQUIRED_SPECIAL = ("[UNK]", "[SEP]", "[PAD]", "[CLS]")
_ST_MODULES = "sentence_transformers.models."
# 2_Normalize/config.json as sentence-transformers 6.3 writes it (older releases ignore it).
_NORMALIZE_CONFIG = {"module_input_name": "sentence_embedding",
                     "module_output_name": "sentence_embedding"}
_POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens",
                  "weightedmean_tokens", "lasttoken")


# --- tensors ------------------------------------------------------------------

_EMBEDDING_NAMES = {flax: hf for hf, flax in _EMBEDDING_PARTS.items()}
_LAYER_NAMES = {flax: hf for hf, flax in _LAYER_PARTS.items()}


@functools.lru_cache(maxsize=16)
def _param_shapes(config: BertConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Path -> shape of every :class:`TextEncoder` parameter for ``config`` (no compute)."""
  abstract = jax.eval_shape(
      lambda: TextEncoder(config).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32),
                                       jnp.ones((1, 2), jnp.int32)))["params"]
  return {_path_keys(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}


def _path_keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _hf_name(path: tuple[str, ...]) -> str:
  """A :class:`TextEncoder` parameter path to its Hugging Face tensor name."""
  *modules, leaf = path
  if len(modules) == 1:
    prefix = _EMBEDDING_NAMES[modules[0]]
  else:
    layer, module = modules
    prefix = f"encoder.layer.{int(layer.removeprefix('layer_'))}.{_LAYER_NAMES[module]}"
  return f"{prefix}.{'bias' if leaf == 'bias' else 'weight'}"


def read_pooler(model_dir: str) -> dict[str, np.ndarray] | None:
  """The BERT pooler (``pooler.dense.weight [H, H]``, ``pooler.dense.bias [H]``) of a folder.

  mrl_jax's encoder never uses the pooler (sentence-transformers pools the token
  states), but a ``BertModel`` checkpoint has one: carrying the base model's through
  an export keeps transformers from reporting it MISSING and re-initialising it.

  Args:
    model_dir: a Hugging Face BERT folder with ``model.safetensors``.

  Returns:
    ``{name: float32 array}`` (names without a ``bert.`` prefix), or None when the
    checkpoint has no pooler.

  Raises:
    BundleError: naming the file when it is unreadable or holds only half a pooler.
  """
  from safetensors import safe_open

  file = os.path.join(os.fspath(model_dir), "model.safetensors")
  try:
    with safe_open(file, framework="numpy") as f:
      names = {n.removeprefix("bert."): n for n in f.keys()}
      found = {n: np.asarray(f.get_tensor(names[n]), np.float32) for n in POOLER_NAMES
               if n in names}
  except Exception as e:  # safetensors raises its own error types
    raise BundleError(f"{file} is not a readable safetensors file: {type(e).__name__}: "
                      f"{e}") from e
  if not found:
    return None
  if len(found) != len(POOLER_NAMES):
    raise BundleError(f"{file} holds {sorted(found)} but not all of {list(POOLER_NAMES)}")
  return found


def identity_pooler(hidden_size: int) -> dict[str, np.ndarray]:
  """A pooler for a model that has none: identity weight, zero bias (``tanh`` of [CLS]).

  Written so that transformers finds every ``BertModel`` tensor (it would otherwise
  draw random ones and report them MISSING); no mrl_jax or sentence-transformers
  embedding reads it.
  """
  return {"pooler.dense.weight": np.eye(hidden_size, dtype=np.float32),
          "pooler.dense.bias": np.zeros((hidden_size,), np.float32)}


def _check_pooler(pooler: Mapping[str, Any] | None, hidden_size: int) -> dict[str, np.ndarray]:
  if pooler is None:
    return identity_pooler(hidden_size)
  if not isinstance(pooler, Mapping) or set(pooler) != set(POOLER_NAMES):
    raise ValueError(f"pooler must map exactly {list(POOLER_NAMES)} to arrays, got "
                     f"{sorted(pooler) if isinstance(pooler, Mapping) else type(pooler)}")
  out = {}
  for name, shape in zip(POOLER_NAMES, ((hidden_size, hidden_size), (hidden_size,)),
                         strict=True):
    array = np.asarray(pooler[name], np.float32)
    if array.shape != shape or not np.isfinite(array).all():
      raise ValueError(f"pooler[{name!r}] must be finite with shape {shape}, got "
                       f"{array.shape}")
    out[name] = np.ascontiguousarray(array)
  return out


def hf_bert_tensors(params: Any, config: BertConfig) -> dict[str, np.ndarray]:
  """:class:`TextEncoder` parameters to Hugging Face ``BertModel`` tensors.

  The exact inverse of :func:`mrl_jax.models.text.convert_hf_bert_params`:
  ``convert_hf_bert_params(hf_bert_tensors(p, c), c)`` equals ``p`` bit for bit.
  Dense kernels ``[in, out]`` become Linear weights ``[out, in]``; LayerNorm
  ``scale`` becomes ``weight``; embeddings become ``<name>.weight``. Names
  carry no ``bert.`` prefix (a ``BertModel`` checkpoint); there is no pooler.

  Args:
    params: the ``params`` collection of ``TextEncoder(config)`` (a nested
      mapping of arrays, on any device; float32, or bfloat16/float16, which
      widen exactly).
    config: the encoder's :class:`BertConfig`.

  Returns:
    ``{name: float32 C-contiguous array}``, sorted by name, e.g.
    ``embeddings.word_embeddings.weight [V, H]``,
    ``encoder.layer.0.attention.self.query.weight [H, H]``. (The pooler, which
    the encoder does not have, is :func:`save_sentence_transformer`'s ``pooler``.)

  Raises:
    ValueError: ``params`` lacks or adds parameters, a shape differs from
      ``config``'s, or a value is not a finite float (naming the parameter).
  """
  if not isinstance(config, BertConfig):
    raise ValueError(f"config must be a BertConfig, got {type(config).__name__}")
  if not isinstance(params, Mapping):
    raise ValueError(f"params must be the TextEncoder's params mapping, got {type(params)}")
  if set(params) == {"params"}:
    raise ValueError("params holds a 'params' collection: pass variables['params']")
  want = _param_shapes(config)
  got = {_path_keys(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  fmt = lambda p: "/".join(p)
  missing = sorted(fmt(p) for p in set(want) - set(got))
  unexpected = sorted(fmt(p) for p in set(got) - set(want))
  if missing or unexpected:
    raise ValueError(f"params do not match TextEncoder({config}): missing {missing[:5]}, "
                     f"unexpected {unexpected[:5]}")
  out = {}
  for path, value in got.items():
    array = np.asarray(jax.device_get(value))
    if array.shape != want[path]:
      raise ValueError(f"params {fmt(path)} has shape {array.shape}, config says {want[path]}")
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
      raise ValueError(f"params {fmt(path)} has dtype {array.dtype}, expected a float")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
      raise ValueError(f"params {fmt(path)} holds {np.size(array) - np.isfinite(array).sum()} "
                       "non-finite values; refusing to export them")
    if path[-1] == "kernel":
      array = array.T
    out[_hf_name(path)] = np.ascontiguousarray(array)
  return dict(sorted(out.items()))


# --- writing --------------------------------------------------------------------


def _hf_config(config: BertConfig, pad_token_id: int, dims: tuple[int, ...]) -> dict:
  """``config.json``: the keys of a Hugging Face ``BertModel`` config (as MiniLM's)."""
  out = {
      "architectures": ["BertModel"],
      "model_type": "bert",
      "attention_probs_dropout_prob": config.attention_dropout,
      "gradient_checkpointing": False,
      "hidden_act": config.hidden_act,
      "hidden_dropout_prob": config.hidden_dropout,
      "hidden_size": config.hidden_size,
      "initializer_range": 0.02,
      "intermediate_size": config.intermediate_size,
      "layer_norm_eps": config.layer_norm_eps,
      "max_position_embeddings": config.max_position_embeddings,
      "num_attention_heads": config.num_heads,
      "num_hidden_layers": config.num_layers,
      "pad_token_id": pad_token_id,
      "position_embedding_type": "absolute",
      "transformers_version": TRANSFORMERS_VERSION,
      "type_vocab_size": config.type_vocab_size,
      "use_cache": True,
      "vocab_size": config.vocab_size,
      "is_matryoshka": bool(dims),
  }
  if dims:
    out["matryoshka_dimensions"] = list(dims)
  return out


def _tokenizer_files(tokenizer: Any, max_seq_length: int, vocab_size: int):
  """The tokenizer to save and the contents of the transformers tokenizer files.

  Returns ``(tokenizer copy, tokenizer_config, special_tokens_map, vocab lines or None,
  pad id)``. The copy pads nothing (sentence-transformers pads each batch) and
  truncates to ``max_seq_length``; the caller's tokenizer is not changed.
  """
  from tokenizers import Tokenizer

  if isinstance(tokenizer, TextTokenizer):
    tokenizer = tokenizer.tokenizer
  if not isinstance(tokenizer, Tokenizer):
    raise ValueError(f"tokenizer must be a TextTokenizer or a tokenizers.Tokenizer, "
                     f"got {type(tokenizer).__name__}")
  tok = Tokenizer.from_str(tokenizer.to_str())
  tok.no_padding()
  tok.enable_truncation(max_seq_length)
  missing = [t for t in _REQUIRED_SPECIAL if tok.token_to_id(t) is None]
  if missing:
    raise ValueError(f"tokenizer lacks the BERT special tokens {missing}")
  size = tok.get_vocab_size(with_added_tokens=True)
  if size > vocab_size:
    raise ValueError(f"tokenizer has {size} token ids but config.vocab_size={vocab_size}")
  spec = json.loads(tok.to_str())
  model, norm = spec.get("model") or {}, spec.get("normalizer") or {}
  vocab_lines = None
  if model.get("type") == "WordPiece":
    by_id = sorted((i, t) for t, i in model["vocab"].items())
    if [i for i, _ in by_id] == list(range(len(by_id))) and not any(
        "\n" in t or "\r" in t for _, t in by_id):
      vocab_lines = [t for _, t in by_id]
  special = {k: t for k, t in _SPECIAL_TOKENS.items() if tok.token_to_id(t) is not None}
  bert_norm = norm.get("type") == "BertNormalizer"
  tokenizer_config = {
      **special,
      "do_lower_case": bool(norm.get("lowercase", False)) if bert_norm else False,
      "tokenize_chinese_chars": bool(norm.get("handle_chinese_chars", True)) if bert_norm
                                else False,
      "strip_accents": norm.get("strip_accents") if bert_norm else None,
      "do_basic_tokenize": True,
      "never_split": None,
      "tokenizer_class": "BertTokenizer" if vocab_lines is not None else
                         "PreTrainedTokenizerFast",
      "model_max_length": max_seq_length,
  }
  return tok, tokenizer_config, special, vocab_lines, int(tok.token_to_id("[PAD]"))


def _modules(normalize: bool) -> list[dict]:
  # The classic class paths: every release 2.x-6.x imports them (6.x maps them to its
  # sentence_transformers.base.modules classes); TEI and vLLM read the folder names.
  names = [("", "Transformer"), (POOLING_DIR, "Pooling")]
  if normalize:
    names.append((NORMALIZE_DIR, "Normalize"))
  return [{"idx": i, "name": str(i), "path": path, "type": _ST_MODULES + kind}
          for i, (path, kind) in enumerate(names)]


def _pooling_config(pooling: str, hidden_size: int) -> dict:
  """``1_Pooling/config.json`` as sentence-transformers 3.x-5.x write it."""
  selected = {"mean": "mean_tokens", "cls": "cls_token"}[pooling]
  return {"word_embedding_dimension": hidden_size,
          **{f"pooling_mode_{m}": m == selected for m in _POOLING_MODES},
          "include_prompt": True}


def _check_dims(matryoshka_dimensions: Sequence[int], hidden_size: int) -> tuple[int, ...]:
  if isinstance(matryoshka_dimensions, (str, bytes)) or not isinstance(
      matryoshka_dimensions, Sequence):
    raise ValueError(f"matryoshka_dimensions must be a sequence of ints, got "
                     f"{matryoshka_dimensions!r}")
  if not matryoshka_dimensions:
    return ()
  if list(matryoshka_dimensions) != sorted(set(matryoshka_dimensions)):
    # The stored form (config.json, read by serving engines) is ascending.
    raise ValueError(f"matryoshka_dimensions={list(matryoshka_dimensions)}: nesting dims must be "
                     "strictly increasing")
  try:
    return Nesting(tuple(matryoshka_dimensions), embed_dim=hidden_size).dims
  except ValueError as e:
    raise ValueError(f"matryoshka_dimensions={list(matryoshka_dimensions)}: {e}") from None


def save_sentence_transformer(
    out_dir: str,
    *,
    params: Any,
    config: BertConfig,
    tokenizer: Any,
    pooling: str,
    max_seq_length: int,
    matryoshka_dimensions: Sequence[int],
    normalize: bool = True,
    do_lower_case: bool = False,
    mrl_jax_metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    pooler: Mapping[str, Any] | None = None,
    prompts: Mapping[str, str] | None = None,
    default_prompt_name: str | None = None,
    model_card: str | None = None,
) -> str:
  """Write a text encoder as a complete sentence-transformers folder, atomically.

  The folder is written into a sibling ``<out_dir>.tmp-XXXXXXXX``, validated
  with :func:`read_sentence_transformer`, then swapped into place with
  :func:`mrl_jax.core.fileio.atomic_replace_dir`: a reader never sees a partial
  folder and an existing folder is replaced only by a complete one. Writes from
  the calling process only (call it on one host).

  ``SentenceTransformer(out_dir).encode(texts, normalize_embeddings=True,
  truncate_dim=m)`` then equals ``load_hf_bert(out_dir).embed(texts, dim=m)``
  (checked against sentence-transformers 6.2.0 by tests/bundle/test_hf_folder.py). Note
  that without ``normalize_embeddings=True`` sentence-transformers truncates
  *after* its Normalize module, so its rows have norm < 1 below the full width
  (cosine similarities are unaffected).

  Args:
    out_dir: destination folder.
    params: the ``params`` collection of ``TextEncoder(config)``.
    config: the encoder's :class:`BertConfig`.
    tokenizer: a :class:`~mrl_jax.tokenizer.TextTokenizer` or a
      ``tokenizers.Tokenizer`` with BERT's ``[CLS] [SEP] [PAD] [UNK]`` tokens
      and at most ``config.vocab_size`` ids; saved as ``tokenizer.json`` (with
      no padding and truncation at ``max_seq_length``), plus ``vocab.txt`` and
      ``tokenizer_class: BertTokenizer`` for a WordPiece vocabulary.
    pooling: ``"mean"`` or ``"cls"`` (:data:`mrl_jax.models.text.POOLINGS`).
    max_seq_length: longest token sequence (special tokens included), in
      ``[2, config.max_position_embeddings]``.
    matryoshka_dimensions: the trained nesting dims, strictly increasing, at
      most ``config.hidden_size`` (as :class:`mrl_jax.core.nesting.Nesting`);
      written to ``config.json`` with ``is_matryoshka: true``. An empty
      sequence writes ``is_matryoshka: false`` (a model not trained with MRL).
    normalize: end the pipeline with sentence-transformers' ``Normalize``
      (L2) module.
    do_lower_case: sentence-transformers lower-cases texts before the tokenizer
      when True, and so does :func:`load_sentence_transformer`, but
      :func:`~mrl_jax.models.text.load_hf_bert` alone does not: prefer False
      with lower-casing in the tokenizer's normaliser (``BertNormalizer``).
    mrl_jax_metadata: mrl_jax's own JSON data (nesting dims and weights,
      training config, ...) written to ``mrl_jax.json``; a mapping with string
      keys and finite numbers. A ``matryoshka_dimensions`` entry must equal the
      argument.
    overwrite: replace an existing folder at ``out_dir`` (only one that is
      empty or holds a ``config.json`` or ``modules.json``).
    pooler: the BERT pooler tensors to write (:func:`read_pooler` of the base
      model); None writes :func:`identity_pooler`. Either way the checkpoint
      holds every ``BertModel`` tensor and transformers reports nothing missing.
    prompts: sentence-transformers' ``prompts`` (name -> text prepended to the
      input, e.g. ``{"query": "query: "}``), in ``config_sentence_transformers.json``;
      :meth:`mrl_jax.bundle.encoder.Encoder.embed` applies them with ``prompt_name=``.
    default_prompt_name: a key of ``prompts`` applied when none is named, or None.
    model_card: the ``README.md`` to write (:mod:`mrl_jax.bundle.model_card`), or None.

  Returns:
    The absolute path of the written folder.

  Raises:
    ValueError: naming the bad argument (shapes, dims, pooling, lengths,
      tokenizer, non-finite parameters, metadata that JSON cannot hold).
    FileExistsError: ``out_dir`` exists and ``overwrite`` is False, or it is not
      a model folder.
  """
  if not isinstance(config, BertConfig):
    raise ValueError(f"config must be a BertConfig, got {type(config).__name__}")
  if pooling not in POOLINGS:
    raise ValueError(f"pooling={pooling!r} is not one of {POOLINGS}")
  if (isinstance(max_seq_length, bool) or not isinstance(max_seq_length, (int, np.integer))
      or not 2 <= max_seq_length <= config.max_position_embeddings):
    raise ValueError(f"max_seq_length must be an int in [2, max_position_embeddings="
                     f"{config.max_position_embeddings}], got {max_seq_length!r}")
  max_seq_length = int(max_seq_length)
  for name, value in (("normalize", normalize), ("do_lower_case", do_lower_case),
                      ("overwrite", overwrite)):
    if not isinstance(value, bool):
      raise ValueError(f"{name} must be a bool, got {value!r}")
  dims = _check_dims(matryoshka_dimensions, config.hidden_size)
  if mrl_jax_metadata is not None:
    if not isinstance(mrl_jax_metadata, Mapping):
      raise ValueError(f"mrl_jax_metadata must be a mapping, got {type(mrl_jax_metadata)}")
    mrl_jax_metadata = dict(mrl_jax_metadata)
    if ("matryoshka_dimensions" in mrl_jax_metadata
        and list(mrl_jax_metadata["matryoshka_dimensions"]) != list(dims)):
      raise ValueError(f"mrl_jax_metadata['matryoshka_dimensions']="
                       f"{mrl_jax_metadata['matryoshka_dimensions']} differs from "
                       f"matryoshka_dimensions={list(dims)}")
    fileio.dumps_json(mrl_jax_metadata, what="mrl_jax_metadata")  # fail before writing
  tensors = {**hf_bert_tensors(params, config), **_check_pooler(pooler, config.hidden_size)}
  prompts = _check_prompts(prompts, default_prompt_name)
  if model_card is not None and not isinstance(model_card, str):
    raise ValueError(f"model_card must be a str (Markdown), got {type(model_card).__name__}")
  tok, tokenizer_config, special, vocab_lines, pad_id = _tokenizer_files(
      tokenizer, max_seq_length, config.vocab_size)

  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.lexists(out_dir):
    if not overwrite:
      raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    if not os.path.isdir(out_dir) or os.path.islink(out_dir) or (
        os.listdir(out_dir) and not any(os.path.isfile(os.path.join(out_dir, f))
                                        for f in ("config.json", "modules.json"))):
      raise FileExistsError(f"{out_dir} exists and is not a model folder (no config.json or "
                            "modules.json); not replacing it")

  from safetensors.numpy import save_file

  tmp = fileio.make_temp_dir(out_dir)
  try:
    path = lambda *p: os.path.join(tmp, *p)
    fileio.write_json(path("config.json"), _hf_config(config, pad_id, dims))
    save_file(tensors, path("model.safetensors"), metadata={"format": "pt"})
    # safetensors creates the file 0600; give it the permissions of the other files.
    os.chmod(path("model.safetensors"), os.stat(tmp).st_mode & 0o666)
    tok.save(path("tokenizer.json"))
    fileio.write_json(path("tokenizer_config.json"), tokenizer_config)
    fileio.write_json(path("special_tokens_map.json"), special)
    if vocab_lines is not None:
      with open(path("vocab.txt"), "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in vocab_lines))
    fileio.write_json(path("modules.json"), _modules(normalize))
    os.mkdir(path(POOLING_DIR))
    fileio.write_json(path(POOLING_DIR, "config.json"),
                      _pooling_config(pooling, config.hidden_size))
    if normalize:  # every module folder that modules.json names exists (as save() writes)
      os.mkdir(path(NORMALIZE_DIR))
      fileio.write_json(path(NORMALIZE_DIR, "config.json"), _NORMALIZE_CONFIG)
    fileio.write_json(path("sentence_bert_config.json"),
                      {"max_seq_length": max_seq_length, "do_lower_case": do_lower_case})
    fileio.write_json(path("config_sentence_transformers.json"), {
        "__version__": {"sentence_transformers": SENTENCE_TRANSFORMERS_VERSION,
                        "transformers": TRANSFORMERS_VERSION, "pytorch": TORCH_VERSION,
                        "mrl_jax": _mrl_jax_version()},
        "prompts": prompts,
        "default_prompt_name": default_prompt_name,
        "similarity_fn_name": "cosine",
        "model_type": "SentenceTransformer",
        # Not read by sentence-transformers (it truncates to any truncate_dim); recorded for
        # people and tools reading this file: the dims the model was trained at.
        "matryoshka_dimensions": list(dims),
    })
    if model_card is not None:
      with open(path(MODEL_CARD), "w", encoding="utf-8") as f:
        f.write(model_card)
    if mrl_jax_metadata is not None:
      fileio.write_json(path(MRL_METADATA_FILE), mrl_jax_metadata, what="mrl_jax_metadata")
    read_sentence_transformer(tmp)  # never install a folder we cannot read back
    fileio.atomic_replace_dir(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


def _check_prompts(prompts: Mapping[str, str] | None,
                   default_prompt_name: str | None) -> dict[str, str]:
  prompts = {} if prompts is None else prompts
  if not isinstance(prompts, Mapping) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
    raise ValueError(f"prompts must map names (str) to prompt texts (str), got {prompts!r}")
  if default_prompt_name is not None and default_prompt_name not in prompts:
    raise ValueError(f"default_prompt_name={default_prompt_name!r} is not a key of prompts "
                     f"{sorted(prompts)}")
  return dict(prompts)


def _mrl_jax_version() -> str:
  return __version__


# --- reading and validating ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SentenceTransformerInfo:
  """What a validated sentence-transformers BERT folder declares.

  Attributes:
    path: the folder (absolute).
    config: the :class:`BertConfig` of ``config.json``.
    pooling: ``"mean"`` or ``"cls"`` (from the Pooling module's config).
    max_seq_length: longest token sequence, capped at ``max_position_embeddings``.
    normalize: the pipeline ends with a ``Normalize`` module.
    do_lower_case: sentence-transformers lower-cases texts before tokenizing.
    is_matryoshka: ``config.json``'s ``is_matryoshka`` (default: whether
      ``matryoshka_dimensions`` is present).
    matryoshka_dimensions: the trained dims, strictly increasing; empty when
      ``config.json`` lists none.
    truncate_dim: a default truncation from
      ``config_sentence_transformers.json`` (sentence-transformers applies it to
      every ``encode``), or None.
    mrl_metadata: the contents of ``mrl_jax.json``, or None without one.
    prompts: ``config_sentence_transformers.json``'s ``prompts`` (name -> text).
    default_prompt_name: its ``default_prompt_name`` (a key of ``prompts``) or None.
  """

  path: str
  config: BertConfig
  pooling: str
  max_seq_length: int
  normalize: bool
  do_lower_case: bool
  is_matryoshka: bool
  matryoshka_dimensions: tuple[int, ...]
  truncate_dim: int | None
  mrl_metadata: dict | None
  prompts: dict = dataclasses.field(default_factory=dict)
  default_prompt_name: str | None = None


def read_mrl_metadata(path: str) -> dict | None:
  """The JSON object in ``<path>/mrl_jax.json``, or None when the folder has none.

  Raises:
    BundleError: naming the file when it is not UTF-8 JSON holding an object.
  """
  file = os.path.join(os.fspath(path), MRL_METADATA_FILE)
  if not os.path.lexists(file):
    return None
  value = fileio.read_json(file)
  if not isinstance(value, dict):
    raise BundleError(f"{file} must hold a JSON object, got {type(value).__name__}")
  return value


def _object(file: str) -> dict:
  value = fileio.read_json(file)
  if not isinstance(value, dict):
    raise BundleError(f"{file} must hold a JSON object, got {type(value).__name__}")
  return value


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _read_modules(file: str) -> tuple[str, bool]:
  """``modules.json`` -> (the Pooling module's folder, whether a Normalize module ends it)."""
  modules = fileio.read_json(file)
  if not isinstance(modules, list) or not all(
      isinstance(m, dict) and isinstance(m.get("type"), str) and isinstance(m.get("path"), str)
      for m in modules):
    raise BundleError(f"{file} must be a list of objects with string 'type' and 'path'")
  kinds = [m["type"].rpartition(".")[2] for m in modules]
  if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
    raise BundleError(f"{file}: modules {[m['type'] for m in modules]} are not supported; "
                      "mrl_jax reads Transformer -> Pooling (-> Normalize) pipelines only")
  if modules[0]["path"] != "":
    raise BundleError(f"{file}: the Transformer module must be the folder itself (path ''), "
                      f"got path {modules[0]['path']!r}")
  pooling_dir = modules[1]["path"]
  if not pooling_dir or os.path.isabs(pooling_dir) or ".." in pooling_dir.split("/"):
    raise BundleError(f"{file}: bad Pooling module path {pooling_dir!r}")
  return pooling_dir, len(kinds) == 3


def _read_pooling(file: str, hidden_size: int) -> str:
  """The Pooling module's ``config.json`` (classic booleans or the 6.x ``pooling_mode``)."""
  cfg = _object(file)
  width = cfg.get("word_embedding_dimension", cfg.get("embedding_dimension"))
  if width != hidden_size:
    raise BundleError(f"{file}: word_embedding_dimension={width!r} differs from the "
                      f"config.json hidden_size={hidden_size}")
  if "pooling_mode" in cfg:
    modes = [cfg["pooling_mode"]]
  else:
    modes = [m for m in _POOLING_MODES if cfg.get(f"pooling_mode_{m}")]
  named = {"mean": "mean", "mean_tokens": "mean", "cls": "cls", "cls_token": "cls"}
  if len(modes) != 1 or modes[0] not in named:
    raise BundleError(f"{file}: pooling {modes} is not supported; mrl_jax pools with "
                      f"exactly one of {POOLINGS}")
  return named[modes[0]]


def _read_dims(file: str, hf: dict, hidden_size: int) -> tuple[bool, tuple[int, ...]]:
  dims = hf.get("matryoshka_dimensions")
  is_matryoshka = hf.get("is_matryoshka", dims is not None)
  if not isinstance(is_matryoshka, bool):
    raise BundleError(f"{file}: is_matryoshka={is_matryoshka!r} is not a bool")
  if dims is None:
    return is_matryoshka, ()
  if not is_matryoshka:
    raise BundleError(f"{file}: is_matryoshka is false but matryoshka_dimensions={dims!r}")
  if not isinstance(dims, list) or not dims or not all(_is_int(d) for d in dims):
    raise BundleError(f"{file}: matryoshka_dimensions must be a non-empty list of ints, "
                      f"got {dims!r}")
  if dims != sorted(set(dims)):
    raise BundleError(f"{file}: matryoshka_dimensions={dims}: nesting dims must be strictly "
                      "increasing (the stored form)")
  try:
    return True, Nesting(tuple(dims), embed_dim=hidden_size).dims
  except ValueError as e:
    raise BundleError(f"{file}: matryoshka_dimensions={dims}: {e}") from None


def expected_hf_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
  """Hugging Face tensor name -> shape of a ``BertModel`` for ``config``, by arithmetic.

  Builds nothing (unlike :func:`_param_shapes`, which traces the model): the cost is
  one dict entry per tensor, so a config can be checked against a file's header
  before anything of its size exists. Equal to the traced shapes (tested).
  """
  h, i = config.hidden_size, config.intermediate_size
  out = {"embeddings.word_embeddings.weight": (config.vocab_size, h),
         "embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
         "embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
         "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,)}
  layer = {"attention.self.query": (h, h), "attention.self.key": (h, h),
           "attention.self.value": (h, h), "attention.output.dense": (h, h),
           "intermediate.dense": (i, h), "output.dense": (h, i)}
  for n in range(config.num_layers):
    for part, (rows, cols) in layer.items():
      out[f"encoder.layer.{n}.{part}.weight"] = (rows, cols)
      out[f"encoder.layer.{n}.{part}.bias"] = (rows,)
    for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
      out[f"encoder.layer.{n}.{norm}.weight"] = (h,)
      out[f"encoder.layer.{n}.{norm}.bias"] = (h,)
  return out


# Tensor dtypes a BERT folder may hold (Hugging Face stores float32/16, bfloat16).
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_TENSORS_PER_LAYER = 16


def _check_tensors(file: str, config: BertConfig) -> None:
  """The safetensors header holds every tensor ``config`` needs, with its shape and a float
  dtype; checked from the header alone, config integers bounded first (nothing is built)."""
  header = {name.removeprefix("bert."): v for name, v in read_header(file).items()}
  config_file = os.path.join(os.path.dirname(file), "config.json")
  if config.num_layers * _TENSORS_PER_LAYER > len(header):
    raise BundleError(f"{config_file}: num_hidden_layers={config.num_layers} needs "
                      f"{config.num_layers * _TENSORS_PER_LAYER} layer tensors, {file} holds "
                      f"{len(header)} tensors in all; the config does not match the weights")
  want = expected_hf_shapes(config)
  missing = sorted(set(want) - set(header))
  if missing:
    raise BundleError(f"{file} lacks {len(missing)} tensors of the config.json model, "
                      f"e.g. {missing[:3]}")
  have = {n: s for n, (_, s) in header.items()}
  wrong = [f"{n}: {have[n]} (config.json implies {s})" for n, s in want.items() if have[n] != s]
  if wrong:
    hint = ""
    if any(n.startswith("embeddings.position_embeddings") for n in wrong[0:1]):
      hint = " (max_position_embeddings: the position embeddings' rows)"
    raise BundleError(f"{file}: tensor shapes differ from config.json: {'; '.join(wrong[:3])}"
                      f"{hint}")
  not_float = [f"{n}: {header[n][0]}" for n in want if header[n][0] not in _FLOAT_DTYPES]
  if not_float:
    raise BundleError(f"{file}: tensors must be floats ({'/'.join(_FLOAT_DTYPES)}), got "
                      f"{'; '.join(not_float[:3])}")


def read_sentence_transformer(path: str) -> SentenceTransformerInfo:
  """Validate a sentence-transformers BERT folder and return what it declares.

  Reads only data (JSON, the safetensors header, the tokenizer JSON); loads no
  weights and runs no code from the folder. Accepts folders written by
  :func:`save_sentence_transformer`, by sentence-transformers 2.x-6.x (both
  Pooling config formats) and the all-MiniLM-L6-v2 layout.

  Args:
    path: the folder.

  Returns:
    A :class:`SentenceTransformerInfo`.

  Raises:
    BundleError: naming the file, for: a missing required file
      (:data:`REQUIRED_FILES` and the Pooling module's ``config.json``); a file
      that is not UTF-8 or not valid JSON; a ``config.json`` that is not a BERT
      config, or whose ``matryoshka_dimensions`` are not strictly increasing
      (out of order or duplicated) or exceed ``hidden_size``; a pipeline other
      than Transformer -> Pooling (-> Normalize); unsupported pooling; tensors
      missing from ``model.safetensors`` or shaped unlike the config; a
      tokenizer with more ids than ``vocab_size``.
  """
  from tokenizers import Tokenizer

  root = os.path.abspath(os.fspath(path))
  if not os.path.isdir(root):
    raise BundleError(f"{root} is not a folder")
  file = lambda *p: os.path.join(root, *p)
  for name in REQUIRED_FILES:
    if not os.path.isfile(file(name)):
      raise BundleError(f"{file(name)} is missing: a sentence-transformers folder needs "
                        f"{list(REQUIRED_FILES)}")
  hf = _object(file("config.json"))
  try:
    config = BertConfig.from_hf(hf)
  except (ValueError, TypeError) as e:
    raise BundleError(f"{file('config.json')}: {e}") from None
  is_matryoshka, dims = _read_dims(file("config.json"), hf, config.hidden_size)

  pooling_dir, normalize = _read_modules(file("modules.json"))
  pooling = _read_pooling(file(pooling_dir, "config.json"), config.hidden_size)

  sbert = _object(file("sentence_bert_config.json"))
  tok_cfg = _object(file("tokenizer_config.json"))
  max_len = sbert.get("max_seq_length", tok_cfg.get("model_max_length"))
  if max_len is None or (_is_int(max_len) and max_len > config.max_position_embeddings):
    max_len = config.max_position_embeddings  # also transformers' 1e30 "no limit"
  if not _is_int(max_len) or max_len < 2:
    raise BundleError(f"{file('sentence_bert_config.json')}: max_seq_length={max_len!r} is "
                      "not an int >= 2")
  do_lower_case = sbert.get("do_lower_case", False)
  if not isinstance(do_lower_case, bool):
    raise BundleError(f"{file('sentence_bert_config.json')}: do_lower_case={do_lower_case!r} "
                      "is not a bool")

  st_cfg = _object(file("config_sentence_transformers.json"))
  truncate_dim = st_cfg.get("truncate_dim")
  if truncate_dim is not None and (not _is_int(truncate_dim)
                                   or not 1 <= truncate_dim <= config.hidden_size):
    raise BundleError(f"{file('config_sentence_transformers.json')}: truncate_dim="
                      f"{truncate_dim!r} is not an int in [1, {config.hidden_size}]")

  try:
    prompts = _check_prompts(st_cfg.get("prompts"), st_cfg.get("default_prompt_name"))
  except ValueError as e:
    raise BundleError(f"{file('config_sentence_transformers.json')}: {e}") from None

  tok_json = fileio.read_json(file("tokenizer.json"))
  try:
    tok = Tokenizer.from_str(json.dumps(tok_json))
  except Exception as e:  # tokenizers raises a bare Exception
    raise BundleError(f"{file('tokenizer.json')} is not a tokenizers file: {e}") from None
  if tok.get_vocab_size(with_added_tokens=True) > config.vocab_size:
    raise BundleError(f"{file('tokenizer.json')} has {tok.get_vocab_size(True)} token ids, "
                      f"more than config.json's vocab_size={config.vocab_size}")
  if os.path.lexists(file("special_tokens_map.json")):
    _object(file("special_tokens_map.json"))

  _check_tensors(file("model.safetensors"), config)
  mrl = read_mrl_metadata(root)
  # A non-Matryoshka folder lists no dims; mrl_jax.json then names the one trained size.
  if mrl is not None and "matryoshka_dimensions" in mrl and (dims or mrl.get("is_matryoshka")) \
      and list(mrl["matryoshka_dimensions"]) != list(dims):
    raise BundleError(f"{file(MRL_METADATA_FILE)}: matryoshka_dimensions="
                      f"{mrl['matryoshka_dimensions']} differ from config.json's {list(dims)}")
  return SentenceTransformerInfo(
      path=root, config=config, pooling=pooling, max_seq_length=int(max_len),
      normalize=normalize, do_lower_case=do_lower_case, is_matryoshka=is_matryoshka,
      matryoshka_dimensions=dims, truncate_dim=truncate_dim, mrl_metadata=mrl,
      prompts=prompts, default_prompt_name=st_cfg.get("default_prompt_name"))


def load_sentence_transformer(path: str, **kwargs: Any) -> tuple[HFBert, SentenceTransformerInfo]:
  """Validate with :func:`read_sentence_transformer`, then load with ``load_hf_bert``.

  The pooling, maximum length and normalisation come from the validated folder
  (so the sentence-transformers 6.x Pooling format works too). With
  ``do_lower_case`` in ``sentence_bert_config.json`` the tokenizer lower-cases
  first, as sentence-transformers does (``load_hf_bert`` alone ignores it).

  Args:
    path: the folder.
    **kwargs: passed to :func:`~mrl_jax.models.text.load_hf_bert` (``dtype``).

  Returns:
    ``(bert, info)``: the loaded :class:`~mrl_jax.models.text.HFBert` and the
    :class:`SentenceTransformerInfo`.
  """
  from tokenizers import normalizers

  info = read_sentence_transformer(path)
  bert = load_hf_bert(info.path, pooling=info.pooling, max_length=info.max_seq_length, **kwargs)
  if info.do_lower_case:
    tok = bert.tokenizer.tokenizer
    steps = [normalizers.Lowercase()] + ([tok.normalizer] if tok.normalizer else [])
    tok.normalizer = normalizers.Sequence(steps)
  return dataclasses.replace(bert, normalize=info.normalize), info
