"""The paper's comparison on offline data: MRL vs MRL-E vs FF-k vs an ordinary model truncated.

``python -m mrl_jax.demo --config=configs/digits_mlp.py --workdir=DIR`` (what
``make demo`` runs) trains, in ``DIR/<run>``:

* ``mrl``: nested heads at every dim of the config's nesting list;
* ``mrl_e``: the weight-tied (efficient) nested head;
* ``ff_<k>``: one fixed-feature model per nested size k (FF-k);
* ``truncated``: the ordinary model (``ff_<D>``) whose embedding is cut to its
  first k dims, with a linear probe trained on each cut.

It prints one top-1 table, writes ``DIR/results.json`` as
``{"dims": [...], "top1": {"mrl": [...], "mrl_e": [...], "ff": [...], "truncated": [...]}}``
(``null`` where a row has no value) and plots the curves to ``DIR/results.png``.
Then it exports the MRL encoder to ``DIR/mrl/encoder`` and evaluates the MRL
model's nested embedding (1-NN, mAP@k, cascade, adaptive and funnel retrieval)
into ``DIR/mrl/eval/``. Runs already finished in ``DIR`` are reused (their
checkpoints are restored).

Then the text comparison (:func:`run_text_demo`, ``--text_config``, default
``configs/text_stdlib.py``; ``--notext`` skips it) in ``DIR/text``: real code
search on the Python standard library (docstring summary -> source), where
all-MiniLM-L6-v2 as shipped, fine-tuned without Matryoshka and fine-tuned with
it are compared at every nested dim by recall@10 and MRR@10 on held-out modules, and
the shipped, MRL and MRL + binary-aware models (the MRL run with the binary-aware loss
terms, :data:`TEXT_BINARY_AWARE`) by float / int8 / ``ubinary`` nDCG@10 and recall@10
and a binary shortlist re-ranked in float (:func:`format_binary_tables`).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from mrl_jax import experiments
from mrl_jax.bundle import artifact
from mrl_jax.bundle.encoder import Encoder
from mrl_jax.data.text import read_text_pairs
from mrl_jax.evaluate import plots, probe
from mrl_jax.evaluate.encoder import evaluate_workdir
from mrl_jax.evaluate.report import format_table as format_evaluation
from mrl_jax.evaluate.text import evaluate_text
from mrl_jax.train import config as config_lib
from mrl_jax.train import loop, optim, sharding

ROWS = (("mrl", "MRL"), ("mrl_e", "MRL-E"), ("ff", "FF-k"), ("truncated", "ordinary, truncated"))
TEXT_ROWS = (("shipped", "as shipped, truncated"), ("no_mrl", "fine-tuned, no MRL, truncated"),
             ("mrl", "fine-tuned with MRL"), ("mrl_binary", "MRL + binary-aware"))
TEXT_METRICS = (("recall_at_10", "recall@10 %"), ("mrr_at_10", "MRR@10 x 100"))
# The binary-aware loss terms of the "mrl_binary" run (mrl_jax.losses.binary), chosen by a
# short sweep on the stdlib corpus (docs/binary-training.md); the "mrl" run has them off.
TEXT_BINARY_AWARE = dict(spread_out_weight=0.1, binary_weight=0.5, binary_estimator="tanh",
                         binary_temperature=1.0)
_BINARY_OFF = dict(spread_out_weight=0.0, binary_weight=0.0)
# results.json key -> evaluate_text's key (less "_per_dim"), for every row.
TEXT_RESULT_KEYS = (
    ("recall_at_1", "cosine_recall@1"), ("recall_at_10", "cosine_recall@10"),
    ("mrr_at_10", "cosine_mrr@10"), ("ndcg_at_10", "cosine_ndcg@10"),
    ("int8_recall_at_10", "int8_symmetric_recall@10"),
    ("int8_ndcg_at_10", "int8_symmetric_ndcg@10"),
    ("ubinary_recall_at_10", "ubinary_recall@10"), ("ubinary_ndcg_at_10", "ubinary_ndcg@10"),
    ("ubinary_rerank_recall_at_10", "ubinary_rerank_recall@10"))
# The per-dim tables of the binary comparison: its rows and columns (results.json keys).
BINARY_ROWS = (("shipped", "as shipped"), ("mrl", "MRL"), ("mrl_binary", "MRL + binary-aware"))
BINARY_COLUMNS = (("ndcg_at_10", "float"), ("int8_ndcg_at_10", "int8"),
                  ("ubinary_ndcg_at_10", "ubinary"), ("recall_at_10", "float"),
                  ("int8_recall_at_10", "int8"), ("ubinary_recall_at_10", "ubinary"),
                  ("ubinary_rerank_recall_at_10", "bin->flt"))


def _variant(config: ml_collections.ConfigDict, **overrides: Any) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  config.update(overrides)
  return config


def run_demo(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
             evaluate: bool = True) -> dict[str, Any]:
  """Train every model of the comparison and return the results dict (see module doc).

  With ``evaluate``, the returned dict also holds ``"evaluation"``: the MRL model's
  :func:`~mrl_jax.evaluate.report.evaluate_nested` metrics (not in ``results.json``).
  """
  config = experiments.validate_config(config)
  dims = list(config.nesting.dims)
  top1: dict[str, list[float | None]] = {}
  for head in ("mrl", "mrl_e"):
    _say(progress, f"== training {head} (nested dims {dims})")
    result = experiments.train_and_evaluate(_variant(config, head=head),
                                          os.path.join(workdir, head), progress=progress,
                                          export_dir=None if head == "mrl" else "")
    top1[head] = result["eval"]["top1_per_dim"]
  top1["ff"] = []
  for k in dims:
    _say(progress, f"== training FF-{k}")
    result = experiments.train_and_evaluate(_variant(config, head="ff", ff_dim=k),
                                          os.path.join(workdir, f"ff_{k}"), progress=progress,
                                          export_dir="")
    top1["ff"].append(result["eval"]["top1_per_dim"][0])
  _say(progress, f"== linear probes on the ordinary (FF-{dims[-1]}) model's truncated embedding")
  top1["truncated"] = _truncated_row(_variant(config, head="ff", ff_dim=dims[-1]),
                                     os.path.join(workdir, f"ff_{dims[-1]}"), dims)
  results = {"dims": dims, "top1": top1}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  plot_results(results, os.path.join(workdir, "results.png"))
  if evaluate:
    mrl_dir = os.path.join(workdir, "mrl")
    _say(progress, "== evaluating the exported MRL encoder's nested embedding")
    results = {**results, "evaluation": evaluate_workdir(mrl_dir)}
  return results


def _truncated_row(config: ml_collections.ConfigDict, workdir: str,
                   dims: Sequence[int]) -> list[float]:
  experiment = experiments.create(config, workdir)  # restores the trained model
  try:
    task, variables = experiment.task, experiment.state.variables
    train = task.predict(variables, config.train_split)
    test = task.predict(variables, config.eval_split)
  finally:
    experiment.close()
  return probe.truncated_probe_accuracy(train["embedding"], train["label"], test["embedding"],
                                        test["label"], dims, task.spec.num_classes)


def format_table(results: dict[str, Any]) -> str:
  """The results as a fixed-width text table of top-1 % per nested dim."""
  dims = results["dims"]
  width = max(len(label) for _, label in ROWS) + 2
  lines = ["top-1 % (test split) per nested dim".ljust(width),
           "dim".ljust(width) + "".join(f"{m:>8d}" for m in dims)]
  for key, label in ROWS:
    values = results["top1"].get(key) or [None] * len(dims)
    cells = "".join(f"{'-':>8}" if v is None else f"{100 * v:8.2f}" for v in values)
    lines.append(label.ljust(width) + cells)
  return "\n".join(lines)


def plot_results(results: dict[str, Any], path: str) -> None:
  """Top-1 vs nested dim (log2 x-axis), one curve per row, saved as a PNG."""
  curves = {}
  for key, label in ROWS:
    values = results["top1"].get(key) or []
    pts = [(m, 100 * v) for m, v in zip(results["dims"], values, strict=False) if v is not None]
    if pts:
      curves[label] = tuple(zip(*pts, strict=True))
  plots.plot_accuracy_vs_dim(curves, path)


# --- The text comparison -----------------------------------------------------------------


def run_text_demo(config: ml_collections.ConfigDict, workdir: str, *,
                  eval_pairs: int | None = None, progress: bool = True,
                  binary_aware: dict[str, Any] | None = None) -> dict[str, Any]:
  """A pretrained text encoder as shipped vs fine-tuned without and with Matryoshka, and
  with Matryoshka plus the binary-aware loss terms.

  ``config`` is a pairs-task config (``configs/text_stdlib.py``). In ``workdir``:

  * ``shipped/encoder``: the encoder before any training (the loop's step-0
    state: ``config.model_dir``'s weights, or the random initialisation of
    ``config.seed`` without one), exported by the task's own export as a
    non-Matryoshka baseline (``is_matryoshka: false``, one size ``D``), rewritten
    on every call;
  * ``no_mrl``: fine-tuned with the loss at the single dim ``D`` (nesting ``(D,)``:
    the plain in-batch softmax), the ordinary fine-tune;
  * ``mrl``: fine-tuned with the nested loss at ``config.nesting.dims`` (binary-aware
    terms off: ``spread_out_weight = binary_weight = 0``);
  * ``mrl_binary``: the ``mrl`` run with the binary-aware terms ``binary_aware`` on.

  The runs go through :func:`mrl_jax.train.loop.train_and_evaluate` (a run
  already finished in ``workdir`` is restored, not retrained) with no
  evaluation in the loop. Each exported bundle then embeds the held-out pairs
  at full width (:meth:`mrl_jax.bundle.encoder.Encoder.embed`, ``normalize=False``)
  and :func:`mrl_jax.evaluate.text.evaluate_text` truncates to each nested dim,
  L2-normalises (and quantises, for the ``int8_symmetric`` / ``ubinary`` codes) and
  ranks: every summary retrieves its source among all the sources of the evaluated
  pairs; the binary funnel shortlists ``config.shortlist_k`` sources by Hamming
  distance at that dim and re-ranks them in float at the full dim
  (:func:`mrl_jax.evaluate.text.binary_rerank_per_dim`).

  Args:
    config: the pairs config; ``config.eval_pairs_file`` names the held-out pairs.
    workdir: where the runs, the bundles and ``results.json`` go.
    eval_pairs: evaluate this many pairs drawn (seed 0) from the held-out file;
      None: all of them.
    progress: print progress and the time of each part.
    binary_aware: the ``mrl_binary`` run's config overrides (None:
      :data:`TEXT_BINARY_AWARE`); it must turn ``spread_out_weight`` or
      ``binary_weight`` on.

  Returns:
    ``{"model", "dims", "eval_file", "eval_pairs", "shortlist_k", "binary_aware", <metric>}``
    for every ``<metric>`` of :data:`TEXT_RESULT_KEYS` (``recall_at_10``, ``ndcg_at_10``,
    ``ubinary_ndcg_at_10``, ``ubinary_rerank_recall_at_10``, ...), each
    ``{row: [M] floats}`` for the rows of :data:`TEXT_ROWS`; ``shortlist_k`` is the binary
    shortlist used (``config.shortlist_k``, at most the evaluated pairs). Also written to
    ``workdir/results.json``.

  Raises:
    ValueError: a config that is not the pairs task's or has no
      ``eval_pairs_file``; ``eval_pairs`` not a positive int; fewer than 10 evaluated
      pairs; ``binary_aware`` not a dict of config fields with a binary-aware weight on.
  """

  config = experiments.validate_config(_variant(config))
  if config.task != "pairs":
    raise ValueError(f"config.task={config.task!r}: the text demo needs the pairs task")
  if not config.eval_pairs_file:
    raise ValueError("config.eval_pairs_file must name the held-out pairs of the text demo")
  if eval_pairs is not None and (isinstance(eval_pairs, bool) or not isinstance(eval_pairs, int)
                                 or eval_pairs < 1):
    raise ValueError(f"eval_pairs={eval_pairs!r} must be a positive int or None")
  binary_aware = TEXT_BINARY_AWARE if binary_aware is None else binary_aware
  if not isinstance(binary_aware, dict):
    raise ValueError(f"binary_aware={binary_aware!r} must be a dict of config fields")
  binary_aware = dict(binary_aware)
  binary_config = experiments.validate_config(_variant(config, **binary_aware))  # names a bad field
  if max(binary_config.spread_out_weight, binary_config.binary_weight) <= 0:
    raise ValueError(f"binary_aware={binary_aware!r} must turn spread_out_weight or "
                     "binary_weight on (the MRL + binary-aware row)")
  dims, width = list(config.nesting.dims), int(config.encoder.embed_dim)
  held_out = read_text_pairs(config.eval_pairs_file)
  if eval_pairs is not None and eval_pairs < len(held_out):
    held_out = held_out.select(np.sort(np.random.default_rng(0).permutation(len(held_out))
                                       [:eval_pairs]))
  if len(held_out) < 10:
    raise ValueError(f"{config.eval_pairs_file}: {len(held_out)} held-out pairs evaluated; "
                     "recall@10 needs at least 10")
  shortlist_k = min(int(config.shortlist_k), len(held_out))
  train_config = _variant(config, eval_file=None, eval_pairs_file=None, **_BINARY_OFF)
  binary_config = _variant(binary_config, eval_file=None, eval_pairs_file=None)
  plain = _variant(train_config)
  plain.nesting.dims, plain.nesting.weights = (width,), None

  tick = time.perf_counter()
  # The shipped model was never trained with the nested loss: exported as what it is, a
  # single-size baseline (is_matryoshka false, no matryoshka_dimensions), so no serving
  # engine truncates it as if it were trained at the nested dims.
  bundles = {"shipped": _export_untrained(plain, os.path.join(workdir, "shipped"))}
  _say(progress, f"== exported the encoder as shipped ({time.perf_counter() - tick:.0f} s)")
  for key, variant in (("no_mrl", plain), ("mrl", train_config), ("mrl_binary", binary_config)):
    tick = time.perf_counter()
    _say(progress, f"== fine-tuning {key} (nested dims {list(variant.nesting.dims)})")
    result = experiments.train_and_evaluate(variant, os.path.join(workdir, key),
                                          progress=progress)
    bundles[key] = result["export_dir"]
    _say(progress, f"   {key}: {time.perf_counter() - tick:.0f} s")


  tick = time.perf_counter()
  results: dict[str, Any] = {
      "model": config.model_dir or "random BERT", "dims": dims,
      "eval_file": os.path.abspath(config.eval_pairs_file), "eval_pairs": len(held_out),
      "shortlist_k": shortlist_k, "binary_aware": binary_aware,
      **{name: {} for name, _ in TEXT_RESULT_KEYS}}
  for key, _ in TEXT_ROWS:
    encoder = Encoder.load(bundles[key])
    metrics = evaluate_text(functools.partial(_embed_by_length, encoder), dims,
                            pairs=(held_out.anchors, held_out.positives),
                            shortlist_k=shortlist_k)
    for name, eval_name in TEXT_RESULT_KEYS:
      results[name][key] = [float(v) for v in metrics[f"{eval_name}_per_dim"]]
  _say(progress, f"== evaluated the {len(TEXT_ROWS)} encoders on {len(held_out)} held-out "
       f"pairs ({time.perf_counter() - tick:.0f} s)")
  loop.write_json(workdir, "results.json", results)
  return results


def _export_untrained(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The task's export of the loop's step-0 encoder (before any update) to ``workdir/encoder``.

  That is ``config.model_dir``'s weights, or the random initialisation the runs start from.
  """
  config = experiments.validate_config(config)  # fills the nesting weights of a variant
  spec = config_lib.spec_of(config)
  mesh = sharding.make_mesh(spec.mesh.shape)
  task_class = experiments.task_of(config)
  task = task_class(task_class.parse_spec(config), workdir=os.path.abspath(workdir), mesh=mesh)
  schedule = optim.learning_rate_schedule(spec, task.steps_per_epoch)
  state = loop.create_train_state(task, jax.random.PRNGKey(spec.seed),
                                  optim.make_optimizer(spec.optim, schedule), mesh)
  variables = jax.tree.map(artifact.to_numpy, state.variables)
  del state
  return artifact.write_atomically(os.path.abspath(os.path.join(workdir, "encoder")),
                                 lambda tmp: task.export(variables, tmp, step=0))


