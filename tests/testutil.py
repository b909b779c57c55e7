"""Shared test helpers (the one test-utility module): tiny configs, tiny text checkpoints,
fake TFDS data, and multi-device subprocesses.

Fixtures live in ``conftest.py``; everything a test imports comes from here.
Multi-device tests run their JAX code in a subprocess (:func:`run_python`):
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` must be set before JAX is imported.
"""

import contextlib
import json
import os
import subprocess
import sys
from unittest import mock

import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
# The tiny sentence-transformers folder (written by fixtures/make_st_reference.py).
TINY_ST_MODEL = os.path.join(TESTS, "fixtures", "tiny_st_model")
# PrefixIndex settings small enough that a few hundred rows exercise every code path.
SMALL = dict(query_batch=8, block_size=64, group_size=8, sub_batch=4, max_cached_dim=4)


def override(config, overrides: dict):
  """``config`` with ``overrides`` applied; a short test-only spelling: a field of the
  shared namespaces may be given by its own name (``num_train_steps=5`` means
  ``config.loop.num_train_steps = 5``; see ``mrl_jax.train.specs.MOVED``), a dict
  updates a nested field."""
  from mrl_jax.train.specs import MOVED

  for key, value in overrides.items():
    if key in MOVED:
      section, field = MOVED[key].split(".")
      config[section][field] = value
    elif isinstance(value, dict) and key in config and hasattr(config[key], "update"):
      config[key].update(value)
    else:
      config[key] = value
  return config


def tiny_config(data_dir: str, **overrides):
  """The base digits config shrunk to seconds: a 16-d MLP embedding, 30 steps."""
  from mrl_jax.train.config import load_config_file

  config = load_config_file(os.path.join(REPO, "configs", "digits_mlp.py"))
  config.data_dir = data_dir
  config.encoder.hidden = (32,)
  config.encoder.embed_dim = 16
  config.nesting.start = 2
  config.batch_size = 32
  config.loop.num_train_steps = 30
  config.optim.warmup_steps = 5
  config.optim.learning_rate = 1e-2
  config.loop.log_every_steps = 10
  config.loop.eval_every_steps = 30
  config.checkpoint.every_steps = 10
  return override(config, overrides)


def tiny_text_config(**overrides):
  """The text-pairs example config shrunk: 16 tokens, hidden 32, dims 8/16/32, 40 steps."""
  from mrl_jax.train.config import load_config_file

  config = load_config_file(os.path.join(REPO, "configs", "text_pairs.py"))
  config.max_length = 16
  config.encoder.dropout = 0.0
  config.optim.learning_rate = 3e-3
  config.optim.warmup_steps = 2
  config.loop.num_train_steps = 40
  config.loop.log_every_steps = 10
  config.loop.eval_every_steps = 40
  config.checkpoint.every_steps = 10
  config.eval_batch_size = 48
  return override(config, overrides)


def tiny(task: str, data_dir: str, **overrides):
  """The tiny config of ``task`` ("classification" or "pairs") with ``overrides``."""
  if task == "pairs":
    return tiny_text_config(**overrides)
  return tiny_config(data_dir, **overrides)


class _RealDataDir:
  """Stands in for TFDS's ``MockFs`` inside ``mock_data``: creates files for real."""

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def add_file(self, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "a").close()


@contextlib.contextmanager
def mock_tfds(num_examples: int):
  """``tfds.testing.mock_data`` for runs that also checkpoint.

  While ``as_dataset`` runs, ``mock_data`` patches ``etils.epath`` for the whole
  process (``MockFs``) only so that the ``data_dir`` looks present. Orbax's
  background threads (tmp-directory cleanup, async commits) use the same
  ``epath`` and then see rerouted paths. Creating ``data_dir`` for real instead
  keeps the fake examples and leaves the file system alone.

  ``MockPolicy.USE_CODE``: the mocked ``tfds.data_source`` (the grain pipeline)
  needs it; the default policy finds TFDS's placeholder metadata folders for
  cifar10/imagenet2012, which hold no splits.
  """
  import tensorflow_datasets as tfds
  from tensorflow_datasets.testing import test_utils

  with mock.patch.object(test_utils, "MockFs", _RealDataDir), \
       tfds.testing.mock_data(num_examples=num_examples,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    yield


# --- multi-device subprocesses ----------------------------------------------------


def run_python(code: str, *, devices: int = 1, timeout: int = 300,
               env: dict | None = None) -> str:
  full_env = {**os.environ, **(env or {})}
  full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  # The repo, the helpers and every layer's test folder (a script may import its own test).
  layers = [os.path.join(TESTS, d) for d in sorted(os.listdir(TESTS))
            if os.path.isdir(os.path.join(TESTS, d)) and d not in ("fixtures", "__pycache__")]
  full_env["PYTHONPATH"] = os.pathsep.join([REPO, TESTS, *layers])
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=timeout, env=full_env, cwd=REPO)
  if proc.returncode:
    raise AssertionError(
        f"subprocess with {devices} devices failed ({proc.returncode}):\n"
        f"--- stdout ---\n{proc.stdout[-5000:]}\n--- stderr ---\n{proc.stderr[-5000:]}")
  return proc.stdout


