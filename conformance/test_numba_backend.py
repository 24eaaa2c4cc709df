"""What the numba backend promises beyond matching the reference: streamed weights are used in place, bad
indices are refused before a kernel (which does not bounds-check) could read outside an array, and
experts the fused kernels cannot take still run."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba", reason="the numba backend needs numba")

from flashmoe.backends import get_backend  # noqa: E402
from flashmoe.backends.base import BackendError  # noqa: E402
from flashmoe.backends.numba_backend import _as_weight  # noqa: E402
from flashmoe.conformance.op_cases import make_expert_views, make_weight  # noqa: E402


def test_bf16_expert_is_used_in_place_without_copying_words_or_scales():
    expert = make_expert_views(np.random.default_rng(0), 128, 64, 4, 64, "bfloat16")
    for name, qt in expert.items():
        kw = _as_weight(qt, name)
        assert np.shares_memory(kw.words, qt.weight), name
        assert np.shares_memory(kw.scales, qt.scales) and np.shares_memory(kw.biases, qt.biases), name
        assert kw.bf16


def test_embed_refuses_token_ids_outside_the_vocabulary():
    w = make_weight(np.random.default_rng(0), 10, 64, 4, 64, "bfloat16")
    with pytest.raises(BackendError, match=r"token ids 3\.\.10 outside 0\.\.9"):
        get_backend("numba").embed(np.array([3, 10]), w)


def test_attention_refuses_query_positions_beyond_the_cache():
    q = np.zeros((1, 2, 8), np.float32)
    kv = np.zeros((4, 1, 8), np.float32)
    with pytest.raises(BackendError, match="query positions 4..4 outside the 4 cached keys"):
        get_backend("numba").attention(q, kv, kv, np.array([4]), 1.0)


def test_experts_of_mixed_widths_run_one_by_one_and_match_the_reference():
    rng = np.random.default_rng(1)
    experts = [make_expert_views(rng, 128, 64, bits, 64, "bfloat16") for bits in (4, 8)]
    x = rng.standard_normal(128).astype(np.float32)
    weights = np.array([0.7, 0.3], np.float32)
    got = get_backend("numba").experts_ffn(x, experts, weights)
    want = get_backend("numpy").experts_ffn(x, experts, weights)
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


def test_float16_scales_are_widened_exactly():
    w = make_weight(np.random.default_rng(2), 8, 64, 4, 32, "float16")
    kw = _as_weight(w, "w")
    assert kw.scales.dtype == np.float32 and np.array_equal(kw.scales, w.scales.astype(np.float32))


def test_a_kernel_call_below_the_work_threshold_runs_on_the_calling_thread_alone():
    import numba

    from flashmoe.backends.numba_backend import PARALLEL_MIN_WORK, _call

    seen = []
    threads = numba.get_num_threads()
    _call(lambda: seen.append(numba.get_num_threads()), PARALLEL_MIN_WORK - 1)
    _call(lambda: seen.append(numba.get_num_threads()), PARALLEL_MIN_WORK)
    assert seen == [1, threads]
    assert numba.get_num_threads() == threads  # restored for the next call


def test_every_parallel_kernel_gives_the_same_bits_on_one_thread_and_on_the_pool(monkeypatch):
    """Each parallel loop's iterations are independent (a row, a head, a chunk of rows), so the serial path
    that small calls take must match the pool's result exactly."""
    import flashmoe.backends.numba_backend as nb

    rng = np.random.default_rng(3)
    be = get_backend("numba")
    w = make_weight(rng, 96, 128, 4, 64, "bfloat16")
    experts = [make_expert_views(rng, 128, 64, 4, 64, "bfloat16") for _ in range(3)]
    x1, x5 = rng.standard_normal((1, 128)).astype(np.float32), rng.standard_normal((5, 128)).astype(np.float32)
    q, kv = rng.standard_normal((3, 4, 16)).astype(np.float32), rng.standard_normal((6, 2, 16)).astype(np.float32)
    dq, dv = rng.standard_normal((4, 2, 8)).astype(np.float32), rng.standard_normal((4, 4, 8)).astype(np.float32)
    g, beta = -rng.random((4, 4)).astype(np.float32), rng.random((4, 4)).astype(np.float32)
    state = rng.standard_normal((4, 8, 8)).astype(np.float32)

    def run_all():
        return [be.linear(x1, w), be.linear(x5, w), be.embed(np.array([0, 95, 7]), w),
                be.attention(q, kv, kv, np.array([3, 4, 5]), 0.25),
                *be.gated_delta_rule(dq, dq, dv, g, beta, state),
                be.experts_ffn(x1[0], experts, np.array([0.5, 0.3, 0.2], np.float32))]

    monkeypatch.setattr(nb, "PARALLEL_MIN_WORK", 0)
    monkeypatch.setattr(nb._ThreadChoice, "pick", lambda self, now: True)
    pooled = run_all()
    monkeypatch.setattr(nb, "PARALLEL_MIN_WORK", 1 << 62)
    for got, want in zip(run_all(), pooled):
        np.testing.assert_array_equal(got, want)


def test_large_calls_take_the_way_measured_faster_and_retry_the_other_in_bursts():
    from flashmoe.backends.numba_backend import _ThreadChoice

    choice = _ThreadChoice()
    n = choice.BURST

    def call(now: float, pool_s: float, alone_s: float) -> bool:
        parallel = choice.pick(now)
        choice.record(parallel, now, pool_s if parallel else alone_s, 1)
        return parallel

    assert call(0.0, 9.0, 9.0)  # the first call (it compiles) is not timed
    assert [call(0.01 * i, 8e-3, 1e-3) for i in range(1, 2 * n + 1)] == [True, False] * n  # both ways, in turn
    assert choice.faster() is False  # the pool was 8x slower
    assert not any(call(0.1 + 0.01 * i, 8e-3, 1e-3) for i in range(100))  # one thread for RETRY_S
    t = 0.01 * 2 * n + choice.RETRY_S  # RETRY_S after the pool's last call, at 0.01 * (2n - 1)
    # The machine goes idle: the pool's retry burst is 10x faster than one thread, so it takes over, and
    # one thread is retried in a burst of its own (its last burst was RETRY_S ago).
    assert [call(t + 0.01 * i, 1e-4, 1e-3) for i in range(n)] == [True] * n
    assert choice.faster() is True
    assert [call(t + 0.1 + 0.001 * i, 1e-4, 1e-3) for i in range(100)] == [False] * n + [True] * (100 - n)
    # One stall of the pool among its calls of the last WINDOW_S seconds costs what it weighs on average.
    assert all(call(t + 0.2 + 0.001 * i, 5e-3 if i == 50 else 1e-4, 1e-3) for i in range(100))
    assert choice.faster() is True
    # The machine gets busy: every other parallel region stalls; one thread takes over.
    t += 3.0
    for i in range(50):
        call(t + 0.001 * i, 5e-3 if i % 2 else 1e-4, 1e-3)
    assert choice.faster() is False
