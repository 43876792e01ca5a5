// rms_norm.cu: RMSNorm of each row, for the products that do not fold it into their prologue
// (the library GEMM of a prefill, and the flat GEMM over quantized weights: minifd/kernels/linear.py
// says why). It starts once the previous kernel has finished (start_after_previous_kernel, launch.py).
//
// Math (fp16 storage, fp32 arithmetic):
//     normed = x / sqrt(mean(x^2) + eps) * weight
//
// Launch geometry: grid (rows), one block per row; the block is a multiple of 64 threads (whole
// warps on every target) and at most kMaxThreads. Each thread strides over its row in chunks of W
// halves: rms_norm_vec8 moves 16-byte vectors (W = 8; hidden % 8 == 0 and 16-byte aligned
// pointers), rms_norm_scalar single halves (W = 1; any shape). Pass 1 sums x^2; warp_sum plus one
// shared slot per warp hands every thread the row total. Pass 2 re-reads the thread's own x (still
// in cache) and writes normed.
#include "portable.cuh"

constexpr int kMaxThreads = 1024;

// Sum of `value` over the block, returned to every thread. blockDim.x is a multiple of
// MINIFD_WARP_SIZE and at most kMaxThreads, so the per-warp sums fit in one warp.
__device__ __forceinline__ float block_sum(float value) {
    __shared__ float warp_sums[kMaxThreads / MINIFD_WARP_SIZE];
    const int lane = threadIdx.x % MINIFD_WARP_SIZE;
    value = warp_sum(value);
    if (lane == 0) warp_sums[threadIdx.x / MINIFD_WARP_SIZE] = value;
    __syncthreads();
    const int n_warps = blockDim.x / MINIFD_WARP_SIZE;
    return warp_sum(lane < n_warps ? warp_sums[lane] : 0.0f);
}

template <int W>
__device__ __forceinline__ void rms_norm_row(const half_t* x, const half_t* weight, float eps, int hidden,
                                             half_t* normed) {
    const size_t row_start = (size_t)blockIdx.x * hidden;
    x += row_start;
    normed += row_start;

    float sum_squares = 0.0f;
    for (int col = threadIdx.x * W; col < hidden; col += blockDim.x * W) {
        float v[W];
        load_halves(x + col, v);
#pragma unroll
        for (int i = 0; i < W; ++i) sum_squares += v[i] * v[i];
    }
    const float scale = 1.0f / sqrtf(block_sum(sum_squares) / hidden + eps);

    for (int col = threadIdx.x * W; col < hidden; col += blockDim.x * W) {
        float v[W], w[W];
        load_halves(x + col, v);
        load_halves(weight + col, w);
#pragma unroll
        for (int i = 0; i < W; ++i) v[i] = v[i] * scale * w[i];
        store_halves(normed + col, v);
    }
}

// x, normed: [rows, hidden]; weight: [hidden]
extern "C" __global__ void __launch_bounds__(kMaxThreads)
rms_norm_vec8(const half_t* x, const half_t* weight, float eps, int hidden, half_t* normed) {
    start_after_previous_kernel();
    rms_norm_row<8>(x, weight, eps, hidden, normed);
}

extern "C" __global__ void __launch_bounds__(kMaxThreads)
rms_norm_scalar(const half_t* x, const half_t* weight, float eps, int hidden, half_t* normed) {
    start_after_previous_kernel();
    rms_norm_row<1>(x, weight, eps, hidden, normed);
}
