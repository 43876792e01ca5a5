// flat_gemm.cu: ImplB of the heuristic dataflow, FlashDecoding++'s flat GEMM, flat in M.
//
// Math (fp16 activations, fp32 accumulation), for m < M and output feature n:
//     s[m, n] = sum_k W[n, k] a[m, k]                   the product, y^T = W a^T
// with three optional fused steps, chosen per launch (template arguments, one kernel each):
//     NORM:     a[m, k] = x[m, k] g[k] / rms_m,  rms_m = sqrt(mean_k x[m, k]^2 + eps)   (RMSNorm prologue)
//     RESIDUAL: y[m, n] = r[m, n] + s[m, n]                                            (residual epilogue)
//     GATED:    y[m, j] = SiLU(s[m, gate row j]) s[m, up row j]                       (SwiGLU epilogue)
//     ROTARY:   q, k = RoPE(s) and k, v into the KV cache                                (rotary_cache.cuh)
// Why fused: at decode sizes every product is bound by streaming W, and the small steps around it
// (the norm before QKV and gate/up, the residual add after O and down, SiLU * up) would each be a
// kernel of its own that re-reads and re-writes activations and pays a launch and a ramp-up. Here
// they cost nothing extra: the block reads all of x for its rows anyway (so it sums x^2 along the
// way and scales its sums by 1/rms at the end; g multiplies x as it is loaded), and the epilogue
// holds the sums in registers when it adds r, gates or rotates. GATED needs the gate and up rows of
// one output in one block: the weight's rows are interleaved in 16-row tiles, rows 0-7 the gate rows
// of features 8j..8j+7 and rows 8-15 their up rows (minifd/model/weights.py lays them out so).
// ROTARY likewise: the QKV weight's q and k rows are paired in 16-row tiles (rotary_cache.cuh's
// layout, pair tile 8), so the two rows of one rotation end in the same block.
//
// Flat in M: W is the MMA's 16-row A operand, x its 8-wide B operand (mma m16n8k16). Each warp
// loads its fragments of W once per K piece and multiplies them by every 8-row tile of x, so W is
// streamed exactly once whatever M (up to M_PAD = 64 rows per block; grid.y walks larger M) and a
// larger M only adds tensor-core work, of which a memory-bound product has plenty to spare.
//
// Fragment trick: a dot product may visit k in any order, as long as W and x use the same one.
// Lane (g, t) (g = lane / 4, t = lane % 4) reads a RowPiece (weight_formats.cuh) of W rows g and
// g + 8: 16 bytes of codes, ROW_PIECE_WEIGHTS = 8 fp16, 16 int8 or 32 int4 weights at columns
// k = ROW_PIECE_WEIGHTS t + i of a K piece 4 ROW_PIECE_WEIGHTS wide. Each 8-column run of its piece
// feeds two m16n8k16 steps: its first four columns play the MMA's k = {2t, 2t+1, 2t+8, 2t+9} of
// one step and its last four the same k of the next, and the lane reads the same 8 columns of x row
// g as its B fragment. So W goes from global memory straight into A fragments, one 16-byte load per
// row and piece in every format, with no shared-memory round trip and no ldmatrix.
//
// Weight formats: W is read through weight_formats.cuh in the WEIGHT_FORMAT the module is compiled
// for (-D; fp16, or int8 / int4 codes with group scales). A piece's codes and its group's scale
// (and min) are loaded with the rest of the chunk and turned into the fp16 A fragments by
// row_piece_run_to_halves right before their MMAs: two weights per fp16 instruction, s q or d q + m
// rounded once to fp16, and dequantized once for all x tiles of the block.
//
// Launch geometry: block = FLAT_WARPS warps of 32 lanes (FLAT_THREADS), owning FLAT_ROWS =
// 16 FLAT_ROW_TILES rows of W, all of K; grid = (ceil(N / FLAT_ROWS), ceil(M / M_PAD)). The block
// walks K in chunks of FlatChunk::width = FLAT_WARPS x pieces x 4 ROW_PIECE_WEIGHTS columns, and warp w takes the
// chunk's pieces [w pieces, (w + 1) pieces): adjacent warps read adjacent runs of each W row. Each
// lane loads its x (and, under NORM, g) pieces straight from global memory into B fragments, like
// W: every block reads the same x, so those loads hit L1 and L2, and the K loop needs no staging and
// no barrier. All weight loads of a chunk (and, for fp16, its x loads) are issued before its first MMA. At the end each warp holds
// partial sums over its own pieces; they are added in warp order through shared memory
// (deterministic, no atomics) and the epilogue writes y. Before any of this the block waits for the
// previous kernel (MINIFD_PRODUCT_KERNEL, launch.py).
// vector_ok == 0 (K % 8 != 0 or a pointer not 16-byte aligned) loads the same pieces 2 bytes at a time:
// the block picks its K loop (flat_gemm_k_loop<VECTOR>) once, so the 16-byte loads carry no branch.
#include "rotary_cache.cuh"
#include "weight_formats.cuh"

