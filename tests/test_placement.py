"""--expert-device (flashmoe.runtime.placement): the choice between computing a decode token's missing experts
on the GPU or on the CPU, from the rates it measures."""

from __future__ import annotations

import numpy as np
import pytest

from flashmoe.backends import get_backend
from flashmoe.backends.numpy_backend import NumpyBackend
from flashmoe.bench.bench_cuda import build_engine
from flashmoe.errors import FlashMoeError
from flashmoe.runtime.load import default_model_dir
from flashmoe.runtime.placement import EXPLORE_EVERY, ExpertPlacement


def test_gpu_needs_no_placement_and_bad_choices_are_refused():
    numpy = get_backend("numpy")
    assert ExpertPlacement.of("gpu", numpy) is None
    with pytest.raises(FlashMoeError, match="--expert-device 'fast' is not one of gpu, cpu, auto"):
        ExpertPlacement.of("fast", numpy)
    with pytest.raises(FlashMoeError, match="numpy computes them in host memory already"):
        ExpertPlacement.of("cpu", numpy)


def test_auto_tries_each_way_then_takes_the_cheaper_and_looks_at_the_other_now_and_then():
    p = ExpertPlacement("auto", cpu=None)
    cost = {False: 2.0, True: 1.0}  # seconds per token of 1 byte: the CPU is cheaper
    ways = []
    for _ in range(2 * EXPLORE_EVERY):
        way = p.on_cpu()
        ways.append(way)
        p.measured(way, 1, cost[way] * (100.0 if len(ways) in (1, 3) else 1.0))  # first of each: a compile
    assert ways[:4] == [False, False, True, True]  # the first token of each way is not counted
    assert p.seconds_per_byte == {False: 2.0, True: 1.0}
    assert ways.count(False) == 2 + 2  # the two tries, then once per EXPLORE_EVERY tokens
    assert p.tokens == {False: 4, True: 2 * EXPLORE_EVERY - 4}


def test_tokens_that_read_from_the_disk_leave_the_rates_alone():
    """A cold page cache paces either way by the disk: a way measured only then would keep looking slower."""
    p = ExpertPlacement("auto", cpu=None)
    for way, seconds, from_disk in [(False, 9.0, False), (False, 50.0, True), (False, 2.0, False),
                                    (True, 9.0, False), (True, 50.0, True), (True, 1.0, False)]:
        p.measured(way, 1, seconds, from_disk)
    assert p.seconds_per_byte == {False: 2.0, True: 1.0} and p.tokens == {False: 3, True: 3}


def test_cpu_always_takes_the_cpu():
    p = ExpertPlacement("cpu", cpu=None)
    assert all(p.on_cpu() for _ in range(3))


TOKENS = [1, 200, 31, 7, 99]


def _generate(engine, reads: list[int] | None = None) -> np.ndarray:
    """The logits of TOKENS (a 2-token prompt, then one token at a time); `reads` gets each decode token's
    expert reads. Closes the engine's store."""
    state = engine.new_state()
    out = [engine.forward(np.array(TOKENS[:2]), state)]
    for t in TOKENS[2:]:
        before = engine.stats.totals.reads
        out.append(engine.forward(np.array([t]), state))
        if reads is not None:
            reads.append(engine.stats.totals.reads - before)
    engine.store.close()
    return np.concatenate(out)


def _warm_plain_logits() -> np.ndarray:
    """The plain NumPy engine's logits of TOKENS, every expert read into the page cache first."""
    plain = build_engine(default_model_dir(), "numpy")
    for layer in plain.model_dir.moe_layers:
        plain.model_dir.expert_path(layer).read_bytes()
    return _generate(plain)


