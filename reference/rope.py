"""Rotary position embedding: the inverse frequencies (plain RoPE and YaRN) and the rotation itself.

Sources: Su et al. 2021, "RoFormer" (RoPE, in transformers' rotate-half convention); Peng et al. 2023,
"YaRN: Efficient Context Window Extension of Large Language Models" ("NTK-by-parts" interpolation, eqs.
17–20; the attention temperature, eq. 22), as transformers computes them (`modeling_rope_utils`:
`_compute_default_rope_parameters`, `_compute_yarn_parameters`, `yarn_get_mscale`).
"""

from __future__ import annotations

import math

import numpy as np

from flashmoe.arch.config import YarnRope


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature, 0.1·mscale·ln(scale) + 1 (eq. 22; 1 for scale ≤ 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq_yarn(dim: int, theta: float, y: YarnRope) -> np.ndarray:
    """YaRN's inverse frequencies (dim/2,), float64: wavelengths shorter than the pretraining context by
    more than beta_fast rotations keep theta^(-2j/dim) (extrapolation); longer than beta_slow rotations are
    divided by `factor` (interpolation); a linear ramp blends the band between (YaRN eqs. 17–20; transformers
    `_compute_yarn_parameters`, truncating the band to whole dimensions when `truncate`)."""
    def correction_dim(rotations: float) -> float:
        return dim * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(y.beta_fast), correction_dim(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers: avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)  # 0: extrapolate
    extrapolation = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    return extrapolation / y.factor * ramp + extrapolation * (1 - ramp)


def yarn_attention_factor(y: YarnRope) -> float:
    """The factor YaRN multiplies cos and sin by: attention_factor when given, else
    mscale(factor, mscale) / mscale(factor, mscale_all_dim) (1 for DeepSeek-V3, where both are 1), else
    mscale(factor) (gpt-oss: 1.347 at factor 32)."""
    if y.attention_factor is not None:
        return y.attention_factor
    if y.mscale and y.mscale_all_dim:
        return yarn_get_mscale(y.factor, y.mscale) / yarn_get_mscale(y.factor, y.mscale_all_dim)
    return yarn_get_mscale(y.factor)


def rope_inv_freq(rotary_dim: int, theta: float, yarn: YarnRope | None = None) -> np.ndarray:
    """RoPE's inverse frequencies, float64 (rotary_dim/2,): theta^(-2j/rotary_dim) (Su et al. 2021;
    transformers `_compute_default_rope_parameters`), or YaRN's (rope_inv_freq_yarn) when `yarn` is given."""
    if yarn is None:
        return 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    return rope_inv_freq_yarn(rotary_dim, theta, yarn)


def rope_attention_factor(yarn: YarnRope | None) -> float:
    """What cos and sin are multiplied by: 1 for plain RoPE, yarn_attention_factor under YaRN."""
    return 1.0 if yarn is None else yarn_attention_factor(yarn)


def rope_cos_sin(positions: np.ndarray, inv_freq: np.ndarray, attention_factor: float,
                 dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables (T, rotary_dim) for absolute `positions` (T,), each times `attention_factor`.

    Angles position·inv_freq are duplicated to both halves (transformers' rotate-half layout) and computed
    in float64.
    """
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]  # (T, rd/2)
    angles = np.concatenate([angles, angles], axis=-1)  # (T, rd)
    return (np.cos(angles) * attention_factor).astype(dtype), (np.sin(angles) * attention_factor).astype(dtype)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate the first rotary_dim = cos.shape[-1] features of each head; the rest pass through
    (partial rotary: Qwen3.5/Qwen3-Next `partial_rotary_factor`).

    x: (heads, T, D); cos, sin: (T, rotary_dim). x_rot·cos + rotate_half(x_rot)·sin, where
    rotate_half([a, b]) = [-b, a] on the two halves of x_rot (gpt-oss's `_apply_rotary_emb` on the two
    halves is the same rotation).
    """
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = np.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    return np.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)