#ifndef FLAT_WARPS
#define FLAT_WARPS 8  // warps per block; they split K
#endif
#ifndef FLAT_ROW_TILES
#define FLAT_ROW_TILES 1  // 16-row tiles of W per block; every warp multiplies all of them
#endif
#ifndef FLAT_PIECES
#define FLAT_PIECES 2  // K pieces per warp per chunk at M_PAD <= 16 (fewer above: shared memory)
#endif
#ifndef FLAT_MIN_BLOCKS
#define FLAT_MIN_BLOCKS 4  // blocks per SM the registers must allow (more blocks: more loads in flight)
#endif
// At 64 x rows the accumulators (4 floats per 8 x rows and row tile) no longer fit beside a chunk's
// loads in the registers FLAT_MIN_BLOCKS leaves (ptxas spilled 0.1-2 KB per lane), so those tiles ask
// for half as many blocks per SM and get twice the registers: 1.4-2.2x faster at M = 64 on the 7B
// shapes; at M_PAD 32 the same cost gate/up 20% (BENCHMARKS.md, 2026-12-03).
#define FLAT_MIN_BLOCKS_AT(M_PAD) ((M_PAD) < 64 ? FLAT_MIN_BLOCKS : (FLAT_MIN_BLOCKS + 1) / 2)
#define FLAT_THREADS (FLAT_WARPS * 32)
#define FLAT_ROWS (16 * FLAT_ROW_TILES)

#define EPILOGUE_STORE 0
#define EPILOGUE_RESIDUAL 1
#define EPILOGUE_GATED 2
#define EPILOGUE_ROTARY 3

template <int M_PAD>
struct FlatChunk {
    static constexpr int pieces = M_PAD <= 16 ? FLAT_PIECES : FLAT_PIECES * 16 < M_PAD ? 1 : FLAT_PIECES * 16 / M_PAD;
    static constexpr int piece_width = 4 * ROW_PIECE_WEIGHTS;      // K columns of one piece: lanes t = 0..3
    static constexpr int width = FLAT_WARPS * piece_width * pieces;  // K columns per chunk
    static constexpr int sum_bytes = FLAT_WARPS * 16 * M_PAD * 4;  // one row tile's partials of every warp
};


// Eight halves of an x row from column k (k % 8 == 0), zeros from K on. VECTOR: one 16-byte load
// (K % 8 == 0, rows aligned); otherwise 2 bytes at a time. A template argument, not a branch per
// load: the block picks one K loop for all of its loads (flat_gemm_block).
template <bool VECTOR>
__device__ __forceinline__ uint4 load_x_run(const half_t* x_row, int k, int K) {
    if (VECTOR) {
        const uint4 zero = {0u, 0u, 0u, 0u};
        return k < K ? load16(x_row + k) : zero;
    }
    return load_halves_piece(x_row, k, K, 0);
}