def _embed_by_length(encoder: Any, texts: Sequence[str]) -> np.ndarray:
  """Full-width raw embeddings ``[N, D]`` of ``texts`` in their order, embedded shortest first
  (batches of similar lengths pad less)."""
  order = np.argsort([len(t) for t in texts], kind="stable")
  embedded = encoder.embed([texts[i] for i in order], normalize=False)
  out = np.empty_like(embedded)
  out[order] = embedded
  return out


def format_text_table(results: dict[str, Any]) -> str:
  """The text results as fixed-width tables of recall@10 % and MRR@10 x 100 per nested dim."""
  dims = results["dims"]
  width = max(len(label) for _, label in TEXT_ROWS) + 2
  model = os.path.normpath(str(results["model"]))
  model = os.path.join(os.path.basename(os.path.dirname(model)), os.path.basename(model))
  lines = [f"{model}: docstring summary -> source retrieval, {results['eval_pairs']} held-out "
           "pairs (unseen modules)"]
  for key, title in TEXT_METRICS:
    lines += ["", title.ljust(width),
              "dim".ljust(width) + "".join(f"{m:>7d}" for m in dims)]
    for row, label in TEXT_ROWS:
      lines.append(label.ljust(width) + "".join(f"{100 * v:7.1f}" for v in results[key][row]))
  return "\n".join(lines)


