"""Everything at once: :func:`evaluate_nested` computes every metric at every size, the
cascade, adaptive and funnel retrieval, writes ``metrics.json`` and PNG plots, and
:func:`format_table` prints it.

Protocol (the paper's): the database is the train split and the queries the test
split; search is exact cosine similarity on truncated-then-normalised prefixes; the
cascade's thresholds are tuned on a random ``tune_fraction`` of the test split and
evaluated on the rest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from mrl_jax.evaluate import cascade as cascade_lib
from mrl_jax.evaluate import plots
from mrl_jax.evaluate.classification import per_dim_accuracy
from mrl_jax.evaluate.index import Array, PrefixIndex
from mrl_jax.evaluate.metrics import MAP_DENOMINATORS, retrieval_metrics
from mrl_jax.evaluate.retrieval import RetrievalResult, cascade_retrieval, funnel_retrieval
from mrl_jax.nesting import Nesting

METRICS_FILE = "metrics.json"


def default_funnel(dims: Sequence[int], k: int = 10,
                   shortlist_k: int = 200) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The paper's funnel shape for any nesting list: ``(stage dims, kept per stage)``.

  Stages: up to five sizes starting at the second smallest, then the largest. The
  shortlist halves from ``shortlist_k`` (never below ``k``), ends at ``k``, and the
  largest size re-orders the final ``k``. For the paper's dims ``(8, ..., 2048)``:
  ``(16, 32, 64, 128, 256, 2048)`` keeping ``(200, 100, 50, 25, 10, 10)``. With two
  stages it is adaptive retrieval: ``(shortlist_k, k)``.
  """
  dims = tuple(dims)
  stages = (dims[1:-1][:5] if len(dims) > 2 else dims[:-1]) + dims[-1:]
  n = len(stages) - 1  # shortlisting stages
  halving = tuple(max(k, shortlist_k >> i) for i in range(max(n - 1, 1))) if n else ()
  return stages, halving + ((k,) if n > 1 else ()) + (k,)


def evaluate_nested(train_embeddings: Array, train_labels: Array, test_embeddings: Array,
                    test_labels: Array, dims: Sequence[int], *, test_logits: Array | None = None,
                    ks: Sequence[int] = (10, 25, 50, 100), map_denominator: str = "k",
                    tune_fraction: float = 0.2, seed: int = 0, shortlist_k: int = 200,
                    adaptive: Sequence[tuple[int, int, int]] | None = None,
                    funnels: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None,
                    out_dir: str | os.PathLike | None = None, model_name: str = "MRL",
                    index_kwargs: dict | None = None) -> dict:
  """Per-dim retrieval/classification metrics, cascade, adaptive and funnel retrieval.

  Args:
    train_embeddings: ``[N, D]`` database (train split).
    train_labels: ``[N]`` integer classes.
    test_embeddings: ``[Q, D]`` queries (test split).
    test_labels: ``[Q]``.
    dims: strictly increasing nested sizes ``<= D``.
    test_logits: optional nested logits ``[M, Q, C]`` (``M = len(dims)``) for the
      test split: adds per-dim top-1/top-5 and the cascade.
    ks: cut-offs for precision/recall/mAP, ``max(ks) <= N``.
    map_denominator: ``"k"`` (paper), ``"hits"`` or ``"relevant"``
      (:func:`~mrl_jax.evaluate.metrics.average_precision_at_k`).
    tune_fraction: share of the test split used to tune the cascade thresholds.
    seed: seed of that split.
    shortlist_k: ``K`` of the default adaptive rows and first funnel stage.
    adaptive: ``(D_s, D_r, K)`` settings; default ``(d, dims[-1], shortlist_k)`` for
      every ``d`` in ``dims[:-1]``. Each returns ``max(ks)`` items.
    funnels: ``(dims, shortlist)`` settings; default :func:`default_funnel`.
    out_dir: if given, ``metrics.json`` and PNG plots are written there.
    model_name: legend label in the plots.
    index_kwargs: options for the :class:`PrefixIndex` over the train split.

  Returns:
    A JSON-ready dict (fractions, not %): ``per_dim``, ``adaptive``, ``funnel`` rows,
    and with logits ``classification`` and ``cascade``; ``files`` lists what was
    written.
  """
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  n, d_full = np.shape(train_embeddings)[0], np.shape(train_embeddings)[-1]
  _check_inputs(train_embeddings, train_labels, test_embeddings, test_labels, ks,
                map_denominator, tune_fraction)
  dims = Nesting(tuple(dims), embed_dim=d_full).dims
  ks = tuple(int(k) for k in ks)
  index = PrefixIndex(train_embeddings, **(index_kwargs or {}))
  kmax = max(ks)
  score = lambda r, keep_ks=ks: retrieval_metrics(r.ids, train_labels, test_labels,
                                                  [k for k in keep_ks if k <= r.keeps[-1]],
                                                  map_denominator=map_denominator)
  out: dict = {"model": model_name, "num_database": int(n), "num_queries": int(len(test_labels)),
               "dims": list(dims), "ks": list(ks), "map_denominator": map_denominator}

  out["per_dim"] = []
  for d in dims:
    r = cascade_retrieval(test_embeddings, index, (d,), (kmax,))
    out["per_dim"].append({"dim": d, **score(r), **_cost(r)})

  settings = adaptive if adaptive is not None else [(d, dims[-1], shortlist_k) for d in dims[:-1]]
  out["adaptive"] = []
  for ds, dr, kk in settings:
    r = cascade_retrieval(test_embeddings, index, (ds, dr), (kk, kmax))
    out["adaptive"].append({"shortlist_dim": ds, "rerank_dim": dr, "shortlist_k": kk,
                            **score(r), **_cost(r)})

  funnel_settings = funnels if funnels is not None else [default_funnel(dims, ks[0], shortlist_k)]
  out["funnel"] = []
  for fdims, fkeep in funnel_settings:
    r = funnel_retrieval(test_embeddings, index, fdims, fkeep)
    out["funnel"].append({"dims": list(r.dims), "shortlist": list(r.keeps), **score(r),
                          **_cost(r)})

  if test_logits is not None:
    out.update(_classification(test_logits, test_labels, dims, tune_fraction, seed))
  if out_dir is not None:
    out["files"] = _write(out, os.fspath(out_dir))
  return out


