"""flashmoe.format.quant against mlx.core.quantize, bit for bit (weights, scales and biases)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from flashmoe.format.quant import BITS, GROUP_SIZES, QuantizedTensor, dequantize, infer_bits, pack, quantize, unpack

mx = pytest.importorskip("mlx.core", reason="mlx[cpu] is the oracle for the MLX layout")

_MX_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16", np.dtype(ml_dtypes.bfloat16): "bfloat16"}


def _mlx_quantize(w: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mx.quantize on w (any of our float dtypes); scales/biases returned as float32 (exact widening)."""
    mw = mx.array(w.astype(np.float32)).astype(getattr(mx, _MX_DTYPES[w.dtype]))
    wq, s, b = mx.quantize(mw, group_size=group_size, bits=bits)
    return np.array(wq), np.array(s.astype(mx.float32)), np.array(b.astype(mx.float32))


def _assert_same_as_mlx(w: np.ndarray, bits: int, group_size: int) -> QuantizedTensor:
    qt = quantize(w, bits, group_size)
    wq, s, b = _mlx_quantize(w, bits, group_size)
    assert qt.weight.dtype == np.uint32 and qt.scales.dtype == w.dtype and qt.biases.dtype == w.dtype
    np.testing.assert_array_equal(qt.weight, wq)
    # Compare bit patterns so -0.0 vs 0.0 or NaN would show.
    np.testing.assert_array_equal(qt.scales.astype(np.float32).view(np.uint32), s.view(np.uint32))
    np.testing.assert_array_equal(qt.biases.astype(np.float32).view(np.uint32), b.view(np.uint32))
    return qt


@st.composite
def weights(draw, dtype):
    """A [rows, in] weight with a random magnitude and shape; sometimes constant or sparse groups."""
    bits = draw(st.sampled_from(BITS))
    group_size = draw(st.sampled_from(GROUP_SIZES))
    rows = draw(st.integers(1, 6))
    n = group_size * draw(st.integers(1, 4))
    magnitude = draw(st.sampled_from([1e-6, 1e-3, 0.02, 1.0, 300.0, 6e4]))
    kind = draw(st.sampled_from(["normal", "elements", "constant", "sparse", "one-sided"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "elements":
        lim = float(np.float16(min(magnitude, 6e4)))
        w = draw(arrays(np.float32, (rows, n), elements=st.floats(-lim, lim, width=32, allow_subnormal=False)))
    else:
        w = rng.standard_normal((rows, n)).astype(np.float32) * np.float32(magnitude)
        if kind == "constant":
            w[:] = w[0, 0]
        elif kind == "sparse":
            w[rng.random((rows, n)) < 0.8] = 0.0
        elif kind == "one-sided":
            w = np.abs(w) if rng.random() < 0.5 else -np.abs(w)
    # Keep within float16's finite range so every dtype sees finite inputs.
    return np.clip(w, -6e4, 6e4).astype(dtype), bits, group_size


@settings(max_examples=150, deadline=None)
@given(weights(np.float32))
def test_quantize_float32_matches_mlx_bit_for_bit(case):
    w, bits, group_size = case
    _assert_same_as_mlx(w, bits, group_size)


@settings(max_examples=60, deadline=None)
@given(weights(ml_dtypes.bfloat16))
def test_quantize_bfloat16_matches_mlx_bit_for_bit(case):
    w, bits, group_size = case
    _assert_same_as_mlx(w, bits, group_size)


@settings(max_examples=40, deadline=None)
@given(weights(np.float16))
def test_quantize_float16_matches_mlx_bit_for_bit(case):
    w, bits, group_size = case
    _assert_same_as_mlx(w, bits, group_size)


@pytest.mark.parametrize("bits", BITS)
def test_float32_dequantize_equals_mlx_dequantize(bits):
    w = np.random.default_rng(bits).standard_normal((5, 128)).astype(np.float32)
    qt = quantize(w, bits, 32)
    expected = np.array(mx.dequantize(mx.array(qt.weight), mx.array(qt.scales), mx.array(qt.biases), 32, bits))
    np.testing.assert_array_equal(qt.dequantize(np.float32), expected)
    assert qt.shape == (5, 128)
    # MLX nudges the scale so the larger-magnitude edge is exact; the other edge may then be clipped, so
    # the error bound is loose at low bits. At 8 bits it stays within one step.
    if bits == 8:
        step = np.abs(qt.scales).repeat(32, axis=-1)
        assert np.all(np.abs(dequantize(qt) - w) <= step)


@pytest.mark.parametrize("bits", BITS)
def test_pack_is_an_lsb_first_bit_stream(bits):
    q = np.random.default_rng(bits).integers(0, 1 << bits, size=(3, 64), dtype=np.uint8)
    words = pack(q, bits)
    assert words.shape == (3, 64 * bits // 32)
    stream = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little").reshape(3, 64, bits)
    np.testing.assert_array_equal((stream * (1 << np.arange(bits))).sum(-1), q)
    np.testing.assert_array_equal(unpack(words, bits), q)
    # a view whose last axis is strided (Fortran order, as a transpose gives) packs to the same words
    strided = pack(np.asfortranarray(q), bits)
    np.testing.assert_array_equal(strided, words)
    assert strided.flags.c_contiguous


def test_stacked_experts_quantise_per_expert_row():
    w = np.random.default_rng(1).standard_normal((4, 16, 64)).astype(np.float32)
    qt = quantize(w, 4, 64)
    assert qt.weight.shape == (4, 16, 8) and qt.scales.shape == (4, 16, 1) and qt.shape == (4, 16, 64)
    np.testing.assert_array_equal(qt.weight[2], quantize(w[2], 4, 64).weight)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_infer_bits_from_shapes(bits, group_size):
    qt = quantize(np.ones((2, 256), np.float32), bits, group_size)
    assert infer_bits(qt.weight, qt.scales, group_size) == bits
    assert infer_bits(qt.weight.shape, qt.scales.shape, group_size) == bits


def test_infer_bits_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="no supported bit width"):
        infer_bits((4, 20), (4, 4), 64)


def test_quantize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="non-finite"):
        quantize(np.full((2, 64), np.inf, np.float32), 4, 64)
    with pytest.raises(ValueError, match="bits"):
        quantize(np.zeros((2, 64), np.float32), 7, 64)
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize(np.zeros((2, 96), np.float32), 4, 64)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        quantize(np.zeros((2, 64), np.int32), 4, 64)
