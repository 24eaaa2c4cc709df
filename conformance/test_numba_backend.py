"""What the numba backend promises beyond matching the reference: streamed weights are used in place, bad
indices are refused before a kernel (which does not bounds-check) could read outside an array, experts
of either format (affine, MXFP4) take the fused kernels, and experts the fused kernels cannot take still run."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba", reason="the numba backend needs numba")

from flashmoe.backends import get_backend, numba_prefill  # noqa: E402
from flashmoe.backends.base import Backend, BackendError  # noqa: E402
from flashmoe.backends.numba_backend import _as_weight  # noqa: E402
from flashmoe.conformance.op_cases import (CLAMPED_ACT, MXFP4, make_expert_views, make_packed_experts,  # noqa: E402
                                           make_weight)


def test_bf16_expert_is_used_in_place_without_copying_words_or_scales():
    expert = make_expert_views(np.random.default_rng(0), 128, 64, 4, 64, "bfloat16")
    for name, qt in expert.items():
        kw = _as_weight(qt, name)
        assert np.shares_memory(kw.words, qt.weight), name
        assert np.shares_memory(kw.scales, qt.scales) and np.shares_memory(kw.biases, qt.biases), name
        assert kw.scale == "bf16"


def test_embed_refuses_token_ids_outside_the_vocabulary():
    w = make_weight(np.random.default_rng(0), 10, 64, 4, 64, "bfloat16")
    with pytest.raises(BackendError, match=r"token ids 3\.\.10 outside 0\.\.9"):
        get_backend("numba").embed(np.array([3, 10]), w)


def test_attention_refuses_query_positions_beyond_the_cache():
    q = np.zeros((1, 2, 8), np.float32)
    kv = np.zeros((4, 1, 8), np.float32)
    with pytest.raises(BackendError, match="query positions 4..4 outside the 4 cached keys"):
        get_backend("numba").attention(q, kv, kv, np.array([4]), 1.0)


@pytest.mark.parametrize("activations", ["float", "q8"])
def test_experts_of_mixed_widths_run_one_by_one_and_match_the_reference(activations):
    rng = np.random.default_rng(1)
    experts = [make_expert_views(rng, 128, 64, bits, 64, "bfloat16") for bits in (4, 8)]
    x = rng.standard_normal(128).astype(np.float32)
    weights = np.array([0.7, 0.3], np.float32)
    got = get_backend("numba", activations).experts_ffn(x, experts, weights)
    want = get_backend("numpy", activations).experts_ffn(x, experts, weights)
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


@pytest.mark.parametrize("activations", ["float", "q8"])
@pytest.mark.parametrize("bits,group_size,sdtype", [(4, 64, "bfloat16"), (8, 32, "float32"), (3, 32, "float16"),
                                                    (4, 32, None)])
def test_packed_experts_take_the_fused_kernels_by_address_and_match_their_views(activations, bits, group_size, sdtype):
    """packed_experts_ffn (the engine's decode call: the store's buffers and their layout) gives the bits of
    experts_ffn on the layout's views, whether the fused kernels take the layout by address (4/8 bits,
    bf16 or float32 scales) or it goes through the views (float16 scales, float experts)."""
    from flashmoe.backends import numba_experts

    rng = np.random.default_rng(3)
    layout, buffers = make_packed_experts(rng, 3, bits if sdtype else None, group_size, sdtype or "float32")
    x = rng.standard_normal(128).astype(np.float32)
    weights = np.array([0.5, 0.3, 0.2], np.float32)
    be = get_backend("numba", activations)
    got = be.packed_experts_ffn(x, buffers, layout, weights)
    np.testing.assert_array_equal(got, be.experts_ffn(x, [layout.view(b) for b in buffers], weights))
    assert (numba_experts.layout_plan(layout) is not None) == (sdtype in ("bfloat16", "float32"))


@pytest.mark.parametrize("bits", [MXFP4, 4])
def test_experts_with_biases_and_the_clamped_swiglu_take_the_fused_kernels_by_address(bits):
    """gpt-oss's packed experts (MXFP4, or converted to affine; biases; the clamped SwiGLU) go to the fused
    kernels by address (numba_experts.layout_plan) with the bits of experts_ffn on their views."""
    from flashmoe.backends import numba_experts

    layout, buffers = make_packed_experts(np.random.default_rng(5), 3, bits, 32, "bfloat16", biases=True)
    x = np.random.default_rng(6).standard_normal(128).astype(np.float32)
    weights = np.array([0.5, 0.3, 0.2], np.float32)
    assert numba_experts.layout_plan(layout) is not None
    for mode in ("float", "q8"):
        be = get_backend("numba", mode)
        got = be.packed_experts_ffn(x, buffers, layout, weights, act=CLAMPED_ACT)
        np.testing.assert_array_equal(got, be.experts_ffn(x, [layout.view(b) for b in buffers], weights,
                                                          act=CLAMPED_ACT))


@pytest.mark.parametrize("bits,group_size,sdtype,biases", [(4, 64, "bfloat16", False), (MXFP4, 32, "bfloat16", True)])
@pytest.mark.parametrize("call_bytes", [64 << 20, 1])
def test_a_prompts_experts_in_one_batch_match_the_q8_reference(bits, group_size, sdtype, biases, call_bytes,
                                                               monkeypatch):
    """packed_experts_prefill (a prompt's experts: numba_prefill's grouped kernels) against the NumPy q8
    reference expert by expert, with tokens per expert that fill tiles and leave remainders (the row dots
    are numba_q8's, whose other widths test_numba_q8 covers), in one call or one call per expert."""
    monkeypatch.setattr(numba_prefill, "CALL_BYTES", call_bytes)
    rng = np.random.default_rng(7)
    layout, buffers = make_packed_experts(rng, 3, bits, group_size, sdtype, biases=biases)
    x = rng.standard_normal((11, 128)).astype(np.float32)
    tokens = [np.array(t, np.int64) for t in ([0, 1, 2, 3, 4, 5, 6, 7, 8], [3], [1, 4, 9, 10, 2])]
    weights = [rng.random(len(t)).astype(np.float32) for t in tokens]
    y0 = rng.standard_normal((11, 128)).astype(np.float32)
    act = CLAMPED_ACT if biases else None
    got, want = y0.copy(), y0.copy()
    get_backend("numba", "q8").packed_experts_prefill(x, buffers, layout, tokens, weights, got, act=act)
    get_backend("numpy", "q8").packed_experts_prefill(x, buffers, layout, tokens, weights, want, act=act)
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want - y0))


