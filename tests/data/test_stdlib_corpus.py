"""The stdlib (docstring summary -> source) corpus: real pairs, clean, split by module."""

import json
import os
import subprocess
import sys

import pytest
from testutil import REPO

from mrl_jax.data import stdlib_corpus as sc
from mrl_jax.data.text import read_text_pairs


def _cli(out_dir, hash_seed):
  """The CLI in a fresh interpreter (its ~290 imports stay out of the test process)."""
  env = {**os.environ, "PYTHONPATH": REPO, "PYTHONHASHSEED": str(hash_seed)}
  proc = subprocess.run([sys.executable, "-m", "mrl_jax.data.stdlib_corpus", "--out",
                         str(out_dir)], capture_output=True, text=True, env=env, timeout=300,
                        cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """The full corpus written twice, under two hash seeds."""
  first, second = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
  printed = _cli(first, 0)
  _cli(second, 12345)
  rows = {split: [json.loads(line) for line in open(first / f"{split}.jsonl", encoding="utf-8")]
          for split in sc.SPLITS}
  return first, second, printed, rows


def test_cli_output_is_deterministic_and_counts_are_plausible(corpus):
  first, second, printed, rows = corpus
  for split in sc.SPLITS:
    assert (first / f"{split}.jsonl").read_bytes() == (second / f"{split}.jsonl").read_bytes()
    assert f"{split}: {len(rows[split])} pairs" in printed
  n_train, n_eval = len(rows["train"]), len(rows["eval"])
  assert 1500 <= n_train + n_eval <= 8000  # 2,965 on CPython 3.11.7
  assert 0.1 <= n_eval / (n_train + n_eval) <= 0.4
  modules = {r["module"] for split in sc.SPLITS for r in rows[split]}
  assert len(modules) >= 120  # 207 on CPython 3.11.7
  pairs = read_text_pairs(str(first / "train.jsonl"))  # the trainer's reader accepts it
  assert len(pairs) == n_train and pairs.num_negatives == 0


def test_pairs_are_clean_unique_and_split_by_module(corpus):
  _, _, _, rows = corpus
  everything = rows["train"] + rows["eval"]
  summaries = [r["anchor"].casefold() for r in everything]
  sources = [r["positive"] for r in everything]
  assert len(set(summaries)) == len(summaries) and len(set(sources)) == len(sources)
  assert not any(sc.is_generic(r["anchor"]) for r in everything)
  assert not {"return repr(self).", "helper for pickle."} & set(summaries)
  assert max(len(s) for s in sources) <= 1000
  for split in sc.SPLITS:
    assert all(sc.split_of(r["module"], 0.2) == split for r in rows[split])
  assert not {r["module"] for r in rows["train"]} & {r["module"] for r in rows["eval"]}
  assert not any(sc.skipped_name(r["module"]) for r in everything)
  # A known pair: the summary is the docstring's first paragraph, gone from the source.
  dedent = [r for r in everything if r["module"] == "textwrap" and r["qualname"] == "dedent"]
  assert dedent and dedent[0]["anchor"].startswith("Remove any common leading whitespace")
  assert dedent[0]["positive"].startswith("def dedent(text):")
  assert "common leading whitespace" not in dedent[0]["positive"]


def _documented(x):
  """Add one to x.

  More text that is not the summary.
  """
  y = x + 1
  return y


def _only_docstring():
  """A docstring and nothing else."""


def _stub(self):
  """Read all the data from the stream."""
  raise NotImplementedError


def test_source_and_summary_helpers():
  assert sc.summary_of(_documented.__doc__) == "Add one to x."
  assert sc.summary_of(None) is None and sc.summary_of("  \n ") is None
  assert sc.source_without_docstring(_documented) == (
      "def _documented(x):\n  y = x + 1\n  return y")
  assert sc.source_without_docstring(_only_docstring) is None
  assert sc.source_without_docstring(_stub) is None
  assert sc.truncate_source("a = 1\nb = 2\nc = 3", 12) == "a = 1\nb = 2"
  assert sc.truncate_source("x" * 20, 8) == "x" * 8
  for generic in ("Return repr(self).", "Helper for pickle.", "Implement delattr(self, name).",
                  "Close it.", "a - b", "f(x, y) -> int", ">>> import io", "Internal helper."):
    assert sc.is_generic(generic), generic
  assert not sc.is_generic("Remove any common leading whitespace from every line.")


def test_in_memory_build_of_a_few_modules():
  modules = ["textwrap", "json.decoder", "this", "antigravity", "no_such_module"]
  built = sc.build_stdlib_pairs(modules=modules, eval_fraction=0.5)
  assert built == sc.build_stdlib_pairs(modules=modules[::-1], eval_fraction=0.5)
  assert {p.module for split in built.values() for p in split} <= {"textwrap", "json.decoder"}
  assert "this" not in sys.modules or sys.modules["this"].__name__ == "this"  # never imported here
  as_pairs = sc.stdlib_text_pairs(modules=modules, eval_fraction=0.5)
  for split in sc.SPLITS:
    assert as_pairs[split].anchors == [p.anchor for p in built[split]]
    assert as_pairs[split].path == f"<stdlib:{split}>"
  for kwargs, match in [({"max_chars": 10}, "max_chars"), ({"eval_fraction": 1.0}, "eval_fraction"),
                        ({"modules": "json"}, "not one string")]:
    with pytest.raises(ValueError, match=match):
      sc.build_stdlib_pairs(**kwargs)
