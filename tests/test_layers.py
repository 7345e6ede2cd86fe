"""The import graph of the stabscope package: no cycles, and the layers of docs/architecture.md.

The graph is read from the sources (ast), with every import wherever it sits: at module level
or inside a function (a function-level import is a dependency that only hides), so
``from .x import y`` in a function counts. Imports under ``if TYPE_CHECKING:`` never run: they
count for the layers, not for cycles.

Tiers, highest first. A module may import its own top-level package and any lower tier; two
packages of one tier may not import each other, except inside the torch engine, which is one
unit (probes hook through record's hooks, the recorder owns the probes, discovery traces with
record's hooks; its modules still form no cycle). The layers are groups of tiers:
cli > drivers (integrations over drivers) > the torch engine > notebook, export (torch-free
facades over both) > rules, report (independent of each other) over analysis > store over
theory, settings, metrics (independent) over version, errors, wording.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "stabscope"
TIERS: list[tuple[str, ...]] = [
    ("stabscope", "__main__"),  # the public facade and python -m stabscope
    ("cli",),
    ("integrations",),
    ("drivers",),
    ("record", "probes", "structure", "grow"),
    ("notebook", "export"),  # the read side's facades over rules and report
    ("rules", "report"),
    ("analysis",),
    ("store",),
    ("theory", "settings", "metrics"),
    ("version", "errors", "wording"),
]
UNITS = {("record", "probes", "structure", "grow")}  # tiers whose packages import each other
TIER = {name: i for i, tier in enumerate(TIERS) for name in tier}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    return {
        node
        for branch in ast.walk(tree)
        if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
        for stmt in branch.body
        for node in ast.walk(stmt)
    }


def imports(name: str, path: Path, known: dict[str, Path]) -> dict[str, bool]:
    """The stabscope modules ``name`` imports, each with whether the import runs (not only
    under TYPE_CHECKING). ``from pkg import sub`` is an import of the submodule."""

    def owner(target: str) -> str:
        while target not in known:
            target = target.rpartition(".")[0]
        return target

    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = _type_checking_only(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.split(".")[0] == "stabscope"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([node.module] if node.module else [])])
            if base.split(".")[0] == "stabscope":
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
                ]
        for target in targets:
            target = owner(target)
            if target != name:
                found[target] = found.get(target, False) or node not in typing_only
    return found


KNOWN = modules()
GRAPH = {name: imports(name, path, KNOWN) for name, path in KNOWN.items()}


def top(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_function_level_and_relative_imports():
    assert GRAPH["stabscope.cli.summary"].get("stabscope.analysis.summary") is True  # in a function
    assert "stabscope.rules.depth" in GRAPH["stabscope.rules"]  # from . import depth
    assert GRAPH["stabscope.rules.output"]["stabscope.rules.gate"] is False  # TYPE_CHECKING
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    running = {m: {t for t, runs in edges.items() if runs} for m, edges in GRAPH.items()}
    assert cycles(running) == []


def test_every_package_has_a_tier():
    assert {top(m) for m in KNOWN} <= set(TIER)


def test_layers():
    """No module imports a higher tier, or a sibling package of its tier outside a unit."""
    broken = []
    for module, edges in sorted(GRAPH.items()):
        mine = top(module)
        for target in sorted(edges):
            theirs = top(target)
            if theirs == mine:
                continue
            same = TIER[theirs] == TIER[mine]
            if TIER[theirs] < TIER[mine] or (same and TIERS[TIER[mine]] not in UNITS):
                broken.append(f"{module} -> {target}")
    assert broken == []


#: Exceptions that never leave the module raising them: each is caught there and turned into
#: an error of stabscope/errors.py (or a note).
INTERNAL = {"LockHeld", "CannotPlan", "NotCovered", "StopScript"}
EXCEPTION_BASES = {"Exception", "BaseException", "ValueError", "OSError", "UserWarning"}


def test_every_user_facing_error_is_in_errors_py():
    import stabscope
    import stabscope.errors as errors

    defined: dict[str, list[str]] = {}
    for name, path in KNOWN.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b).rpartition(".")[2] for b in node.bases}
                if bases & EXCEPTION_BASES or any(b.endswith(("Error", "Warning")) for b in bases):
                    defined.setdefault(node.name, []).append(name)
    outside = {c: m for c, m in defined.items() if m != ["stabscope.errors"] and c not in INTERNAL}
    assert outside == {}
    assert {
        "NotARunError",
        "MetaError",
        "RunExistsError",
        "NestedRunError",
        "RunWriteError",
        "FindingsError",
        "UsageError",
        "StabscopeWarning",
    } <= set(defined)
    # Where the API documents them, they are the same classes.
    assert stabscope.NotARunError is errors.NotARunError
    assert stabscope.MetaError is errors.MetaError
