"""The router on the GPU: softmax and top-k (``flashmoe.reference.routing.softmax_topk``) and the lookup of
each chosen expert's VRAM slot in one launch, so that when every expert of a layer is in the VRAM tier a
decode token's MoE runs without the host waiting for the router's logits.

Same conventions as backends/cuda_kernels.py (flat float32 arrays, rows of LANES threads, the lane
reductions that also run in numba's simulator).
"""

from __future__ import annotations

import math

from numba import cuda, float32

from flashmoe.backends.cuda_kernels import LANES, _lane_max, _lane_sum


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
