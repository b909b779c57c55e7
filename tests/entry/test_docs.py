"""Every code block of the README and the docs runs as printed, or says what it needs.

Blocks are read from ``README.md``, ``docs/**/*.md`` and ``benchmarks/README.md``
(included in the docs' results page):

* ```` ```python ```` blocks run as pasted, each in its own namespace;
* ```` ```bash ```` / ```` ```sh ```` blocks run as printed under ``bash -e``;
* ```` ```console ```` blocks run their ``$ `` lines (with their ``\\`` continuations);
* any of them preceded by ``<!-- needs: REASON -->`` (data, an accelerator, a pod,
  the network, minutes) is skipped with that reason instead.

Other blocks (``text``, unlabelled) are output and are not run. The blocks of a page
run in order, in one folder of their own (so a command's output feeds the snippet
after it), where ``.venv``, ``configs/``, ``train.py``, ``examples/`` and
``benchmarks/`` point at this checkout and ``workdir/demo`` holds what a short run of
``make demo``'s MRL model writes (``workdir/demo/mrl/encoder``).
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest
from testutil import REPO, override

from mrl_jax import experiments
from mrl_jax.train.config import load_config_file

RUNNABLE = {"python": "python", "bash": "shell", "sh": "shell", "console": "console"}
FENCE = re.compile(r"(?:<!--\s*needs:\s*(?P<needs>.*?)\s*-->\s*\n)?"
                   r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<code>.*?)^```", re.S | re.M)
LINKED = ("configs", "train.py", "examples", "benchmarks")


def doc_pages() -> list[str]:
  """Repository-relative paths of every page whose blocks are checked."""
  pages = ["README.md", "benchmarks/README.md"]
  pages += sorted(os.path.relpath(p, REPO)
                  for p in glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True))
  return [p for p in pages if os.path.exists(os.path.join(REPO, p))]


def blocks(page: str) -> list[dict]:
  """The fenced blocks of ``page`` in order: ``{"kind", "code", "needs", "line"}``."""
  text = open(os.path.join(REPO, page), encoding="utf-8").read()
  found = []
  for match in FENCE.finditer(text):
    found.append({"kind": RUNNABLE.get(match["lang"]), "lang": match["lang"],
                  "code": match["code"], "needs": match["needs"],
                  "line": text.count("\n", 0, match.start("lang")) + 1})
  return found


def console_commands(code: str) -> str:
  """The ``$ `` lines of a console block (and their continuations) as a script."""
  lines, going_on = [], False
  for line in code.splitlines():
    if line.startswith("$ ") or going_on:
      lines.append(line[2:] if line.startswith("$ ") else line)
      going_on = line.rstrip().endswith("\\")
  return "\n".join(lines)


def runnable(page: str) -> list[dict]:
  return [b for b in blocks(page) if b["kind"] and not b["needs"]]


def test_the_readme_cites_nothing_outside_the_repository():
  for path in ("README.md", "docs", "configs", "benchmarks", "mrl_jax"):
    out = subprocess.run(["git", "grep", "-l", "DESIGN.md", "--", path], cwd=REPO,
                         capture_output=True, text=True)
    assert not out.stdout.strip(), out.stdout


def test_the_readme_is_a_short_front_page():
  text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  assert len(text.splitlines()) <= 150
  for heading in ("## Two commands", "## Install", "## Train an image model",
                  "## Fine-tune a text model and search with it", "## Results"):
    assert heading in text, heading


def test_every_test_a_page_names_exists():
  """``tests/x/test_y.py::name`` (or ``x/test_y.py``) references point at real tests."""
  ref = re.compile(r"(?:tests/)?(\w+/test_\w+\.py)(?:::(\w+))?")
  for page in doc_pages():
    for path, name in ref.findall(open(os.path.join(REPO, page), encoding="utf-8").read()):
      file = os.path.join(REPO, "tests", path)
      assert os.path.isfile(file), f"{page} names tests/{path}"
      if name:
        assert f"def {name}(" in open(file, encoding="utf-8").read(), f"{page}: {path}::{name}"


def test_every_block_runs_or_says_what_it_needs():
  """A block is output (text/unlabelled), runnable, or marked with a reason."""
  total = 0
  for page in doc_pages():
    for block in blocks(page):
      where = f"{page}:{block['line']}"
      assert block["lang"] in (*RUNNABLE, "text", ""), f"{where}: unknown language {block['lang']}"
      if block["needs"] is not None:
        assert block["kind"], f"{where}: a needs marker on a block that never runs"
        assert block["needs"].strip(), f"{where}: empty needs marker"
      if block["kind"] == "console":
        assert console_commands(block["code"]).strip(), f"{where}: console block without $"
      total += bool(block["kind"] and not block["needs"])
  assert total >= 15, total


def test_the_fence_parser_reads_markers_and_console_lines(tmp_path):
  text = ("x\n<!-- needs: gpu -->\n```bash\nnvidia-smi\n```\n```python\nprint(1)\n```\n"
          "```console\n$ echo a \\\n  b\nout\n```\n```text\nout\n```\n")
  page = tmp_path / "p.md"
  page.write_text(text)
  found = blocks(str(page))
  assert [(b["kind"], b["needs"]) for b in found] == [
      ("shell", "gpu"), ("python", None), ("console", None), (None, None)]
  assert console_commands(found[2]["code"]) == "echo a \\\n  b"


def test_the_api_reference_covers_the_curated_api():
  import mrl_jax

  api = open(os.path.join(REPO, "docs", "api.md"), encoding="utf-8").read()
  for name, module in mrl_jax._API.items():
    assert f"::: {module}.{name}\n" in api, f"docs/api.md lacks mrl_jax.{name}"


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
  yml = open(os.path.join(REPO, "mkdocs.yml"), encoding="utf-8").read()
  nav = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", yml, re.M))
  pages = {os.path.relpath(p, os.path.join(REPO, "docs"))
           for p in glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True)}
  assert nav == pages, (sorted(nav - pages), sorted(pages - nav))


def test_every_config_docstring_starts_with_its_command():
  import ast

  for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
    doc = ast.get_docstring(ast.parse(open(path, encoding="utf-8").read())) or ""
    head = "\n".join(doc.split("\n\n")[:2])
    name = os.path.basename(path)
    assert re.search(rf"--config=configs/{re.escape(name)}", head), f"{name}: no command first"
    assert re.search(r"print|reach|expect", head), f"{name}: says nothing of what to expect"


def test_every_notebook_links_the_docs_it_illustrates():
  import nbformat

  for path in sorted(glob.glob(os.path.join(REPO, "colab", "*.ipynb"))):
    cells = nbformat.read(path, as_version=4).cells
    text = "\n".join(c.source for c in cells if c.cell_type == "markdown")
    links = re.findall(r"https://mrl-jax\.github\.io/mrl_jax/([\w/-]*?)/?\)", text)
    assert links, f"{path}: no link to the docs"
    for link in links:
      page = os.path.join(REPO, "docs", (link or "index") + ".md")
      assert os.path.exists(page), f"{path}: links a missing docs page {link!r}"


@pytest.mark.slow
def test_mkdocs_builds_with_no_warning(tmp_path):
  pytest.importorskip("mkdocs")
  pytest.importorskip("mkdocstrings")
  proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                         "-d", str(tmp_path / "site")], cwd=REPO, capture_output=True,
                        text=True, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
  assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def demo_workdir(digits_dir, tmp_path_factory):
  """``workdir/demo/mrl/encoder``: the digits config (64 dims), 20 steps."""
  root = tmp_path_factory.mktemp("docs_demo")
  config = override(load_config_file(os.path.join(REPO, "configs", "digits_mlp.py")),
                    dict(data_dir=digits_dir, num_train_steps=20, log_every_steps=20,
                         eval_every_steps=20, checkpoint_every_steps=20))
  config.encoder.hidden = (32,)
  experiments.train_and_evaluate(config, str(root / "mrl"), progress=False)
  return root


DRIVER = """
import json, subprocess, sys, traceback
failed = []
for i, block in enumerate(json.load(open(sys.argv[1]))):
  where = f"{block['page']}:{block['line']}"
  try:
    if block["kind"] == "python":
      exec(compile(block["code"], where, "exec"), {"__name__": "__main__"})
    else:
      subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block["code"]], check=True,
                     timeout=600)
  except BaseException:
    failed.append(where)
    print(f"--- {where} failed:\\n{block['code']}\\n{traceback.format_exc()}", file=sys.stderr)
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in doc_pages() if runnable(p)])
def test_every_block_of_the_page_runs_as_printed(page, demo_workdir, digits_dir, tmp_path):
  """One fresh interpreter per page runs its blocks in order, in a folder of its own."""
  for name in LINKED:
    os.symlink(os.path.join(REPO, name), tmp_path / name)
  os.symlink(sys.prefix, tmp_path / ".venv")
  os.makedirs(tmp_path / "workdir")
  os.symlink(demo_workdir, tmp_path / "workdir" / "demo")
  todo = [{**b, "page": page,
           "code": console_commands(b["code"]) if b["kind"] == "console" else b["code"]}
          for b in runnable(page)]
  (tmp_path / "blocks.json").write_text(json.dumps(todo))
  env = {**os.environ, "PYTHONPATH": REPO, "TFDS_DATA_DIR": digits_dir, "JAX_PLATFORMS": "cpu",
         "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
  proc = subprocess.run([sys.executable, "-c", DRIVER, "blocks.json"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-8000:]
