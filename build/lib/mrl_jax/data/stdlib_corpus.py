"""A real offline text task: (docstring summary -> source code) pairs from the Python stdlib.

Code search in the style of CodeSearchNet (Husain et al. 2019): the query is the
first paragraph of a function's docstring, the document is the function's
source with that docstring removed. Every pair is written by the CPython
developers and ships with the running interpreter, so the task needs no
download (about 3,000 pairs from ~200 modules of CPython 3.11 after filtering).

How the pairs are built (deterministic for a given interpreter):

1. Modules: the pure-Python (``.py``) modules of ``sys.stdlib_module_names``
   and their submodules, found with ``importlib.util.find_spec`` and
   ``pkgutil.iter_modules`` without importing anything. Skipped: private names
   (a component starting with ``_``), test packages, ``__main__`` modules,
   :data:`EXCLUDED` (side effects on import such as ``this``/``antigravity``,
   GUI packages such as ``tkinter``/``idlelib``/``turtle``, codec boilerplate
   in ``encodings``, and the modules that warn on import because they are
   deprecated), and every module whose import raises.
2. Functions and methods (also static/class methods and property getters)
   DEFINED in each module (their code lives in the module's file; re-exports
   are skipped), visited once each, ordered by line number.
3. ``anchor``: the first paragraph of the function's OWN ``__doc__``
   (``inspect.cleandoc``; not :func:`inspect.getdoc`, which would hand an
   undocumented override its base class's docstring), whitespace collapsed.
   ``positive``: :func:`inspect.getsource`, dedented, its docstring removed
   (otherwise the query is a substring of the answer), cut at the last line
   break before ``max_chars`` characters.
4. Dropped: summaries shorter than :data:`MIN_WORDS` words or matching
   :data:`GENERIC_SUMMARIES` ("Return repr(self).", "Helper for pickle.",
   "Implement ...", signatures such as ``f(x) -> y``); functions whose body is
   only the docstring, ``pass``, ``...`` or ``raise NotImplementedError``;
   a source already seen (the first is kept); and EVERY pair whose summary
   (case-folded) occurs more than once, since such a query has no unique answer.
5. Split by module: a module goes to ``eval`` when the SHA-256 of its dotted
   name, read as a number, falls in the lowest ``eval_fraction`` of the range,
   so evaluation modules are unseen in training, for every interpreter and seed.

CLI: ``python -m mrl_jax.data.stdlib_corpus --out DIR`` writes ``DIR/train.jsonl``
and ``DIR/eval.jsonl`` (keys ``anchor``, ``positive``, ``module``, ``qualname``;
readable with :func:`mrl_jax.data.text.read_text_pairs`) and prints the counts.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import pkgutil
import re
import sys
import textwrap
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from mrl_jax.data.text import TextPairs

SPLITS = ("train", "eval")

# Top-level packages or dotted modules never imported (a submodule of an entry is skipped too).
EXCLUDED = frozenset({
    # side effects on import
    "this", "antigravity", "rlcompleter",
    # GUI / interactive tools
    "idlelib", "tkinter", "turtle", "turtledemo",
    # data-only or boilerplate packages
    "pydoc_data", "encodings", "lib2to3", "distutils", "ensurepip", "venv",
    # platform-specific
    "msilib", "winreg", "winsound", "msvcrt", "nt", "ntpath", "nturl2path",
    # deprecated (PEP 594 and aliases): warn on import, removed in later versions
    "aifc", "asynchat", "asyncore", "audioop", "cgi", "cgitb", "chunk", "crypt", "imghdr",
    "imp", "mailcap", "nis", "nntplib", "ossaudiodev", "pipes", "smtpd", "sndhdr", "spwd",
    "sunau", "telnetlib", "uu", "xdrlib", "sre_compile", "sre_constants", "sre_parse",
})

MIN_WORDS = 3  # whitespace-separated words, of which at least 2 have 2+ letters

# Case-insensitive patterns of summaries that describe no particular code.
GENERIC_SUMMARIES = tuple(re.compile(p, re.IGNORECASE) for p in (
    r"^return (repr|str|hash|len|iter|bool|format)\(self\b",
    r"^return self\s*(==|!=|<|<=|>|>=|\[|\.)",
    r"^implement\b",
    r"^helper for pickle",
    r"^(create and return a new object|initiali[sz]e self)\b",
    r"see help\(type\(self\)\)",
    r"^(an? )?(internal|private) (helper|function|method|use)\b",
    r"^for internal use\b",
    r"^(deprecated|undocumented|obsolete)\b",
    r"^(alias|same as|see|override|overrides|overridden)\b",
    r"^(override|subclasses (must|should)) (this|implement|override)\b",
    r"^(abstract method|not implemented|xxx|todo)\b",
    r"^[\w.]+\(.*\)\s*(->.*)?$",  # a signature line such as "f(x) -> y"
    r"^>>>",  # a doctest example, not a summary
))

_TRIVIAL_BODY = re.compile(r"^(pass|\.\.\.|raise NotImplementedError(\(.*\))?)$")


@dataclasses.dataclass(frozen=True)
class CodePair:
  """One pair: ``anchor`` (summary), ``positive`` (source), and where the code lives."""

  anchor: str
  positive: str
  module: str
  qualname: str

  def to_json(self) -> dict[str, str]:
    return dataclasses.asdict(self)


def _skipped_name(name: str) -> bool:
  parts = name.split(".")
  if any(name == e or name.startswith(e + ".") for e in EXCLUDED):
    return True
  return any(p.startswith("_") or p in ("test", "tests") or p.startswith("test_")
             or p.endswith("_test") for p in parts)


def stdlib_module_names() -> list[str]:
  """Sorted dotted names of the interpreter's pure-Python stdlib modules, none imported.

  Submodules of packages are included; see the module docstring for what is skipped.
  """
  out = []

  def visit(name: str, spec: Any) -> None:
    if spec is None or _skipped_name(name):
      return
    if spec.origin and spec.origin.endswith(".py"):
      out.append(name)
    for info in pkgutil.iter_modules(spec.submodule_search_locations or []):
      child = f"{name}.{info.name}"
      if _skipped_name(child):
        continue
      try:
        child_spec = importlib.util.find_spec(child)
      except (ImportError, ValueError):
        continue  # finding a submodule's spec imports its parent; that failed
      visit(child, child_spec)

  for name in sorted(sys.stdlib_module_names):
    if _skipped_name(name):
      continue
    try:
      spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
      continue
    visit(name, spec)
  return sorted(set(out))


def _import_quietly(name: str) -> Any | None:
  """Import ``name`` with warnings and output suppressed; ``None`` if the import raises."""
  with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
       contextlib.redirect_stderr(io.StringIO()):
    warnings.simplefilter("ignore")
    try:
      return importlib.import_module(name)
    except (Exception, SystemExit):  # a platform module, a missing C extension, ...
      return None


def _functions(module: Any) -> Iterator[Any]:
  """Plain functions defined in ``module``'s file: module level and in its classes."""
  filename = getattr(module, "__file__", None)
  seen: set[int] = set()

  def own(obj: Any) -> Any | None:
    if isinstance(obj, (staticmethod, classmethod)):
      obj = obj.__func__
    elif isinstance(obj, property):
      obj = obj.fget
    elif isinstance(obj, functools.cached_property):
      obj = obj.func
    if not inspect.isfunction(obj) or obj.__name__ == "<lambda>":
      return None
    if obj.__code__.co_filename != filename or id(obj.__code__) in seen:
      return None
    seen.add(id(obj.__code__))
    return obj

  def walk(namespace: dict[str, Any], classes_seen: set[int]) -> Iterator[Any]:
    for value in list(namespace.values()):
      if inspect.isclass(value):
        if value.__module__ == module.__name__ and id(value) not in classes_seen:
          classes_seen.add(id(value))
          yield from walk(dict(vars(value)), classes_seen)
      elif (f := own(value)) is not None:
        yield f

  yield from walk(dict(vars(module)), set())