// The block's K loop: acc[r][j] += W rows of tile r times x rows 8j.. (the MMA's C fragments), and
// under NORM square_sums[j] += this lane's x^2 of x row 8j + g.
template <int M_PAD, bool NORM, bool VECTOR>
__device__ __forceinline__ void flat_gemm_k_loop(const half_t* __restrict__ x, const WeightRow (&w_rows)[FLAT_ROW_TILES][2],
                                                 const half_t* __restrict__ norm_weight, int rows_here, int K,
                                                 float (&acc)[FLAT_ROW_TILES][M_PAD / 8][4],
                                                 float (&square_sums)[M_PAD / 8]) {
    typedef FlatChunk<M_PAD> C;
    constexpr int n_tiles = M_PAD / 8;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    // Lane g reads x row 8j + g as column g of B; x rows past rows_here read the last row again. A
    // column of B reaches only the same column of C, outputs the epilogue never writes, so the
    // padding needs neither zeros nor a branch.
    auto x_row = [&](int j) { return x + (size_t)min(8 * j + g, rows_here - 1) * K; };

    constexpr int runs = ROW_PIECE_WEIGHTS / 8;  // 8-column runs of a lane's piece, two MMAs each
    for (int k0 = 0; k0 < K; k0 += C::width) {
        // Every weight load of the chunk is issued before any arithmetic uses one, and with them the x
        // (and gain) loads where registers allow: fp16 pieces are one run, and loading that run in the
        // MMA loop instead exposes an L2 latency per piece (with it there, batch-8 decode measured 17%
        // slower: BENCHMARKS.md, 2026-12-03); a quantized piece's 2 or 4 runs of x beside its codes
        // spill (ptxas), so those runs load right before their MMAs.
        constexpr bool x_with_chunk = runs == 1;
        RowPiece w_pieces[C::pieces][FLAT_ROW_TILES][2];
        uint4 x_pieces[C::pieces][n_tiles], gain_pieces[C::pieces];  // x_with_chunk: the pieces' one run
#pragma unroll
        for (int p = 0; p < C::pieces; ++p) {
            const int k = k0 + (warp * C::pieces + p) * C::piece_width + ROW_PIECE_WEIGHTS * t;
#pragma unroll
            for (int r = 0; r < FLAT_ROW_TILES; ++r)
#pragma unroll
                for (int h = 0; h < 2; ++h) w_pieces[p][r][h] = load_row_piece_or_zeros(w_rows[r][h], k, K, VECTOR);
            if (x_with_chunk) {
                if (NORM) gain_pieces[p] = load_x_run<VECTOR>(norm_weight, k, K);
#pragma unroll
                for (int j = 0; j < n_tiles; ++j) x_pieces[p][j] = load_x_run<VECTOR>(x_row(j), k, K);
            }
        }

#pragma unroll
        for (int p = 0; p < C::pieces; ++p) {
            const int k = k0 + (warp * C::pieces + p) * C::piece_width + ROW_PIECE_WEIGHTS * t;
#pragma unroll
            for (int s = 0; s < runs; ++s) {
                unsigned w_halves[FLAT_ROW_TILES][2][4];  // run s of rows g and g + 8, dequantized once for every x tile
#pragma unroll
                for (int r = 0; r < FLAT_ROW_TILES; ++r)
#pragma unroll
                    for (int h = 0; h < 2; ++h) row_piece_run_to_halves(w_pieces[p][r][h], s, w_halves[r][h]);
                uint4 gains;
                if (NORM) gains = x_with_chunk ? gain_pieces[p] : load_x_run<VECTOR>(norm_weight, k + 8 * s, K);
#pragma unroll
                for (int j = 0; j < n_tiles; ++j) {
                    uint4 b = x_with_chunk ? x_pieces[p][j] : load_x_run<VECTOR>(x_row(j), k + 8 * s, K);
                    if (NORM) {  // B = x g, rounded to fp16 as the MMA takes it
                        float values[8], gain_values[8];
                        halves8_to_float(b, values);
                        halves8_to_float(gains, gain_values);
#pragma unroll
                        for (int i = 0; i < 8; ++i) {
                            square_sums[j] += values[i] * values[i];
                            values[i] *= gain_values[i];
                        }
                        b = float_to_halves8(values);
                    }
                    const unsigned b_first[2] = {b.x, b.y}, b_second[2] = {b.z, b.w};
#pragma unroll
                    for (int r = 0; r < FLAT_ROW_TILES; ++r) {
                        const unsigned* low = w_halves[r][0];   // row g: columns k + 8s .. k + 8s + 7
                        const unsigned* high = w_halves[r][1];  // row g + 8
                        const unsigned a_first[4] = {low[0], high[0], low[1], high[1]};
                        const unsigned a_second[4] = {low[2], high[2], low[3], high[3]};
                        mma_16x8x16(acc[r][j], a_first, b_first);
                        mma_16x8x16(acc[r][j], a_second, b_second);
                    }
                }
            }
        }
    }
}

