"""The import graph: layers that import only downward, and no import loop.

Read from the source with :mod:`ast` (every import, module-level or inside a
function), so the test needs no optional dependency installed.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "mrl_jax"

# Bottom first; a layer imports only from the layers before it (never a sibling).
LAYERS = [
    {"core"},
    {"losses"},
    {"tokenizer"},
    {"models", "data"},
    {"bundle"},
    {"evaluate", "train"},
    {"tasks", "search"},
    {"experiments"},
    {"demo"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = sorted(PACKAGE.rglob("*.py"))
MODULES = {_module_name(f) for f in FILES}


def _imports(path: pathlib.Path):
  """``(line, imported module)`` for every ``mrl_jax`` import in the file."""
  module = _module_name(path)
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        base = ".".join(parent + ([node.module] if node.module else []))
      # ``from mrl_jax.evaluate import metrics`` imports the module mrl_jax.evaluate.metrics
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                 for a in node.names]
    else:
      continue
    for target in targets:
      if target == "mrl_jax" or target.startswith("mrl_jax."):
        yield node.lineno, target


def _layer(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_module_has_a_layer():
  names = {_layer(_module_name(f)) for f in FILES} - {"__init__"}
  assert names == set(RANK), f"layers to place in LAYERS: {sorted(names - set(RANK))}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_only_downward(path):
  source = _layer(_module_name(path))
  imports = [(line, target) for line, target in _imports(path) if _layer(target) != source]
  if source == "__init__":  # the curated lazy API: it imports core, the rest by name on use
    upward = [(line, target) for line, target in imports if _layer(target) != "core"]
  else:
    upward = [(line, target) for line, target in imports
              if RANK.get(_layer(target), 99) >= RANK[source]]
  assert not upward, f"{path.name} imports a layer at or above {source!r}: {upward}"


def test_no_import_loop_between_modules():
  graph = {}
  for path in FILES:
    graph[_module_name(path)] = {t for _, t in _imports(path)}
  # a module's own packages (their __init__) run before it whatever it imports
  graph = {m: {t for t in ts if t != m and not m.startswith(t + ".")}
           for m, ts in graph.items()}
  state = {}

  def visit(m, stack):
    state[m] = "open"
    for t in sorted(graph[m]):
      if state.get(t) == "open":
        loop = stack[stack.index(t):] + [t]
        raise AssertionError("import loop: " + " -> ".join(loop))
      if t not in state:
        visit(t, stack + [t])
    state[m] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