def summary_of(doc: str | None) -> str | None:
  """The first paragraph of a docstring, whitespace collapsed; ``None`` for no docstring."""
  if not isinstance(doc, str):
    return None
  paragraph = inspect.cleandoc(doc).strip().split("\n\n")[0]
  return " ".join(paragraph.split()) or None


def is_generic(summary: str) -> bool:
  """Whether a summary is too short or generic to identify code (see :data:`GENERIC_SUMMARIES`)."""
  if len(summary.split()) < MIN_WORDS or len(re.findall(r"[^\W\d_]{2,}", summary)) < 2:
    return True  # "Close it.", "a - b"
  return any(p.search(summary) for p in GENERIC_SUMMARIES)


def source_without_docstring(func: Any) -> str | None:
  """``func``'s dedented source with its docstring lines removed.

  ``None`` when the source is unavailable or unparsable, when the docstring
  shares a line with other code, or when nothing but a trivial body (``pass``,
  ``...``, ``raise NotImplementedError``) is left.
  """
  try:
    text = textwrap.dedent(inspect.getsource(func))
    tree = ast.parse(text)
  except (OSError, TypeError, SyntaxError, IndentationError):
    return None
  node = tree.body[0] if tree.body else None
  if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
    return None
  lines = text.splitlines()
  body = node.body
  first = body[0]
  if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
      and isinstance(first.value.value, str)):
    start, end = first.lineno - 1, first.end_lineno - 1
    if lines[start][: first.col_offset].strip() or lines[end][first.end_col_offset:].strip():
      return None  # `def f(): "doc"` or `"doc"; x = 1`
    lines = lines[:start] + lines[end + 1:]
    body = body[1:]
  if not body:
    return None
  if len(body) == 1 and _TRIVIAL_BODY.match(ast.unparse(body[0]).strip()):
    return None
  return "\n".join(line.rstrip() for line in lines).strip("\n")


