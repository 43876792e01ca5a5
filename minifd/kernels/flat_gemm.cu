// flat_gemm.cu: ImplB of the heuristic dataflow, FlashDecoding++'s flat GEMM on tensor cores.
//
// Math: y[m, n] = sum_k x[m, k] * W[n, k] for m < M, n < N (fp16 in, fp32 accumulation, fp16 out),
// i.e. y^T[N, M] = W[N, K] x^T[K, M]: W is the MMA's 16-row "A" operand and x its narrow "B" operand,
// so M is padded only to the MMA's narrow side (8 on NVIDIA) instead of a library's 64.
//
// Launch geometry: block = FLAT_THREADS = 128 threads; grid = (ceil(N / FLAT_BN), splits,
// ceil(M / M_TILE)). Block (b, s, g) owns output features [FLAT_BN b, FLAT_BN (b + 1)) and x rows
// [M_TILE g, M_TILE (g + 1)), and runs the K tiles [s T, (s + 1) T) of width FlatTile::bk in sequence
// (T = tiles_per_split): no atomics between K tiles. A K tile of W is FLAT_BN rows by bk columns, so
// each row of W is read in runs of 512 bytes (M_TILE 8) or 256 bytes, as long as a GEMV warp's.
// Double buffering: two shared-memory stages; the next tile's W and x land by cp.async (sm_80+)
// while the tensor cores consume the current one.
//
// Split K: when N / FLAT_BN blocks cannot fill the GPU, splits > 1 blocks share one output tile.
// Each writes its fp32 partial tile to workspace[s, m, n]; the last block to arrive at the tile's
// counter (an atomic ticket) adds the partials in split order 0..splits-1, so the result does not
// depend on arrival order, writes y and re-arms the counter to 0 for the next launch (graph replay).
//
// Compute step per target, each on the whole FLAT_BN x bk stage, its K split into `slices`:
// mma.sync m16n8k16 (NVIDIA sm_80+: warp w owns K quarter w), v_mfma_f32_16x16x16f16 (AMD CDNA:
// wavefront v owns K half v), otherwise CUDA cores (thread t owns row t % FLAT_BN, K quarter
// t / FLAT_BN). Each slice leaves a partial fp32 tile in shared memory; the shared epilogue adds the
// slices in order. vector_ok == 0 (K % 8 != 0 or a misaligned pointer) stages with 2-byte loads.
#include "portable.cuh"

#define FLAT_THREADS 128
#define FLAT_BN 32                  // output features (rows of W) per block
#define FLAT_PAD 8                  // halves of padding per shared row: rows 16 bytes apart in bank terms
#define FLAT_C_STRIDE (FLAT_BN + 4) // fp32 partial tile row, padded against bank conflicts

// Shared-memory geometry of one pipeline stage for a given M_TILE: W tile then x tile.
template <int M_TILE>
struct FlatTile {
    static constexpr int bk = M_TILE == 8 ? 256 : 128;  // K per stage: 16-21 KB of W and x either way
    static constexpr int stride = bk + FLAT_PAD;         // halves per shared row
    static constexpr int w_halves = FLAT_BN * stride;
    static constexpr int stage_halves = (FLAT_BN + M_TILE) * stride;
};

__device__ __forceinline__ int flat_min(int a, int b) { return a < b ? a : b; }

// Eight halves of row `row` of a [rows, K] matrix starting at column k -> dst; zeros outside.
__device__ __forceinline__ void stage_piece(half_t* dst, const half_t* matrix, int row, int rows, int k, int K,
                                            int vector_ok) {
    if (row >= rows || k >= K) {
        const uint4 zero = {0u, 0u, 0u, 0u};
        store16(dst, zero);
        return;
    }
    const half_t* src = matrix + (size_t)row * K + k;
    if (vector_ok) {
        async_copy16(dst, src);  // K % 8 == 0 here, so the piece lies inside the row
        return;
    }
    for (int i = 0; i < 8; ++i) dst[i] = (k + i < K) ? src[i] : __float2half(0.0f);
}

