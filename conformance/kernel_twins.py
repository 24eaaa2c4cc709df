"""NumPy twins of the fused kernels in shaders/: each function computes exactly what its kernel computes,
element by element, so the Metal (or CUDA) code can be checked against it on any machine that has the GPU.

The kernels take one token (a vector x) and 4-bit MLX-layout weights: words uint32 ``[out, in/8]`` holding
8 values each, least significant nibble first; scales and biases ``[out, in/group_size]``; ``w ≈ scale*q +
bias`` (flashmoe.format.quant). All arithmetic is float32, as on the GPU; the only freedom a kernel has is the
order of its float32 sums, so kernels are compared to the twins with a tolerance, and the twins are
compared to the reference (flashmoe.backends.numpy_backend) the same way.
"""

from __future__ import annotations

import numpy as np

from flashmoe.backends.base import scales_to_f32
from flashmoe.format.quant import unpack


def _fma_terms(x: np.ndarray, words: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int) -> np.ndarray:
    """Per-weight terms ``fma(q, scale*x, bias*x)`` = ``q*(scale*x) + bias*x``, float32 ``[out, in]``."""
    q = unpack(words, 4).astype(np.float32)  # [out, in]
    s = np.repeat(scales_to_f32(scales), group_size, axis=1)  # [out, in]: each group's scale per input
    b = np.repeat(scales_to_f32(biases), group_size, axis=1)
    x = np.asarray(x, np.float32)[None, :]
    return q * (s * x) + b * x


def dequant_matvec_4bit_twin(x: np.ndarray, words: np.ndarray, scales: np.ndarray, biases: np.ndarray,
                             group_size: int) -> np.ndarray:
    """shaders/dequant_matvec_4bit: ``y[r] = sum_i fma(q[r,i], scale[r,g(i)]*x[i], bias[r,g(i)]*x[i])``.

    x float32 ``[in]``; words uint32 ``[out, in/8]``; scales, biases ``[out, in/group_size]`` (f32/f16/bf16,
    widened exactly). -> float32 ``[out]``. The FMA form is Flash-MoE's: the scale and bias multiply x once
    per element instead of dequantising the weight first (measured +12% there)."""
    return _fma_terms(x, words, scales, biases, group_size).sum(axis=1, dtype=np.float32)


def swiglu_4bit_twin(x: np.ndarray, gate: tuple, up: tuple, group_size: int) -> np.ndarray:
    """shaders/swiglu_4bit: ``h = silu(g) * u`` with ``g``, ``u`` the dequant_matvec_4bit of the gate and up
    projections (``gate``/``up`` = (words, scales, biases)) and ``silu(g) = g / (1 + exp(-g))``.

    x float32 ``[hidden]`` -> float32 ``[moe_intermediate_size]``."""
    g = dequant_matvec_4bit_twin(x, *gate, group_size)
    u = dequant_matvec_4bit_twin(x, *up, group_size)
    return (g / (np.float32(1) + np.exp(-g)) * u).astype(np.float32)


def moe_combine_twin(expert_out: np.ndarray, weights: np.ndarray, shared: np.ndarray, shared_gate: float,
                     residual: np.ndarray) -> np.ndarray:
    """shaders/moe_combine: ``out = (sum_{e=0..K-1} weights[e] * expert_out[e]) + shared_gate * shared +
    residual``, summed in that order.

    expert_out float32 ``[K, D]``; weights ``[K]`` (router probabilities after top-k); shared ``[D]`` (the
    shared expert's output; zeros when the model has none); shared_gate: its sigmoid gate value (1 when
    ungated); residual ``[D]``. -> float32 ``[D]``."""
    acc = np.zeros(expert_out.shape[1], np.float32)
    for e in range(expert_out.shape[0]):
        acc = acc + np.float32(weights[e]) * expert_out[e]
    return acc + np.float32(shared_gate) * np.asarray(shared, np.float32) + np.asarray(residual, np.float32)
