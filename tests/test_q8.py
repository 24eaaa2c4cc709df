"""The q8 reference (flashmoe.reference.q8): its activation codes against ggml's own Q8_0 quantiser, its
linear layer against the same sum written from dequantised activations, and its distance from the float path."""

from __future__ import annotations

import numpy as np
import pytest

from flashmoe.format.mxfp4 import Mxfp4Tensor
from flashmoe.format.quant import BITS, quantize
from flashmoe.reference.q8 import Q8_VS_FLOAT_TOLERANCE, linear_q8, quantize_q8, swiglu_q8
from flashmoe.reference.moe import swiglu

gguf_quants = pytest.importorskip("gguf.quants", reason="gguf-py's Q8_0 quantiser is the oracle for the codes")


def _activations(rng: np.random.Generator, T: int, n: int) -> np.ndarray:
    x = (rng.standard_normal((T, n)) * rng.uniform(0.01, 10, (T, 1))).astype(np.float32)
    x[0, :32] = 0  # an all-zero block: scale 0, codes 0
    x[0, 32:64] = np.float32(127 / 2) * np.arange(-16, 16, dtype=np.float32) / 16  # codes at exact halves
    x[0, 63] = 127 / 2  # the block's max: d = 0.5, so x * (1/d) hits every .5
    return x


def test_q8_codes_are_ggml_q8_0_codes_with_a_float32_scale():
    x = _activations(np.random.default_rng(0), 3, 256)
    xq, d = quantize_q8(x)
    blocks = np.frombuffer(gguf_quants.quantize(x, gguf_quants.GGMLQuantizationType.Q8_0), np.uint8).reshape(-1, 34)
    np.testing.assert_array_equal(xq.reshape(-1, 32), blocks[:, 2:].view(np.int8))
    np.testing.assert_array_equal(d.reshape(-1).astype(np.float16), blocks[:, :2].copy().view(np.float16).ravel())
    assert d[0, 0] == 0 and not xq[0, :32].any()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_linear_q8_is_the_dequantised_weight_times_the_dequantised_activations(bits, group_size):
    """The integer form (int32 block dots, bias term from the codes' sums) equals W·x̂ with x̂ = d_b·xq."""
    rng = np.random.default_rng(bits * 1000 + group_size)
    x = _activations(rng, 2, 256)
    qt = quantize(rng.standard_normal((24, 256)).astype(np.float32), bits, group_size)
    xq, d = quantize_q8(x)
    x_hat = (xq.reshape(2, 8, 32) * d[..., None].astype(np.float64)).reshape(2, 256)
    want = x_hat @ qt.dequantize(np.float64).T
    np.testing.assert_allclose(linear_q8(x, qt), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_mxfp4_linear_q8_is_the_dequantised_weight_times_the_dequantised_activations():
    """MXFP4 (doubled E2M1 values in int32 block dots, then 2^(s - 128)): W·x̂ over every code, with scales
    from 2^-127 to 2^125 (where 6·2^s is still a finite float32)."""
    rng = np.random.default_rng(3)
    x = _activations(rng, 2, 512) * np.float32(1e-6)  # keeps every row's sum finite in float32
    w = Mxfp4Tensor(np.tile(np.arange(256, dtype=np.uint8), (24, 1)), rng.integers(0, 253, (24, 16), dtype=np.uint8))
    xq, d = quantize_q8(x)
    x_hat = (xq.reshape(2, 16, 32) * d[..., None].astype(np.float64)).reshape(2, 512)
    want = x_hat @ w.dequantize(np.float64).T
    np.testing.assert_allclose(linear_q8(x, w), want.astype(np.float32), rtol=1e-6, atol=1e-44)


@pytest.mark.parametrize("bits", BITS)
def test_q8_reference_is_within_its_documented_tolerance_of_the_float_reference(bits):
    rng = np.random.default_rng(bits)
    hidden, inter = 512, 256
    x = rng.standard_normal((4, hidden)).astype(np.float32)
    expert = {n: quantize(rng.standard_normal(s).astype(np.float32) * s[1] ** -0.5, bits, 64)
              for n, s in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter)))}
    want = swiglu(x, *(expert[n].dequantize() for n in ("gate_proj", "up_proj", "down_proj")))
    got = swiglu_q8(x, expert)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= Q8_VS_FLOAT_TOLERANCE


def test_quantize_q8_names_a_width_that_is_not_whole_blocks():
    with pytest.raises(ValueError, match="48 inputs is not a multiple of the block of 32"):
        quantize_q8(np.ones((1, 48), np.float32))