def _check_inputs(train_embeddings, train_labels, test_embeddings, test_labels, ks,
                  map_denominator, tune_fraction) -> None:
  if np.ndim(train_embeddings) != 2 or np.ndim(test_embeddings) != 2:
    raise ValueError(f"embeddings must be [N, D] and [Q, D], got {np.shape(train_embeddings)} "
                     f"and {np.shape(test_embeddings)}")
  if np.shape(train_embeddings)[1] != np.shape(test_embeddings)[1]:
    raise ValueError(f"train and test embeddings differ in size: {np.shape(train_embeddings)} "
                     f"vs {np.shape(test_embeddings)}")
  if train_labels.shape != (np.shape(train_embeddings)[0],):
    raise ValueError(f"train_labels must be [N]={np.shape(train_embeddings)[0]}, "
                     f"got {train_labels.shape}")
  if test_labels.shape != (np.shape(test_embeddings)[0],):
    raise ValueError(f"test_labels must be [Q]={np.shape(test_embeddings)[0]}, "
                     f"got {test_labels.shape}")
  if not ks or any(isinstance(k, bool) or int(k) != k or k < 1 for k in ks):
    raise ValueError(f"ks must be positive ints, got {ks}")
  if max(ks) > np.shape(train_embeddings)[0]:
    raise ValueError(f"k={max(ks)} is larger than the database "
                     f"({np.shape(train_embeddings)[0]} train items)")
  if map_denominator not in MAP_DENOMINATORS:
    raise ValueError(f"map_denominator must be one of {MAP_DENOMINATORS}, got {map_denominator!r}")
  if not 0 < tune_fraction < 1:
    raise ValueError(f"tune_fraction must be in (0, 1), got {tune_fraction}")


def _cost(r: RetrievalResult) -> dict:
  ms = None if r.seconds_per_query is None else 1e3 * r.seconds_per_query
  return {"mflops_per_query": r.mflops_per_query, "ms_per_query": ms}


def _classification(test_logits, test_labels, dims, tune_fraction, seed) -> dict:
  logits = np.asarray(test_logits)
  if logits.ndim != 3 or logits.shape[:2] != (len(dims), len(test_labels)):
    raise ValueError(f"test_logits must be [M={len(dims)}, Q={len(test_labels)}, C], "
                     f"got {logits.shape}")
  acc = per_dim_accuracy(logits, test_labels)
  conf, pred = cascade_lib.confidences(logits)
  order = np.random.default_rng(seed).permutation(len(test_labels))
  n_tune = int(round(tune_fraction * len(order)))
  if not 0 < n_tune < len(order):
    raise ValueError(f"tune_fraction={tune_fraction} leaves an empty split of "
                     f"{len(order)} test items")
  tune, held = order[:n_tune], order[n_tune:]
  thresholds = cascade_lib.tune_thresholds(conf[:, tune], pred[:, tune], test_labels[tune])
  report = cascade_lib.cascade_report(conf[:, held], pred[:, held], test_labels[held],
                                      thresholds, dims)
  fixed = np.mean(pred[:, held] == test_labels[held][None, :], axis=1)
  return {"classification": {"dims": list(dims), **{k: v.tolist() for k, v in acc.items()}},
          "cascade": {"num_tune": int(n_tune), "num_eval": int(len(held)),
                      "thresholds": thresholds.tolist(), "accuracy": report["accuracy"],
                      "expected_dim": report["expected_dim"],
                      "stop_fraction": report["stop_fraction"].tolist(),
                      "capped": report["capped"], "fixed_top1_eval": fixed.tolist()}}