def test_the_cpu_way_computes_on_the_page_cache_and_the_read_buffers_stay_the_gpus(monkeypatch):
    """--expert-device cpu on a backend that takes its experts from read buffers (the NumPy backend made to say
    so, as cuda's does): a decode token whose experts the page cache holds reads nothing, numba computes them
    on views of the expert files' mapping; prefill still reads into buffers (the store hands out views only
    to the CPU way). Logits as the plain NumPy engine's; each way's time counts from the fetch to the sum."""
    want = _warm_plain_logits()
    monkeypatch.setattr(NumpyBackend, "experts_in_place", False)
    engine = build_engine(default_model_dir(), "numpy", expert_device="cpu")
    assert engine.store.files.in_place and not engine.store.in_place
    prefill_reads = []
    engine.store.wait = lambda f, wait=engine.store.wait: prefill_reads.append(len(f.expert_ids)) or wait(f)
    reads: list[int] = []
    got = _generate(engine, reads)
    assert reads == [0, 0, 0]
    assert sum(prefill_reads) > 0 and not engine.store.in_place
    assert engine.placement.tokens[True] == 3 * len(engine.model_dir.moe_layers)
    assert engine.placement.seconds_per_byte[True] > 0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_the_cpu_way_with_q8_activations_stays_within_q8s_error(monkeypatch):
    """--activations q8 for the CPU way: numba computes the missing experts with int8 activations; the logits
    stay within 3% of the largest of the float engine's (1.3% measured) but are not float's."""
    want = _warm_plain_logits()
    monkeypatch.setattr(NumpyBackend, "experts_in_place", False)
    engine = build_engine(default_model_dir(), "numpy", expert_device="cpu", cpu_activations="q8")
    assert engine.placement.cpu.activations == "q8"
    got = _generate(engine)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-2 * scale)
    assert np.abs(got - want).max() > 1e-4 * scale


def test_expert_files_are_mapped_for_a_placement_only(monkeypatch):
    """load_engine maps the expert files of a backend that takes read buffers (the NumPy backend made to say so,
    as cuda's does) only for --expert-device cpu or auto, whose CPU way computes on the mapping; numba's gate
    runs only then."""
    import flashmoe.runtime.load as load
    from flashmoe.runtime import expert_files

    gates: list[str] = []
    monkeypatch.setattr(load, "ensure_conformant", lambda name, *formats: gates.append(name))
    monkeypatch.setattr(NumpyBackend, "experts_in_place", False)
    plain = load.load_engine(None, backend="numpy", expert_device="gpu")
    assert plain.placement is None and not plain.store.files.in_place and gates == ["numpy"]
    plain.store.close()
    placed = load.load_engine(None, backend="numpy", expert_device="cpu")
    assert placed.placement.mode == "cpu" and not placed.store.in_place and gates == ["numpy", "numpy", "numba"]
    assert placed.store.files.in_place == (expert_files._mincore is not None)
    placed.store.close()


def test_a_decode_without_placement_times_nothing(monkeypatch):
    """The plain engine's decode layers take no clock readings for a placement that is not there."""
    import types

    import flashmoe.runtime.engine as engine_module

    def no_clock():
        raise AssertionError("a decode layer read the clock for a placement")

    engine = build_engine(default_model_dir(), "numpy")
    monkeypatch.setattr(engine_module, "time", types.SimpleNamespace(perf_counter=no_clock))
    state = engine.new_state()
    engine.forward(np.array([1, 200]), state)
    engine.forward(np.array([31]), state)
    engine.store.close()


def test_the_cpu_way_computes_with_the_activations_asked_for(monkeypatch):
    """--activations with --expert-device cpu or auto names the CPU way's (numba's) mode, float unless asked
    (the GPU computes float); load_engine gives it there, and to numba's gate, and leaves the GPU backend at
    its own."""
    import flashmoe.runtime.load as load

    monkeypatch.setattr(NumpyBackend, "experts_in_place", False)
    gpu = get_backend("numpy")
    assert ExpertPlacement.of("cpu", gpu).cpu.activations == "float"
    assert ExpertPlacement.of("auto", gpu, "q8").cpu.activations == "q8"
    with pytest.raises(FlashMoeError, match="--activations int4"):
        ExpertPlacement.of("cpu", gpu, "int4")
    gates = []
    monkeypatch.setattr(load, "ensure_conformant",
                        lambda name, formats: gates.append((name, {f.activations for f in formats})))
    engine = load.load_engine(None, backend="numpy", expert_device="cpu", activations="q8")
    assert engine.placement.cpu.activations == "q8" and engine.backend is gpu
    assert gates == [("numpy", {"float"}), ("numba", {"q8"})]  # numba's gate checks what the CPU way computes
    engine.store.close()
