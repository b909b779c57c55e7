"""Every Python snippet of the README runs as pasted (extracted from the README itself).

Snippets that read what ``make demo`` or the README's commands write
(``workdir/demo/mrl/encoder``, ``workdir/text/encoder``) run in a folder where a
short run of the same config wrote them.
"""

import os
import re
import subprocess
import sys

import pytest
from testutil import REPO, tiny_text_config

from mrl_jax import experiments
from mrl_jax.train.config import load_config_file

README = os.path.join(REPO, "README.md")
SNIPPETS = re.findall(r"```python\n(.*?)```", open(README, encoding="utf-8").read(), re.S)


def test_the_readme_cites_nothing_outside_the_repository():
  for path in ("README.md", "configs", "benchmarks", "mrl_jax"):
    out = subprocess.run(["git", "grep", "-l", "DESIGN.md", "--", path], cwd=REPO,
                         capture_output=True, text=True)
    assert not out.stdout.strip(), out.stdout


@pytest.fixture(scope="module")
def workdirs(digits_dir, tmp_path_factory):
  """``workdir/demo/mrl/encoder`` (the digits config, 64 dims) and ``workdir/text/encoder``."""
  root = tmp_path_factory.mktemp("readme")
  config = load_config_file(os.path.join(REPO, "configs", "digits_mlp.py"),
                            data_dir=digits_dir,
                            loop={"num_train_steps": 20, "log_every_steps": 20,
                                  "eval_every_steps": 20},
                            checkpoint={"every_steps": 20})
  config.encoder.hidden = (32,)
  experiments.train_and_evaluate(config, str(root / "workdir" / "demo" / "mrl"), progress=False)
  experiments.train_and_evaluate(tiny_text_config(num_train_steps=10),
                               str(root / "workdir" / "text"), progress=False)
  return root


DRIVER = """
import json, sys, traceback
snippets = json.load(open(sys.argv[1]))
failed = []
for i, code in enumerate(snippets):
  try:
    exec(compile(code, f"README snippet {i}", "exec"), {"__name__": "__main__"})
  except Exception:
    failed.append(i)
    print(f"--- README snippet {i} failed:\\n{code}\\n{traceback.format_exc()}", file=sys.stderr)
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
def test_every_readme_snippet_runs_as_pasted(workdirs):
  """One fresh interpreter runs every snippet, each in its own namespace."""
  import json

  assert len(SNIPPETS) >= 5
  (workdirs / "snippets.json").write_text(json.dumps(SNIPPETS))
  env = {**os.environ, "PYTHONPATH": REPO}
  proc = subprocess.run([sys.executable, "-c", DRIVER, "snippets.json"], cwd=workdirs, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-6000:]
