// gemv.cu: ImplA of the heuristic dataflow, a GEMV on CUDA cores for the smallest M (decode batch 1..2).
//
// Math: y[m, n] = sum_k x[m, k] * W[n, k] for m < M, n < N (fp16 in, fp32 accumulation, fp16 out).
// W is in the Hugging Face [N, K] layout, so every output is the dot product of two contiguous rows,
// in any of the weight formats of weight_formats.cuh (-DWEIGHT_FORMAT; fp16, or int8 / int4 codes
// with group scales, dequantized in registers between the loads and the FMAs).
// Three steps around it can be fused, as in flat_gemm.cu (which says why): NORM, the RMSNorm of x
// (x g is staged, the block computes each row's 1 / rms(x) first and scales the dot products by
// it), RESIDUAL, y = r + the product, and GATED, the SwiGLU y[m, j] = SiLU(s[m, gate row j])
// s[m, up row j] on the gate/up interleaved weight (16-row tiles: 8 gate rows, then the same
// features' up rows; minifd/model/weights.py), which saves the MLP a kernel and a round trip of the
// [M, 2 features] product through memory. ROTARY (with or without NORM) ends the QKV projection with RoPE and
// the KV-cache write (rotary_cache.cuh: the weight's q and k rows are paired, so the two rows one
// rotation needs are 8 apart in a 16-row tile), which saves attention a kernel and the round trip of
// qkv.
//
// Why CUDA cores: at M = 1 or 2 the product streams W once at 2 bytes per 2M flops; tensor cores
// would only pad M, and speed is decided by how many bytes of W each thread keeps in flight.
//
// Launch geometry: block = GEMV_THREADS threads = GEMV_THREADS / MINIFD_WARP_SIZE warps. Warp w of
// block b owns the GEMV_ROWS_PER_WARP rows n = (b * warps + w) * GEMV_ROWS_PER_WARP + r, or, GATED or
// ROTARY, warps 2f and 2f + 1 (f = b * warps / 2 + w / 2) share the pair of rows f stands for (rows
// 16 (f / 8) + f % 8 and that + 8: a feature's gate and up rows, or a rotary pair), each taking one
// half of every K chunk, with half the unroll, and the even warp adds the odd one's sums through
// shared memory. So a paired product launches as many warps, each streaming as many bytes, as a
// plain one: pairing whole K per warp halved the warps and left the last wave half full; grid = (ceil(rows / rows_per_block),
// ceil(M / M_TILE)) and blockIdx.y picks M_TILE rows of x. The block walks
// K in chunks of GEMV_STAGE_HALVES / M_TILE: the chunk of its x rows is staged in shared memory once
// for all warps, then each lane streams 16-byte pieces of its warp's rows of W (ROW_PIECE_WEIGHTS =
// 8 halves, 16 int8 or 32 int4 codes with their group's scale and min: weight_formats.cuh), `unroll`
// pieces per row in flight (GEMV_UNROLL for M_TILE <= 2, where the arithmetic is light; half that above, where
// registers go to the accumulators), and a warp_sum closes each dot product. vector_ok == 0 (K not a multiple of 8, or a
// pointer not 16-byte aligned) walks the same geometry with 2-byte loads.
// Before any of this the block waits for the previous kernel (MINIFD_PRODUCT_KERNEL, launch.py).
#include "rotary_cache.cuh"
#include "weight_formats.cuh"

// The geometry can be set at compile time (-D...) so a sweep can compare variants; gemv.py passes
// the values it plans with.
#ifndef GEMV_THREADS
#define GEMV_THREADS 128
#endif
#ifndef GEMV_ROWS_PER_WARP
#define GEMV_ROWS_PER_WARP 1
#endif
#ifndef GEMV_UNROLL
#define GEMV_UNROLL 8  // 8-weight pieces of each row in flight per lane for M_TILE <= 2 (half that above)
#endif
#ifndef GEMV_STAGE_HALVES
#define GEMV_STAGE_HALVES 8192  // 16 KB of shared memory holds M_TILE x-rows of one K chunk
#endif

__device__ __forceinline__ int gemv_min(int a, int b) { return a < b ? a : b; }

