"""numba's on-disk cache of the backend's kernels, made stale by an edit of any module they are compiled from.

numba keys a cached kernel on the contents of the one file that defines it (numba.core.caching: the locator's
source stamp), but a kernel is compiled together with what it calls from other modules: numba_q8's kernels
inline numba_x86's row kernels and numba_packed's views, and bake in constants of flashmoe.reference.q8. With
plain ``njit(cache=True)`` an edit of numba_x86.py alone left numba loading the kernels compiled from the old
code. ``cached_njit`` stamps each kernel's cache with the contents of its own module and of every flashmoe
module that module imports, following the imports of the backend's numba modules (``numba_*``) to the end
(flashmoe.sources): a change in any of them recompiles the kernel; one anywhere else does not.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path

try:
    import numba
    from numba.core.caching import FunctionCache
    from numba.core.errors import NumbaIRAssumptionWarning
except ImportError:  # numba_backend reports it through unavailable_reason
    numba = None
else:
    # numba's pedantic check of its own IR after `inline="always"` overloads (numba_q8's row and tile kernels)
    # reports inlined locals as "not in scope" while a kernel compiles; the compiled code is what conformance checks,
    # and the warning's text would otherwise print into a user's generated text on a first run.
    warnings.filterwarnings("ignore", category=NumbaIRAssumptionWarning)

from flashmoe.sources import dependencies


def kernel_sources(module: str) -> list[Path]:
    """The source files a kernel of loaded module ``module`` (its name) may be compiled from: its own file and
    every flashmoe module it imports, the imports of the backend's ``numba_*`` modules followed further
    (flashmoe.sources.dependencies); not this module, which compiles nothing. Sorted paths."""
    own = Path(sys.modules[module].__file__).resolve()
    found = dependencies([own], follow=lambda path: path == own or path.name.startswith("numba_"))
    return [path for path in found if path != Path(__file__).resolve()]


@functools.lru_cache(maxsize=None)
def _file_hash(path: Path, mtime_ns: int, size: int) -> str:
    """sha256 of a file's bytes (memoised on its mtime and size, as numba's own stamp is)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sources_stamp(paths: list[Path]) -> tuple[tuple[str, str], ...]:
    """(file name, sha256 of its contents) for each path, sorted: equal exactly while no file's contents changed,
    wherever the files are."""
    stamp = []
    for path in paths:
        st = os.stat(path)
        stamp.append((path.name, _file_hash(path, st.st_mtime_ns, st.st_size)))
    return tuple(sorted(stamp))


if numba is not None:

    class _ModulesStamp:
        """A numba cache locator whose source stamp also covers the kernel's imported modules (kernel_sources)."""

        @classmethod
        def from_function(cls, py_func, py_file):
            self = super().from_function(py_func, py_file)
            if self is not None:
                self._kernel_module = py_func.__module__
            return self

        def get_source_stamp(self):
            return super().get_source_stamp(), sources_stamp(kernel_sources(self._kernel_module))

    class _KernelCacheImpl(FunctionCache._impl_class):
        # numba's own locators, in its order of preference, each with the wider stamp
        _locator_classes = [type(c.__name__, (_ModulesStamp, c), {}) for c in FunctionCache._impl_class._locator_classes]

    class KernelCache(FunctionCache):
        """numba's per-function disk cache, stamped by kernel_sources (module docstring)."""

        _impl_class = _KernelCacheImpl


def cached_njit(**options):
    """``numba.njit(**options)`` with its compiled code cached on disk (as ``cache=True``) under KernelCache's
    stamp: recompiled when the kernel's module or any module it is compiled from changes (module docstring)."""

    def decorate(func):
        dispatcher = numba.njit(**options)(func)
        dispatcher._cache = KernelCache(dispatcher.py_func)  # what Dispatcher.enable_caching does
        return dispatcher

    return decorate
