"""What only the MLX backend has: MLX arrays end to end, read buffers MLX owns, the float64 RoPE table, and
the fused kernels of shaders/ with their NumPy twins.

The op-by-op comparison with the reference is the shared conformance suite's (every registered backend,
"mlx" included). On a Mac, `python -m pytest conformance/test_mlx_backend.py` checks the Metal kernels
against their twins; with MLX's CUDA back-end the same command checks the CUDA sources.
"""

from __future__ import annotations

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest

from flashmoe.backends.mlx_backend import MlxBackend, gpu_language
from flashmoe.backends.numpy_backend import NumpyBackend
from flashmoe.conformance.kernel_twins import dequant_matvec_4bit_twin, moe_combine_twin, swiglu_4bit_twin
from flashmoe.format.quant import QuantizedTensor, quantize

HIDDEN, INTER, GROUP = 256, 128, 64
NO_GPU = ("no GPU for MLX custom kernels here: mx.metal.is_available() and mx.cuda.is_available() are "
          "False, and on the CPU mx.fast.metal_kernel raises 'No Metal back-end' when called")


@pytest.fixture(scope="module")
def mlx_backend() -> MlxBackend:
    return MlxBackend()


def _expert(rng: np.random.Generator) -> dict[str, QuantizedTensor]:
    """One 4-bit expert with bf16 scales, as converted checkpoints store them."""
    def q(shape):
        return quantize((rng.standard_normal(shape) * 0.1).astype(ml_dtypes.bfloat16), 4, GROUP)
    return {"gate_proj": q((INTER, HIDDEN)), "up_proj": q((INTER, HIDDEN)), "down_proj": q((HIDDEN, INTER))}


def _parts(t: QuantizedTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return t.weight, t.scales, t.biases


# -- the twins define the kernels; the reference checks the twins (runs everywhere) -----------------------

def test_matvec_twin_is_the_reference_linear():
    rng = np.random.default_rng(0)
    w = _expert(rng)["gate_proj"]
    x = rng.standard_normal(HIDDEN).astype(np.float32)
    want = NumpyBackend().linear(x[None], w)[0]
    np.testing.assert_allclose(dequant_matvec_4bit_twin(x, *_parts(w), GROUP), want, rtol=1e-5, atol=1e-5)


def test_swiglu_twin_is_silu_gate_times_up():
    rng = np.random.default_rng(1)
    e = _expert(rng)
    x = rng.standard_normal(HIDDEN).astype(np.float32)
    nb = NumpyBackend()
    want = nb.silu(nb.linear(x[None], e["gate_proj"])) * nb.linear(x[None], e["up_proj"])
    got = swiglu_4bit_twin(x, _parts(e["gate_proj"]), _parts(e["up_proj"]), GROUP)
    np.testing.assert_allclose(got, want[0], rtol=1e-5, atol=1e-5)


def test_combine_twin_is_weighted_experts_plus_gated_shared_plus_residual():
    rng = np.random.default_rng(2)
    experts = [_expert(rng) for _ in range(3)]
    x = rng.standard_normal(HIDDEN).astype(np.float32)
    weights = np.array([0.5, 0.3, 0.2], np.float32)
    nb = NumpyBackend()
    outs = np.stack([nb.expert_ffn(x[None], e)[0] for e in experts])
    shared, residual = rng.standard_normal((2, HIDDEN)).astype(np.float32)
    want = nb.experts_ffn(x, experts, weights) + np.float32(0.25) * shared + residual
    np.testing.assert_allclose(moe_combine_twin(outs, weights, shared, 0.25, residual), want, rtol=1e-5, atol=1e-4)


# -- the kernels against their twins (on a GPU only) ------------------------------------------------------

@pytest.mark.skipif(gpu_language() is None, reason=NO_GPU)
def test_fused_kernels_match_their_twins(mlx_backend: MlxBackend):
    rng = np.random.default_rng(3)
    kern = mlx_backend.kernels
    e = _expert(rng)
    q = {name: mlx_backend._quantized(t) for name, t in e.items()}
    x = rng.standard_normal(HIDDEN).astype(np.float32)
    got = np.array(kern.dequant_matvec_4bit(mx.array(x), q["gate_proj"]))
    np.testing.assert_allclose(got, dequant_matvec_4bit_twin(x, *_parts(e["gate_proj"]), GROUP), rtol=1e-5, atol=1e-4)
    got = np.array(kern.swiglu_4bit(mx.array(x), q["gate_proj"], q["up_proj"]))
    want = swiglu_4bit_twin(x, _parts(e["gate_proj"]), _parts(e["up_proj"]), GROUP)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    outs = rng.standard_normal((4, HIDDEN)).astype(np.float32)
    shared, residual = rng.standard_normal((2, HIDDEN)).astype(np.float32)
    weights = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
    got = np.array(kern.moe_combine(mx.array(outs), mx.array(weights), mx.array(shared), mx.array([0.7]),
                                    mx.array(residual)))
    np.testing.assert_allclose(got, moe_combine_twin(outs, weights, shared, 0.7, residual), rtol=1e-6, atol=1e-5)


@pytest.mark.skipif(gpu_language() is not None, reason="this machine has a GPU; the CPU fallback is not used")
def test_cpu_uses_builtin_ops_because_metal_kernels_raise_when_called(mlx_backend: MlxBackend):
    assert mlx_backend.kernels is None
    kernel = mx.fast.metal_kernel(name="probe", input_names=["a"], output_names=["o"], source="o[0] = a[0];")
    with pytest.raises(RuntimeError, match="No Metal back-end"):
        mx.eval(kernel(inputs=[mx.ones((1,))], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)],
                       output_dtypes=[mx.float32]))


