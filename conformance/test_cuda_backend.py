"""The CUDA backend (backends/cuda_backend.py, cuda_arrays.py, cuda_staging.py): its kernels against the NumPy
reference, its array glue, streamed experts in pinned buffers, and a whole engine forward pass against the NumPy backend.

Where this process can run the backend (a GPU, or ``NUMBA_ENABLE_CUDASIM=1``) the tests run here; on a GPU
the op cases are the full conformance suite, in the simulator tiny cases (every operation, bit width and
scale dtype) because the simulator runs each GPU thread as a Python thread. Without either (CI), the last
test runs this file again in a subprocess under the simulator, so the kernels are checked on every machine
that has numba-cuda installed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flashmoe.backends import available_backends, get_backend
from flashmoe.conformance.op_cases import (CLAMPED_ACT, OpCase, array_glue_mismatches, full_cases,
                                           make_expert_views, make_weight, mxfp4_extremes_excess, run_case)
from flashmoe.format.manifest import MXFP4

WHY_NOT = available_backends()["cuda"]
HERE = pytest.mark.skipif(
    WHY_NOT is not None,
    reason=f"the cuda backend cannot run in this process ({WHY_NOT}); test_kernels_in_the_simulator runs these "
           "tests in a subprocess under NUMBA_ENABLE_CUDASIM=1")


def _simulator() -> bool:
    from flashmoe.backends import cuda_kernels

    return cuda_kernels.SIMULATOR


if WHY_NOT is None and _simulator():
    # The simulator's scheduler polls its block's threads in a loop that holds the GIL for the default 5 ms
    # switch interval at a time; a 0.1 ms interval makes these tests ~8x faster (measured 93 s -> 11 s).
    sys.setswitchinterval(1e-4)


def _tiny_cases() -> list[OpCase]:
    c = OpCase.of
    cases = [c("linear", tokens=1, out=6, inp=64, bits=b, group_size=32, sdtype=s)
             for b, s in [(2, "bfloat16"), (3, "float16"), (4, "bfloat16"), (6, "float32"), (8, "float16")]]
    cases += [c("linear", tokens=2, out=5, inp=128, bits=4, group_size=128, sdtype="float32"),
              c("linear", tokens=2, out=5, inp=64, bits=6, group_size=16, sdtype="float32"),
              c("linear", tokens=2, out=3, inp=320, bits=4, group_size=64, sdtype="bfloat16"),  # 2.5 passes
              c("linear", tokens=1, out=5, inp=64, bits=2, group_size=16, sdtype="float32"),
              c("linear", tokens=2, out=5, inp=40, bits=None),
              c("embed", tokens=3, vocab=20, hidden=64, bits=3, group_size=64, sdtype="bfloat16"),
              c("embed", tokens=2, vocab=9, hidden=64, bits=6, group_size=16, sdtype="float32"),
              c("embed", tokens=2, vocab=9, hidden=16, bits=None),
              c("rms_norm", tokens=2, n=70, scale=10.0),
              c("rope", tokens=2, heads=2, head_dim=24, rotary_dim=8, theta=1e7, max_position=40000),
              c("attention", tokens=2, cached=5, heads=4, kv_heads=2, head_dim=8),
              c("attention", tokens=1, cached=6, heads=4, kv_heads=2, head_dim=8, sinks=True),
              c("causal_conv1d", tokens=3, channels=10, kernel=4),
              c("gated_delta_rule", tokens=2, k_heads=2, rep=2, dk=8, dv=5),
              c("gated_delta_net", tokens=2, k_heads=2, rep=2, dk=8, dv=5),
              c("rms_norm_gated", tokens=2, heads=2, n=12),
              c("silu_mul", tokens=2, n=20),
              c("add_sigmoid_gated", tokens=2, n=20),
              c("add_sigmoid_gated", tokens=2, n=20, per_row=False),
              c("expert_ffn", tokens=2, hidden=64, inter=32, bits=4, group_size=32, sdtype="bfloat16"),
              c("expert_ffn", tokens=2, hidden=32, inter=16, bits=None),
              c("experts_ffn", k=3, hidden=64, inter=32, bits=4, group_size=32, sdtype="bfloat16"),
              c("experts_ffn", k=2, hidden=32, inter=32, bits=6, group_size=32, sdtype="float16"),
              c("experts_ffn", k=2, hidden=32, inter=32, bits=3, group_size=16, sdtype="float32"),
              c("experts_ffn", k=2, hidden=32, inter=16, bits=None)]
    cases += [c(op, tokens=2, n=20) for op in ("sigmoid", "silu", "softplus", "l2_normalize")]
    cases += [c("linear", tokens=t, out=5, inp=64, bits=MXFP4) for t in (1, 3)]
    cases += [c("expert_ffn", tokens=2, hidden=64, inter=32, bits=MXFP4, act=True),
              c("experts_ffn", k=2, hidden=64, inter=32, bits=MXFP4, act=True)]
    return cases + [c("clip", tokens=2, n=20, limit=2.0)]


def _cases() -> list[OpCase]:
    if WHY_NOT is not None or _simulator():
        return _tiny_cases()
    # the cuda backend computes float activations only (q8 cases are for the CPU backends; run_cases skips them too)
    return [c for c in full_cases() if c.p.get("activations", "float") == "float"]


@HERE
@pytest.mark.parametrize("case", _cases(), ids=str)
def test_op_matches_reference(case: OpCase):
    result = run_case("cuda", case)
    assert result.passed, result.describe()


@pytest.fixture(scope="module")
def be():
    return get_backend("cuda")


@HERE
def test_mxfp4_linear_over_every_code_and_extreme_scales(be):
    assert mxfp4_extremes_excess(be) <= 1


@HERE
def test_array_glue_runs_on_the_device_and_matches_numpy(be):
    from flashmoe.backends.cuda_arrays import DeviceArray

    assert array_glue_mismatches(be) == []
    d = be.asarray(np.ones((2, 3), np.float32))
    assert all(isinstance(a, DeviceArray) for a in (be.add(d, 1.0), be.reshape(d, (3, 2)), be.rows(d, 0, 1),
                                                    *be.split(d, (1, 2)), be.gather_rows(d, [1])))


@HERE
@pytest.mark.parametrize("values", [True, False], ids=["keys-values", "keys-only"])
def test_kv_cache_lives_on_the_device_and_grows_and_cuts_like_the_numpy_one(be, values):
    from flashmoe.backends.base import BackendError, KVCacheBuffer
    from flashmoe.backends.cuda_arrays import DeviceArray, DeviceKVCacheBuffer

    rng = np.random.default_rng(4)
    assert isinstance(be.new_kv_cache(2, 4, values=values), DeviceKVCacheBuffer)
    assert (be.new_kv_cache(2, 4, values=values).v is None) == (not values)
    dev, ref = DeviceKVCacheBuffer(2, 4, capacity=2, values=values), KVCacheBuffer(2, 4, capacity=2, values=values)
    for step, T in enumerate([3, 1, 1, 2, 1]):  # grows from 2 positions past 8
        if step == 3:
            dev.length = ref.length = 3  # a chat session rewinding to a common prefix
        k, v = (rng.standard_normal((T, 2, 4)).astype(np.float32) for _ in range(2))
        if not values:  # keys only (absorbed MLA's latent): the keys are the values
            got, want = dev.append(be.asarray(k)), ref.append(k)
            np.testing.assert_array_equal(want[0], want[1])
        else:
            got, want = dev.append(be.asarray(k), be.asarray(v)), ref.append(k, v)
        assert dev.length == ref.length
        for g, w in zip(got, want):
            assert isinstance(g, DeviceArray) and g.shape == w.shape
            np.testing.assert_array_equal(be.to_numpy(g), w)
    with pytest.raises(BackendError, match="per position"):
        dev.append(be.asarray(np.zeros((1, 3, 4), np.float32)), be.asarray(np.zeros((1, 3, 4), np.float32)))


@HERE
def test_launches_after_the_first_skip_numbas_dispatcher(be):
    from flashmoe.backends import cuda_arrays

    x = np.random.default_rng(5).standard_normal((3, 40)).astype(np.float32)
    w = np.linspace(0.5, 1.5, 40, dtype=np.float32)
    want = be.to_numpy(be.rms_norm(x, w, 1e-6))  # first launch: numba compiles; the plan is made
    plans = [p for key, p in cuda_arrays._PLANS.items() if key[0] is cuda_arrays.K.rms_norm]
    if _simulator():  # simulated kernels have no driver function to launch: numba's own path, no plans
        assert cuda_arrays._DIRECT is None and not plans
    else:
        assert plans and all(p is not None for p in plans)
    np.testing.assert_array_equal(be.to_numpy(be.rms_norm(x, w, 1e-6)), want)  # through the plan on a GPU


@HERE
def test_small_uploads_through_the_pinned_ring_survive_its_wrapping(be):
    from flashmoe.backends.cuda_arrays import _Uploads

    uploads = _Uploads(nbytes=1024)
    rng = np.random.default_rng(6)
    sent = [rng.standard_normal(n).astype(np.float32) for n in (40, 60, 7, 64, 50, 3, 64, 30)]
    sent.append(np.arange(5, dtype=np.int64))
    got = [uploads(a) for a in sent]
    assert uploads.at < sum(-(-a.nbytes // 64) * 64 for a in sent)  # the ring was reused from its start
    for a, d in zip(sent, got):
        assert d.dtype == a.dtype
        np.testing.assert_array_equal(d.copy_to_host(), a)


@HERE
def test_experts_in_one_pinned_buffer_cross_in_one_copy_each(be):
    rng = np.random.default_rng(1)
    hidden, inter, k = 64, 32, 3
    experts = [make_expert_views(rng, hidden, inter, 4, 32, "bfloat16") for _ in range(k)]
    nbytes = 8192
    bufs = [be.allocate_buffer(nbytes) for _ in range(k)]
    assert all(b.ctypes.data % 4096 == 0 and b.nbytes == nbytes and b.flags.writeable for b in bufs)
    views = []
    for e, buf in zip(experts, bufs):  # lay each expert out in its pinned buffer as the store would
        offset, v = 0, {}
        for name, t in e.items():
            parts = []
            for a in (t.weight, t.scales, t.biases):
                buf[offset:offset + a.nbytes] = a.reshape(-1).view(np.uint8)
                parts.append(buf[offset:offset + a.nbytes].view(a.dtype).reshape(a.shape))
                offset += -(-a.nbytes // 64) * 64
            v[name] = type(t)(*parts, t.bits, t.group_size)
        views.append(v)
    x = rng.standard_normal(hidden).astype(np.float32)
    weights = np.array([0.5, 0.3, 0.2], np.float32)
    copies = be.expert_cache_stats["copies"]
    got = be.to_numpy(be.experts_ffn(x, views, weights))
    assert be.expert_cache_stats["copies"] - copies == k
    want = get_backend("numpy").experts_ffn(x, experts, weights)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@HERE
def test_experts_staged_as_their_reads_land_give_experts_ffns_sum(be):
    """CudaBackend.experts_as_read, the engine's way for experts read into host buffers: each expert put is
    copied at once into a staging slot (no VRAM tier) or its tier slot, in any order; held experts are not
    put (none at all when the tier holds every one); the sum is the NumPy backend's experts_ffn."""
    from flashmoe.format.manifest import ExpertLayout

    rng = np.random.default_rng(4)
    hidden, inter = 64, 32
    experts = [make_expert_views(rng, hidden, inter, 4, 32, "bfloat16") for _ in range(4)]
    layout = ExpertLayout.plan(experts[0])
    bufs = []
    for e in experts:  # each expert packed into a pinned buffer, as the store reads it
        bufs.append(be.allocate_buffer(layout.stride))
        layout.pack(e, bufs[-1])
    x = rng.standard_normal(hidden).astype(np.float32)
    ref = get_backend("numpy")

    def run(ids, put, weights):
        staging = be.experts_as_read(layout, [(3, e) for e in ids], weights)
        for i in put:
            staging.put(i, bufs[ids[i]])
        got = be.to_numpy(staging.finish(be.asarray(x)))
        staging.wait()
        want = ref.experts_ffn(x, [experts[e] for e in ids], weights)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

    w3, w2 = np.array([0.5, 0.3, 0.2], np.float32), np.array([0.6, 0.4], np.float32)
    run([0, 1, 2], [2, 0, 1], w3)  # no tier: staging slots 0..2
    be.configure_expert_cache(4 * layout.stride, "lru")
    try:
        before = dict(be.expert_cache_stats)
        run([0, 1, 2], [1, 2, 0], w3)  # three misses, each copied as it is put
        assert all(be.has_expert((3, e)) for e in (0, 1, 2)) and not be.has_expert((3, 3))
        run([3, 1], [0], w2)  # expert 1 held: only 3 is put
        run([2, 0], [], w2)  # both held: nothing put, nothing copied
        stats = {k: v - before[k] for k, v in be.expert_cache_stats.items()}
        assert stats == {"gpu_hits": 3, "gpu_misses": 4, "bytes_copied": stats["bytes_copied"], "copies": 4}
    finally:
        be.configure_expert_cache(0)


