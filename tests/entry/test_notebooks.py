"""Execute every notebook in colab/ top to bottom, in their small (smoke) setting."""

import glob
import os

import nbformat
import pytest
from testutil import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colab", "*.ipynb")))


def test_every_notebook_is_collected_and_clean():
  names = {os.path.basename(p) for p in NOTEBOOKS}
  assert {"quickstart.ipynb", "retrieval.ipynb", "tpu_training.ipynb",
          "text_matryoshka.ipynb"} <= names
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    assert "colab-badge.svg" in nb.cells[0].source, f"{path}: no Open in Colab badge"
    assert f"blob/main/colab/{os.path.basename(path)}" in nb.cells[0].source
    for cell in nb.cells:
      assert not cell.get("outputs"), f"{path}: outputs committed; clear them"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
  from nbclient import NotebookClient

  monkeypatch.setenv("MRL_JAX_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(path, as_version=4)
  monkeypatch.setenv("MRL_JAX_NOTEBOOK_ROOT", str(tmp_path))  # where the notebook writes
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": REPO}})
  client.execute()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_setup_cell_installs_the_extras_when_dependencies_are_missing(path, monkeypatch):
  """The first code cell in a Python without mrl_jax's dependencies: it must pip-install the
  checkout with the notebook's extras (``import mrl_jax`` alone always succeeds)."""
  import importlib.util
  import subprocess

  nb = nbformat.read(path, as_version=4)
  setup = next(c.source for c in nb.cells if c.cell_type == "code")
  calls = []
  monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name in ("ml_collections", "jax") else object())
  monkeypatch.chdir(REPO)
  exec(compile(setup, path, "exec"), {"__name__": "__main__"})
  installs = [c for c in calls if c[1:4] == ["-m", "pip", "install"]]
  assert len(installs) == 1, calls
  extras = installs[0][-1]
  assert extras.startswith(".[") and ("images" in extras or "text" in extras), extras
  if "text_matryoshka" in path:
    assert extras == ".[text]"
  calls.clear()
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
  exec(compile(setup, path, "exec"), {"__name__": "__main__"})
  assert not calls  # everything importable: nothing installed
