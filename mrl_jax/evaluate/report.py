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
import warnings
from collections.abc import Sequence

import numpy as np

from mrl_jax.core.nesting import Nesting
from mrl_jax.evaluate import cascade as cascade_lib
from mrl_jax.evaluate import codes as codes_lib
from mrl_jax.evaluate import plots
from mrl_jax.evaluate.classification import per_dim_accuracy
from mrl_jax.evaluate.index import Array, PrefixIndex
from mrl_jax.evaluate.metrics import MAP_DENOMINATORS, retrieval_metrics
from mrl_jax.evaluate.retrieval import RetrievalResult, cascade_retrieval, funnel_retrieval

METRICS_FILE = "metrics.json"
DEFAULT_KS = (10, 25, 50, 100)
DEFAULT_SHORTLIST_K = 200


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
  if not dims or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1
                     for d in dims) or list(dims) != sorted(set(dims)):
    raise ValueError(f"dims must be strictly increasing positive ints, got {dims!r}")
  for name, v in (("k", k), ("shortlist_k", shortlist_k)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}")
  stages = (dims[1:-1][:5] if len(dims) > 2 else dims[:-1]) + dims[-1:]
  n = len(stages) - 1  # shortlisting stages
  halving = tuple(max(k, shortlist_k >> i) for i in range(max(n - 1, 1))) if n else ()
  return stages, halving + ((k,) if n > 1 else ()) + (k,)


