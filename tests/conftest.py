"""Test-wide settings: CPU JAX, quiet TensorFlow, one device in this process.

Helpers are in ``tests/testutil.py``; tests that need several devices start a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (``testutil.run_python``).
"""

import os
import sys
import tempfile

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
