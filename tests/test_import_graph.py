"""refimpl's modules import each other without a cycle.

The graph is built with ``ast`` over refimpl/**/*.py. An edge A -> B means module A imports module B
(``import B``, ``from B import name``, or ``from P import B`` where B is the submodule P.B). Imports under
``if TYPE_CHECKING:`` never run and are left out.

Two graphs are checked: the imports that run when a module is loaded (module level, class bodies included)
must be acyclic; and so must all imports, function bodies included, except those whose line (or the line
above) says in a comment that they break a cycle: an import deferred into a function is the usual way to hide
a cycle, and the project's rule is that such an import names the cycle it breaks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "refimpl"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(body: list[ast.stmt], in_function: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement under ``body``, with whether it sits inside a function."""
    for node in body:
        if isinstance(node, ast.If) and _type_checking_only(node):
            yield from _imports(node.orelse, in_function)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                yield from _imports([child], inner)
            elif isinstance(child, (ast.ExceptHandler, ast.match_case)):
                yield from _imports(child.body, inner)


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The refimpl modules one import statement loads."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in MODULES}
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    out = set()
    for alias in node.names:
        if f"{source}.{alias.name}" in MODULES:
            out.add(f"{source}.{alias.name}")
        elif source in MODULES:
            out.add(source)
    return out


def _graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(imports run at load time, all imports except deferred ones that name the cycle they break)."""
    load: dict[str, set[str]] = {m: set() for m in MODULES}
    full: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for node, in_function in _imports(ast.parse(text).body, False):
            targets = _targets(module, path.name == "__init__.py", node) - {module}
            if not in_function:
                load[module] |= targets
                full[module] |= targets
                continue
            near = " ".join(lines[max(node.lineno - 2, 0) : node.end_lineno or node.lineno]).lower()
            if "cycle" not in near:
                full[module] |= targets
    return load, full


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        return list(exc.args[1])
    return []


def test_the_import_graph_covers_the_package():
    load, _ = _graphs()
    assert len(load) >= 50 and "refimpl.conformance.runner" in load
    # a known edge, so an empty graph (a parser that finds nothing) cannot pass the tests below
    assert "refimpl.conformance.results" in load["refimpl.conformance.report"]


def test_module_level_imports_form_no_cycle():
    load, _ = _graphs()
    assert _cycle(load) == [], " -> ".join(_cycle(load))


def test_deferred_imports_close_no_cycle_unless_they_say_so():
    _, full = _graphs()
    assert _cycle(full) == [], " -> ".join(_cycle(full)) + " (a function-level import closes this cycle)"


def test_the_cycle_finder_finds_a_cycle():
    assert set(_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()})) == {"a", "b", "c"}