def format_binary_tables(results: dict[str, Any]) -> str:
  """One table per nested dim: float / int8 / ubinary nDCG@10 and recall@10 and the binary
  shortlist -> float re-rank recall@10 (x 100) of the :data:`BINARY_ROWS`; then the goals
  of binary-aware Matryoshka measured on these numbers (printed, not asserted)."""
  width = max(len(label) for _, label in BINARY_ROWS) + 2
  lines = [f"float / int8 / ubinary retrieval x 100 per nested dim; bin->flt: a "
           f"{results['shortlist_k']}-item Hamming shortlist at that dim re-ranked in float "
           f"at {results['dims'][-1]} dims (recall@10)"]
  for i, m in enumerate(results["dims"]):
    lines += ["", f"dim {m}".ljust(width) + f"{'nDCG@10':^24}{'recall@10':^32}",
              "".ljust(width) + "".join(f"{title:>8}" for _, title in BINARY_COLUMNS)]
    for row, label in BINARY_ROWS:
      lines.append(label.ljust(width) + "".join(f"{100 * results[key][row][i]:8.1f}"
                                                for key, _ in BINARY_COLUMNS))
  return "\n".join(lines + ["", *binary_goals(results)])


def binary_goals(results: dict[str, Any]) -> list[str]:
  """The issue's three goals on the ``mrl_binary`` row, one line each (met or missed)."""
  ndcg, recall = results["ndcg_at_10"], results["recall_at_10"]
  gap = results["ubinary_ndcg_at_10"]["mrl_binary"][-1] - ndcg["mrl_binary"][-1]
  ratio = results["ubinary_rerank_recall_at_10"]["mrl_binary"][-1] / max(
      recall["mrl_binary"][-1], 1e-12)
  drop = max(b - a for a, b in zip(ndcg["mrl_binary"], ndcg["mrl"], strict=True))
  verdict = lambda ok: "met" if ok else "MISSED"
  d = results["dims"][-1]
  return [
      f"goal: ubinary - float nDCG@10 at {d} dims >= -0.020: {gap:+.3f} ({verdict(gap >= -0.02)})",
      f"goal: bin->flt / float recall@10 at {d} dims >= 0.95: {ratio:.3f} "
      f"({verdict(ratio >= 0.95)})",
      f"goal: float nDCG@10 at every dim within 0.010 of MRL: largest drop {drop:+.3f} "
      f"({verdict(drop <= 0.01)})"]


