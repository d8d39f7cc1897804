"""No import circles inside authz_server nor inside bench: lower layers never import upper ones.

The graph is read from the source (an AST walk, nothing imported), every import counted,
those under ``if TYPE_CHECKING:`` and inside functions too: a circle hidden there still ties
two modules together.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def modules_of(package: str) -> dict[str, Path]:
    """Every module of ``package`` (a folder under the repository root) by its dotted name."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imported_names(tree: ast.Module, module: str, is_package: bool) -> Iterator[str]:
    """The dotted names ``module``'s imports name: ``import a.b`` names ``a.b``, ``from a import
    b`` names ``a.b`` (a module, or an attribute of the module ``a``)."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here[: len(here) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph(package: str) -> dict[str, set[str]]:
    """Each module of ``package`` -> the modules of ``package`` it imports.

    ``from a import b`` counts as importing ``a.b`` when that is a module, else ``a``; a module
    importing its own package's ``__init__`` implicitly (as every import of a submodule does) is
    not counted, only the imports its source writes.
    """
    modules = modules_of(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        names = _imported_names(tree, name, path.name == "__init__.py")
        graph[name] = {found for found in map(_module_in(modules), names) if found} - {name}
    return graph


def _module_in(modules: Collection[str]) -> Callable[[str], str | None]:
    """A function: a dotted name -> the module of ``modules`` it names (itself, or the module
    it is an attribute of), or None."""

    def module(imported: str) -> str | None:
        if imported in modules:
            return imported
        parent = imported.rpartition(".")[0]
        return parent if parent in modules else None

    return module


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` as [a, b, ..., a], or None when it has none."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for target in sorted(graph.get(node, ())):
            if target in on_path:
                return [*path[path.index(target) :], target]
            if target not in done:
                found = visit(target)
                if found:
                    return found
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            found = visit(start)
            if found:
                return found
    return None


@pytest.mark.parametrize("package", ["authz_server", "bench"])
def test_the_package_has_no_import_circle(package: str) -> None:
    graph = import_graph(package)
    assert len(graph) > 10, f"{package}: too few modules found, the walk is broken"
    circle = find_circle(graph)
    assert circle is None, f"{package}: import circle " + " -> ".join(circle or [])


def test_a_circle_through_a_type_checking_import_is_found(tmp_path: Path) -> None:
    # The shape bench had (envoy_bench -> report -> envoy_bench, under TYPE_CHECKING).
    source = {
        "runner": "import report\n",
        "report": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from runner import S\n",
    }
    graph = {}
    for name, text in source.items():
        names = _imported_names(ast.parse(text), name, is_package=False)
        graph[name] = {found for found in map(_module_in(source), names) if found}
    assert find_circle(graph) == ["report", "runner", "report"]
    assert find_circle({"report": set(), "runner": {"report"}}) is None
