// CUDA version of swiglu_4bit.metal (same inputs, outputs, template and launch; see that file).
// Body of an `mx.fast.cuda_kernel`: one warp per output row reads that row of both projections.
const unsigned lane = threadIdx.x;
const unsigned row = blockIdx.y * blockDim.y + threadIdx.y;
if (row >= OUT) {
    return;
}
constexpr unsigned words = IN / 8;
constexpr unsigned groups = IN / GROUP;
const uint32_t* gw = gate_w + row * words;
const uint32_t* uw = up_w + row * words;
float g_acc = 0.0f;
float u_acc = 0.0f;
for (unsigned i = lane; i < words; i += 32) {
    uint32_t gp = gw[i];
    uint32_t upk = uw[i];
    unsigned g = row * groups + (i * 8) / GROUP;
    float gs = static_cast<float>(gate_scales[g]), gb = static_cast<float>(gate_biases[g]);
    float us = static_cast<float>(up_scales[g]), ub = static_cast<float>(up_biases[g]);
#pragma unroll
    for (unsigned j = 0; j < 8; ++j) {
        float xv = x[i * 8 + j];
        g_acc += fmaf(static_cast<float>((gp >> (4 * j)) & 0xFu), gs * xv, gb * xv);
        u_acc += fmaf(static_cast<float>((upk >> (4 * j)) & 0xFu), us * xv, ub * xv);
    }
}
#pragma unroll
for (int offset = 16; offset > 0; offset /= 2) {
    g_acc += __shfl_down_sync(0xffffffffu, g_acc, offset);
    u_acc += __shfl_down_sync(0xffffffffu, u_acc, offset);
}
if (lane == 0) {
    h[row] = g_acc / (1.0f + expf(-g_acc)) * u_acc;
}
