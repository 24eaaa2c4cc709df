"""The NumPy backend: the reference's arithmetic, float32, quantised weights dequantised on the fly.

It is the slow, obviously-correct backend: every other backend is measured against the same definitions
(docstrings in backends/base.py). Quantised weights are dequantised a block of rows at a time, so even a
248k-row lm_head never exists as one float copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flashmoe.backends.base import Backend, Expert, PackedWeight, pack_weight
from flashmoe.quant import QuantizedTensor, dequantize

# Dequantise this many weight elements at a time (16 M float32 = 64 MB of temporary).
_BLOCK_ELEMENTS = 1 << 24


def _f32(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _row_blocks(p: PackedWeight, rows: np.ndarray | None = None):
    """Yield (row selection, float32 rows [r, in]) covering ``rows`` (default: all) in bounded blocks."""
    n = p.out_features if rows is None else len(rows)
    step = max(1, _BLOCK_ELEMENTS // p.in_features)
    for r in range(0, n, step):
        out = slice(r, min(r + step, n))
        sel = out if rows is None else rows[out]
        qt = QuantizedTensor(p.words[sel], p.scales[sel], p.biases[sel], p.bits, p.group_size)
        yield out, dequantize(qt)


def silu(x: np.ndarray) -> np.ndarray:
    """``x * sigmoid(x)`` in float32, without overflow warnings for large negative x."""
    return x / (np.float32(1) + np.exp(-np.clip(x, -88.0, 88.0)))


class NumpyBackend(Backend):
    """Plain NumPy, float32. Handles: float32 arrays for float weights, PackedWeight for quantised ones."""

    name = "numpy"

    def asarray(self, x: Any) -> np.ndarray:
        return _f32(x)

    def to_numpy(self, x: Any) -> np.ndarray:
        return _f32(x)

    def prepare(self, t: Any) -> Any:
        if isinstance(t, (QuantizedTensor, PackedWeight)):
            return pack_weight(t)
        return np.ascontiguousarray(t, dtype=np.float32)

    def linear(self, x: Any, w: Any) -> np.ndarray:
        x = _f32(x)
        if isinstance(w, np.ndarray):
            return x @ _f32(w).T
        p = pack_weight(w)
        y = np.empty((x.shape[0], p.out_features), np.float32)
        for sel, rows in _row_blocks(p):
            y[:, sel] = x @ rows.T
        return y

    def embed(self, ids: np.ndarray, w: Any) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if isinstance(w, np.ndarray):
            return _f32(w[ids])
        p = pack_weight(w)
        out = np.empty((len(ids), p.in_features), np.float32)
        for sel, rows in _row_blocks(p, ids):
            out[sel] = rows
        return out

    def rms_norm(self, x: Any, weight: Any, eps: float) -> np.ndarray:
        x = _f32(x)
        var = np.mean(x * x, axis=-1, keepdims=True)
        return x / np.sqrt(var + np.float32(eps)) * _f32(weight)

    def rope(self, x: Any, positions: np.ndarray, theta: float, rotary_dim: int) -> np.ndarray:
        x = _f32(x)
        inv_freq = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
        angles = np.asarray(positions, np.float64)[:, None] * inv_freq[None, :]  # [T, rotary_dim/2]
        cos = np.cos(angles).astype(np.float32)[:, None, :]  # [T, 1, rotary_dim/2]
        sin = np.sin(angles).astype(np.float32)[:, None, :]
        half = rotary_dim // 2
        x1, x2 = x[..., :half], x[..., half:rotary_dim]
        out = x.copy()
        out[..., :half] = x1 * cos - x2 * sin
        out[..., half:rotary_dim] = x2 * cos + x1 * sin
        return out

    def attention(self, q: Any, k: Any, v: Any, q_positions: np.ndarray, scale: float) -> np.ndarray:
        q, k, v = _f32(q), _f32(k), _f32(v)
        T, Hq, D = q.shape
        S, Hkv, _ = k.shape
        group = Hq // Hkv
        qg = q.reshape(T, Hkv, group, D)
        scores = np.einsum("tkgd,skd->kgts", qg, k) * np.float32(scale)  # [Hkv, group, T, S]
        visible = np.arange(S)[None, :] <= np.asarray(q_positions)[:, None]  # [T, S]
        scores = np.where(visible, scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out = np.einsum("kgts,skd->tkgd", p, v)
        return out.reshape(T, Hq, D)

    def causal_conv1d(self, x: Any, state: Any, weight: Any) -> tuple[np.ndarray, np.ndarray]:
        x, state, weight = _f32(x), _f32(state), _f32(weight)
        T = x.shape[0]
        K = weight.shape[1]
        xs = np.concatenate([state, x], axis=0)  # [K-1+T, C]
        y = np.zeros_like(x)
        for j in range(K):
            y += weight[:, j] * xs[j : j + T]
        return silu(y), xs[T:].copy()

    def gated_delta_rule(
        self, q: Any, k: Any, v: Any, g: Any, beta: Any, state: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        q, k, v, g, beta = _f32(q), _f32(k), _f32(v), _f32(g), _f32(beta)
        S = _f32(state).copy()  # [H, Dk, Dv]
        T, H, Dv = v.shape
        rep = H // q.shape[1]
        q, k = np.repeat(q, rep, axis=1), np.repeat(k, rep, axis=1)  # [T, H, Dk]
        o = np.empty((T, H, Dv), np.float32)
        for t in range(T):
            S *= np.exp(g[t])[:, None, None]
            kv = np.einsum("hkv,hk->hv", S, k[t])  # Sᵀk: what the memory recalls for k
            delta = (v[t] - kv) * beta[t][:, None]
            S += k[t][:, :, None] * delta[:, None, :]
            o[t] = np.einsum("hkv,hk->hv", S, q[t])
        return o, S

    def expert_ffn(self, x: Any, expert: Expert) -> np.ndarray:
        x = _f32(x)
        h = silu(self.linear(x, expert["gate_proj"])) * self.linear(x, expert["up_proj"])
        return self.linear(h, expert["down_proj"])

    def experts_ffn(self, x: Any, experts: list[Expert], weights: np.ndarray) -> np.ndarray:
        x = _f32(x)[None, :]
        out = np.zeros(x.shape[1], np.float32)
        for e, wgt in zip(experts, np.asarray(weights, np.float32)):
            out += wgt * self.expert_ffn(x, e)[0]
        return out