// W rows [n0, n0 + FLAT_BN) and x rows [m0, m0 + M_TILE), columns [k0, k0 + bk) -> one stage.
template <int M_TILE>
__device__ __forceinline__ void stage_tiles(half_t* stage, const half_t* w, const half_t* x, int n0, int m0, int k0,
                                            int M, int N, int K, int vector_ok) {
    typedef FlatTile<M_TILE> T;
    constexpr int pieces_per_row = T::bk / 8;
    for (int i = threadIdx.x; i < FLAT_BN * pieces_per_row; i += FLAT_THREADS) {
        const int row = i / pieces_per_row, col = (i % pieces_per_row) * 8;
        stage_piece(stage + row * T::stride + col, w, n0 + row, N, k0 + col, K, vector_ok);
    }
    half_t* x_tile = stage + T::w_halves;
    for (int i = threadIdx.x; i < M_TILE * pieces_per_row; i += FLAT_THREADS) {
        const int row = i / pieces_per_row, col = (i % pieces_per_row) * 8;
        stage_piece(x_tile + row * T::stride + col, x, m0 + row, M, k0 + col, K, vector_ok);
    }
}

// ---------------------------------------------------------------------------------------------
// The block's accumulators: multiply() consumes one staged K tile (W at `stage`, x after it);
// store() writes slice s's sums over the consumed tiles to
// partials[(s * M_TILE + m) * FLAT_C_STRIDE + n] = sum over its K columns of x[m0 + m, k] W[n0 + n, k].
// ---------------------------------------------------------------------------------------------
#if defined(MINIFD_HAS_MMA_16816)

template <int M_TILE>
struct TileAccumulator {
    typedef FlatTile<M_TILE> T;
    static constexpr int slices = FLAT_THREADS / 32;     // warp w owns K quarter w of every stage
    static constexpr int row_tiles = FLAT_BN / 16;       // 16-row MMA tiles
    static constexpr int col_tiles = M_TILE / 8;         // 8-column MMA tiles
    static constexpr int steps = T::bk / slices / 16;    // k16 steps per warp per stage
    float acc[row_tiles][col_tiles][4];

    __device__ __forceinline__ void zero() {
#pragma unroll
        for (int r = 0; r < row_tiles; ++r)
#pragma unroll
            for (int c = 0; c < col_tiles; ++c)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[r][c][j] = 0.0f;
    }

    __device__ __forceinline__ void multiply(const half_t* stage) {
        const half_t* x_tile = stage + T::w_halves;
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
        for (int step = 0; step < steps; ++step) {
            const int k = (warp * steps + step) * 16;
            unsigned a[row_tiles][4], b[col_tiles][2];
#pragma unroll
            for (int r = 0; r < row_tiles; ++r)
                ldmatrix_x4(a[r], stage + (r * 16 + lane % 16) * T::stride + k + (lane / 16) * 8);
#pragma unroll
            for (int c = 0; c < col_tiles; ++c)
                ldmatrix_x2(b[c], x_tile + (c * 8 + lane % 8) * T::stride + k + ((lane / 8) % 2) * 8);
#pragma unroll
            for (int r = 0; r < row_tiles; ++r)
#pragma unroll
                for (int c = 0; c < col_tiles; ++c) mma_16816(acc[r][c], a[r], b[c]);
        }
    }

    __device__ __forceinline__ void store(float* partials) const {
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
        float* slice = partials + warp * M_TILE * FLAT_C_STRIDE;
#pragma unroll
        for (int r = 0; r < row_tiles; ++r)
#pragma unroll
            for (int c = 0; c < col_tiles; ++c)
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int n = r * 16 + lane / 4 + (j / 2) * 8;
                    const int m = c * 8 + (lane % 4) * 2 + j % 2;
                    slice[m * FLAT_C_STRIDE + n] = acc[r][c][j];
                }
    }
};

#elif defined(MINIFD_HAS_MFMA_16X16X16)

template <int M_TILE>
struct TileAccumulator {
    typedef FlatTile<M_TILE> T;
    static constexpr int slices = FLAT_THREADS / 64;      // wavefront v owns K half v of every stage
    static constexpr int row_tiles = FLAT_BN / 16;        // 16-row MFMA tiles
    static constexpr int col_tiles = (M_TILE + 15) / 16;  // 16-column MFMA tiles; columns past M_TILE are zero
    static constexpr int steps = T::bk / slices / 16;
    mfma_float4 acc[row_tiles][col_tiles];

    __device__ __forceinline__ void zero() {
#pragma unroll
        for (int r = 0; r < row_tiles; ++r)
#pragma unroll
            for (int c = 0; c < col_tiles; ++c) acc[r][c] = mfma_float4{0.0f, 0.0f, 0.0f, 0.0f};
    }

