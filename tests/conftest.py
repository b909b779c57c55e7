"""Test-wide settings: CPU JAX, quiet TensorFlow, one device in this process.

Tests that need several devices start a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (see ``tests/subprocess_util.py``).
"""

import contextlib
import os
import sys
import tempfile
from unittest import mock

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The tests compile the same tiny programs many times (and in subprocesses):
# a persistent compilation cache turns most of those compiles into disk reads.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "mrl_jax_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
  """A TFDS data_dir with the digits builder prepared once for the session."""
  from mrl_jax.data import pipeline

  path = str(tmp_path_factory.mktemp("tfds"))
  pipeline.get_builder("sklearn_digits", path)
  return path


@pytest.fixture
def fast_prng():
  """Use the ``rbg`` PRNG for one test: XLA:CPU compiles the ``threefry`` bits of a
  ResNet's jitted init in tens of seconds on small machines, ``rbg`` in a few."""
  import jax

  old = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")
  yield
  jax.config.update("jax_default_prng_impl", old)


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
