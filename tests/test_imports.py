"""The import graph of the flashmoe distribution: no cycles, and dependencies that point down the data flow.

The graph is read from the source (every ``import`` statement, those inside functions included, since a
function-level import only hides a cycle until that function runs; imports under ``if TYPE_CHECKING:`` do
not run and are left out), over every module of the packages pyproject.toml lists.
"""

from __future__ import annotations

import ast
import graphlib
import importlib.util
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    """Module name -> source file for every package in pyproject.toml (its mapped folders included)."""
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    modules = {}
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec.origin is not None:  # None: a folder of data files (flashmoe.data), listed only to ship them
            modules[package] = Path(spec.origin)
        for folder in spec.submodule_search_locations:
            for path in Path(folder).glob("*.py"):
                if path.stem != "__init__":
                    modules[f"{package}.{path.stem}"] = path
    return modules


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported(tree: ast.AST, package: str, known: dict[str, Path]) -> set[str]:
    """The known modules that the statements of `tree` import, outside `if TYPE_CHECKING:` blocks."""
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:  # `from pkg import sub` imports the module pkg.sub, else a name of pkg
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found & known.keys()


def import_graph() -> dict[str, set[str]]:
    """Module -> the flashmoe modules it imports (itself excluded)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = _imported(ast.parse(path.read_text(), str(path)), package, modules) - {name}
    return graph


def test_graph_covers_every_package_and_their_mapped_folders():
    graph = import_graph()
    for name in ("flashmoe.runtime.load", "flashmoe.reference.model", "flashmoe.backends.base",
                 "flashmoe.conformance.runner", "flashmoe.bench.streaming", "flashmoe.cli"):
        assert name in graph, name
    assert "flashmoe.conformance.runner" in graph["flashmoe.runtime.load"]  # the gate: function-level imports count


def test_no_import_cycles():
    try:
        graphlib.TopologicalSorter(import_graph()).prepare()
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None


def test_only_the_cli_imports_the_benchmarks():
    """bench/ measures the package; the package runs without it. `flashmoe bench` (flashmoe/cli) is the one door:
    a command that runs a benchmark, imported only when that command runs."""
    graph = import_graph()
    users = {m for m, deps in graph.items() if not m.startswith("flashmoe.bench")
             and not m.rpartition(".")[2].startswith("test_") and any(d.startswith("flashmoe.bench") for d in deps)}
    assert all(m == "flashmoe.cli" or m.startswith("flashmoe.cli.") for m in users), users