template <int M_PAD, int EPILOGUE, bool NORM>
__device__ __forceinline__ void flat_gemm_block(const half_t* __restrict__ x, const void* __restrict__ w,
                                                const half_t* __restrict__ w_scales,
                                                const half_t* __restrict__ w_mins, half_t* y, const half_t* __restrict__ norm_weight,
                                                const half_t* residual, int M, int N, int K, float eps,
                                                int vector_ok, RotaryCache rotary = RotaryCache{}) {
    // x: [M, K], W: [N, K] as (w, w_scales, w_mins), norm_weight: [K] (NORM), residual: [M, N] (RESIDUAL, may be y itself)
    // -> y: [M, N], or [M, N / 2] when GATED; ROTARY writes rotary.q [M, n_heads, head_dim] and the caches instead
    constexpr bool PAIRED = EPILOGUE == EPILOGUE_GATED || EPILOGUE == EPILOGUE_ROTARY;  // rows r and r + 8 of a tile make one output
    constexpr int n_tiles = M_PAD / 8;
    __shared__ float partials[FLAT_WARPS * 16 * M_PAD];  // [warp][row of a tile][x row]
    __shared__ float square_parts[FLAT_WARPS * M_PAD];   // NORM: [warp][x row]
    __shared__ float row_scale[M_PAD];

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int n0 = blockIdx.x * FLAT_ROWS;
    const int m0 = blockIdx.y * M_PAD;
    const int rows_here = M - m0 < M_PAD ? M - m0 : M_PAD;
    x += (size_t)m0 * K;

    // Rows past N re-read row N - 1 and drop the result, so the loads need no bounds branch.
    WeightRow w_rows[FLAT_ROW_TILES][2];
#pragma unroll
    for (int r = 0; r < FLAT_ROW_TILES; ++r)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int n = n0 + 16 * r + g + 8 * h;
            w_rows[r][h] = weight_row(w, w_scales, w_mins, n < N ? n : N - 1, K);
        }
    float acc[FLAT_ROW_TILES][n_tiles][4];
#pragma unroll
    for (int r = 0; r < FLAT_ROW_TILES; ++r)
#pragma unroll
        for (int j = 0; j < n_tiles; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[r][j][i] = 0.0f;

    float square_sums[n_tiles];  // NORM: x^2 summed over this lane's columns, for x rows 8j + g
#pragma unroll
    for (int j = 0; j < n_tiles; ++j) square_sums[j] = 0.0f;

    if (vector_ok)
        flat_gemm_k_loop<M_PAD, NORM, true>(x, w_rows, norm_weight, rows_here, K, acc, square_sums);
    else
        flat_gemm_k_loop<M_PAD, NORM, false>(x, w_rows, norm_weight, rows_here, K, acc, square_sums);

    if (NORM) {  // row m's sum: its four lanes t, then the warps in order
#pragma unroll
        for (int j = 0; j < n_tiles; ++j) {
            const float lanes_sum = lane_group_sum<4>(square_sums[j]);
            if (t == 0) square_parts[warp * M_PAD + 8 * j + g] = lanes_sum;
        }
        __syncthreads();
        if (threadIdx.x < M_PAD) {
            float total = 0.0f;
            for (int v = 0; v < FLAT_WARPS; ++v) total += square_parts[v * M_PAD + threadIdx.x];
            row_scale[threadIdx.x] = rsqrtf(total / K + eps);
        }
    }

#pragma unroll
    for (int r = 0; r < FLAT_ROW_TILES; ++r) {
        __syncthreads();  // the previous tile's partials are no longer read
#pragma unroll
        for (int j = 0; j < n_tiles; ++j) {
            float* tile = partials + (warp * 16 + g) * M_PAD + 8 * j + 2 * t;  // C layout: rows g, g + 8; cols 2t, 2t + 1
            tile[0] = acc[r][j][0];
            tile[1] = acc[r][j][1];
            tile[8 * M_PAD] = acc[r][j][2];
            tile[8 * M_PAD + 1] = acc[r][j][3];
        }
        __syncthreads();
        const int tile_n0 = n0 + 16 * r;
        constexpr int outputs = PAIRED ? 8 : 16;  // features (or rotary pairs) this row tile produces
        for (int i = threadIdx.x; i < outputs * rows_here; i += FLAT_THREADS) {
            const int row = i % outputs, m = i / outputs;
            float sums[2] = {0.0f, 0.0f};  // the row's sum (and, PAIRED, its partner row's: up, or the rotation's second)
            for (int v = 0; v < FLAT_WARPS; ++v) {
                sums[0] += partials[(v * 16 + row) * M_PAD + m];
                if (PAIRED) sums[1] += partials[(v * 16 + row + 8) * M_PAD + m];
            }
            if (NORM) {
                sums[0] *= row_scale[m];
                sums[1] *= row_scale[m];
            }
            const size_t out_row = (size_t)(m0 + m);
            if (EPILOGUE == EPILOGUE_GATED) {
                const int feature = tile_n0 / 2 + row;  // N % 16 == 0 here
                if (tile_n0 < N) y[out_row * (N / 2) + feature] = __float2half(silu(sums[0]) * sums[1]);
            } else if (EPILOGUE == EPILOGUE_ROTARY) {
                float first[1] = {sums[0]}, partner[1] = {sums[1]};  // N % head_dim == 0, head_dim % 16 == 0
                if (tile_n0 < N) store_rotary_pairs<1>(rotary, m0 + m, tile_n0 + row, 8, first, partner);
            } else {
                const int n = tile_n0 + row;
                if (n >= N) continue;
                if (EPILOGUE == EPILOGUE_RESIDUAL) sums[0] += __half2float(residual[out_row * N + n]);
                y[out_row * N + n] = __float2half(sums[0]);
            }
        }
    }
}