def _write(results: dict, out_dir: str) -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  k0 = results["ks"][0]
  name = results["model"]
  per_dim = results["per_dim"]
  dims = [r["dim"] for r in per_dim]
  curves = {f"{name} 1-NN": (dims, [100 * r["1nn"] for r in per_dim]),
            f"{name} mAP@{k0}": (dims, [100 * r[f"map@{k0}"] for r in per_dim])}
  if "classification" in results:
    curves[f"{name} top-1"] = (dims, [100 * a for a in results["classification"]["top1"]])
  files = [plots.plot_accuracy_vs_dim(curves, os.path.join(out_dir, "accuracy_vs_dim.png"),
                                      ylabel="%")]
  series = {"exact": ([r["mflops_per_query"] for r in per_dim],
                      [100 * r[f"map@{k0}"] for r in per_dim], [str(d) for d in dims])}
  if results["adaptive"]:
    series["adaptive"] = ([r["mflops_per_query"] for r in results["adaptive"]],
                          [100 * r[f"map@{k0}"] for r in results["adaptive"]],
                          [f"{r['shortlist_dim']}->{r['rerank_dim']}" for r in results["adaptive"]])
  funnels = [r for r in results["funnel"] if f"map@{k0}" in r]
  if funnels:
    series["funnel"] = ([r["mflops_per_query"] for r in funnels],
                        [100 * r[f"map@{k0}"] for r in funnels],
                        ["->".join(map(str, r["dims"])) for r in funnels])
  files.append(plots.plot_map_vs_mflops(series, os.path.join(out_dir, "map_vs_mflops.png"),
                                        ylabel=f"mAP@{k0} (%)"))
  if "cascade" in results:
    c = results["cascade"]
    files.append(plots.plot_cascade([r["expected_dim"] for r in c["capped"]],
                                     [100 * r["accuracy"] for r in c["capped"]],
                                     os.path.join(out_dir, "cascade.png"), fixed_dims=dims,
                                     fixed_accuracies=[100 * a for a in c["fixed_top1_eval"]]))
  path = os.path.join(out_dir, METRICS_FILE)
  files.append(path)
  with open(path, "w") as f:
    json.dump({**results, "files": files}, f, indent=1)
  return files


def format_table(results: dict) -> str:
  """The results of :func:`evaluate_nested` as aligned text tables (metrics in %)."""
  ks = results["ks"]
  cols = ["1nn"] + [f"{m}@{k}" for k in ks for m in ("precision", "recall", "map")]
  lines = [f"{results['model']}: {results['num_database']} database items, "
           f"{results['num_queries']} queries, mAP denominator: {results['map_denominator']}"]

  def table(title, rows, key_name, key):
    lines.append("")
    lines.append(title)
    lines.append(f"{key_name:>24} " + " ".join(f"{c:>12}" for c in cols)
                 + f" {'MFLOPs/q':>10} {'ms/q':>8}")
    for r in rows:
      vals = " ".join(f"{100 * r[c]:>12.2f}" if c in r else f"{'-':>12}" for c in cols)
      ms = f"{r['ms_per_query']:>8.3f}" if r.get("ms_per_query") is not None else f"{'-':>8}"
      lines.append(f"{key(r):>24} {vals} {r['mflops_per_query']:>10.3f} {ms}")

  table("retrieval, exact search per dim", results["per_dim"], "dim", lambda r: str(r["dim"]))
  table("adaptive retrieval (D_s -> D_r, K)", results["adaptive"], "setting",
        lambda r: f"{r['shortlist_dim']}->{r['rerank_dim']}, K={r['shortlist_k']}")
  table("funnel retrieval", results["funnel"], "dims / shortlist",
        lambda r: "->".join(map(str, r["dims"])) + "/" + "->".join(map(str, r["shortlist"])))
  if "classification" in results:
    c = results["classification"]
    lines += ["", "classification (nested logits, whole test split)",
              f"{'dim':>8} " + " ".join(f"{k:>8}" for k in c if k != "dims")]
    for i, d in enumerate(c["dims"]):
      lines.append(f"{d:>8} " + " ".join(f"{100 * c[k][i]:>8.2f}" for k in c if k != "dims"))
  if "cascade" in results:
    c = results["cascade"]
    lines += ["", f"adaptive classification (thresholds tuned on {c['num_tune']}, "
              f"evaluated on {c['num_eval']})",
              f"{'max dim':>8} {'top-1':>8} {'exp. dim':>9} {'fixed top-1':>12}"]
    for r, fixed in zip(c["capped"], c["fixed_top1_eval"], strict=True):
      lines.append(f"{r['max_dim']:>8} {100 * r['accuracy']:>8.2f} {r['expected_dim']:>9.2f} "
                   f"{100 * fixed:>12.2f}")
  return "\n".join(lines)
