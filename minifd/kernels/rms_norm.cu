// rms_norm.cu: RMSNorm of each row, with the residual add of the decoder fused in front of it.
//
// Math (fp16 storage, fp32 arithmetic):
//     h      = x + residual                        rounded to fp16: it is the residual stream kept
//     normed = h / sqrt(mean(h^2) + eps) * weight
// Without a residual (residual == nullptr) h is x and only normed is written. The statistics are
// taken over the fp16-rounded h, so normed is exactly the norm of the stream the caller keeps.
//
// Launch geometry: grid (rows), one block per row; the block is a multiple of 64 threads (whole
// warps on every target) and at most kMaxThreads. Each thread strides over its row in chunks of W
// halves: rms_norm_vec8 moves 16-byte vectors (W = 8; hidden % 8 == 0 and 16-byte aligned
// pointers), rms_norm_scalar single halves (W = 1; any shape). Pass 1 reads x and residual once,
// writes h and sums h^2; warp_sum plus one shared slot per warp hands every thread the row total.
// Pass 2 re-reads the thread's own h (just written, still in cache) and writes normed.
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
__device__ __forceinline__ void rms_norm_row(const half_t* x, const half_t* residual, const half_t* weight,
                                             float eps, int hidden, half_t* normed, half_t* h_out) {
    const size_t row_start = (size_t)blockIdx.x * hidden;
    x += row_start;
    normed += row_start;
    if (residual != nullptr) {
        residual += row_start;
        h_out += row_start;
    }

    float sum_squares = 0.0f;
    for (int col = threadIdx.x * W; col < hidden; col += blockDim.x * W) {
        float h[W];
        load_halves(x + col, h);
        if (residual != nullptr) {
            float r[W];
            load_halves(residual + col, r);
#pragma unroll
            for (int i = 0; i < W; ++i) h[i] = __half2float(__float2half(h[i] + r[i]));
            store_halves(h_out + col, h);
        }
#pragma unroll
        for (int i = 0; i < W; ++i) sum_squares += h[i] * h[i];
    }
    const float scale = 1.0f / sqrtf(block_sum(sum_squares) / hidden + eps);

    const half_t* h_in = residual != nullptr ? h_out : x;
    for (int col = threadIdx.x * W; col < hidden; col += blockDim.x * W) {
        float h[W], w[W];
        load_halves(h_in + col, h);
        load_halves(weight + col, w);
#pragma unroll
        for (int i = 0; i < W; ++i) h[i] = h[i] * scale * w[i];
        store_halves(normed + col, h);
    }
}

// x, residual (or nullptr), normed, h_out (nullptr without residual): [rows, hidden]; weight: [hidden]
extern "C" __global__ void __launch_bounds__(kMaxThreads)
rms_norm_vec8(const half_t* x, const half_t* residual, const half_t* weight, float eps, int hidden,
              half_t* normed, half_t* h_out) {
    rms_norm_row<8>(x, residual, weight, eps, hidden, normed, h_out);
}

extern "C" __global__ void __launch_bounds__(kMaxThreads)
rms_norm_scalar(const half_t* x, const half_t* residual, const half_t* weight, float eps, int hidden,
                half_t* normed, half_t* h_out) {
    rms_norm_row<1>(x, residual, weight, eps, hidden, normed, h_out);
}