    __device__ __forceinline__ void multiply(const half_t* stage) {
        static_assert(MINIFD_WARP_SIZE == 64, "MFMA layouts assume wavefront 64");
        const half_t* x_tile = stage + T::w_halves;
        const int wave = threadIdx.x / 64, lane = threadIdx.x % 64;
#pragma unroll
        for (int step = 0; step < steps; ++step) {
            const int kq = (wave * steps + step) * 16 + (lane / 16) * 4;
            mfma_half4 b[col_tiles];
#pragma unroll
            for (int c = 0; c < col_tiles; ++c) {
                const int m = c * 16 + lane % 16;
                b[c] = m < M_TILE ? *reinterpret_cast<const mfma_half4*>(x_tile + m * T::stride + kq)
                                  : mfma_half4{0, 0, 0, 0};
            }
#pragma unroll
            for (int r = 0; r < row_tiles; ++r) {
                const mfma_half4 a = *reinterpret_cast<const mfma_half4*>(stage + (r * 16 + lane % 16) * T::stride + kq);
#pragma unroll
                for (int c = 0; c < col_tiles; ++c) acc[r][c] = mfma_16x16x16(a, b[c], acc[r][c]);
            }
        }
    }

    __device__ __forceinline__ void store(float* partials) const {
        const int wave = threadIdx.x / 64, lane = threadIdx.x % 64;
        float* slice = partials + wave * M_TILE * FLAT_C_STRIDE;
#pragma unroll
        for (int r = 0; r < row_tiles; ++r)
#pragma unroll
            for (int c = 0; c < col_tiles; ++c) {
                const int m = c * 16 + lane % 16;
                if (m >= M_TILE) continue;
#pragma unroll
                for (int i = 0; i < 4; ++i) slice[m * FLAT_C_STRIDE + r * 16 + (lane / 16) * 4 + i] = acc[r][c][i];
            }
    }
};

#else

template <int M_TILE>
struct TileAccumulator {
    typedef FlatTile<M_TILE> T;
    static constexpr int slices = FLAT_THREADS / FLAT_BN;  // thread t: row t % FLAT_BN, K slice t / FLAT_BN
    static constexpr int width = T::bk / slices;
    float acc[M_TILE];

    __device__ __forceinline__ void zero() {
#pragma unroll
        for (int m = 0; m < M_TILE; ++m) acc[m] = 0.0f;
    }

    __device__ __forceinline__ void multiply(const half_t* stage) {
        const half_t* x_tile = stage + T::w_halves;
        const int row = threadIdx.x % FLAT_BN, k_begin = threadIdx.x / FLAT_BN * width;
        for (int k = k_begin; k < k_begin + width; k += 8) {
            float w_values[8];
            halves8_to_float(load16(stage + row * T::stride + k), w_values);
#pragma unroll
            for (int m = 0; m < M_TILE; ++m) {
                float x_values[8];
                halves8_to_float(load16(x_tile + m * T::stride + k), x_values);
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[m] += w_values[j] * x_values[j];
            }
        }
    }

    __device__ __forceinline__ void store(float* partials) const {
        float* slice = partials + threadIdx.x / FLAT_BN * M_TILE * FLAT_C_STRIDE;
#pragma unroll
        for (int m = 0; m < M_TILE; ++m) slice[m * FLAT_C_STRIDE + threadIdx.x % FLAT_BN] = acc[m];
    }
};

#endif

// Block-level sum of one output element over the accumulator's K slices, in slice order.
template <int SLICES, int M_TILE>
__device__ __forceinline__ float slice_sum(const float* partials, int m, int n) {
    float total = 0.0f;
#pragma unroll
    for (int s = 0; s < SLICES; ++s) total += partials[(s * M_TILE + m) * FLAT_C_STRIDE + n];
    return total;
}

