// silu_mul.cu: the SwiGLU gate of the MLP, read straight out of the fused gate/up projection.
//
// Math (fp16 storage, fp32 arithmetic), for each row and column c < intermediate:
//     out[c] = SiLU(gate[c]) * up[c] = gate[c] / (1 + exp(-gate[c])) * up[c]
// where gate = gate_up[:, :intermediate] and up = gate_up[:, intermediate:]. exp(-gate) overflows
// to inf for very negative gates, and gate / inf = -0 is the correct limit.
//
// Launch geometry: a 1-D grid of blocks of 256 threads over rows x (intermediate / W) chunks; one
// thread produces W outputs. silu_mul_vec8: W = 8, 16-byte loads and stores (intermediate % 8 == 0,
// 16-byte aligned pointers); silu_mul_scalar: W = 1, any shape.
#include "portable.cuh"

template <int W>
__device__ __forceinline__ void silu_mul_chunk(const half_t* gate_up, int rows, int intermediate, half_t* out) {
    const int chunks_per_row = intermediate / W;
    const long long item = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (item >= (long long)rows * chunks_per_row) return;
    const size_t row = (size_t)(item / chunks_per_row);
    const int col = (int)(item % chunks_per_row) * W;

    const half_t* gate = gate_up + row * 2 * intermediate + col;
    float g[W], u[W];
    load_halves(gate, g);
    load_halves(gate + intermediate, u);
#pragma unroll
    for (int i = 0; i < W; ++i) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    store_halves(out + row * intermediate + col, g);
}

// gate_up: [rows, 2 intermediate] (gate columns, then up columns); out: [rows, intermediate]
extern "C" __global__ void silu_mul_vec8(const half_t* gate_up, int rows, int intermediate, half_t* out) {
    silu_mul_chunk<8>(gate_up, rows, intermediate, out);
}

extern "C" __global__ void silu_mul_scalar(const half_t* gate_up, int rows, int intermediate, half_t* out) {
    silu_mul_chunk<1>(gate_up, rows, intermediate, out);
}
