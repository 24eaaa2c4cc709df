"""Shared fixtures: tiny Hugging Face checkpoints, built once per test session; numba's kernels compiled on
the other core while the first tests run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so tests can `import checkpoints`

from checkpoints import build_hf_checkpoint  # noqa: E402

#: The conformance gate of the numba backend, run in its own process from the session's start (None: not
#: needed, the stamp exists, or numba is missing).
_numba_gate: subprocess.Popen | None = None


def pytest_sessionstart(session) -> None:
    """A fresh checkout compiles every numba kernel on the backend's first use: the conformance gate's quick
    suite (flashmoe.conformance.runner), minutes of CI's 2 cores and most of the suite's time. Started here in
    a second process, it compiles on the other core while the tests that need no numba run (tests/ runs the
    NumPy backend; the tests marked numba and conformance/ are ordered after them); those wait for it and
    then find the stamp and every kernel in numba's cache of this checkout (the cache the suite's processes
    share). An unmarked test that loads a numba engine waits too. conformance/test_cuda_backend.py's run in
    the CUDA simulator (marked own_numba_cache: its subprocess compiles into a numba cache of its own) is
    ordered with the first part, on the core the gate leaves. If the process fails, the waiting
    load_engine runs the gate itself and reports what failed."""
    global _numba_gate
    try:
        from flashmoe.conformance.runner import EVERY_FORMAT, read_stamp
        from flashmoe.runtime import load

        if EVERY_FORMAT in read_stamp("numba").get("formats", []):
            return
    except Exception:  # numba missing or unusable: the backend's own tests say why
        return
    _numba_gate = subprocess.Popen(
        [sys.executable, "-c", "from flashmoe.conformance.runner import ensure_conformant; ensure_conformant('numba')"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gate = load.ensure_conformant

    def after_the_background_gate(name: str, formats=None) -> None:
        if name == "numba":
            _numba_gate.wait()
        gate(name, formats)

    load.ensure_conformant = after_the_background_gate


def _runs_numba(item: pytest.Item) -> bool:
    if item.get_closest_marker("own_numba_cache") is not None:
        return False  # fills the wait for the gate (conformance/test_cuda_backend.py's simulator run)
    return item.get_closest_marker("numba") is not None or item.path.parent.name == "conformance"


def pytest_collection_modifyitems(config, items: list[pytest.Item]) -> None:
    items.sort(key=_runs_numba)  # stable: the file order within each part


def pytest_runtest_setup(item: pytest.Item) -> None:
    # two processes compiling kernels into one numba cache could interleave its index's read-modify-write
    if _numba_gate is not None and _runs_numba(item):
        _numba_gate.wait()


def pytest_sessionfinish(session, exitstatus) -> None:
    """A run that ended before its first numba test stops the gate's process (the kernels it saved stay)."""
    if _numba_gate is not None and _numba_gate.poll() is None:
        _numba_gate.terminate()
        _numba_gate.wait()


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory) -> Callable[[str, str], Path]:
    """hf_checkpoint(arch, variant) -> directory with config.json + model.safetensors (built on first use)."""
    root = tmp_path_factory.mktemp("hf_checkpoints")
    built: dict[tuple[str, str], Path] = {}

    def get(arch: str, variant: str) -> Path:
        if (arch, variant) not in built:
            built[(arch, variant)] = build_hf_checkpoint(arch, variant, root / f"{arch}-{variant}")
        return built[(arch, variant)]

    return get