def evaluate_nested(train_embeddings: Array, train_labels: Array, test_embeddings: Array,
                    test_labels: Array, dims: Sequence[int], *, test_logits: Array | None = None,
                    ks: Sequence[int] | None = None, map_denominator: str = "k",
                    tune_fraction: float = 0.2, seed: int = 0, shortlist_k: int | None = None,
                    adaptive: Sequence[tuple] | None = None,
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
    ks: cut-offs for precision/recall/mAP, ``max(ks) <= N``; default
      ``(10, 25, 50, 100)`` without the cut-offs above ``N`` (a warning says which
      were dropped; ``(N,)`` if none is left).
    map_denominator: ``"k"`` (paper), ``"hits"`` or ``"relevant"``
      (:func:`~mrl_jax.evaluate.metrics.average_precision_at_k`).
    tune_fraction: share of the test split used to tune the cascade thresholds.
    seed: seed of that split.
    shortlist_k: ``K`` of the default adaptive rows and first funnel stage, in
      ``[max(ks), N]``; default ``min(200, N)`` (a warning says when 200 was clamped).
    adaptive: ``(D_s, D_r, K)`` or ``(D_s, D_r, K, codes)`` settings (``codes``:
      ``None``, ``"ubinary"`` or ``"int8_symmetric"``, the shortlist stage's codes); default
      ``(d, dims[-1], shortlist_k)`` for every ``d`` in ``dims[:-1]``. Each returns
      ``max(ks)`` items.
    funnels: ``(dims, shortlist)`` settings; default :func:`default_funnel`.
    out_dir: if given, ``metrics.json`` and PNG plots are written there.
    model_name: legend label in the plots.
    index_kwargs: options for the :class:`PrefixIndex` over the train split.

  Returns:
    A JSON-ready dict (fractions, not %): ``per_dim``, ``adaptive``, ``funnel`` rows,
    and with logits ``classification`` and ``cascade``; ``files`` lists what was
    written.

  Raises:
    ValueError: naming the argument, for shapes that do not match, non-finite
      embeddings or logits, a cut-off or shortlist larger than the database, or any
      other argument outside its domain.
  """
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  if np.ndim(train_embeddings) != 2 or np.ndim(test_embeddings) != 2:
    raise ValueError(f"embeddings must be [N, D] and [Q, D], got {np.shape(train_embeddings)} "
                     f"and {np.shape(test_embeddings)}")
  n, d_full = np.shape(train_embeddings)[0], np.shape(train_embeddings)[-1]
  if ks is None:
    ks = tuple(k for k in DEFAULT_KS if k <= n) or (n,)
    if ks != DEFAULT_KS:
      warnings.warn(f"evaluate_nested: the default cut-offs {DEFAULT_KS} exceed the database "
                    f"({n} train items); using ks={ks}", stacklevel=2)
  _check_inputs(train_embeddings, train_labels, test_embeddings, test_labels, ks,
                map_denominator, tune_fraction)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise ValueError(f"seed must be an int, got {seed!r}")
  if index_kwargs is not None and not isinstance(index_kwargs, dict):
    raise ValueError(f"index_kwargs must be a dict or None, got {index_kwargs!r}")
  dims = Nesting(tuple(dims), embed_dim=d_full).dims
  ks = tuple(int(k) for k in ks)
  kmax = max(ks)
  if shortlist_k is None:
    shortlist_k = min(DEFAULT_SHORTLIST_K, n)
    if shortlist_k < DEFAULT_SHORTLIST_K:
      warnings.warn(f"evaluate_nested: the default shortlist_k={DEFAULT_SHORTLIST_K} exceeds "
                    f"the database ({n} train items); using shortlist_k={shortlist_k}",
                    stacklevel=2)
  if isinstance(shortlist_k, bool) or not isinstance(shortlist_k, (int, np.integer)) or not (
      kmax <= shortlist_k <= n):
    raise ValueError(f"shortlist_k must be an int in [max(ks)={kmax}, N={n}] (the database "
                     f"size), got {shortlist_k!r}")
  codes_lib.refuse_nonfinite(train_embeddings, "train_embeddings")
  codes_lib.refuse_nonfinite(test_embeddings, "test_embeddings")
  if test_logits is not None:
    _check_logits(test_logits, dims, test_labels)
  settings = _adaptive_settings(adaptive, dims, shortlist_k, kmax, n)
  index = PrefixIndex(train_embeddings, **(index_kwargs or {}))
  score = lambda r, keep_ks=ks: retrieval_metrics(r.ids, train_labels, test_labels,
                                                  [k for k in keep_ks if k <= r.keeps[-1]],
                                                  map_denominator=map_denominator)
  out: dict = {"model": model_name, "num_database": int(n), "num_queries": int(len(test_labels)),
               "dims": list(dims), "ks": list(ks), "map_denominator": map_denominator}

  out["per_dim"] = []
  for d in dims:
    r = cascade_retrieval(test_embeddings, index, (d,), (kmax,))
    out["per_dim"].append({"dim": d, **score(r), **_cost(r)})

  out["adaptive"] = []
  for ds, dr, kk, codes in settings:
    r = cascade_retrieval(test_embeddings, index, (ds, dr), (kk, kmax), shortlist_codes=codes)
    row = {"shortlist_dim": ds, "rerank_dim": dr, "shortlist_k": kk}
    if codes is not None:
      row["shortlist_codes"] = codes
    out["adaptive"].append({**row, **score(r), **_cost(r)})

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


def _adaptive_settings(adaptive, dims, shortlist_k, kmax, n) -> list[tuple]:
  """``(D_s, D_r, K, codes)`` rows, each checked, naming the bad setting."""
  if adaptive is None:
    return [(d, dims[-1], shortlist_k, None) for d in dims[:-1]]
  out = []
  for setting in adaptive:
    if not isinstance(setting, (tuple, list)) or len(setting) not in (3, 4):
      raise ValueError(f"adaptive settings are (D_s, D_r, K) or (D_s, D_r, K, codes), "
                       f"got {setting!r}")
    ds, dr, kk = setting[:3]
    codes = setting[3] if len(setting) == 4 else None
    codes_lib.check_kind(codes, allow_none=True)
    if isinstance(kk, bool) or not isinstance(kk, (int, np.integer)) or not kmax <= kk <= n:
      raise ValueError(f"adaptive setting {tuple(setting)}: K must be an int in "
                       f"[max(ks)={kmax}, N={n}]")
    for name, d in (("D_s", ds), ("D_r", dr)):
      if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 1 <= d <= dims[-1]:
        raise ValueError(f"adaptive setting {tuple(setting)}: {name} must be an int in "
                         f"[1, {dims[-1]}]")
    if dr < ds:
      raise ValueError(f"adaptive setting {tuple(setting)}: D_r={dr} is smaller than D_s={ds}")
    out.append((int(ds), int(dr), int(kk), codes))
  return out


def _check_inputs(train_embeddings, train_labels, test_embeddings, test_labels, ks,
                  map_denominator, tune_fraction) -> None:
  if np.shape(train_embeddings)[1] != np.shape(test_embeddings)[1]:
    raise ValueError(f"train and test embeddings differ in size: {np.shape(train_embeddings)} "
                     f"vs {np.shape(test_embeddings)}")
  if train_labels.shape != (np.shape(train_embeddings)[0],):
    raise ValueError(f"train_labels must be [N]={np.shape(train_embeddings)[0]}, "
                     f"got {train_labels.shape}")
  if test_labels.shape != (np.shape(test_embeddings)[0],):
    raise ValueError(f"test_labels must be [Q]={np.shape(test_embeddings)[0]}, "
                     f"got {test_labels.shape}")
  if (isinstance(ks, (str, bytes)) or not ks
      or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks)):
    raise ValueError(f"ks must be positive ints, got {ks!r}")
  for name, labels in (("train_labels", train_labels), ("test_labels", test_labels)):
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"{name} must be integer classes, got {labels.dtype}")
  if max(ks) > np.shape(train_embeddings)[0]:
    raise ValueError(f"ks: k={max(ks)} is larger than the database "
                     f"({np.shape(train_embeddings)[0]} train items)")
  if map_denominator not in MAP_DENOMINATORS:
    raise ValueError(f"map_denominator must be one of {MAP_DENOMINATORS}, got {map_denominator!r}")
  if isinstance(tune_fraction, bool) or not isinstance(tune_fraction, (int, float)) or not (
      0 < tune_fraction < 1):
    raise ValueError(f"tune_fraction must be in (0, 1), got {tune_fraction!r}")


def _cost(r: RetrievalResult) -> dict:
  ms = None if r.seconds_per_query is None else 1e3 * r.seconds_per_query
  return {"mflops_per_query": r.mflops_per_query, "ms_per_query": ms,
          "bytes_per_vector": r.bytes_per_vector}


def _check_logits(test_logits, dims, test_labels) -> None:
  logits = np.asarray(test_logits)
  if logits.ndim != 3 or logits.shape[:2] != (len(dims), len(test_labels)):
    raise ValueError(f"test_logits must be [M={len(dims)}, Q={len(test_labels)}, C], "
                     f"got {logits.shape}")
  if not np.issubdtype(logits.dtype, np.floating):
    raise ValueError(f"test_logits must be floating point, got {logits.dtype}")
  codes_lib.refuse_nonfinite(np.moveaxis(logits, 1, 0), "test_logits (rows = test items)")


def _classification(test_logits, test_labels, dims, tune_fraction, seed) -> dict:
  logits = np.asarray(test_logits)
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
        lambda r: (f"{r['shortlist_dim']}->{r['rerank_dim']}, K={r['shortlist_k']}"
                   + (f" {r['shortlist_codes']}" if r.get("shortlist_codes") else "")))
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
