"""Elementwise and normalisation operations shared by every block of the reference.

Arrays are NumPy, in the dtype of their input (float32 by default, float64 when the model asks for it).
"""

from __future__ import annotations

import numpy as np


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """y = x·Wᵀ (+ b), as torch.nn.Linear. x: (..., in); w: (out, in); b: (out,) -> (..., out)."""
    y = x @ w.T
    return y if b is None else y + b


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis: x / sqrt(mean(x²) + eps) · w (Zhang & Sennrich 2019; transformers
    LlamaRMSNorm). x: (..., D); w: (D,).

    The single RMSNorm of flashmoe: checkpoints whose norms compute x·(1+w) (Qwen3-Next, Qwen3.5) have 1
    added to those weights at conversion (flashmoe.arch.families).
    """
    inv_rms = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * inv_rms * w


def l2_normalize(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """x / sqrt(sum(x²) + eps) over the last axis (transformers `l2norm`, matching flash-linear-attention)."""
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + eps)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + e⁻ˣ), computed without overflow for large |x|."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


def silu(x: np.ndarray) -> np.ndarray:
    """SiLU / swish: x·σ(x) (Elfwing et al. 2017; the `silu` hidden_act of every supported model)."""
    return x * sigmoid(x)


def softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + eˣ), overflow-free (torch.nn.functional.softplus with beta 1)."""
    return np.logaddexp(np.zeros((), x.dtype), x)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """exp(x - max) / Σ exp(x - max) along `axis`."""
    # the array methods: the same reductions as np.max / np.sum, without their Python wrappers (a decode
    # layer's router softmax of one token spent most of its time there)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)
