"""Execute every notebook in colab/ top to bottom, in their small (smoke) setting."""

import glob
import os

import nbformat
import pytest
from conftest import REPO

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
