"""The import graph of ``adv``, ``jobs`` and ``bench`` has no cycle (read statically from the source with ``ast``).

An edge A -> B means module A imports module B; ``from pkg import name`` points at ``pkg.name`` when that is a module
and at ``pkg`` (its ``__init__``) otherwise. Two rules:

* module-level imports (anything not inside a function; ``if TYPE_CHECKING:`` bodies never run) form no cycle, even
  counting that importing ``a.b.c`` first runs ``a/__init__.py`` and ``a/b/__init__.py`` (a cycle there is the
  "partially initialized module" error, met or waiting for an import order to meet it);
* all imports, those inside functions too, as written, form no cycle either: a deferred import is not a way to
  hide a cycle between two layers (issue 23: registration must not make the defenses import the detectors).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("adv", "jobs", "bench")


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, deferred: bool = False):
    """(import statement, inside a function?) for every import that can run; TYPE_CHECKING bodies are skipped."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, deferred
        elif isinstance(node, ast.If) and _is_type_checking(node):
            for stmt in node.orelse:
                yield from _imports(ast.Module(body=[stmt], type_ignores=[]), deferred)
        else:
            inner = deferred or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from _imports(node, inner)


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_pkg: bool, known: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_pkg else module.split(".")[:-1]
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    out = set()
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in known:
            out.add(sub)
        elif base in known:
            out.add(base)
    return out


def import_graph(include_deferred: bool, parents: bool = False) -> dict[str, set[str]]:
    """Module -> the modules it imports; ``parents``: plus the packages above each of them (their ``__init__``
    runs first), except the importer's own packages (already running)."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, deferred in _imports(tree):
            if deferred and not include_deferred:
                continue
            graph[name] |= _targets(node, name, path.name == "__init__.py", known) - {name}
    if parents:
        for name, targets in graph.items():
            above = {".".join(t.split(".")[:i]) for t in targets for i in range(1, t.count(".") + 1)}
            targets |= {p for p in above if p in known and p != name and not name.startswith(p + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_graph_sees_the_packages_and_their_imports():
    graph = import_graph(include_deferred=False)
    assert {"adv.defenses.registry", "jobs.evaluate", "bench.training_defenses"} <= set(graph)
    assert "adv.errors" in graph["adv.defenses.registry"]
    assert "adv.attacks" not in graph["adv.evaluate.protocol"]  # imports adv.attacks.core, ...: no __init__ edge
    assert "adv.attacks" in import_graph(include_deferred=False, parents=True)["adv.evaluate.protocol"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_module_level_imports_have_no_cycle():
    assert cycles(import_graph(include_deferred=False, parents=True)) == []


def test_no_cycle_even_counting_imports_inside_functions():
    assert cycles(import_graph(include_deferred=True)) == []


#: The layers below evaluation (docs/architecture.md): none of them imports adv.evaluate, adv.tuning,
#: adv.serving or jobs, even inside a function.
LOWER = ("adv.data", "adv.runs", "adv.models", "adv.attacks", "adv.defenses", "adv.detectors", "adv.train",
         "adv.explain")
UPPER = ("adv.evaluate", "adv.tuning", "adv.serving", "jobs", "bench")


def test_lower_layers_never_import_evaluation_or_above():
    graph = import_graph(include_deferred=True)
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.startswith(LOWER)
                    for t in targets if t.startswith(UPPER))
    assert upward == []