# --- tiny offline text fixtures: a WordPiece tokenizer and a random BERT on disk ---

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "fast", "slow", "red", "blue",
         "big", "small", "house", "tree", "##s", "##ing", ".", ","]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tokenizer_json(path: str) -> None:
  """A lower-casing BERT WordPiece tokenizer over :data:`WORDS`, saved as ``tokenizer.json``."""
  from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
  from tokenizers.models import WordPiece

  vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
  tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]),
                                                 ("[CLS]", vocab["[CLS]"]))
  tok.save(path)


TINY_CONFIG = {
    "model_type": "bert", "vocab_size": len(SPECIAL) + len(WORDS), "hidden_size": 8,
    "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16,
    "max_position_embeddings": 16, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
    "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
}


def random_hf_tensors(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Random tensors named and shaped like a PyTorch ``BertModel`` state dict (``[out, in]``)."""
  rng = np.random.default_rng(seed)
  h, inner = config["hidden_size"], config["intermediate_size"]
  normal = lambda *shape: rng.normal(scale=0.5, size=shape).astype(np.float32)
  t = {
      "embeddings.word_embeddings.weight": normal(config["vocab_size"], h),
      "embeddings.position_embeddings.weight": normal(config["max_position_embeddings"], h),
      "embeddings.token_type_embeddings.weight": normal(config["type_vocab_size"], h),
      "embeddings.LayerNorm.weight": 1 + normal(h), "embeddings.LayerNorm.bias": normal(h),
      "embeddings.position_ids": np.arange(config["max_position_embeddings"])[None],
      "pooler.dense.weight": normal(h, h), "pooler.dense.bias": normal(h),
  }
  for i in range(config["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    for name, (out, inp) in {"attention.self.query": (h, h), "attention.self.key": (h, h),
                             "attention.self.value": (h, h), "attention.output.dense": (h, h),
                             "intermediate.dense": (inner, h), "output.dense": (h, inner)}.items():
      t[p + name + ".weight"], t[p + name + ".bias"] = normal(out, inp), normal(out)
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      t[p + name + ".weight"], t[p + name + ".bias"] = 1 + normal(h), normal(h)
  return t


def write_tiny_checkpoint(directory: str, *, pooling: str = "mean", normalize: bool = True,
                          seed: int = 0) -> dict[str, np.ndarray]:
  """A complete sentence-transformers-style BERT directory; returns its tensors."""
  from safetensors.numpy import save_file

  os.makedirs(os.path.join(directory, "1_Pooling"), exist_ok=True)
  tensors = random_hf_tensors(TINY_CONFIG, seed)
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  make_tokenizer_json(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(TINY_CONFIG, f)
  with open(os.path.join(directory, "1_Pooling", "config.json"), "w") as f:
    json.dump({"pooling_mode_mean_tokens": pooling == "mean",
               "pooling_mode_cls_token": pooling == "cls"}, f)
  modules = [{"type": "sentence_transformers.models.Transformer"},
             {"type": "sentence_transformers.models.Pooling"}]
  if normalize:
    modules.append({"type": "sentence_transformers.models.Normalize"})
  with open(os.path.join(directory, "modules.json"), "w") as f:
    json.dump(modules, f)
  with open(os.path.join(directory, "sentence_bert_config.json"), "w") as f:
    json.dump({"max_seq_length": 12}, f)
  return tensors


def numpy_bert_layers(t: dict[str, np.ndarray], config: dict, ids: np.ndarray,
                      mask: np.ndarray) -> np.ndarray:
  """Plain numpy BERT forward (float64): the hidden states after every layer, ``[L, B, T, H]``."""
  from math import erf

  t = {k: np.asarray(v, np.float64) for k, v in t.items()}
  eps, heads = config["layer_norm_eps"], config["num_attention_heads"]
  gelu = np.vectorize(lambda x: 0.5 * x * (1.0 + erf(x / np.sqrt(2.0))))

  def layer_norm(x, name):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * t[name + ".weight"] + t[name + ".bias"]

  def linear(x, name):
    return x @ t[name + ".weight"].T + t[name + ".bias"]

  batch, seq = ids.shape
  x = (t["embeddings.word_embeddings.weight"][ids]
       + t["embeddings.position_embeddings.weight"][np.arange(seq)][None]
       + t["embeddings.token_type_embeddings.weight"][np.zeros_like(ids)])
  x = layer_norm(x, "embeddings.LayerNorm")
  out = []
  for i in range(config["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    q, k, v = (linear(x, p + f"attention.self.{n}") for n in ("query", "key", "value"))
    hd = q.shape[-1] // heads
    context = np.zeros_like(q)
    for b in range(batch):
      for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        scores = q[b, :, sl] @ k[b, :, sl].T / np.sqrt(hd)
        scores = np.where(mask[b][None, :] > 0, scores, -np.inf)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        context[b, :, sl] = (w / w.sum(-1, keepdims=True)) @ v[b, :, sl]
    x = layer_norm(x + linear(context, p + "attention.output.dense"),
                   p + "attention.output.LayerNorm")
    x = layer_norm(x + linear(gelu(linear(x, p + "intermediate.dense")), p + "output.dense"),
                   p + "output.LayerNorm")
    out.append(x)
  return np.stack(out)


# --- numpy references of the binary / int8 code search -------------------------


def normalise(x, dim):
  p = np.asarray(x, np.float64)[:, :dim]
  n = np.linalg.norm(p, axis=1, keepdims=True)
  return np.divide(p, n, out=np.zeros_like(p), where=n > 0).astype(np.float32)


def np_binary(z):
  return np.packbits(np.asarray(z) > 0, axis=-1)


def np_int8(z):
  return np.clip(np.round(np.asarray(z, np.float32) * 127.0), -127, 127).astype(np.int8)


def hamming(qc, xc):
  """``[Q, N]`` Hamming distances of packed codes, by unpacking every bit."""
  qb, xb = np.unpackbits(qc, axis=1), np.unpackbits(xc, axis=1)
  return (qb[:, None, :] != xb[None, :, :]).sum(-1)


def top_by(key, k):
  """Ids of the ``k`` smallest keys per row, ties by smaller id (stable sort)."""
  ids = np.argsort(key, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(key, ids, axis=1), ids


def code_keys(q, x, dim, kind):
  """Stage-0 sort keys (smaller is better) of the numpy reference."""
  qn, xn = normalise(q, dim), normalise(x, dim)
  if kind == "ubinary":
    return hamming(np_binary(qn), np_binary(xn))
  return -(np_int8(qn).astype(np.int64) @ np_int8(xn).astype(np.int64).T)


def numpy_code_cascade(q, x, dims, keeps, kind):
  _, ids = top_by(code_keys(q, x, dims[0], kind), keeps[0])
  for d, keep in zip(dims[1:], keeps[1:], strict=True):
    s = normalise(q, d).astype(np.float64) @ normalise(x, d).astype(np.float64).T
    s = np.take_along_axis(s, ids, axis=1)
    order = np.argsort(-s, axis=1, kind="stable")[:, :keep]  # ties: previous stage's order
    ids = np.take_along_axis(ids, order, axis=1)
  return ids


# --- hand-made bundles --------------------------------------------------------------


def sign_bundle(path, modality, dims=(2, 4, 8), **extra):
  """(Re)write ``mrl_jax.json`` with the hashes of the folder's files, as an export does."""
  from mrl_jax.bundle import artifact

  if os.path.lexists(os.path.join(path, artifact.METADATA_FILE)):
    os.remove(os.path.join(path, artifact.METADATA_FILE))
  return artifact.write_metadata(path, modality=modality, dims=list(dims),
                                 weights=[1.0] * len(dims), is_matryoshka=True, step=3,
                                 task="test", training_config=None, extra=extra or None)


def text_bundle(path):
  """A copy of :data:`TINY_ST_MODEL` signed as an MRL text bundle at dims 8/16/32."""
  import shutil

  shutil.copytree(TINY_ST_MODEL, path)
  sign_bundle(path, "text", dims=[8, 16, 32])
  return path
