"""Which source files a module depends on, found by following its import statements (without running it):
what the conformance gate's stamp covers (flashmoe.conformance.runner) and what numba's cached kernels are
compiled from (flashmoe.backends.numba_cache)."""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path
from typing import Callable


@functools.lru_cache(maxsize=None)
def _imported_modules(path: Path, mtime_ns: int, size: int) -> frozenset[str]:
    """Every flashmoe module name an import statement of file ``path`` may name, at top level or inside a
    function: for ``from flashmoe.a import b`` both ``flashmoe.a`` and ``flashmoe.a.b`` (b may be a submodule).
    Cached per file version (every engine load asks): parsing the ~50 sources takes a tenth of a second."""
    names = set()
    for node in ast.walk(ast.parse(path.read_bytes())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return frozenset(n for n in names if n == "flashmoe" or n.startswith("flashmoe."))


@functools.lru_cache(maxsize=None)
def _module_file(name: str) -> Path | None:
    """The source file of module ``name``, found without running it (only the packages above it are
    imported); None if ``name`` is not a module (an attribute such as ``flashmoe.format.quant.unpack``)."""
    parent = name.rpartition(".")[0]
    if parent:
        above = importlib.util.find_spec(parent)
        if above is None or above.submodule_search_locations is None:  # below a module: an attribute
            return None
    spec = importlib.util.find_spec(name)
    return Path(spec.origin) if spec is not None and spec.has_location else None


def dependencies(roots: list[Path], follow: Callable[[Path], bool] = lambda path: True) -> list[Path]:
    """``roots`` and every flashmoe module file their import statements name (packages' ``__init__`` included:
    importing a module runs them), the imports of each file for which ``follow(path)`` holds followed in
    turn (by default all: the transitive closure). Resolved paths, sorted."""
    todo, seen = [p.resolve() for p in roots], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if not follow(path):
            continue
        stat = path.stat()
        for module in _imported_modules(path, stat.st_mtime_ns, stat.st_size):
            parts = module.split(".")
            for prefix in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):  # each package runs its __init__
                found = _module_file(prefix)
                if found is not None and found.resolve() not in seen:
                    todo.append(found.resolve())
    return sorted(seen)