def truncate_source(source: str, max_chars: int) -> str:
  """``source`` cut at the last line break within ``max_chars`` characters (a hard cut if none)."""
  if len(source) <= max_chars:
    return source
  cut = source.rfind("\n", 0, max_chars + 1)
  return source[: cut if cut > 0 else max_chars].rstrip()


def split_of(module: str, eval_fraction: float) -> str:
  """``"eval"`` if SHA-256(module) / 2**256 < ``eval_fraction``, else ``"train"``."""
  digest = int.from_bytes(hashlib.sha256(module.encode("utf-8")).digest(), "big")
  return "eval" if digest < eval_fraction * 2**256 else "train"


def _candidates(modules: Sequence[str], max_chars: int) -> Iterator[CodePair]:
  for name in modules:
    module = _import_quietly(name)
    if module is None:
      continue
    functions = sorted(_functions(module),
                       key=lambda f: (f.__code__.co_firstlineno, f.__qualname__))
    for func in functions:
      summary = summary_of(func.__doc__)
      if summary is None or is_generic(summary):
        continue
      source = source_without_docstring(func)
      if source is None:
        continue
      yield CodePair(summary, truncate_source(source, max_chars), name, func.__qualname__)


def build_stdlib_pairs(
    *, max_chars: int = 1000, eval_fraction: float = 0.2, modules: Sequence[str] | None = None,
) -> dict[str, list[CodePair]]:
  """The corpus in memory: ``{"train": [CodePair...], "eval": [CodePair...]}``.

  Args:
    max_chars: longest ``positive`` in characters (cut at a line break); >= 80.
    eval_fraction: share of MODULES (not pairs) held out for evaluation, in (0, 1).
    modules: dotted module names to read; default :func:`stdlib_module_names`.
      Names that fail to import, and names the module list would skip
      (private, tests, :data:`EXCLUDED`), are skipped: none is ever imported.

  Returns:
    Both splits, each ordered by module name, then line number. Deterministic
    for a given interpreter; the counts differ between Python versions.

  Raises:
    ValueError: a bad ``max_chars`` or ``eval_fraction``.
  """
  if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 80:
    raise ValueError(f"max_chars must be an int >= 80, got {max_chars!r}")
  if not (isinstance(eval_fraction, (int, float)) and 0.0 < eval_fraction < 1.0):
    raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
  if modules is None:
    modules = stdlib_module_names()
  elif isinstance(modules, str):
    raise ValueError(f"modules must be a sequence of module names, not one string {modules!r}")
  modules = sorted({m for m in modules if not _skipped_name(m)})
  pairs, seen_sources = [], set()
  for pair in _candidates(modules, max_chars):
    if pair.positive not in seen_sources:
      seen_sources.add(pair.positive)
      pairs.append(pair)
  counts = Counter(p.anchor.casefold() for p in pairs)
  out: dict[str, list[CodePair]] = {s: [] for s in SPLITS}
  for p in pairs:
    if counts[p.anchor.casefold()] == 1:
      out[split_of(p.module, eval_fraction)].append(p)
  return out


def to_text_pairs(pairs: Sequence[CodePair], name: str = "<stdlib>") -> TextPairs:
  """``CodePair`` s as :class:`~mrl_jax.data.text.TextPairs` (no hard negatives)."""
  return TextPairs([p.anchor for p in pairs], [p.positive for p in pairs], path=name)


def stdlib_text_pairs(**kwargs: Any) -> dict[str, TextPairs]:
  """:func:`build_stdlib_pairs` as ``{"train": TextPairs, "eval": TextPairs}``."""
  return {split: to_text_pairs(pairs, f"<stdlib:{split}>")
          for split, pairs in build_stdlib_pairs(**kwargs).items()}


def write_stdlib_corpus(out_dir: str, **kwargs: Any) -> dict[str, int]:
  """Write ``out_dir/train.jsonl`` and ``out_dir/eval.jsonl``; returns ``{split: pairs}``.

  ``kwargs`` as in :func:`build_stdlib_pairs`.
  """
  splits = build_stdlib_pairs(**kwargs)
  os.makedirs(out_dir, exist_ok=True)
  for split, pairs in splits.items():
    with open(os.path.join(out_dir, f"{split}.jsonl"), "w", encoding="utf-8") as f:
      for p in pairs:
        f.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")
  return {split: len(pairs) for split, pairs in splits.items()}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m mrl_jax.data.stdlib_corpus",
      description="Write (docstring summary -> source) pairs of the Python stdlib as JSONL.")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--max_chars", type=int, default=1000, help="longest source kept")
  parser.add_argument("--eval_fraction", type=float, default=0.2,
                      help="share of modules held out for evaluation")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  try:
    counts = write_stdlib_corpus(args.out, max_chars=args.max_chars,
                                 eval_fraction=args.eval_fraction)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  seconds = time.perf_counter() - start
  version = ".".join(map(str, sys.version_info[:3]))
  for split, n in counts.items():
    print(f"{split}: {n} pairs -> {os.path.join(args.out, split + '.jsonl')}")
  print(f"Python {version}; {sum(counts.values())} pairs in {seconds:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
