// CUDA version of dequant_matvec_4bit.metal (same inputs, outputs, template and launch; see that file).
// Body of an `mx.fast.cuda_kernel`: one warp of 32 threads per output row, warp-shuffle reduction.
const unsigned lane = threadIdx.x;
const unsigned row = blockIdx.y * blockDim.y + threadIdx.y;
if (row >= OUT) {
    return;  // the whole warp leaves together: its 32 lanes share one row
}
constexpr unsigned words = IN / 8;
const uint32_t* wr = w + row * words;
const T* sr = scales + row * (IN / GROUP);
const T* br = biases + row * (IN / GROUP);
float acc = 0.0f;
for (unsigned i = lane; i < words; i += 32) {
    uint32_t packed = wr[i];
    unsigned g = (i * 8) / GROUP;
    float s = static_cast<float>(sr[g]);
    float b = static_cast<float>(br[g]);
#pragma unroll
    for (unsigned j = 0; j < 8; ++j) {
        float xv = x[i * 8 + j];
        float q = static_cast<float>((packed >> (4 * j)) & 0xFu);
        acc += fmaf(q, s * xv, b * xv);
    }
}
#pragma unroll
for (int offset = 16; offset > 0; offset /= 2) {
    acc += __shfl_down_sync(0xffffffffu, acc, offset);
}
if (lane == 0) {
    y[row] = acc;
}
