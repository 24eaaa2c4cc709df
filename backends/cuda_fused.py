"""The router on the GPU: softmax and top-k (``flashmoe.reference.routing.softmax_topk``) and the lookup of
each chosen expert's VRAM slot in one launch, so that when every expert of a layer is in the VRAM tier a
decode token's MoE runs without the host waiting for the router's logits.

Same conventions as backends/cuda_kernels.py (flat float32 arrays, rows of LANES threads, the lane
reductions that also run in numba's simulator).
"""

from __future__ import annotations

import math
from functools import lru_cache

from numba import cuda, float32

from flashmoe.backends.cuda_kernels import LANES, _lane_max, _lane_sum


def per_lane(n_experts: int) -> int:
    """Experts each lane of :func:`softmax_topk`'s warp holds: the next power of two >= n_experts / LANES (one
    kernel per size class; 16 for 512 experts)."""
    need = -(-n_experts // LANES)
    return 1 << max(need - 1, 0).bit_length()


@lru_cache(maxsize=None)
def softmax_topk(per: int):
    """The kernel (logits, n_experts, k, norm, slot_of, ids, ids_at, slots, weights) for n_experts <= per *
    LANES (:func:`per_lane`): one token's routing. probs = softmax(logits [E]); ids [k] the k most probable
    experts in decreasing probability (ties: lower id first, as the reference's stable sort), written at
    ids[ids_at:], weights [k] their probabilities, divided by their sum when norm != 0; slots [k] =
    slot_of[ids] (each expert's VRAM slot). One block of (LANES, 1) threads; lane l owns experts l, l + LANES,
    ..., their probabilities in registers (`per` a compile-time constant, every index into them one too).
    (Kept in a global scratch array, each of the k rounds re-read a lane's experts from memory: 15 us a launch
    for 512 experts, k = 10, on an H100.)"""

    @cuda.jit
    def kernel(logits, n_experts, k, norm, slot_of, ids, ids_at, slots, weights):
        sh = cuda.shared.array((1, LANES), float32)
        lane = cuda.threadIdx.x
        p = cuda.local.array(per, float32)
        m = float32(-math.inf)
        for j in range(per):
            i = j * LANES + lane
            p[j] = logits[i] if i < n_experts else float32(-math.inf)
            m = max(m, p[j])
        m = _lane_max(m, sh, lane, 0)
        s = float32(0.0)
        for j in range(per):
            i = j * LANES + lane
            p[j] = math.exp(p[j] - m) if i < n_experts else float32(-1.0)  # -1: never chosen
            if i < n_experts:
                s += p[j]
        s = _lane_sum(s, sh, lane, 0)
        total = float32(0.0)
        for r in range(k):
            best, at = float32(-1.0), n_experts
            for j in range(per):  # increasing ids: a tie keeps the lower one
                if p[j] > best:
                    best, at = p[j], j * LANES + lane
            top = _lane_max(best, sh, lane, 0)
            mine = float32(at) if best == top else float32(n_experts)
            at = min(int(-_lane_max(-mine, sh, lane, 0)), n_experts - 1)  # the lowest id holding the maximum
            for j in range(per):
                if j * LANES + lane == at:
                    p[j] = float32(-1.0)
            w = top / s
            total += w
            if lane == 0:
                ids[ids_at + r] = at
                slots[r] = slot_of[at]
                weights[r] = w
        if norm != 0 and lane == 0:
            for r in range(k):
                weights[r] = weights[r] / total

    return kernel
