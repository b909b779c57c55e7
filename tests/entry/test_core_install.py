"""`pip install mrl_jax` with the core dependencies alone serves an exported bundle.

Builds a fresh virtualenv (no extras: no optax/orbax pins of ours, ml-collections,
tensorboardX, matplotlib, scipy pins, pyarrow, TensorFlow), installs a copy of this
package into it from PyPI's wheels, and serves the tiny sentence-transformers bundle
there: the embeddings equal sentence-transformers' stored ones and no extra is imported.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from testutil import REPO, TESTS

from mrl_jax.bundle import artifact

DATA = os.path.join(TESTS, "fixtures")
# What the core must not need (each lives in an extra).
EXTRAS = ("ml_collections", "tensorboardX", "matplotlib", "pyarrow", "tensorflow",
          "tensorflow_datasets", "grain", "sklearn", "faiss", "chex")
SERVE = """
import json, sys
from mrl_jax import Encoder
encoder = Encoder.load(sys.argv[1])
texts = json.loads(sys.argv[2])
out = {str(m): z.tolist() for m, z in encoder.embed(texts, dims=encoder.dims).items()}
extras = sorted(set(json.loads(sys.argv[3])) & {m.split(".")[0] for m in sys.modules})
print(json.dumps({"embeddings": out, "extras_imported": extras,
                  "mrl_jax": __import__("mrl_jax").__file__}))
"""


@pytest.mark.slow
def test_the_core_install_serves_a_bundle(tmp_path):
  src = tmp_path / "src"  # a copy: pip's in-tree build would write into the repository
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(REPO, name), src / name)
  shutil.copytree(os.path.join(REPO, "mrl_jax"), src / "mrl_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
  py = str(venv / "bin" / "python")
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  done = subprocess.run([py, "-m", "pip", "install", "--quiet", str(src)], env=env,
                        capture_output=True, text=True, timeout=1500)
  assert done.returncode == 0, done.stderr[-3000:]
  listed = subprocess.run([py, "-m", "pip", "list", "--format=json"], env=env,
                          capture_output=True, text=True, check=True, timeout=300)
  installed = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
  for extra in ("ml-collections", "tensorboardx", "matplotlib", "pyarrow", "tensorflow-cpu",
                "tensorflow-datasets", "grain", "scikit-learn", "faiss-cpu", "chex"):
    assert extra not in installed, extra

  bundle = tmp_path / "enc"
  shutil.copytree(os.path.join(DATA, "tiny_st_model"), bundle)
  os.remove(bundle / artifact.METADATA_FILE)
  artifact.write_metadata(str(bundle), modality="text", dims=[8, 16, 32], weights=[1.0] * 3,
                        is_matryoshka=True, step=0, task="pairs", training_config=None)
  ref = np.load(os.path.join(DATA, "tiny_st_reference.npz"))
  texts = [str(t) for t in ref["texts"]]
  run = subprocess.run([py, "-c", SERVE, str(bundle), json.dumps(texts), json.dumps(EXTRAS)],
                       env={**env, "JAX_PLATFORMS": "cpu"}, cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(run.stdout.strip().splitlines()[-1])
  assert result["mrl_jax"].startswith(str(venv))  # the installed copy, not the repository
  assert result["extras_imported"] == []
  for m in (8, 16, 32):
    np.testing.assert_allclose(np.asarray(result["embeddings"][str(m)]),
                               ref[f"st_normalized_{m}"], atol=1e-5)