def test_packed_experts_shorter_than_their_layout_are_refused_by_the_views():
    layout, buffers = make_packed_experts(np.random.default_rng(4), 2, 4, 64, "bfloat16")
    with pytest.raises(ValueError):
        get_backend("numba").packed_experts_ffn(np.zeros(128, np.float32), [buffers[0], buffers[1][:100]], layout,
                                                np.ones(2, np.float32))


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


def test_prange_only_kernels_keep_their_options_in_every_specialisation():
    """Each specialisation of a PRANGE_ONLY kernel (here a read-only argument's, compiled second) has its prange
    loop as its one parallel region: numba pops the keys of a dict option on the first compile, which left the
    attention block's second specialisation with a region per array expression (4 ms a layer at 2 threads)."""
    import re

    from numba import njit, prange

    from flashmoe.backends.numba_packed import PRANGE_ONLY

    @njit(parallel=PRANGE_ONLY)
    def kernel(a, b, out):
        out[:] = b[0]  # an array expression: its own parallel region under plain parallel=True
        for i in prange(out.shape[0]):
            out[i] += a[i]

    a, out = np.ones(64, np.float32), np.empty(64, np.float32)
    readonly = np.full(3, 2.0, np.float32)
    readonly.flags.writeable = False
    for b in (np.full(3, 2.0, np.float32), readonly):
        kernel(a, b, out)
        np.testing.assert_array_equal(out, 3.0)
    assert len(kernel.signatures) == 2
    for sig in kernel.signatures:
        assert len(re.findall(r"call .*do_scheduling", kernel.inspect_llvm(sig))) == 1, sig


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
    pooled = run_all()
    monkeypatch.setattr(nb, "PARALLEL_MIN_WORK", 1 << 62)
    for got, want in zip(run_all(), pooled):
        np.testing.assert_array_equal(got, want)