// One kernel per (M_PAD, epilogue, norm): flat_gemm_m<M_PAD>_<store|store_norm|residual|gated|gated_norm|rotary|
// rotary_norm> (the rotary ones through rotary_cache.cuh's entry point).
#define FLAT_GEMM_KERNELS(M_PAD)                                                                                   \
    MINIFD_PRODUCT_KERNEL(flat_gemm_m##M_PAD##_store, FLAT_THREADS, FLAT_MIN_BLOCKS_AT(M_PAD), flat_gemm_block<M_PAD, EPILOGUE_STORE, false>) \
    MINIFD_PRODUCT_KERNEL(flat_gemm_m##M_PAD##_store_norm, FLAT_THREADS, FLAT_MIN_BLOCKS_AT(M_PAD), flat_gemm_block<M_PAD, EPILOGUE_STORE, true>) \
    MINIFD_PRODUCT_KERNEL(flat_gemm_m##M_PAD##_residual, FLAT_THREADS, FLAT_MIN_BLOCKS_AT(M_PAD), flat_gemm_block<M_PAD, EPILOGUE_RESIDUAL, false>) \
    MINIFD_PRODUCT_KERNEL(flat_gemm_m##M_PAD##_gated, FLAT_THREADS, FLAT_MIN_BLOCKS_AT(M_PAD), flat_gemm_block<M_PAD, EPILOGUE_GATED, false>) \
    MINIFD_PRODUCT_KERNEL(flat_gemm_m##M_PAD##_gated_norm, FLAT_THREADS, FLAT_MIN_BLOCKS_AT(M_PAD), flat_gemm_block<M_PAD, EPILOGUE_GATED, true>) \
    MINIFD_ROTARY_PRODUCT_KERNEL(flat_gemm_m##M_PAD##_rotary, FLAT_THREADS, FLAT_MIN_BLOCKS_AT(M_PAD), flat_gemm_block<M_PAD, EPILOGUE_ROTARY, false>) \
    MINIFD_ROTARY_PRODUCT_KERNEL(flat_gemm_m##M_PAD##_rotary_norm, FLAT_THREADS, FLAT_MIN_BLOCKS_AT(M_PAD), flat_gemm_block<M_PAD, EPILOGUE_ROTARY, true>)

FLAT_GEMM_KERNELS(8) FLAT_GEMM_KERNELS(16) FLAT_GEMM_KERNELS(32) FLAT_GEMM_KERNELS(64)