// ---------------------------------------------------------------------------------------------
// The kernel body
// ---------------------------------------------------------------------------------------------
template <int M_TILE>
__device__ __forceinline__ void flat_gemm_block(const half_t* __restrict__ x, const half_t* __restrict__ w,
                                                half_t* __restrict__ y, float* workspace, int* counters, int M,
                                                int N, int K, int tiles_per_split, int vector_ok) {
    // x: [M, K], w: [N, K] -> y: [M, N]; workspace: [splits, M, N] fp32; counters: [m groups * N blocks]
    typedef FlatTile<M_TILE> T;
    typedef TileAccumulator<M_TILE> Accumulator;
    static_assert(Accumulator::slices * M_TILE * FLAT_C_STRIDE * 4 <= 2 * T::stage_halves * 2,
                  "the partial tiles reuse the stages");
    __shared__ __align__(16) half_t stages[2 * T::stage_halves];
    __shared__ int earlier_arrivals;

    const int n0 = blockIdx.x * FLAT_BN, split = blockIdx.y, m0 = blockIdx.z * M_TILE;
    const int splits = gridDim.y;
    const int k_tiles = (K + T::bk - 1) / T::bk;
    const int tile_begin = split * tiles_per_split;
    const int tile_end = flat_min(tile_begin + tiles_per_split, k_tiles);

    Accumulator accumulator;
    accumulator.zero();

    if (tile_begin < tile_end) stage_tiles<M_TILE>(stages, w, x, n0, m0, tile_begin * T::bk, M, N, K, vector_ok);
    async_commit();
    for (int tile = tile_begin; tile < tile_end; ++tile) {
        half_t* current = stages + ((tile - tile_begin) & 1) * T::stage_halves;
        half_t* next = stages + ((tile - tile_begin + 1) & 1) * T::stage_halves;
        if (tile + 1 < tile_end) stage_tiles<M_TILE>(next, w, x, n0, m0, (tile + 1) * T::bk, M, N, K, vector_ok);
        async_commit();   // one group per iteration, possibly empty, keeps the count below uniform
        async_wait<1>();  // everything but the tile just requested has landed
        __syncthreads();
        accumulator.multiply(current);
        __syncthreads();  // the stage is free for the load two iterations on
    }

    float* partials = reinterpret_cast<float*>(stages);  // [slices, M_TILE, FLAT_C_STRIDE]
    accumulator.store(partials);
    __syncthreads();

    // Output element i of the tile: m = i / FLAT_BN, n = i % FLAT_BN; its block sum adds the slices in order.
    if (splits == 1) {
        for (int i = threadIdx.x; i < M_TILE * FLAT_BN; i += FLAT_THREADS) {
            const int m = i / FLAT_BN, n = i % FLAT_BN;
            if (m0 + m < M && n0 + n < N)
                y[(size_t)(m0 + m) * N + n0 + n] = __float2half(slice_sum<Accumulator::slices, M_TILE>(partials, m, n));
        }
        return;
    }

    float* partial = workspace + (size_t)split * M * N;
    for (int i = threadIdx.x; i < M_TILE * FLAT_BN; i += FLAT_THREADS) {
        const int m = i / FLAT_BN, n = i % FLAT_BN;
        if (m0 + m < M && n0 + n < N)
            partial[(size_t)(m0 + m) * N + n0 + n] = slice_sum<Accumulator::slices, M_TILE>(partials, m, n);
    }
    __threadfence();  // this block's partial is visible device-wide before its ticket is taken
    __syncthreads();
    int* counter = counters + blockIdx.z * gridDim.x + blockIdx.x;
    if (threadIdx.x == 0) earlier_arrivals = atomicAdd(counter, 1);
    __syncthreads();
    if (earlier_arrivals != splits - 1) return;

    __threadfence();
    const volatile float* split_partials = workspace;  // volatile: read past the (incoherent) L1
    for (int i = threadIdx.x; i < M_TILE * FLAT_BN; i += FLAT_THREADS) {
        const int m = i / FLAT_BN, n = i % FLAT_BN;
        if (m0 + m >= M || n0 + n >= N) continue;
        float total = 0.0f;
        for (int s = 0; s < splits; ++s) total += split_partials[((size_t)s * M + m0 + m) * N + n0 + n];
        y[(size_t)(m0 + m) * N + n0 + n] = __float2half(total);
    }
    if (threadIdx.x == 0) *counter = 0;
}

// One kernel per M_TILE: 8 is the decode case; 16 and 32 let one block reuse its W tile across more rows of x.
#define FLAT_GEMM_KERNEL(M_TILE)                                                                          \
    extern "C" __global__ void __launch_bounds__(FLAT_THREADS)                                            \
        flat_gemm_m##M_TILE(const half_t* x, const half_t* w, half_t* y, float* workspace, int* counters, \
                            int M, int N, int K, int tiles_per_split, int vector_ok) {                    \
        flat_gemm_block<M_TILE>(x, w, y, workspace, counters, M, N, K, tiles_per_split, vector_ok);       \
    }

FLAT_GEMM_KERNEL(8)
FLAT_GEMM_KERNEL(16)
FLAT_GEMM_KERNEL(32)
