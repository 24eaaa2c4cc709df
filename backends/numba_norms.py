"""The numba backend's norm and RoPE kernels: RMSNorm, RoPE, and their fused decode forms (the residual add
with the norm after it; Qwen3's per-head q/k norms with RoPE on both).

They run on the calling thread: a decode token's vectors are a few thousand floats, where numba's dispatch
and NumPy's temporaries cost more than the arithmetic, so the fused forms exist to make one kernel call
where the backend's defaults (backends/base.py) made four (q/k: two norms, two RoPEs, each with its own
angles, cos and sin) or two (a NumPy add and the norm) per use, each decode layer using each twice.
Each row is computed by the same compiled row function in the plain and the fused kernels, so the fused
forms give the plain forms' bits (conformance/test_numba_backend.py checks this). The norm's sum of squares
may be reassociated (FASTMATH); RoPE's products are not contracted (no fastmath), as in the reference.
"""

from __future__ import annotations

import numpy as np

try:
    from numba import njit
except ImportError:  # numba_backend reports it through unavailable_reason
    njit = None

from flashmoe.backends.numba_cache import cached_njit
from flashmoe.backends.numba_packed import FASTMATH

if njit is not None:

    @cached_njit(fastmath=FASTMATH)
    def rms_row(x, w, eps, out):
        """out = x / sqrt(mean(x²) + eps) * w for one row x float32 [n] (out may be x)."""
        ss = np.float32(0.0)
        for i in range(x.shape[0]):
            ss += x[i] * x[i]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(x.shape[0]) + eps)
        for i in range(x.shape[0]):
            out[i] = x[i] * inv * w[i]

    @cached_njit()
    def rope_row(x, cos, sin, out):
        """Rotate-half RoPE of one head x float32 [D] by angles' cos, sin [half] into out [D] (not x); the
        features past 2·half are the caller's."""
        half = cos.shape[0]
        for i in range(half):
            a = x[i]
            b = x[i + half]
            out[i] = a * cos[i] - b * sin[i]
            out[i + half] = b * cos[i] + a * sin[i]

    @cached_njit()
    def rms_norm(x, w, eps, out):
        """rms_row of each row of x [T, n] into out [T, n]."""
        for t in range(x.shape[0]):
            rms_row(x[t], w, eps, out[t])

    @cached_njit()
    def add_rms_norm(h, delta, w, eps, total, out):
        """total = h + delta, out = rms_row(total) row by row; all float32 [T, n]."""
        for t in range(h.shape[0]):
            for i in range(h.shape[1]):
                total[t, i] = h[t, i] + delta[t, i]
            rms_row(total[t], w, eps, out[t])

    @cached_njit()
    def rope(x, cos, sin, out):
        """rope_row of every head of x [T, H, D] at its token's cos, sin [T, half] into out (which holds the
        pass-through features already)."""
        for t in range(x.shape[0]):
            for h in range(x.shape[1]):
                rope_row(x[t, h], cos[t], sin[t], out[t, h])

    @cached_njit()
    def _heads_norm_rope(x, w, eps, cos, sin, t, normed, out):
        for h in range(x.shape[1]):
            rms_row(x[t, h], w, eps, normed)
            out[t, h, :] = normed
            rope_row(normed, cos[t], sin[t], out[t, h])

    @cached_njit()
    def qk_norm_rope(q, k, wq, wk, eps, cos, sin, q_out, k_out):
        """Per-head rms_row of q [T, Hq, D] (weight wq [D]) and k [T, Hkv, D] (wk), then rope_row of both at
        the token's cos, sin [T, half], into q_out and k_out; features past 2·half are the normed ones."""
        normed = np.empty(q.shape[2], np.float32)
        for t in range(q.shape[0]):
            _heads_norm_rope(q, wq, eps, cos, sin, t, normed, q_out)
            _heads_norm_rope(k, wk, eps, cos, sin, t, normed, k_out)
