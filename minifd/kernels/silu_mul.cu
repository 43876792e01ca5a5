// silu_mul.cu: the SwiGLU gate of the MLP, read straight out of the fused gate/up projection.
//
// Math (fp16 storage, fp32 arithmetic), for each row and feature c < features:
//     out[c] = SiLU(gate[c]) * up[c] = gate[c] / (1 + exp(-gate[c])) * up[c]
// where gate_up's columns come in tiles of 16: gate[8j..8j+7] then up[8j..8j+7] (silu_mul.py says
// why). exp(-gate) overflows to inf for very negative gates, and gate / inf = -0 is the correct limit.
//
// Launch geometry: a 1-D grid of blocks of 256 threads over rows x (features / W) chunks; one
// thread produces W outputs. silu_mul_vec8: W = 8, one tile's 16-byte loads and store (16-byte
// aligned pointers); silu_mul_scalar: W = 1.
#include "portable.cuh"

#define GATE_TILE 8

template <int W>
__device__ __forceinline__ void silu_mul_chunk(const half_t* gate_up, int rows, int features, half_t* out) {
    const int chunks_per_row = features / W;
    const long long item = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (item >= (long long)rows * chunks_per_row) return;
    const size_t row = (size_t)(item / chunks_per_row);
    const int col = (int)(item % chunks_per_row) * W;

    const half_t* gate = gate_up + row * 2 * features + (col / GATE_TILE) * 2 * GATE_TILE + col % GATE_TILE;
    float g[W], u[W];
    load_halves(gate, g);
    load_halves(gate + GATE_TILE, u);
#pragma unroll
    for (int i = 0; i < W; ++i) g[i] = silu(g[i]) * u[i];
    store_halves(out + row * features + col, g);
}

// gate_up: [rows, 2 features] (interleaved tiles); out: [rows, features]; features % 8 == 0
extern "C" __global__ void silu_mul_vec8(const half_t* gate_up, int rows, int features, half_t* out) {
    start_after_previous_kernel();
    silu_mul_chunk<8>(gate_up, rows, features, out);
}

extern "C" __global__ void silu_mul_scalar(const half_t* gate_up, int rows, int features, half_t* out) {
    start_after_previous_kernel();
    silu_mul_chunk<1>(gate_up, rows, features, out);
}
