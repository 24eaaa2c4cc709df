// out = residual + shared_gate * shared + sum_e weights[e] * expert_out[e]: the end of one MoE layer
// for one token, in one pass over the hidden vector.
//
// Body of an `mx.fast.metal_kernel`.
//   inputs:  expert_out [K, D] float; weights [K] float (router probabilities after top-k);
//            shared [D] float (the shared expert's output, zeros if none); shared_gate [1] float (its
//            sigmoid gate, already applied: 1 when ungated, 0 when absent); residual [D] float
//   outputs: out [D] float
//   template: K (experts per token), D (hidden size)
//   launch:  grid (D, 1, 1), threadgroup (256, 1, 1)
//
// The sum runs over e in order 0..K-1, then adds the shared term, then the residual.
// NumPy twin: conformance/test_mlx_backend.py::moe_combine_twin.
uint d = thread_position_in_grid.x;
if (d >= D) {
    return;
}
float acc = 0.0f;
for (uint e = 0; e < K; ++e) {
    acc = metal::fma(weights[e], expert_out[e * D + d], acc);
}
acc = metal::fma(shared_gate[0], shared[d], acc);
out[d] = acc + residual[d];