# -- MLX arrays end to end --------------------------------------------------------------------------------

def test_every_op_returns_float32_mlx_arrays(mlx_backend: MlxBackend):
    rng = np.random.default_rng(4)
    be = mlx_backend
    x = be.asarray(rng.standard_normal((2, HIDDEN)))
    e = _expert(rng)
    w = be.prepare(e["gate_proj"])
    heads = be.asarray(rng.standard_normal((2, 2, 16)))
    outs = {
        "linear": be.linear(x, w),
        "embed": be.embed(np.array([1, 0]), w),
        "rms_norm": be.rms_norm(x, be.asarray(np.ones(HIDDEN)), 1e-6),
        "rope": be.rope(heads, np.array([3, 4]), 1e4, 8),
        "attention": be.attention(heads, heads, heads, np.array([0, 1]), 0.25),
        "causal_conv1d": be.causal_conv1d(x, be.asarray(np.zeros((3, HIDDEN))), be.asarray(np.ones((HIDDEN, 4))))[0],
        "gated_delta_rule": be.gated_delta_rule(heads, heads, heads, be.asarray(-np.ones((2, 2))),
                                                be.asarray(np.full((2, 2), 0.5)), be.asarray(np.zeros((2, 16, 16))))[0],
        "silu": be.silu(x), "softplus": be.softplus(x), "l2_normalize": be.l2_normalize(x), "clip": be.clip(x, 1.0),
        "expert_ffn": be.expert_ffn(x, e),
        "experts_ffn": be.experts_ffn(x[0], [e, e], np.array([0.6, 0.4])),
    }
    for name, y in outs.items():
        assert isinstance(y, mx.array) and y.dtype == mx.float32, name


def test_rope_angles_are_float64_like_the_reference_at_position_32000(mlx_backend: MlxBackend):
    # mx.fast.rope forms position * inv_freq in float32: 1.5e-4 off here (measured), hence the table.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 2, 64)).astype(np.float32)
    positions = np.array([31998, 31999, 32000])
    want = NumpyBackend().rope(x, positions, 1e7, 16)
    np.testing.assert_allclose(np.array(mlx_backend.rope(x, positions, 1e7, 16)), want, atol=2e-6)


def test_attention_with_query_positions_not_at_the_end_of_the_cache(mlx_backend: MlxBackend):
    rng = np.random.default_rng(6)
    q = rng.standard_normal((3, 4, 16)).astype(np.float32)
    k, v = rng.standard_normal((2, 9, 2, 16)).astype(np.float32)
    positions = np.array([0, 5, 2])
    want = NumpyBackend().attention(q, k, v, positions, 0.25)
    np.testing.assert_allclose(np.array(mlx_backend.attention(q, k, v, positions, 0.25)), want, atol=1e-5)


# -- streamed experts: read buffers MLX owns are used in place --------------------------------------------

def _write_expert(buf: np.ndarray, e: dict[str, QuantizedTensor]) -> dict[str, QuantizedTensor]:
    """Lay expert e out in buf as the expert files do and return zero-copy views of it."""
    views, offset = {}, 0
    for name, t in e.items():
        parts = []
        for a in _parts(t):
            buf[offset : offset + a.nbytes] = a.reshape(-1).view(np.uint8)
            parts.append(buf[offset : offset + a.nbytes].view(a.dtype).reshape(a.shape))
            offset += a.nbytes
        views[name] = QuantizedTensor(*parts, t.bits, t.group_size)
    return views


def test_expert_read_into_an_mlx_buffer_reaches_mlx_without_a_copy(mlx_backend: MlxBackend):
    rng = np.random.default_rng(7)
    e = _expert(rng)
    nbytes = sum(t.nbytes for t in e.values())
    buf = mlx_backend.allocate_buffer(nbytes)
    assert buf.ctypes.data % 4096 == 0 and buf.flags.writeable and buf.nbytes == nbytes
    views = _write_expert(buf, e)
    words = mlx_backend._quantized(views["down_proj"]).words
    mx.eval(words)
    views["down_proj"].weight[0, 0] ^= np.uint32(0xFFFFFFFF)  # a later pread into the same buffer...
    assert np.array(words)[0, 0] == views["down_proj"].weight[0, 0]  # ...is what MLX sees: shared memory
    views["down_proj"].weight[0, 0] ^= np.uint32(0xFFFFFFFF)
    x = rng.standard_normal(HIDDEN).astype(np.float32)
    weights = np.array([1.0], np.float32)
    in_place = np.array(mlx_backend.experts_ffn(x, [views], weights))
    copied = np.array(mlx_backend.experts_ffn(x, [e], weights))
    np.testing.assert_array_equal(in_place, copied)
    np.testing.assert_allclose(in_place, NumpyBackend().experts_ffn(x, [e], weights), rtol=1e-4, atol=1e-4)
