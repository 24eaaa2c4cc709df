// h = silu(G x) * (U x): the gate and up projections of one expert in one pass over x (fused SwiGLU).
//
// Body of an `mx.fast.metal_kernel`.
//   inputs:  x [IN] float; gate_w, up_w [OUT, IN/8] uint32; gate_scales, gate_biases, up_scales,
//            up_biases [OUT, IN/GROUP] of type T
//   outputs: h [OUT] float          (OUT = moe_intermediate_size)
//   template: T, IN, GROUP, OUT
//   launch:  grid (32, OUT, 1), threadgroup (32, ROWS, 1): one SIMD group per output row, which reads
//            the matching rows of both projections so x is loaded once for both.
//
// Dot products use the FMA form of dequant_matvec_4bit.metal; silu(g) = g / (1 + exp(-g)).
// NumPy twin: conformance/test_mlx_backend.py::swiglu_4bit_twin.
uint lane = thread_position_in_threadgroup.x;
uint row = thread_position_in_grid.y;
if (row >= OUT) {
    return;  // a whole SIMD group leaves together: its 32 lanes share one row
}
const uint words = IN / 8;
const uint groups = IN / GROUP;
device const uint32_t* gw = gate_w + row * words;
device const uint32_t* uw = up_w + row * words;
float g_acc = 0.0f;
float u_acc = 0.0f;
for (uint i = lane; i < words; i += 32) {
    uint32_t gp = gw[i];
    uint32_t upk = uw[i];
    uint g = row * groups + (i * 8) / GROUP;
    float gs = float(gate_scales[g]), gb = float(gate_biases[g]);
    float us = float(up_scales[g]), ub = float(up_biases[g]);
    for (uint j = 0; j < 8; ++j) {
        float xv = x[i * 8 + j];
        g_acc += metal::fma(float((gp >> (4 * j)) & 0xFu), gs * xv, gb * xv);
        u_acc += metal::fma(float((upk >> (4 * j)) & 0xFu), us * xv, ub * xv);
    }
}
g_acc = metal::simd_sum(g_acc);
u_acc = metal::simd_sum(u_acc);
if (lane == 0) {
    h[row] = g_acc / (1.0f + metal::exp(-g_acc)) * u_acc;
}