// x rows [m0, m0 + M_TILE) x columns [k0, k0 + width) -> x_stage[m * chunk + k]; rows past M are zero.
// NORM (gain != nullptr) stages x g instead of x.
template <int M_TILE>
__device__ __forceinline__ void stage_x_chunk(half_t* x_stage, const half_t* x, const half_t* gain, int m0, int M,
                                              int K, int k0, int width, int vector_ok) {
    constexpr int chunk = GEMV_STAGE_HALVES / M_TILE;
    if (vector_ok) {
        const int pieces = width / 8;
        for (int i = threadIdx.x; i < M_TILE * pieces; i += GEMV_THREADS) {
            const int m = i / pieces, piece = i % pieces;
            uint4 value = {0u, 0u, 0u, 0u};
            if (m0 + m < M) value = load16(x + (size_t)(m0 + m) * K + k0 + 8 * piece);
            if (gain != nullptr) {
                float values[8], gains[8];
                halves8_to_float(value, values);
                halves8_to_float(load16(gain + k0 + 8 * piece), gains);
                for (int j = 0; j < 8; ++j) values[j] *= gains[j];
                value = float_to_halves8(values);
            }
            store16(x_stage + m * chunk + 8 * piece, value);
        }
    } else {
        for (int i = threadIdx.x; i < M_TILE * width; i += GEMV_THREADS) {
            const int m = i / width, k = i % width;
            float value = (m0 + m < M) ? __half2float(x[(size_t)(m0 + m) * K + k0 + k]) : 0.0f;
            if (gain != nullptr) value *= __half2float(gain[k0 + k]);
            x_stage[m * chunk + k] = __float2half(value);
        }
    }
}

// NORM: 1 / sqrt(mean_k x[m0 + m, k]^2 + eps) for the block's M_TILE rows -> row_scale[m] (every thread
// sees it after the call); the warps' partial sums are added in warp order.
template <int M_TILE>
__device__ __forceinline__ void inverse_rms_rows(float* row_scale, const half_t* x, int m0, int M, int K, float eps,
                                                 int vector_ok) {
    constexpr int warps = GEMV_THREADS / MINIFD_WARP_SIZE;
    __shared__ float warp_parts[M_TILE][warps];
    const int warp = threadIdx.x / MINIFD_WARP_SIZE, lane = threadIdx.x % MINIFD_WARP_SIZE;
#pragma unroll
    for (int m = 0; m < M_TILE; ++m) {
        float squares = 0.0f;
        if (m0 + m < M) {
            const half_t* row = x + (size_t)(m0 + m) * K;
            if (vector_ok) {
                for (int k = 8 * threadIdx.x; k < K; k += 8 * GEMV_THREADS) {
                    float values[8];
                    halves8_to_float(load16(row + k), values);
                    for (int j = 0; j < 8; ++j) squares += values[j] * values[j];
                }
            } else {
                for (int k = threadIdx.x; k < K; k += GEMV_THREADS) squares += __half2float(row[k]) * __half2float(row[k]);
            }
        }
        squares = warp_sum(squares);
        if (lane == 0) warp_parts[m][warp] = squares;
    }
    __syncthreads();
    if (threadIdx.x < M_TILE) {
        float total = 0.0f;
        for (int v = 0; v < warps; ++v) total += warp_parts[threadIdx.x][v];
        row_scale[threadIdx.x] = rsqrtf(total / K + eps);
    }
    __syncthreads();
}

