// CUDA version of moe_combine.metal (same inputs, outputs, template and launch; see that file).
const unsigned d = blockIdx.x * blockDim.x + threadIdx.x;
if (d >= D) {
    return;
}
float acc = 0.0f;
for (unsigned e = 0; e < K; ++e) {
    acc = fmaf(weights[e], expert_out[e * D + d], acc);
}
acc = fmaf(shared_gate[0], shared[d], acc);
out[d] = acc + residual[d];
