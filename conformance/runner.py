"""The conformance gate: a backend is used only after it has passed the quick suite on this machine.

``ensure_conformant(name)`` runs the quick suite (conformance/op_cases.py: every operation, every bit width
and scale dtype, against the NumPy reference) once and records a stamp; later calls find the stamp and
return at once. The stamp is keyed by backend, flashmoe version, machine (host, CPU, numba/numpy versions)
and a digest of every source the backend depends on (its modules and the flashmoe modules they import,
transitively: helper kernel modules and the reference too) and of the suite, so a changed kernel is checked again. Stamps live in
``$FLASHMOE_CACHE_DIR/conformance`` (default ``~/.cache/flashmoe/conformance``).

``main(backend, full, make_engine)`` is ``flashmoe conformance``: it runs the quick (or full) suite for one
backend or every available one and prints a table. The full suite adds more op cases and the model-level check
(conformance/model_cases.py: the engine vs the reference on a tiny model of every architecture), whose
engines the caller builds (the CLI passes flashmoe.runtime.load.load_engine): the runtime imports this
module for its gate, so this module imports nothing of the runtime.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from flashmoe import __version__, shaders
from flashmoe.backends import available_backends, get_backend
from flashmoe.backends.base import BackendError
from flashmoe.conformance import model_cases, op_cases
from flashmoe.conformance.model_cases import EngineFactory, ModelResult
from flashmoe.conformance.op_cases import QUICK_CASES, CaseResult, full_cases, run_cases
from flashmoe.errors import ConformanceError
from flashmoe.format.atomic import write_json_atomic
from flashmoe.sources import dependencies

#: The NumPy backend is the reference the suite compares with; it needs no gate.
REFERENCE_BACKEND = "numpy"


def cache_dir() -> Path:
    """Where stamps are kept: ``$FLASHMOE_CACHE_DIR/conformance`` or ``~/.cache/flashmoe/conformance``."""
    root = os.environ.get("FLASHMOE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flashmoe"
    return Path(root) / "conformance"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str]:
    """What identifies this machine and toolchain for the stamp."""
    info = {"host": platform.node(), "cpu": _cpu_model(), "arch": platform.machine(), "cores": str(os.cpu_count()),
            "python": platform.python_version(), "numpy": np.__version__}
    try:
        import numba

        info["numba"] = numba.__version__
    except ImportError:
        pass
    return info


def source_files(name: str) -> list[Path]:
    """The sources that backend ``name``'s conformance depends on: its class's module, the quick suite
    (conformance/op_cases.py) and every flashmoe module they import, transitively (packages' __init__ and
    imports inside functions included, so the helper kernel modules a backend imports lazily count), this
    runner, and the shader sources compiled at run time. Sorted by path."""
    roots = [Path(inspect.getfile(type(get_backend(name)))), Path(inspect.getfile(op_cases))]
    seen = set(dependencies(roots))
    seen.add(Path(__file__).resolve())
    seen.update(p.resolve() for p in Path(shaders.__file__).parent.glob("*.[cm]*"))  # kernels compiled at run time
    return sorted(seen)


def _source_digest(name: str) -> str:
    """SHA-256 over every source backend ``name`` depends on (``source_files``): editing any of them, a helper
    kernel module or the reference included, re-runs the gate."""
    h = hashlib.sha256()
    for path in source_files(name):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def stamp_path(name: str) -> Path:
    """The stamp file of backend ``name`` for this flashmoe version, machine, source and checkout."""
    # Where numba caches the compiled kernels (beside the sources unless NUMBA_CACHE_DIR) is part of the key:
    # a fresh clone runs the gate again, whose message tells the user why the first run waits for compilation.
    kernels = os.environ.get("NUMBA_CACHE_DIR") or str(Path(inspect.getfile(BackendError)).resolve().parent.parent)
    key = json.dumps({"machine": machine(), "source": _source_digest(name), "kernel_cache": kernels}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / f"{name}-{__version__}-{digest}.json"


def _write_stamp(path: Path, name: str, results: list[CaseResult], seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"backend": name, "flashmoe_version": __version__, "machine": machine(), "cases": len(results),
              "max_error_over_tolerance": max(r.error / r.tolerance for r in results), "seconds": round(seconds, 2),
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json_atomic(path, record)  # concurrent first runs never leave a half-written stamp


def ensure_conformant(name: str) -> None:
    """Make sure backend ``name`` passed the quick suite on this machine; run it (seconds, plus numba's
    one-time compilation) and stamp it if not.

    Raises BackendError for an unknown or unavailable backend, ConformanceError listing the failing cases.
    """
    backend = get_backend(name)
    if name == REFERENCE_BACKEND:
        return
    path = stamp_path(name)
    if path.is_file():
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    start = time.perf_counter()
    # The first use on a machine compiles the backend's kernels too (about a minute for numba): say why the
    # wait, that it happens once, and how far it is, on stderr.
    console = Console(stderr=True, highlight=False)
    console.print(f"First use of backend {name} on this machine (and flashmoe version): checking it against the "
                  "reference and compiling its kernels. This happens once; later runs skip it.", markup=False,
                  soft_wrap=True)
    with Progress(TextColumn("  conformance cases"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=console.is_terminal) as progress:
        task = progress.add_task("cases", total=len(QUICK_CASES))
        results = run_cases(backend, QUICK_CASES, progress=lambda result: progress.advance(task))
    failed = [r for r in results if not r.passed]
    if failed:
        shown = "\n  ".join(r.describe() for r in failed[:5])
        more = f"\n  ... and {len(failed) - 5} more" if len(failed) > 5 else ""
        raise ConformanceError(
            f"backend {name!r} failed {len(failed)} of {len(results)} conformance cases against the NumPy "
            f"reference and will not be used:\n  {shown}{more}\n(run `flashmoe conformance --backend {name}`)"
        )
    seconds = time.perf_counter() - start
    _write_stamp(path, name, results, seconds)
    console.print(f"backend {name}: all {len(results)} cases pass ({seconds:.0f} s); stamped in {path}", markup=False,
                  soft_wrap=True)
    # The model's own calls compile more kernel variants than the cases did (minutes on a busy machine, with no
    # output until the first token): say so, once, before that silence.
    console.print(f"compiling the {name} kernels for this model (first run only; cached afterwards)…", markup=False,
                  soft_wrap=True)


def _table(name: str, results: list[CaseResult]):
    from rich.table import Table

    table = Table(title=f"backend {name}: {sum(r.passed for r in results)}/{len(results)} cases pass")
    for col, justify in [("operation", "left"), ("cases", "right"), ("failed", "right"),
                         ("max rel. error", "right"), ("tolerance", "right"), ("seconds", "right")]:
        table.add_column(col, justify=justify)
    for op in dict.fromkeys(r.case.op for r in results):
        rs = [r for r in results if r.case.op == op]
        bad = sum(not r.passed for r in rs)
        worst = max(r.error for r in rs)
        table.add_row(op, str(len(rs)), f"[red]{bad}[/red]" if bad else "0", f"{worst:.2e}",
                      f"{rs[0].tolerance:.0e}", f"{sum(r.seconds for r in rs):.2f}")
    return table


def _model_table(name: str, results: list[ModelResult]):
    from rich.table import Table

    table = Table(title=f"backend {name}, model level: {sum(r.passed for r in results)}/{len(results)} pass")
    for col in ("architecture", "max rel. error", "tolerance", "greedy tokens", "seconds"):
        table.add_column(col, justify="left" if col == "architecture" else "right")
    for r in results:
        tokens = "same" if r.tokens_agree else "[red]differ[/red]"
        table.add_row(r.arch, f"{r.error:.2e}", f"{model_cases.TOLERANCE:.0e}", tokens, f"{r.seconds:.1f}")
    return table


def main(backend: str | None = None, full: bool = False, make_engine: EngineFactory | None = None) -> int:
    """Run the quick (or ``full``) suite for ``backend`` (default: every available backend but the
    reference), print a table per backend and the failing cases; stamp the backends that pass the op
    cases. ``full`` needs ``make_engine``, which builds the engines of the model-level cases. Returns 0 when
    every checked backend passes, 1 otherwise (2 for an unknown backend)."""
    if full and make_engine is None:
        raise TypeError("the full conformance suite needs make_engine (e.g. flashmoe.runtime.load.load_engine)")
    from rich.console import Console

    console = Console()
    available = available_backends()
    if backend is not None and backend not in available:
        console.print(f"[red]error:[/red] unknown backend {backend!r}; choose one of {', '.join(available)}")
        return 2
    names = [backend] if backend else [n for n, why in available.items() if why is None and n != REFERENCE_BACKEND]
    for n, why in available.items():
        if why is not None and (backend is None or n == backend):
            console.print(f"backend {n}: not available ({why})")
    status = 0
    for name in names:
        if available[name] is not None:
            status = 1
            continue
        cases = full_cases() if full else QUICK_CASES
        start = time.perf_counter()
        with console.status(f"checking {name} ({len(cases)} cases; the first run compiles kernels)"):
            results = run_cases(name, cases)
        seconds = time.perf_counter() - start
        console.print(_table(name, results))
        failed = [r for r in results if not r.passed]
        for r in failed:
            console.print(f"[red]FAIL[/red] {r.describe()}")
        if failed:
            status = 1
            continue
        if name != REFERENCE_BACKEND:
            _write_stamp(stamp_path(name), name, results, seconds)
            console.print(f"{name}: conformant ({seconds:.1f} s); stamp {stamp_path(name)}")
        if full:
            with console.status(f"checking {name} on a tiny model of every architecture"):
                models = model_cases.run_models(name, make_engine)
            console.print(_model_table(name, models))
            for r in models:
                if not r.passed:
                    console.print(f"[red]FAIL[/red] {r.describe()}")
                    status = 1
    return status