def _say(enabled: bool, text: str) -> None:
  if enabled:
    print(text, flush=True)


def main(argv: Sequence[str]) -> None:
  from absl import flags, logging

  del argv
  logging.set_verbosity(logging.WARNING)
  start = time.perf_counter()
  workdir = flags.FLAGS.workdir
  if flags.FLAGS.digits:
    results = run_demo(flags.FLAGS.config, workdir)
    print("\nMRL model, nested embedding (database = train split, queries = test split):")
    print(format_evaluation(results["evaluation"]))
    print()
    print(format_table(results))
    print(f"\nwrote {os.path.join(workdir, 'results.json')}, results.png, "
          f"the MRL encoder bundle {os.path.join(workdir, 'mrl', 'encoder')} and "
          f"{os.path.join(workdir, 'mrl', 'eval', 'metrics.json')} "
          f"({time.perf_counter() - start:.0f} s)")
  if flags.FLAGS.text:
    tick = time.perf_counter()
    text_dir = os.path.join(workdir, "text")
    text = run_text_demo(flags.FLAGS.text_config, text_dir,
                         eval_pairs=flags.FLAGS.text_eval_pairs or None)
    print()
    print(format_text_table(text))
    print()
    print(format_binary_tables(text))
    print(f"\nwrote {os.path.join(text_dir, 'results.json')} and the bundles "
          f"{text_dir}/{{{','.join(row for row, _ in TEXT_ROWS)}}}/encoder "
          f"({time.perf_counter() - tick:.0f} s)")
    tick = time.perf_counter()
    from mrl_jax.search.demo import search_demo  # the search extra, imported only here

    search_demo(os.path.join(text_dir, "mrl", "encoder"),
                flags.FLAGS.text_config.eval_pairs_file, os.path.join(text_dir, "search"))
    print(f"(search: {time.perf_counter() - tick:.0f} s)")
  print(f"demo: {time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  flags.DEFINE_string("workdir", "workdir/demo", "Where every run and the results go.")
  config_flags.DEFINE_config_file("config", "configs/digits_mlp.py", "Base config.")
  flags.DEFINE_bool("digits", True, "Run the digits comparison (run_demo) in WORKDIR; "
                    "--nodigits: the text comparison only.")
  flags.DEFINE_bool("text", True, "Also run the text comparison (run_text_demo) in WORKDIR/text.")
  config_flags.DEFINE_config_file(
      "text_config", "configs/text_stdlib.py",
      "The text comparison's config; configs/text_stdlib.py:DIR reads (writes) the corpus in DIR.")
  flags.DEFINE_integer("text_eval_pairs", 500,
                       "Held-out pairs evaluated (drawn with seed 0; 0: all of them).")
  app.run(main)