@HERE
@pytest.mark.parametrize("bits", [4, MXFP4])  # MXFP4: gpt-oss's experts as published, with biases
def test_gpu_expert_cache_keeps_experts_by_key_and_evicts_by_policy(be, bits):
    from flashmoe.backends.base import BackendError

    rng = np.random.default_rng(2)
    hidden, inter = 64, 32
    act = CLAMPED_ACT if bits == MXFP4 else None
    experts = {e: make_expert_views(rng, hidden, inter, bits, 32, "bfloat16", biases=act is not None)
               for e in range(4)}
    x = rng.standard_normal(hidden).astype(np.float32)
    ref = get_backend("numpy")

    def check(ids, given, weights):
        got = be.to_numpy(be.experts_ffn(x, [experts[e] if e in given else None for e in ids], weights,
                                         keys=[(7, e) for e in ids], act=act))
        want = ref.experts_ffn(x, [experts[e] for e in ids], weights, act=act)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())

    stride = -(-sum(t.nbytes + 3 * 64 for t in experts[0].values()) // 256) * 256  # an upper bound
    be.configure_expert_cache(2 * stride, "lru")  # room for 2 experts (the views are 64-byte aligned)
    try:
        w = np.array([0.7, 0.3], np.float32)
        before = dict(be.expert_cache_stats)
        check([0, 1], {0, 1}, w)  # two misses: both copied
        assert be.has_expert((7, 0)) and be.has_expert((7, 1)) and not be.has_expert((7, 2))
        check([1, 0], set(), w)  # two hits: passed as None, nothing copied
        check([2, 1], {2}, w)  # expert 2 evicts the least recently used, 0
        assert not be.has_expert((7, 0)) and be.has_expert((7, 2))
        stats = {k: v - before[k] for k, v in be.expert_cache_stats.items()}
        assert stats == {"gpu_hits": 3, "gpu_misses": 3, "bytes_copied": stats["bytes_copied"], "copies": 3}
        got = be.to_numpy(be.expert_ffn(x[None], None, key=(7, 2), act=act))  # one expert, from the cache
        np.testing.assert_allclose(got, ref.expert_ffn(x[None], experts[2], act=act), rtol=1e-4, atol=1e-5)
        with pytest.raises(BackendError, match="one token needs 3"):
            check([0, 1, 3], {0, 1, 3}, np.array([0.5, 0.3, 0.2], np.float32))
    finally:
        be.configure_expert_cache(0)


_HYBRID_TINY = dict(model_type="qwen3_5_moe_text", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16,
                    linear_value_head_dim=16, linear_num_key_heads=1, linear_num_value_heads=2, num_experts=4,
                    num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                    vocab_size=48, full_attention_interval=2)


def _two_layers(arch: str) -> dict:
    """model_cases' tiny ``arch`` cut to two layers: each kind of layer still there once (qwen3_moe: MoE;
    deepseek_v3: the dense first layer, then MoE; gpt_oss: sliding, then full attention). The simulator runs
    every GPU thread as a Python thread, so each layer cost seconds of CPU per forward pass."""
    from flashmoe.conformance.model_cases import TINY_CONFIGS

    return dict(TINY_CONFIGS[arch], num_hidden_layers=2)


@HERE
@pytest.mark.parametrize("n_experts,k,norm", [(9, 3, True), (40, 5, False), (512, 10, True)])
def test_router_top_k_on_the_device_matches_the_reference(n_experts, k, norm):
    from numba import cuda

    from flashmoe.backends import cuda_fused, cuda_kernels
    from flashmoe.reference.routing import softmax_topk

    rng = np.random.default_rng(n_experts)
    logits = rng.standard_normal(n_experts).astype(np.float32)
    logits[3] = logits[7] = logits.max() + 1  # a tie: the lower id comes first
    slot_of = rng.permutation(n_experts).astype(np.int64)
    ids, slots = cuda.to_device(np.full(k + 2, -1, np.int64)), cuda.to_device(np.full(k, -1, np.int64))
    weights = cuda.to_device(np.full(k, np.nan, np.float32))
    kernel = cuda_fused.softmax_topk(cuda_fused.per_lane(n_experts))
    kernel[1, (cuda_kernels.LANES, 1)](cuda.to_device(logits), n_experts, k, int(norm), cuda.to_device(slot_of), ids,
                                       2, slots, weights)
    want_ids, want_w = softmax_topk(logits[None], type("Cfg", (), {"norm_topk_prob": norm})(), k)
    np.testing.assert_array_equal(ids.copy_to_host(), [-1, -1, *want_ids[0]])
    np.testing.assert_array_equal(slots.copy_to_host(), slot_of[want_ids[0]])
    np.testing.assert_allclose(weights.copy_to_host(), want_w[0], rtol=1e-5)


@HERE
def test_attention_reads_only_the_positions_up_to_the_query(be):
    """A replayed decode graph passes the KV cache's whole capacity: positions past the query's (NaN here)
    must not be read."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 4, 8)).astype(np.float32)
    k, v = (rng.standard_normal((9, 2, 8)).astype(np.float32) for _ in range(2))
    k[6:], v[6:] = np.nan, np.nan
    got = be.to_numpy(be.attention(be.asarray(q), be.asarray(k), be.asarray(v), np.array([5]), 0.3))
    want = get_backend("numpy").attention(q, k[:6], v[:6], np.array([5]), 0.3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@HERE
def test_every_thread_of_a_block_shares_its_shared_arrays_in_the_simulator(be, monkeypatch):
    """numba's simulator makes a block's shared array when its first thread reaches the line; a thread that
    lost the GIL in between got an array of its own (backends/cuda_kernels.py replaces that step). NumPy's
    allocation made slow here hands the GIL over at exactly that point: every lane must still see the row's
    sum."""
    if not _simulator():
        pytest.skip("a GPU has real shared memory: this checks numba's simulator")
    import time

    empty = np.empty

    def slow_empty(*args, **kwargs):
        time.sleep(1e-3)
        return empty(*args, **kwargs)

    x = np.arange(1, 71, dtype=np.float32).reshape(1, 70)
    w = np.ones(70, np.float32)
    monkeypatch.setattr(np, "empty", slow_empty)
    got = be.to_numpy(be.rms_norm(be.asarray(x), be.asarray(w), 1e-6))
    monkeypatch.undo()
    np.testing.assert_allclose(got, get_backend("numpy").rms_norm(x, w, 1e-6), rtol=1e-5)


@HERE
@pytest.mark.parametrize("n", [70, 9000])  # 9000: past the features a block holds in registers, GPU and simulator
def test_add_rms_norm_is_the_add_then_the_norm(be, n):
    rng = np.random.default_rng(4)
    h, d = (rng.standard_normal((3, n)).astype(np.float32) for _ in range(2))
    w = rng.standard_normal(n).astype(np.float32)
    total, normed = be.add_rms_norm(be.asarray(h), be.asarray(d), be.asarray(w), 1e-6)
    ref = get_backend("numpy")
    np.testing.assert_allclose(be.to_numpy(total), h + d, rtol=1e-6)
    np.testing.assert_allclose(be.to_numpy(normed), ref.rms_norm(h + d, w, 1e-6), rtol=1e-5, atol=1e-6)


@HERE
def test_linears_of_one_input_run_three_to_a_launch_and_match_the_reference(be):
    """Four weights of one format: a launch of three (rows of each in their own blocks), then one."""
    rng = np.random.default_rng(7)
    ws = [make_weight(rng, out, 64, 4, 32, "bfloat16") for out in (5, 3, 7, 2)]
    x = rng.standard_normal((2, 64)).astype(np.float32)
    ref = get_backend("numpy")
    for got, w in zip(be.linears(be.asarray(x), ws), ws):
        np.testing.assert_allclose(be.to_numpy(got), ref.linear(x, w), rtol=1e-5, atol=1e-5)


@HERE
@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_qk_norm_rope_is_the_head_norms_then_rope(be, rotary_dim):
    """One launch for both tensors against the NumPy backend's rms_norm then rope (partial rotary too)."""
    rng = np.random.default_rng(6)
    q, k = (rng.standard_normal((2, h, 16)).astype(np.float32) * 3 for h in (4, 2))
    wq, wk = (rng.standard_normal(16).astype(np.float32) for _ in range(2))
    positions = np.array([7, 30000])
    got = be.qk_norm_rope(be.asarray(q), be.asarray(k), be.asarray(wq), be.asarray(wk), 1e-6, positions, 1e6,
                          rotary_dim)
    want = get_backend("numpy").qk_norm_rope(q, k, wq, wk, 1e-6, positions, 1e6, rotary_dim)
    for g, w in zip(got, want):
        np.testing.assert_allclose(be.to_numpy(g), w, rtol=1e-5, atol=1e-5)


@HERE
def test_affine_experts_with_biases_stay_out_of_the_vram_tier():
    """gpt-oss converted to affine (--expert-bits) with a VRAM tier and --preload: the tier's affine kernels
    have no expert bias, so such experts are not held (has_expert stays false and the engine passes them,
    never None) and compute as the NumPy backend does."""
    be, rng = get_backend("cuda"), np.random.default_rng(4)
    experts = [make_expert_views(rng, 64, 64, 4, 32, "bfloat16", 64 * e, biases=True) for e in range(2)]
    keys, weights, x = [(0, 0), (0, 1)], np.array([0.7, 0.3], np.float32), rng.standard_normal(64).astype(np.float32)
    be.configure_expert_cache(1 << 20)
    try:
        be.hold_experts(experts, keys)  # what Engine.preload_experts does
        passed = [None if be.has_expert(key) else e for key, e in zip(keys, experts)]  # as Engine._moe_decode
        got = be.to_numpy(be.experts_ffn(x, passed, weights, keys, act=CLAMPED_ACT))
    finally:
        be.configure_expert_cache(0)
    want = get_backend("numpy").experts_ffn(x, experts, weights, act=CLAMPED_ACT)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@HERE
@pytest.mark.parametrize("arch", ["qwen3_5_moe", "deepseek_v3", "gpt_oss"])
def test_engine_forward_matches_the_numpy_backend(tmp_path, arch):
    """Hybrid attention; MLA (absorbed, latent cache) with sigmoid group routing; gpt-oss's MXFP4 experts
    staged on the device."""
    from flashmoe.bench.bench_cuda import build_engine
    from flashmoe.convert.synth import synth_model

    config = _HYBRID_TINY if arch == "qwen3_5_moe" else _two_layers(arch)
    model = synth_model(tmp_path / "tiny", config, bits=4, group_size=32, seed=3)
    tokens = np.array([5, 17])
    logits = {}
    for name in ("numpy", "cuda"):
        engine = build_engine(model, name)
        state = engine.new_state()
        prefill = engine.forward(tokens, state)
        decode = engine.forward(np.array([9]), state)
        logits[name] = np.concatenate([prefill, decode])
        engine.store.close()
    want = logits["numpy"]
    np.testing.assert_allclose(logits["cuda"], want, rtol=0, atol=1e-4 * np.abs(want).max())


@HERE
def test_experts_not_in_vram_computed_on_the_cpu_join_the_gpus(tmp_path):
    """--expert-device auto with a VRAM tier of 3 experts (k = 2 of 8): each MoE layer's missing experts run
    either on the GPU (copied) or with numba on the CPU beside the held ones; 'auto' tries both ways (two MoE
    layers each, the first uncounted) before it compares their rates: 2 one-token steps of 3 MoE layers.
    Logits as the NumPy backend's."""
    from flashmoe.bench.bench_cuda import build_engine
    from flashmoe.conformance.model_cases import TINY_CONFIGS
    from flashmoe.convert.synth import synth_model
    from flashmoe.format.modeldir import ModelDir

    model = synth_model(tmp_path / "tiny", TINY_CONFIGS["mixtral"], bits=4, group_size=32, seed=3)
    prompt, decode = np.array([5]), [9]
    cache = 3 * (ModelDir.open(model).layout.stride + 256)
    logits = {}
    for name in ("numpy", "cuda"):
        engine = build_engine(model, name, gpu_memory=cache if name == "cuda" else 0,
                              expert_device="auto" if name == "cuda" else "gpu")
        state = engine.new_state()
        out = [engine.forward(prompt, state)] + [engine.forward(np.array([t]), state) for t in decode]
        logits[name] = np.concatenate(out)
        engine.store.close()
    placement = engine.placement
    assert placement.tokens[True] >= 2 and placement.tokens[False] >= 2, placement.tokens
    assert set(placement.seconds_per_byte) == {False, True}
    want = logits["numpy"]
    np.testing.assert_allclose(logits["cuda"], want, rtol=0, atol=1e-4 * np.abs(want).max())


@HERE
@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen3_moe"])
def test_decode_with_every_expert_in_vram_routes_on_the_device(tmp_path, arch):
    """Once the VRAM tier holds every expert, decode routes on the GPU (Backend.routed_experts): the same
    logits as the NumPy backend, and each layer's k experts still count as hits. On a GPU the decode steps
    after the first are replayed from a CUDA graph, also with linear attention (qwen3_5_moe: its state updated
    in place); the simulator has no graphs, so there they run eagerly."""
    from flashmoe.backends import cuda_kernels
    from flashmoe.bench.bench_cuda import build_engine
    from flashmoe.convert.synth import synth_model

    config = _HYBRID_TINY if arch == "qwen3_5_moe" else _two_layers(arch)
    model = synth_model(tmp_path / "tiny", config, bits=4, group_size=32, seed=3)
    # The simulator runs every step eagerly: two decode steps there take each path a GPU's four do (the first,
    # then the ones after it), at half the simulated threads.
    prompt, decode = np.array([5, 17]), [9, 30] if cuda_kernels.SIMULATOR else [9, 30, 2, 41]
    logits = {}
    for name in ("numpy", "cuda"):
        engine = build_engine(model, name, gpu_memory=1 << 24 if name == "cuda" else 0, preload=True)
        state = engine.new_state()
        out = [engine.forward(prompt, state)]
        if name == "cuda":
            be, cuda_engine = engine.backend, engine
            n = engine.cfg.num_experts
            assert all(be._experts.resident(layer, n) is not None for layer in engine.model_dir.moe_layers)
            before = be.expert_cache_stats
        out += [engine.forward(np.array([t]), state) for t in decode]
        logits[name] = np.concatenate(out)
        engine.store.close()
    after = be.expert_cache_stats
    per_token = len(cuda_engine.model_dir.moe_layers) * cuda_engine.k
    assert after["gpu_hits"] - before["gpu_hits"] == len(decode) * per_token
    assert after["gpu_misses"] == before["gpu_misses"] and after["copies"] == before["copies"]
    replayed = cuda_engine._recording is not None and cuda_engine._recording[1] is not None
    assert replayed == (not cuda_kernels.SIMULATOR), cuda_engine.not_recorded
    want = logits["numpy"]
    np.testing.assert_allclose(logits["cuda"], want, rtol=0, atol=1e-4 * np.abs(want).max())


#: CPU seconds the simulator run below may use: about 3x the ~300 s it used (Xeon, 2 cores); a bound on its
#: work, which a wall-clock limit is not: other processes' load stretches the wall time (950 s for those
#: 300 s of CPU at a load average of 9 on 2 cores), not the CPU time.
SIMULATOR_CPU_S = 900
#: Wall-clock seconds after which the run counts as hung: a process waiting forever uses no CPU.
SIMULATOR_HANG_S = 3600


def _limit_cpu() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CPU, (SIMULATOR_CPU_S, SIMULATOR_CPU_S + 30))  # SIGXCPU, then SIGKILL


@pytest.mark.own_numba_cache
def test_kernels_in_the_simulator(tmp_path):
    """Without a GPU here: every test above, in a subprocess under numba's CUDA simulator. The subprocess
    compiles the few CPU kernels it runs (the experts the GPU does not hold) into a numba cache of its own, so
    it may run while another process compiles into the checkout's (the suite's conformance gate: tests/conftest.py
    runs this test then, on the core the gate leaves)."""
    if WHY_NOT is None:
        pytest.skip("the cuda backend runs in this process (GPU or simulator): the tests above checked it")
    try:
        import numba.cuda  # noqa: F401
        from importlib.metadata import version

        version("numba-cuda")
    except Exception as e:
        pytest.skip(f"numba-cuda is not installed ({e}); pip install numba-cuda to check the CUDA kernels")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(Path(__file__)),
                          "-k", "not test_kernels_in_the_simulator"],
                         env=env, capture_output=True, text=True, timeout=SIMULATOR_HANG_S, preexec_fn=_limit_cpu)
    assert run.returncode != -signal.SIGXCPU, f"the simulator run used more than {SIMULATOR_CPU_S} s of CPU"
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, run.stdout[-3000:]
