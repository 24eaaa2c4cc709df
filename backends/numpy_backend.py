"""The NumPy backend: the reference's arithmetic, float32, quantised weights dequantised on the fly.

It is the slow, obviously-correct backend: each operation calls the reference's own function
(``flashmoe.reference``) after adapting shapes, so every other backend is measured against the reference
itself. Quantised weights are dequantised a block of rows at a time (flashmoe.format.quant.dequantize), so even a
248k-row lm_head never exists as one float copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flashmoe.backends.base import Backend, PackedWeight, pack_weight
from flashmoe.arch.config import YarnRope
from flashmoe.format.mxfp4 import Mxfp4Tensor
from flashmoe.format.quant import QuantizedTensor, dequantize
from flashmoe.reference import attention as ref_attention
from flashmoe.reference import linear_attention as ref_linear_attention
from flashmoe.reference import ops as ref_ops
from flashmoe.reference import q8 as ref_q8
from flashmoe.reference import rope as ref_rope

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


class NumpyBackend(Backend):
    """Plain NumPy, float32. Handles: float32 arrays for float weights, PackedWeight for quantised ones."""

    name = "numpy"
    activation_modes = ref_q8.ACTIVATIONS

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
        q8 = self.activations == "q8"
        if isinstance(w, Mxfp4Tensor):  # routed experts only: one expert's rows are few enough to decode at once
            return ref_q8.linear_q8(x, w) if q8 else x @ w.dequantize().T
        p = pack_weight(w)
        y = np.empty((x.shape[0], p.out_features), np.float32)
        if q8 and ref_q8.uses_q8(p.bits, p.group_size):
            # linear_q8's int32 temporaries: 8 bytes per weight and token
            step = max(1, _BLOCK_ELEMENTS // 8 // p.in_features // max(1, x.shape[0]))
            for r in range(0, p.out_features, step):
                sel = slice(r, r + step)
                y[:, sel] = ref_q8.linear_q8(x, QuantizedTensor(p.words[sel], p.scales[sel], p.biases[sel], p.bits,
                                                                p.group_size))
            return y
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
        return ref_ops.rms_norm(_f32(x), _f32(weight), np.float32(eps))

    def rope(self, x: Any, positions: np.ndarray, theta: float, rotary_dim: int, yarn: YarnRope | None = None
             ) -> np.ndarray:
        inv_freq = ref_rope.rope_inv_freq(rotary_dim, theta, yarn)
        cos, sin = ref_rope.rope_cos_sin(np.asarray(positions), inv_freq, 1.0, np.float32)  # [T, rd]
        return ref_rope.apply_rope(_f32(x), cos[:, None, :], sin[:, None, :])  # heads broadcast

    def attention(self, q: Any, k: Any, v: Any, q_positions: np.ndarray, scale: float, sinks: Any = None
                  ) -> np.ndarray:
        q, k, v = (_f32(t).transpose(1, 0, 2) for t in (q, k, v))  # [H, T or S, D]
        visible = np.arange(k.shape[1])[None, :] <= np.asarray(q_positions)[:, None]  # [T, S] causal
        sinks = None if sinks is None else _f32(sinks)
        return ref_attention.softmax_attention(q, k, v, visible, np.float32(scale), sinks).transpose(1, 0, 2)

    def causal_conv1d(self, x: Any, state: Any, weight: Any) -> tuple[np.ndarray, np.ndarray]:
        # The reference keeps state as [C, K-1] and the kernel as [C, 1, K].
        y, new_state = ref_linear_attention.causal_conv1d(_f32(x), _f32(state).T, _f32(weight)[:, None, :])
        return y, np.ascontiguousarray(new_state.T)

    def gated_delta_rule(
        self, q: Any, k: Any, v: Any, g: Any, beta: Any, state: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        v = _f32(v)
        rep = v.shape[1] // _f32(q).shape[1]  # the reference takes q, k already repeated to the value heads
        q, k = np.repeat(_f32(q), rep, axis=1), np.repeat(_f32(k), rep, axis=1)
        return ref_linear_attention.gated_delta_rule(q, k, v, _f32(g), _f32(beta), _f32(state))
