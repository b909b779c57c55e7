"""PNG plots of the evaluation (matplotlib, Agg canvas; no global backend change).

* :func:`plot_accuracy_vs_dim`: a metric against the prefix size (log2 x-axis), one
  line per model;
* :func:`plot_map_vs_mflops`: mAP@k against MFLOPs/query (log x-axis), one series
  per retrieval family (per-dim exact search, adaptive, funnel);
* :func:`plot_cascade`: cascade accuracy against expected dim, with the fixed-size
  classifiers for reference.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _finish(fig: Figure, ax, path: str | os.PathLike, *, xlabel: str, ylabel: str,
            title: str | None) -> str:
  """Labels, grid, legend and title, then save as a PNG; returns ``path``."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend()
  if title:
    ax.set_title(title)
  return _save(fig, path)


def _save(fig: Figure, path: str | os.PathLike) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  FigureCanvasAgg(fig)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return os.fspath(path)


def plot_accuracy_vs_dim(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
                         path: str | os.PathLike, *, ylabel: str = "top-1 accuracy (%)",
                         title: str | None = None) -> str:
  """One line per model: ``{name: (dims, values)}``; values as plotted (e.g. %).

  Returns:
    ``path``.
  """
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  for name, (dims, values) in curves.items():
    ax.plot(dims, values, marker="o", label=name)
  ax.set_xscale("log", base=2)
  all_dims = sorted({int(d) for dims, _ in curves.values() for d in dims})
  ax.set_xticks(all_dims, [str(d) for d in all_dims])
  return _finish(fig, ax, path, xlabel="representation size (dims)", ylabel=ylabel, title=title)


def plot_map_vs_mflops(series: Mapping[str, tuple[Sequence[float], Sequence[float],
                                                   Sequence[str]]],
                       path: str | os.PathLike, *, ylabel: str = "mAP@10 (%)",
                       title: str | None = None) -> str:
  """One series per family: ``{name: (mflops, values, point_labels)}``.

  Returns:
    ``path``.
  """
  fig = Figure(figsize=(6.5, 4.5))
  ax = fig.add_subplot()
  for name, (mflops, values, labels) in series.items():
    ax.plot(mflops, values, marker="o", linestyle="-" if name == "exact" else "none",
            label=name)
    for x, y, text in zip(mflops, values, labels, strict=True):
      ax.annotate(text, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
  ax.set_xscale("log")
  return _finish(fig, ax, path, xlabel="MFLOPs / query", ylabel=ylabel, title=title)


def plot_cascade(expected_dims: Sequence[float], accuracies: Sequence[float],
                 path: str | os.PathLike, *, fixed_dims: Sequence[int] | None = None,
                 fixed_accuracies: Sequence[float] | None = None,
                 title: str | None = None) -> str:
  """Cascade accuracy (%) against expected dim (log2 x-axis), fixed sizes for reference.

  Returns:
    ``path``.
  """
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  ax.plot(expected_dims, accuracies, marker="o", label="adaptive (cascade)")
  if fixed_dims is not None and fixed_accuracies is not None:
    ax.plot(fixed_dims, fixed_accuracies, marker="s", linestyle="--", label="fixed size")
  ax.set_xscale("log", base=2)
  return _finish(fig, ax, path, xlabel="expected representation size (dims)",
                 ylabel="top-1 accuracy (%)", title=title)
