"""The conformance gate: a backend computes a model only after it has passed, on this machine, the cases of
the model's weight formats.

``ensure_conformant(name, formats)`` runs, against the NumPy reference, the operations every model uses
(op_cases.COMMON_CASES) and each of the model's weight formats' cases (``model_formats``: bits, group size,
scales' dtype, float or MXFP4, dense or experts, activation mode; op_cases.WeightFormat.cases) that the
backend's stamp does not list yet, then adds them to the stamp: a model of formats checked before starts at
once, one of a new format waits only for that format's kernels. ``ensure_conformant(name)`` (no formats) runs
the whole quick suite (conformance/op_cases.py: every operation, every bit width and scale dtype), which
stamps every format. The stamp is keyed by backend, flashmoe version, machine (host, CPU, numba/numpy versions)
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
from flashmoe.conformance.op_cases import (BIASED_EXPERTS, COMMON_CASES, DENSE, EXPERTS, QUICK_CASES, CaseResult,
                                           OpCase, WeightFormat, full_cases, run_cases)
from flashmoe.arch.tensors import EXPERT_PROJS
from flashmoe.errors import ConformanceError
from flashmoe.format.atomic import write_json_atomic
from flashmoe.format.manifest import MXFP4
from flashmoe.format.modeldir import ModelDir
from flashmoe.sources import dependencies

#: The NumPy backend is the reference the suite compares with; it needs no gate.
REFERENCE_BACKEND = "numpy"
#: What a stamp lists for the whole quick suite (`flashmoe conformance`, or the gate given no formats): it
#: covers every format.
EVERY_FORMAT = "every format (the quick suite)"
#: What a stamp lists for op_cases.COMMON_CASES, the operations without weights that every model uses.
COMMON = "operations without weights"


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


def read_stamp(name: str) -> dict:
    """Backend ``name``'s stamp for this machine and source ({} when there is none): its "formats" lists what
    passed (EVERY_FORMAT, COMMON and str(WeightFormat) entries)."""
    try:
        return json.loads(stamp_path(name).read_text())
    except FileNotFoundError:
        return {}


def _write_stamp(name: str, formats: list[str], results: list[CaseResult], seconds: float) -> Path:
    """Add ``formats``, whose cases gave ``results`` in ``seconds``, to backend ``name``'s stamp; returns its path."""
    path = stamp_path(name)
    old = read_stamp(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    worst = max([r.error / r.tolerance for r in results] + [old.get("max_error_over_tolerance", 0.0)])
    record = {"backend": name, "flashmoe_version": __version__, "machine": machine(),
              "formats": sorted(set(old.get("formats", [])) | set(formats)),
              "cases": old.get("cases", 0) + len(results), "max_error_over_tolerance": worst,
              "seconds": round(old.get("seconds", 0.0) + seconds, 2),
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json_atomic(path, record)  # concurrent first runs never leave a half-written stamp
    return path


def model_formats(model: ModelDir, activations: str) -> list[WeightFormat]:
    """The formats of ``model``'s weights, computed with ``activations``: each quantised resident tensor's
    (bits, group size, scales' dtype), float where a 2-D resident tensor (a linear or an embedding) is stored
    unquantised, and each expert projection's, BIASED_EXPERTS where the experts have biases. Sorted by name."""
    found = set()
    for name in model.resident_names():
        q = model.quantization(name)
        if q is not None:
            scales = model.stored(name[: -len("weight")] + "scales")[0]
            found.add(WeightFormat(DENSE, q.bits, q.group_size, scales.name, activations))
        elif len(model.stored(name)[1]) == 2:
            found.add(WeightFormat(DENSE, None, activations=activations))
    for layer in model.moe_layers:
        layout = model.layer_layout(layer)
        components = {c.name: c for c in layout.components}
        role = BIASED_EXPERTS if any(n.endswith(".bias") for n in components) else EXPERTS
        for proj in EXPERT_PROJS:
            q = layout.quantization.get(proj)
            if q is None:
                found.add(WeightFormat(role, None, activations=activations))
            elif q.format == MXFP4:
                found.add(WeightFormat(role, MXFP4, activations=activations))
            else:
                found.add(WeightFormat(role, q.bits, q.group_size, components[f"{proj}.scales"].dtype, activations))
    return sorted(found, key=str)


def ensure_conformant(name: str, formats: list[WeightFormat] | None = None) -> None:
    """Make sure backend ``name`` passed, on this machine, the operations every model uses and the cases of
    ``formats`` (a model's, ``model_formats``), or with None the whole quick suite; run what its stamp does not
    list yet (seconds, plus numba's one-time compilation of those formats' kernels) and add it to the stamp.

    Raises BackendError for an unknown or unavailable backend, ConformanceError listing the failing cases.
    """
    backend = get_backend(name)
    if name == REFERENCE_BACKEND:
        return
    checked = set(read_stamp(name).get("formats", []))
    if EVERY_FORMAT in checked:
        return
    wanted: dict[str, list[OpCase]] = {EVERY_FORMAT: QUICK_CASES} if formats is None else \
        {COMMON: COMMON_CASES, **{str(f): f.cases() for f in formats}}
    missing = {what: cases for what, cases in wanted.items() if what not in checked}
    if not missing:
        return
    cases = [case for group in missing.values() for case in group]
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    start = time.perf_counter()
    # The first use on a machine compiles the backend's kernels too (about a minute for numba): say why the
    # wait, that it happens once, and how far it is, on stderr.
    console = Console(stderr=True, highlight=False)
    console.print(f"First use of backend {name} on this machine (and flashmoe version) for {'; '.join(missing)}: "
                  "checking it against the reference and compiling its kernels. This happens once per format; "
                  "later runs skip it.", markup=False, soft_wrap=True)
    with Progress(TextColumn("  conformance cases"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=console.is_terminal) as progress:
        task = progress.add_task("cases", total=len(cases))
        results = run_cases(backend, cases, progress=lambda result: progress.advance(task))
    failed = [r for r in results if not r.passed]
    if failed:
        shown = "\n  ".join(r.describe() for r in failed[:5])
        more = f"\n  ... and {len(failed) - 5} more" if len(failed) > 5 else ""
        raise ConformanceError(
            f"backend {name!r} failed {len(failed)} of {len(results)} conformance cases against the NumPy "
            f"reference and will not be used:\n  {shown}{more}\n(run `flashmoe conformance --backend {name}`)"
        )
    seconds = time.perf_counter() - start
    path = _write_stamp(name, list(missing), results, seconds)
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
            path = _write_stamp(name, [EVERY_FORMAT], results, seconds)
            console.print(f"{name}: conformant ({seconds:.1f} s); stamp {path}")
        if full:
            with console.status(f"checking {name} on a tiny model of every architecture"):
                models = model_cases.run_models(name, make_engine)
            console.print(_model_table(name, models))
            for r in models:
                if not r.passed:
                    console.print(f"[red]FAIL[/red] {r.describe()}")
                    status = 1
    return status