template <int M_TILE, bool NORM, bool RESIDUAL, bool GATED, bool ROTARY = false>
__device__ __forceinline__ void gemv_rows(const half_t* __restrict__ x, const void* __restrict__ w,
                                          const half_t* __restrict__ w_scales, const half_t* __restrict__ w_mins,
                                          half_t* __restrict__ y, const half_t* __restrict__ gain,
                                          const half_t* __restrict__ residual, int M, int N, int K, float eps,
                                          int vector_ok, RotaryCache rotary = RotaryCache{}) {
    // x: [M, K], W: [N, K] as (w, w_scales, w_mins), gain: [K] (NORM), residual: [M, N] (RESIDUAL) -> y: [M, N], or [M, N / 2]
    // when GATED; ROTARY writes rotary.q [M, n_heads, head_dim] and the caches instead of y
    constexpr bool PAIRED = GATED || ROTARY;  // two warps share the two rows of one pair, halving K
    constexpr int k_parts = PAIRED ? 2 : 1;
    constexpr int chunk = GEMV_STAGE_HALVES / M_TILE;
    constexpr int warps = GEMV_THREADS / MINIFD_WARP_SIZE;
    static_assert(!PAIRED || warps % 2 == 0, "the two warps of a pair must be in one block");
    constexpr int rows = PAIRED ? 2 : GEMV_ROWS_PER_WARP;  // rows of W per warp
    constexpr int full_unroll = M_TILE <= 2 ? GEMV_UNROLL : (GEMV_UNROLL + 1) / 2;
    constexpr int unroll = PAIRED ? (full_unroll + 1) / 2 : full_unroll;
    __shared__ __align__(16) half_t x_stage[GEMV_STAGE_HALVES];
    __shared__ float row_scale[M_TILE];

    const int warp = threadIdx.x / MINIFD_WARP_SIZE, lane = threadIdx.x % MINIFD_WARP_SIZE;
    const int m0 = blockIdx.y * M_TILE;
    const int feature = (blockIdx.x * warps + warp) / k_parts;  // PAIRED: the pair (GATED: the output column)
    const int k_part = warp % k_parts;  // which half of each chunk this warp sums
    const int row0 = PAIRED ? 16 * (feature / 8) + feature % 8 : feature * GEMV_ROWS_PER_WARP;
    const int row_step = PAIRED ? 8 : 1;  // PAIRED: the first row, then its partner 8 further
    // Rows past N re-read row N - 1 and drop the result, so the load stream needs no bounds branch.
    WeightRow w_rows[rows];
#pragma unroll
    for (int r = 0; r < rows; ++r) w_rows[r] = weight_row(w, w_scales, w_mins, gemv_min(row0 + r * row_step, N - 1), K);

    float acc[rows][M_TILE];
#pragma unroll
    for (int r = 0; r < rows; ++r)
#pragma unroll
        for (int m = 0; m < M_TILE; ++m) acc[r][m] = 0.0f;

    if (NORM) inverse_rms_rows<M_TILE>(row_scale, x, m0, M, K, eps, vector_ok);
    for (int k0 = 0; k0 < K; k0 += chunk) {
        const int width = gemv_min(chunk, K - k0);
        __syncthreads();  // every warp is done with the previous chunk
        stage_x_chunk<M_TILE>(x_stage, x, NORM ? gain : nullptr, m0, M, K, k0, width, vector_ok);
        __syncthreads();
        if (vector_ok) {
            // quantized widths are multiples of 32 (K % 32 == 0 and 32 | chunk), so pieces are whole
            const int part = (width / ROW_PIECE_WEIGHTS + k_parts - 1) / k_parts;  // pieces per K part
            const int pieces = gemv_min(width / ROW_PIECE_WEIGHTS, (k_part + 1) * part);
            for (int first = k_part * part + lane; first < pieces; first += MINIFD_WARP_SIZE * unroll) {
                RowPiece w_pieces[rows][unroll];
#pragma unroll
                for (int u = 0; u < unroll; ++u) {
                    const int piece = first + u * MINIFD_WARP_SIZE;
#pragma unroll
                    for (int r = 0; r < rows; ++r)
                        w_pieces[r][u] = piece < pieces ? load_row_piece(w_rows[r], k0 + ROW_PIECE_WEIGHTS * piece)
                                                        : RowPiece{};
                }
#pragma unroll
                for (int u = 0; u < unroll; ++u) {
                    const int piece = first + u * MINIFD_WARP_SIZE;
                    if (piece >= pieces) break;
                    float w_values[rows][ROW_PIECE_WEIGHTS];
#pragma unroll
                    for (int r = 0; r < rows; ++r) row_piece_to_float(w_pieces[r][u], w_values[r]);
#pragma unroll
                    for (int m = 0; m < M_TILE; ++m) {
#pragma unroll
                        for (int s = 0; s < ROW_PIECE_WEIGHTS / 8; ++s) {
                            float x_values[8];
                            halves8_to_float(load16(x_stage + m * chunk + ROW_PIECE_WEIGHTS * piece + 8 * s), x_values);
#pragma unroll
                            for (int r = 0; r < rows; ++r)
#pragma unroll
                                for (int j = 0; j < 8; ++j) acc[r][m] += w_values[r][8 * s + j] * x_values[j];
                        }
                    }
                }
            }
        } else {
            const int part = (width + k_parts - 1) / k_parts;
            for (int k = k_part * part + lane; k < gemv_min(width, (k_part + 1) * part); k += MINIFD_WARP_SIZE) {
#pragma unroll
                for (int r = 0; r < rows; ++r) {
                    const float w_value = load_weight(w_rows[r], k0 + k);
#pragma unroll
                    for (int m = 0; m < M_TILE; ++m) acc[r][m] += w_value * __half2float(x_stage[m * chunk + k]);
                }
            }
        }
    }

    float totals[rows][M_TILE];
#pragma unroll
    for (int r = 0; r < rows; ++r)
#pragma unroll
        for (int m = 0; m < M_TILE; ++m) totals[r][m] = warp_sum(acc[r][m]);
    if (PAIRED) {  // the odd warp's half of K joins the even warp's
        __shared__ float odd_totals[warps][rows][M_TILE];
        if (k_part == 1 && lane == 0) {
#pragma unroll
            for (int r = 0; r < rows; ++r)
#pragma unroll
                for (int m = 0; m < M_TILE; ++m) odd_totals[warp][r][m] = totals[r][m];
        }
        __syncthreads();
        if (k_part == 1) return;
#pragma unroll
        for (int r = 0; r < rows; ++r)
#pragma unroll
            for (int m = 0; m < M_TILE; ++m) totals[r][m] += odd_totals[warp + 1][r][m];
    }
#pragma unroll
    for (int r = 0; r < rows; ++r)
#pragma unroll
        for (int m = 0; m < M_TILE; ++m) totals[r][m] *= NORM ? row_scale[m] : 1.0f;
    if (lane != 0) return;
#pragma unroll
    for (int m = 0; m < M_TILE; ++m) {
        if (m0 + m >= M) continue;
        if (GATED) {
            if (feature < N / 2) y[(size_t)(m0 + m) * (N / 2) + feature] = __float2half(silu(totals[0][m]) * totals[rows - 1][m]);
            continue;
        }
        if (ROTARY) {
            float first[1] = {totals[0][m]}, partner[1] = {totals[rows - 1][m]};
            if (feature < N / 2) store_rotary_pairs<1>(rotary, m0 + m, row0, 8, first, partner);
            continue;
        }
#pragma unroll
        for (int r = 0; r < rows; ++r) {
            if (row0 + r >= N) continue;
            const size_t out = (size_t)(m0 + m) * N + row0 + r;
            y[out] = __float2half(RESIDUAL ? totals[r][m] + __half2float(residual[out]) : totals[r][m]);
        }
    }
}

