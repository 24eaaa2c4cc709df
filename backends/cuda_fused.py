"""Fused decode kernels of the CUDA backend: work that would otherwise be several launches, or a round trip
to the host, in one launch.

- :func:`add_rms_norm`: the residual add and the following RMSNorm (two launches -> one).
- :func:`softmax_topk`: the router's softmax and top-k (``flashmoe.reference.routing.softmax_topk``) and the
  lookup of each chosen expert's VRAM slot, on the GPU: when every expert of a layer is in the VRAM tier, a
  decode token's MoE runs without the host waiting for the router's logits.

Same conventions as backends/cuda_kernels.py (flat float32 arrays, rows of LANES threads, the lane
reductions that also run in numba's simulator).
"""

from __future__ import annotations

import math

from numba import cuda, float32

from flashmoe.backends.cuda_kernels import LANES, ROWS, _lane_max, _lane_sum


@cuda.jit
def add_rms_norm(h, d, w, eps, h_out, out):
    """Rows of n = w.shape[0]: h_out = h + d, out = h_out / sqrt(mean(h_out²) + eps) * w. Grid
    ceil(rows / ROWS), block (LANES, ROWS)."""
    sh = cuda.shared.array((ROWS, LANES), float32)
    lane, r = cuda.threadIdx.x, cuda.threadIdx.y
    n = w.shape[0]
    row = cuda.blockIdx.x * ROWS + r
    active = row * n < h.shape[0]
    ss = float32(0.0)
    if active:
        for i in range(lane, n, LANES):
            v = h[row * n + i] + d[row * n + i]
            h_out[row * n + i] = v
            ss += v * v
    ss = _lane_sum(ss, sh, lane, r)
    if active:
        inv = float32(1.0) / math.sqrt(ss / float32(n) + eps)
        for i in range(lane, n, LANES):  # each lane reads back only the elements it wrote
            out[row * n + i] = h_out[row * n + i] * inv * w[i]


@cuda.jit
def softmax_topk(logits, n_experts, k, norm, slot_of, probs, ids, ids_at, slots, weights):
    """One token's routing: probs = softmax(logits [E]); ids [k] the k most probable experts in decreasing
    probability (ties: lower id first, as the reference's stable sort), written at ids[ids_at:], weights [k]
    their probabilities,
    divided by their sum when norm != 0; slots [k] = slot_of[ids] (each expert's VRAM slot). probs [E] is
    scratch. One block of (LANES, 1) threads; lane l owns experts l, l + LANES, ..., so marking a chosen
    expert touches only its owner's entries and needs no barrier."""
    sh = cuda.shared.array((1, LANES), float32)
    lane = cuda.threadIdx.x
    m = float32(-math.inf)
    for i in range(lane, n_experts, LANES):
        m = max(m, logits[i])
    m = _lane_max(m, sh, lane, 0)
    s = float32(0.0)
    for i in range(lane, n_experts, LANES):
        p = math.exp(logits[i] - m)
        probs[i] = p
        s += p
    s = _lane_sum(s, sh, lane, 0)
    total = float32(0.0)
    for r in range(k):
        best, at = float32(-1.0), n_experts
        for i in range(lane, n_experts, LANES):  # increasing ids: a tie keeps the lower one
            if probs[i] > best:
                best, at = probs[i], i
        top = _lane_max(best, sh, lane, 0)
        mine = float32(at) if best == top else float32(n_experts)
        at = min(int(-_lane_max(-mine, sh, lane, 0)), n_experts - 1)  # the lowest id holding the maximum
        if at % LANES == lane:
            probs[at] = float32(-1.0)
        w = top / s
        total += w
        if lane == 0:
            ids[ids_at + r] = at
            slots[r] = slot_of[at]
            weights[r] = w
    if norm != 0 and lane == 0:
        for r in range(k):
            weights[r] = weights[r] / total