@pytest.mark.parametrize("pooled", [False, True], ids=["one-thread", "pool"])
def test_the_attention_block_over_a_cache_of_several_chunks_gives_the_bits_of_its_composition(pooled, monkeypatch):
    """A decode token's query heads over a cache longer than numba_attention.CHUNK split into (kv head, chunk)
    items whose sums merge; the block (query heads on the pool or the calling thread) and the separate
    attention call split at the same positions, so they give the same bits."""
    import flashmoe.backends.numba_backend as nb
    from flashmoe.backends.numba_attention import CHUNK
    from flashmoe.conformance.op_cases import OpCase, attention_block_inputs

    be = get_backend("numba", "q8")
    case = OpCase.of("attention_block", 0, tokens=1, cached=3 * CHUNK + 5, hidden=128, heads=8, kv_heads=2,
                     head_dim=32, bits=4, group_size=64, sdtype="bfloat16")
    x, block, keys, values, positions = attention_block_inputs(np.random.default_rng(5), case.p)
    monkeypatch.setattr(nb, "PARALLEL_MIN_WORK", 0 if pooled else 1 << 62)

    def run(method):
        cache = be.new_kv_cache(block.kv_heads, block.head_dim)
        cache.append(keys, values)
        return method(be, x, block, cache, positions), cache.k[: cache.length].copy()

    (fused, k_fused), (composed, k_composed) = run(type(be).attention_block), run(Backend.attention_block)
    np.testing.assert_array_equal(k_fused, k_composed)
    np.testing.assert_array_equal(fused, composed)


@pytest.mark.parametrize("bits", [MXFP4, 4])
def test_experts_with_biases_and_the_clamped_swiglu_take_the_fused_kernels(bits, monkeypatch):
    """Experts with biases and the clamped SwiGLU (gpt-oss), in MXFP4 or converted to affine, run in the
    fused k-expert kernels like any other (two parallel regions per layer): Backend.expert_ffn is not called."""
    rng = np.random.default_rng(3)
    experts = [make_expert_views(rng, 128, 64, bits, 32, "bfloat16", 64 * e, biases=True) for e in range(3)]
    weights = np.array([0.5, 0.3, 0.2], np.float32)
    x = rng.standard_normal(128).astype(np.float32)
    for mode in ("float", "q8"):
        want = get_backend("numpy", mode).experts_ffn(x, experts, weights, act=CLAMPED_ACT)
        with monkeypatch.context() as m:
            m.setattr(Backend, "expert_ffn", lambda *a, **k: pytest.fail("an expert ran on its own"))
            got = get_backend("numba", mode).experts_ffn(x, experts, weights, act=CLAMPED_ACT)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_the_fused_norms_give_the_bits_of_the_norm_and_rope_calls_they_replace(rotary_dim):
    """add_rms_norm and qk_norm_rope in one kernel each (numba_norms) against Backend's compositions of
    rms_norm and rope, the numba backend's own: the same bits, partial rotary too (the recorded greedy outputs
    depend on it)."""
    rng = np.random.default_rng(8)
    be = get_backend("numba")
    q, k = (rng.standard_normal((3, h, 16)).astype(np.float32) * 3 for h in (4, 2))
    wq, wk = (rng.standard_normal(16).astype(np.float32) for _ in range(2))
    positions = np.array([0, 7, 30000])
    got = be.qk_norm_rope(q, k, wq, wk, 1e-6, positions, 1e6, rotary_dim)
    want = Backend.qk_norm_rope(be, q, k, wq, wk, 1e-6, positions, 1e6, rotary_dim)
    h, d = (rng.standard_normal((2, 96)).astype(np.float32) for _ in range(2))
    w = rng.standard_normal(96).astype(np.float32)
    for g, x in zip([*got, *be.add_rms_norm(h, d, w, 1e-5)], [*want, *Backend.add_rms_norm(be, h, d, w, 1e-5)]):
        np.testing.assert_array_equal(g, x)
