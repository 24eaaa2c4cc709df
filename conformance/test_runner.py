"""The conformance gate itself: stamps, refusal of a wrong backend with the failing case shown, the table."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from flashmoe.backends import base
from flashmoe.backends.numpy_backend import NumpyBackend
from flashmoe.conformance import runner
from flashmoe.conformance.op_cases import COMMON_CASES, DENSE, EXPERTS, MXFP4, WeightFormat
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
    assert err.count("First use of backend exact-test on this machine (and flashmoe version) for every format (the "
                     "quick suite): checking it against the reference and compiling its kernels. This happens once "
                     "per format; later runs skip it.") == 1, err
    n = len(runner.QUICK_CASES)
    assert "conformance cases" in err and f"{n}/{n}" in err and f"all {n} cases pass" in err, err
    assert err.endswith("compiling the exact-test kernels for this model (first run only; cached afterwards)…\n"), err
    assert stamp.parent == backends / "conformance" and os.listdir(stamp.parent) == [stamp.name]  # written atomically
    record = runner.read_stamp("exact-test")
    assert record["cases"] == n and record["formats"] == [runner.EVERY_FORMAT]

    def must_not_run(*args, **kwargs):
        raise AssertionError("the quick suite ran again despite a stamp")

    monkeypatch.setattr(runner, "run_cases", must_not_run)
    runner.ensure_conformant("exact-test")
    # the whole quick suite covers any model's formats
    runner.ensure_conformant("exact-test", [WeightFormat(EXPERTS, MXFP4, activations="q8")])


def _recording_run_cases(monkeypatch) -> list[list]:
    """runner.run_cases, recording the cases of each call."""
    calls: list[list] = []
    run = runner.run_cases

    def record(backend, cases, progress=None):
        calls.append(list(cases))
        return run(backend, cases, progress)

    monkeypatch.setattr(runner, "run_cases", record)
    return calls


def test_a_models_first_use_checks_its_formats_and_a_later_model_only_its_new_ones(backends, monkeypatch, capsys,
                                                                                   tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the architecture owner's builders
    from checkpoints import VARIANTS, build_hf_checkpoint

    from flashmoe.convert.checkpoint import convert_checkpoint
    from flashmoe.runtime.load import load_engine

    calls = _recording_run_cases(monkeypatch)
    load_engine(None, backend="exact-test", activations="float")  # the demo model: 4-bit, its routers 8-bit
    demo = ["dense 4-bit g64 bfloat16 (float activations)", "dense 8-bit g64 bfloat16 (float activations)",
            "experts 4-bit g64 bfloat16 (float activations)"]
    assert runner.read_stamp("exact-test")["formats"] == sorted([runner.COMMON, *demo])
    formats = {str(f): f for f in (WeightFormat(DENSE, 4, 64, "bfloat16"), WeightFormat(DENSE, 8, 64, "bfloat16"),
                                   WeightFormat(EXPERTS, 4, 64, "bfloat16"))}
    assert list(formats) == demo
    assert calls == [COMMON_CASES + [case for f in formats.values() for case in f.cases()]]
    assert {case.p["bits"] for case in calls[0] if "bits" in case.p} == {4, 8}  # no MXFP4, 3-bit, float... case
    err = capsys.readouterr().err
    assert f"for {runner.COMMON}; {'; '.join(demo)}: checking it" in err, err
    assert f"all {len(calls[0])} cases pass" in err, err

    load_engine(None, backend="exact-test", activations="float")  # stamped: nothing runs
    assert len(calls) == 1 and "First use" not in capsys.readouterr().err

    # 8-bit resident weights in groups of 32, the routers 8-bit in groups of 64 (as mlx-lm keeps them), the
    # shared experts' down_proj float (its input width is no multiple of 32), 2-bit experts; scales float32 as
    # the float32 checkpoint gives them, so the routers' format is new too
    hf = build_hf_checkpoint(*VARIANTS[0], tmp_path / "hf")
    other = convert_checkpoint(hf, tmp_path / "other", bits="8", group_size=32, expert_bits="2", progress=False)
    load_engine(other, backend="exact-test", activations="float")
    new = [WeightFormat(DENSE, 8, 32, "float32"), WeightFormat(DENSE, 8, 64, "float32"), WeightFormat(DENSE, None),
           WeightFormat(EXPERTS, 2, 32, "float32")]
    assert calls[1] == [case for f in new for case in f.cases()]  # not the operations every model uses again
    assert runner.read_stamp("exact-test")["formats"] == sorted([runner.COMMON, *demo, *map(str, new)])
    assert runner.read_stamp("exact-test")["cases"] == len(calls[0]) + len(calls[1])
    assert f"for {'; '.join(map(str, new))}: checking it" in capsys.readouterr().err


def test_q8_activations_are_a_format_of_their_own(backends, monkeypatch):
    calls = _recording_run_cases(monkeypatch)
    runner.ensure_conformant("exact-test", [WeightFormat(EXPERTS, 4, 64, "bfloat16")])
    runner.ensure_conformant("exact-test", [WeightFormat(EXPERTS, 4, 64, "bfloat16", "q8")])
    assert len(calls) == 2 and all(case.p["activations"] == "q8" for case in calls[1])


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


def test_a_format_that_fails_is_refused_naming_its_case_and_not_stamped(backends):
    runner.ensure_conformant("broken-test", [])  # the operations without weights: no linear among them
    assert runner.read_stamp("broken-test")["formats"] == [runner.COMMON]
    with pytest.raises(ConformanceError) as err:
        runner.ensure_conformant("broken-test", [WeightFormat(DENSE, 3, 32, "float16", "q8")])
    message = str(err.value)
    assert "backend 'broken-test' failed 9 of 10 conformance cases" in message, message  # all but the embedding
    assert "linear(activations=q8, bits=3, group_size=32, inp=256, out=72, sdtype=float16, tokens=1, seed=0): " \
           "relative error 0.01" in message, message
    assert runner.read_stamp("broken-test")["formats"] == [runner.COMMON]


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