// One kernel per M_TILE (the accumulators live in registers, so the tile is a compile-time constant)
// and fused steps: gemv_m<M_TILE>_<store|store_norm|residual|gated|gated_norm|rotary|rotary_norm> (the
// rotary ones with RoPE and the cache write: rotary_cache.cuh's entry point, pair tile 8, head_dim % 16 == 0).
#define GEMV_KERNELS(M_TILE)                                                                                \
    MINIFD_PRODUCT_KERNEL(gemv_m##M_TILE##_store, GEMV_THREADS, 1, gemv_rows<M_TILE, false, false, false>)     \
    MINIFD_PRODUCT_KERNEL(gemv_m##M_TILE##_store_norm, GEMV_THREADS, 1, gemv_rows<M_TILE, true, false, false>) \
    MINIFD_PRODUCT_KERNEL(gemv_m##M_TILE##_residual, GEMV_THREADS, 1, gemv_rows<M_TILE, false, true, false>)   \
    MINIFD_PRODUCT_KERNEL(gemv_m##M_TILE##_gated, GEMV_THREADS, 1, gemv_rows<M_TILE, false, false, true>)      \
    MINIFD_PRODUCT_KERNEL(gemv_m##M_TILE##_gated_norm, GEMV_THREADS, 1, gemv_rows<M_TILE, true, false, true>)   \
    MINIFD_ROTARY_PRODUCT_KERNEL(gemv_m##M_TILE##_rotary, GEMV_THREADS, 1, gemv_rows<M_TILE, false, false, false, true>) \
    MINIFD_ROTARY_PRODUCT_KERNEL(gemv_m##M_TILE##_rotary_norm, GEMV_THREADS, 1, gemv_rows<M_TILE, true, false, false, true>)

GEMV_KERNELS(1) GEMV_KERNELS(2) GEMV_KERNELS(4) GEMV_KERNELS(8)
