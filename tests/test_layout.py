"""
The package's layout: imports point one way, no cycles, small modules (docs/architecture.md).

Every import of the package's own modules counts, at module level, inside functions (lazy
imports) and under ``TYPE_CHECKING``: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "allele.observability"
ROOT = Path(__file__).resolve().parent.parent / "src" / "allele" / "observability"
#: a module may import modules of its own package and of lower layers only; the most
#: specific prefix names a module's layer ("" is the package's own __init__)
LAYERS: tuple[tuple[str, ...], ...] = (
    ("config",),
    (
        "_core.context",
        "_core.names",
        "_core.accounting",
        "_core.runs",
        "_core.sampling",
        "_core.files",
    ),
    ("sources",),
    ("genomes", "backends"),
    ("alerts",),
    ("sinks",),
    ("spool",),
    ("exporter",),
    ("_core",),  # the bus and the facade: above the exporter, which sees only a Protocol
    ("", "queries", "detectors", "testing"),  # the public doors
    ("demo",),
    ("cli",),
)
#: the longest a module may be
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    """The package modules an ``from ... import ...`` statement loads."""
    if node.level:
        base = module.split(".") if module else []
        if path.name != "__init__.py":
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join([*base, *(node.module.split(".") if node.module else [])])
    elif node.module and (node.module + ".").startswith(PACKAGE + "."):
        target = node.module[len(PACKAGE) + 1 :]
    elif node.module == PACKAGE:
        target = ""
    else:
        return []
    found = [target]
    for alias in node.names:  # `from . import x` names a submodule
        sub = f"{target}.{alias.name}" if target else alias.name
        if sub in MODULES:
            found.append(sub)
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it is for type checking only."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def walk(node: ast.AST, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, typing_only))
            inner = typing_only or (isinstance(child, ast.If) and _is_type_checking(child))
            walk(child, inner)

    walk(tree, typing_only=False)
    return found


def _imports(*, runtime_only: bool) -> dict[str, set[str]]:
    """Module to the package modules it imports (with the facades their loading runs)."""
    direct: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        targets: set[str] = set()
        for node, typing_only in _import_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if typing_only and runtime_only:
                continue
            if isinstance(node, ast.ImportFrom):
                targets.update(_resolve(module, path, node))
            else:
                targets.update(
                    alias.name[len(PACKAGE) + 1 :]
                    for alias in node.names
                    if alias.name.startswith(PACKAGE + ".")
                )
        direct[module] = {t for t in targets if t in MODULES and t != module}
    graph: dict[str, set[str]] = {}
    for module, targets in direct.items():
        edges = set(targets)
        for target in targets:
            # importing a.b.c first runs a/__init__ and a/b/__init__: count those that
            # import something (facades), except the importer's own enclosing packages
            parts = target.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if direct.get(parent) and not (module + ".").startswith(parent + "."):
                    edges.add(parent)
        graph[module] = edges
    return graph


GRAPH = _imports(runtime_only=False)
RUNTIME_GRAPH = _imports(runtime_only=True)


def layer_of(module: str) -> int:
    """The index in LAYERS of the most specific prefix naming ``module``."""
    best, best_len = -1, -1
    for index, names in enumerate(LAYERS):
        for name in names:
            matches = module == name or (name and module.startswith(name + "."))
            if matches and len(name) > best_len:
                best, best_len = index, len(name)
    assert best >= 0, f"{module} is in no layer of tests/test_layout.py"
    return best


def _package(module: str) -> str:
    return module.split(".", 1)[0]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a higher layer, or of the same layer in another package."""
    wrong = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            own, theirs = layer_of(module), layer_of(target)
            if theirs > own or (theirs == own and _package(module) != _package(target)):
                wrong.append(f"{module} (layer {own}) imports {target} (layer {theirs})")
    return wrong


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle found by a depth-first search (each reported once)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_every_module_has_a_layer() -> None:
    """A new package must be placed in LAYERS (and in docs/architecture.md)."""
    for module in MODULES:
        assert layer_of(module) >= 0


def test_imports_point_down() -> None:
    """sinks/spool/backends never import the exporter or the facade; nothing imports cli."""
    assert [] == upward_imports(GRAPH)


def test_no_import_cycles() -> None:
    """
    No module imports itself through others, at module level or lazily in a function
    (imports for type checking only are not run, so they cannot form a cycle).
    """
    assert [] == cycles(RUNTIME_GRAPH)


def test_modules_are_small() -> None:
    """No module in src/ is longer than MAX_LINES."""
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in MODULES.items()}
    assert {} == {m: n for m, n in sizes.items() if n > MAX_LINES}


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"spool.replay": {"exporter.loop"}}, "spool.replay (layer 6) imports exporter.loop"),
        ({"sinks.registry": {"_core.observability"}}, "imports _core.observability"),
        ({"exporter.loop": {"_core.bus"}}, "exporter.loop (layer 7) imports _core.bus"),
        ({"_core.observability": {"cli.spool"}}, "imports cli.spool"),
        ({"alerts.emit": {"sinks.batching"}}, "alerts.emit (layer 4) imports sinks.batching"),
    ],
)
def test_the_check_finds_upward_imports(graph: dict[str, set[str]], expected: str) -> None:
    """The layering check itself: each of these made-up imports is reported."""
    found = upward_imports(graph)

    assert 1 == len(found)
    assert expected in found[0]


def test_the_check_finds_cycles() -> None:
    """The cycle check itself: a made-up cycle through three modules is reported."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}

    assert [["a", "b", "c", "a"]] == cycles(graph)
