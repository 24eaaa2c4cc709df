"""The conformance gate itself: stamps, refusal of a wrong backend with the failing case shown, the table."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from flashmoe.backends import base
from flashmoe.backends.numpy_backend import NumpyBackend
from flashmoe.conformance import runner
from flashmoe.errors import ConformanceError


class ExactBackend(NumpyBackend):
    """The reference's arithmetic under another name: must pass."""

    name = "exact-test"


class OffByOnePercentLinear(NumpyBackend):
    """A backend whose linear is 1% off (as a wrong scale or bias handling would be): must be refused."""

    name = "broken-test"

    def linear(self, x, w):
        return super().linear(x, w) * np.float32(1.01)


@pytest.fixture
def backends(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHMOE_CACHE_DIR", str(tmp_path))
    for cls in (ExactBackend, OffByOnePercentLinear):
        monkeypatch.setitem(base._REGISTRY, cls.name, lambda cls=cls: cls)
        monkeypatch.delitem(base._INSTANCES, cls.name, raising=False)
    return tmp_path


def test_ensure_conformant_stamps_once_and_then_skips_the_suite(backends, monkeypatch, capsys):
    stamp = runner.stamp_path("exact-test")
    stamp.parent.mkdir(parents=True)
    killed = stamp.with_name(f".{stamp.name}.tmp-99999999")  # a gate run killed while writing its stamp
    killed.write_text("{")
    runner.ensure_conformant("exact-test")
    # stderr is not a terminal under capsys: the message appears once, plainly, then the bar's final state.
    err = capsys.readouterr().err
    assert err.count("First use of backend exact-test on this machine (and flashmoe version): checking it against "
                     "the reference and compiling its kernels. This happens once; later runs skip it.") == 1, err
    n = len(runner.QUICK_CASES)
    assert "conformance cases" in err and f"{n}/{n}" in err and f"all {n} cases pass" in err, err
    assert err.endswith("compiling the exact-test kernels for this model (first run only; cached afterwards)…\n"), err
    assert stamp.parent == backends / "conformance" and os.listdir(stamp.parent) == [stamp.name]  # written atomically
    assert '"cases": %d' % len(runner.QUICK_CASES) in stamp.read_text()

    def must_not_run(*args, **kwargs):
        raise AssertionError("the quick suite ran again despite a stamp")

    monkeypatch.setattr(runner, "run_cases", must_not_run)
    runner.ensure_conformant("exact-test")


def test_stamp_key_changes_with_the_machine(backends, monkeypatch):
    before = runner.stamp_path("exact-test")
    monkeypatch.setattr(runner, "machine", lambda: {"host": "another"})
    assert runner.stamp_path("exact-test") != before


def test_stamp_key_changes_when_a_module_the_backend_imports_changes(backends, monkeypatch):
    # The numba backend's class lives in numba_backend.py; its kernels in the modules it imports (some inside
    # functions), the arithmetic they must match in reference/ and the weight layouts in format/.
    files = {(path.parent.name, path.name) for path in runner.source_files("numba")}
    helpers = [("backends", "numba_q8.py"), ("backends", "numba_x86.py"), ("backends", "numba_packed.py"),
               ("backends", "numba_experts.py"), ("backends", "base.py"), ("reference", "q8.py"),
               ("reference", "ops.py"), ("format", "quant.py"), ("format", "mxfp4.py"),
               ("conformance", "op_cases.py"), ("conformance", "runner.py")]
    assert set(helpers) <= files, set(helpers) - files
    assert ("serve", "server.py") not in files  # what the gate does not run does not re-run it
    before = runner.stamp_path("numba")
    read = Path.read_bytes
    for folder, edited in helpers:
        monkeypatch.setattr(Path, "read_bytes", lambda self, edited=edited: read(self) + b"\n# edited\n" * (self.name == edited))
        assert runner.stamp_path("numba") != before, f"editing {folder}/{edited} kept the stamp"
    monkeypatch.setattr(Path, "read_bytes", read)
    assert runner.stamp_path("numba") == before


def test_wrong_backend_is_refused_naming_the_failing_case(backends):
    with pytest.raises(ConformanceError) as err:
        runner.ensure_conformant("broken-test")
    message = str(err.value)
    assert "backend 'broken-test' failed" in message
    assert "linear(" in message and "relative error 0.01" in message and "> tolerance 1e-04" in message
    assert not runner.stamp_path("broken-test").exists()


def test_reference_backend_needs_no_stamp(backends):
    runner.ensure_conformant("numpy")
    assert not (backends / "conformance").exists()


def test_main_prints_a_table_and_returns_the_verdict(backends, capsys):
    assert runner.main("exact-test") == 0
    out = capsys.readouterr().out
    n = len(runner.QUICK_CASES)
    assert f"backend exact-test: {n}/{n} cases pass" in out
    assert "experts_ffn" in out and "conformant" in out
    assert runner.main("broken-test") == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "linear(" in out
    assert runner.main("no-such-backend") == 2
