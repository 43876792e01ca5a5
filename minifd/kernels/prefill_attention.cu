// prefill_attention.cu: causal prefill attention, FlashAttention-2-style tiles, with the unified max
// value phi (FlashDecoding++) and an in-block synchronised recompute of rows that leave the window.
//
// A launch covers a ragged batch: sequence j's n_queries_j query rows follow those of sequences
// 0..j-1 in q and out, and attend to the first n_keys_j keys of KV-cache slot slot_j, of which they are
// the last positions (a chunk of a prompt whose earlier positions are already cached). One sequence
// of contiguous [n_keys, n_kv_heads, HEAD_DIM] keys is the batch of one with slot_stride 0.
//
// Math (log2 units: t = (q.k) * log2(e) / sqrt(HEAD_DIM); phi, low, high also times log2 e), for
// query row r of a sequence over its keys c <= r + offset, offset = n_keys - n_queries:
//   unified max:  p_rc = exp2(t_rc - phi),  out_r = sum_c p_rc v_c / sum_c p_rc
//                 Each key tile adds to the row's sums directly: no running max, no rescaling of
//                 the output accumulators, no max reduction across the lanes of a row.
//   safe row:     every t_rc - phi lies in (low, min(high, 15)), and the row's mean p_rc is at least
//                 2^-14. The tensor cores take P in fp16: 15 keeps every p_rc below fp16's largest
//                 finite value, and a mean of at least the smallest normal fp16 keeps the terms
//                 that fp16 flushes or rounds coarsely (those below 2^-14) from mattering, as in
//                 FlashAttention where the row's largest term is 1. Both paths below apply the
//                 same test, so every backend recomputes the same rows.
//   synchronised: per key tile, the row max m is reduced across the row's lanes and the sums are
//                 rescaled by exp2(m_old - m_new) (online softmax). After the unified-max pass, a
//                 block with any unsafe row runs this pass again over the same key tiles and writes
//                 those rows; each such row adds 1 to a device counter.
//
// Launch geometry: grid (n_tiles, n_heads), block 128 threads (4 warps). Row x of `tiles` [n_tiles, 2]
// (sequence, first query row) gives block x its tile of kQueryTile rows of one sequence (a sequence's
// tiles start at its row 0); the host orders the table by the keys each tile reaches, longest first, so the
// longest tiles are scheduled first. A block owns its tile's rows of one head (GQA: head h reads KV
// head h / (n_heads / n_kv_heads)) and walks the key tiles up to its diagonal.
// - Tensor cores (NVIDIA sm_80+), kQueryTile = 128: warp w owns query rows [32 w, 32 w + 32), two
//   m16 tiles, so every K and V fragment read from shared memory feeds two mma. Dynamic shared
//   memory holds the Q tile and two [K, V] buffers of 64 keys (cp.async double buffering: tile j + 1
//   loads while tile j is computed), (128 + 4 * 64) * HEAD_DIM halves; 16-byte chunks XOR-swizzled by
//   row so ldmatrix reads are conflict-free. S = Q K^T and O += P V with mma.m16n8k16 (fp16 in, fp32
//   accumulate) over 32 keys at a time (the S of a whole tile would not fit in registers next to O);
//   the S accumulators become P's A fragments in registers. Only tiles on the diagonal are masked,
//   and a warp skips keys that lie above all of its rows.
// - CUDA cores (AMD, older NVIDIA; static shared memory), kQueryTile = 64: key tiles of 32; lanes
//   form row groups of 8: group g owns rows 4g..4g+3; lane l of the group computes the scores of key
//   columns 4l..4l+3 and owns output dimensions [8 (l + 8 c), 8 (l + 8 c) + 8) for c < HEAD_DIM / 64;
//   fp32 arithmetic.
// Arrays: q [rows, n_heads, HEAD_DIM] (rows = sum of n_queries_j), out like q (fp16, contiguous);
// sequences [n_sequences, 4] int32 (first row in q, n_queries, n_keys, slot); k, v fp16 with key c of
// KV head h of slot s at s slot_stride + h head_stride + c key_stride halves (the KV cache [batch,
// n_kv_heads, max_seq, HEAD_DIM]: max_seq HEAD_DIM, HEAD_DIM; one contiguous sequence: 0, HEAD_DIM,
// n_kv_heads HEAD_DIM).
#include "portable.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif

namespace prefill {

constexpr float kLargestLog2Probability = 15.0f;  // exp2(15) = 32768 < 65504, fp16's largest finite
constexpr float kSmallestNormalHalf = 6.103515625e-05f;  // 2^-14
static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "prefill attention supports HEAD_DIM 64 and 128");

struct Task {
    const half_t* q;  // row 0 of this head: q + head * HEAD_DIM, row stride n_heads * HEAD_DIM
    const half_t* k;  // key 0 of the KV head, row stride n_kv_heads * HEAD_DIM
    const half_t* v;
    half_t* out;      // row 0 of this head in out, row stride q_stride
    int q_stride, kv_stride;
    int first_query, n_queries, n_keys;
    int query_offset;  // query row r sits at key position r + query_offset = r + n_keys - n_queries
    int key_end;       // keys [0, key_end) can be seen by some row of the tile
};

// The window of the unified-max pass.
struct Window {
    float score_scale, phi, low, high;
};

__device__ __forceinline__ float negative_infinity() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float positive_infinity() { return __int_as_float(0x7f800000); }

// shifted_min/max: extremes of t - phi over the row's keys; denominator: sum of exp2(t - phi).
__device__ __forceinline__ bool row_is_safe(float shifted_min, float shifted_max, float denominator, int n_keys,
                                            const Window& window) {
    return shifted_min > window.low && shifted_max < fminf(window.high, kLargestLog2Probability) &&
           denominator >= n_keys * kSmallestNormalHalf;
}

// Where the keys and values sit: key c of KV head h of slot s at k + s * slot_stride + h * head_stride
// + c * key_stride (in halves; v alike).
struct KeyLayout {
    long long slot_stride;
    int head_stride, key_stride;
};

// The block's query tile: row blockIdx.x of `tiles` names its sequence and first query row.
__device__ __forceinline__ Task locate_tile(const half_t* q, const half_t* k, const half_t* v, half_t* out,
                                            const int* tiles, const int* sequences, int n_heads, int n_kv_heads,
                                            const KeyLayout& layout, int query_tile) {
    const int head = blockIdx.y, kv_head = head / (n_heads / n_kv_heads);
    const int* tile = tiles + 2 * blockIdx.x;  // (sequence, first query row within it)
    const int* sequence = sequences + 4 * tile[0];  // (first row in q, n_queries, n_keys, slot)
    const size_t first_row = sequence[0];
    const size_t kv_offset = sequence[3] * layout.slot_stride + (size_t)kv_head * layout.head_stride;
    Task task;
    task.q = q + (first_row * n_heads + head) * HEAD_DIM;
    task.k = k + kv_offset;
    task.v = v + kv_offset;
    task.out = out + (first_row * n_heads + head) * HEAD_DIM;
    task.q_stride = n_heads * HEAD_DIM;
    task.kv_stride = layout.key_stride;
    task.first_query = tile[1];
    task.n_queries = sequence[1];
    task.n_keys = sequence[2];
    task.query_offset = task.n_keys - task.n_queries;
    task.key_end = min(task.first_query + query_tile, task.n_queries) + task.query_offset;
    return task;
}

}  // namespace prefill

#if defined(MINIFD_HAS_MMA_16816)
// =============================================================================================
// Tensor-core path
// =============================================================================================
// Tile sizes come from prefill_attention.py as -D flags (the defaults below are its values).
#ifndef PREFILL_WARPS
#define PREFILL_WARPS 4
#endif
#ifndef PREFILL_ROW_TILES
#define PREFILL_ROW_TILES 2
#endif
#ifndef PREFILL_KEY_TILE
#define PREFILL_KEY_TILE 64
#endif
namespace prefill {

constexpr int kWarps = PREFILL_WARPS;
constexpr int kThreads = 32 * kWarps;
constexpr int kRowTiles = PREFILL_ROW_TILES;  // m16 tiles of query rows per warp: each K or V fragment feeds both
constexpr int kBlocksPerMultiprocessor = 2;  // up to 255 registers; 96 KB of shared memory at HEAD_DIM 128
constexpr int kWarpRows = 16 * kRowTiles;
constexpr int kQueryTile = kWarps * kWarpRows;
constexpr int kKeyTile = PREFILL_KEY_TILE;
constexpr int kRowChunks = HEAD_DIM / 8;        // 16-byte chunks in a row of Q, K or V
constexpr int kTileHalves = kKeyTile * HEAD_DIM;  // one K or V tile in shared memory
constexpr int kScoreKeys = 32;                  // keys of a key tile whose scores are live at once
constexpr int kScoreTiles = kScoreKeys / 8;     // S = Q K^T: n8 tiles of keys
constexpr int kDimSteps = HEAD_DIM / 16;        // S = Q K^T: k16 steps over dimensions
constexpr int kKeySteps = kScoreKeys / 16;      // O += P V: k16 steps over keys
constexpr int kDimTiles = HEAD_DIM / 8;         // O += P V: n8 tiles of dimensions

// One m16 tile of a warp's query rows; this thread holds rows g = lane / 4 and g + 8 of it.
struct RowTile {
    float o[kDimTiles][4];  // o[n]: (row g, dims 8 n + 2 t, + 1), (row g + 8, same dims)
    float l[2];             // partial denominators over this thread's key columns
    float m[2];             // synchronised: running row max (row-wide, identical in a quad)
    float shifted_min[2], shifted_max[2];  // unified max: extremes of t - phi over its key columns
};

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ unsigned pack_halves(float low, float high) {
    const __half2 pair = __floats2half2_rn(low, high);
    return *reinterpret_cast<const unsigned*>(&pair);
}

// Reductions over the 4 lanes (a quad) that hold one mma row.
__device__ __forceinline__ float quad_sum(float value) {
    value += shuffle_xor(value, 1);
    return value + shuffle_xor(value, 2);
}

__device__ __forceinline__ float quad_max(float value) {
    value = fmaxf(value, shuffle_xor(value, 1));
    return fmaxf(value, shuffle_xor(value, 2));
}

__device__ __forceinline__ float quad_min(float value) {
    value = fminf(value, shuffle_xor(value, 1));
    return fminf(value, shuffle_xor(value, 2));
}

// Chunk `chunk` of row `row` of a tile lives at chunk (chunk ^ row % 8): the 8 rows one ldmatrix
// reads fall in 8 different bank groups.
__device__ __forceinline__ int swizzled_offset(int row, int chunk) {
    return (row * kRowChunks + (chunk ^ (row & 7))) * 8;
}

// Issue async copies of rows [first, first + n_rows) of a [seq, heads, HEAD_DIM] array into a tile;
// rows at or beyond seq become zeros.
template <int n_rows>
__device__ __forceinline__ void issue_tile(half_t* tile, const half_t* base, int stride, int first, int seq) {
    for (int i = threadIdx.x; i < n_rows * kRowChunks; i += kThreads) {
        const int row = i / kRowChunks, chunk = i % kRowChunks;  // a row's chunks are consecutive lanes
        half_t* destination = tile + swizzled_offset(row, chunk);
        if (first + row < seq) {
            async_copy16(destination, base + (size_t)(first + row) * stride + chunk * 8);
        } else {
            store16(destination, make_uint4(0, 0, 0, 0));
        }
    }
}

// Shared memory: the Q tile, then buffer b = [K tile, V tile] at shared + kQueryTile HEAD_DIM + 2 b kTileHalves.
__device__ __forceinline__ void issue_key_tile(const Task& task, half_t* shared, int tile) {
    half_t* buffer = shared + kQueryTile * HEAD_DIM + (tile & 1) * 2 * kTileHalves;
    issue_tile<kKeyTile>(buffer, task.k, task.kv_stride, tile * kKeyTile, task.n_keys);
    issue_tile<kKeyTile>(buffer + kTileHalves, task.v, task.kv_stride, tile * kKeyTile, task.n_keys);
    async_commit();
}

// S tile of one m16 tile -> P fragments (A operand of P V, fp16) and the row sums. kMasked: a tile
// on the diagonal, where a key past the query's position is left out. score[n][e]: the query at key
// position first_row + g + 8 (e / 2), key first_key + 8 n + 2 t + e % 2.
template <bool kUnifiedMax, bool kMasked>
__device__ __forceinline__ void scores_to_probabilities(float score[kScoreTiles][4], int first_key, int first_row,
                                                        const Window& window, RowTile& rows,
                                                        unsigned p[kKeySteps][4]) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    auto valid = [&](int n, int e) {
        return !kMasked || first_key + 8 * n + 2 * t + (e & 1) <= first_row + g + 8 * (e >> 1);
    };
    if (kUnifiedMax) {
#pragma unroll
        for (int n = 0; n < kScoreTiles; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float shifted = fmaf(score[n][e], window.score_scale, -window.phi);
                float probability = 0.0f;
                if (valid(n, e)) {
                    rows.shifted_min[e >> 1] = fminf(rows.shifted_min[e >> 1], shifted);
                    rows.shifted_max[e >> 1] = fmaxf(rows.shifted_max[e >> 1], shifted);
                    probability = fast_exp2(shifted);
                }
                rows.l[e >> 1] += probability;
                score[n][e] = probability;
            }
        }
    } else {
        float tile_max[2] = {negative_infinity(), negative_infinity()};
#pragma unroll
        for (int n = 0; n < kScoreTiles; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                score[n][e] *= window.score_scale;
                if (valid(n, e)) tile_max[e >> 1] = fmaxf(tile_max[e >> 1], score[n][e]);
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float new_max = fmaxf(rows.m[r], quad_max(tile_max[r]));
            // A row that has seen no key keeps m = -inf and zero sums.
            const float correction = new_max == negative_infinity() ? 1.0f : fast_exp2(rows.m[r] - new_max);
            rows.m[r] = new_max;
            rows.l[r] *= correction;
#pragma unroll
            for (int n = 0; n < kDimTiles; ++n) {
                rows.o[n][2 * r] *= correction;
                rows.o[n][2 * r + 1] *= correction;
            }
        }
#pragma unroll
        for (int n = 0; n < kScoreTiles; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float probability = valid(n, e) ? fast_exp2(score[n][e] - rows.m[e >> 1]) : 0.0f;
                rows.l[e >> 1] += probability;
                score[n][e] = probability;
            }
        }
    }
    // The S accumulator layout of n8 tiles 2s and 2s + 1 is the A layout of k16 step s.
#pragma unroll
    for (int s = 0; s < kKeySteps; ++s) {
        p[s][0] = pack_halves(score[2 * s][0], score[2 * s][1]);
        p[s][1] = pack_halves(score[2 * s][2], score[2 * s][3]);
        p[s][2] = pack_halves(score[2 * s + 1][0], score[2 * s + 1][1]);
        p[s][3] = pack_halves(score[2 * s + 1][2], score[2 * s + 1][3]);
    }
}

// Walk the key tiles once (the Q tile and key tile 0 already in flight), accumulating this warp's
// rows. Buffers alternate: tile j + 1 loads while tile j is computed. A warp skips the tiles whose
// keys all lie above its rows.
template <bool kUnifiedMax>
__device__ __forceinline__ void attend_key_tiles(const Task& task, half_t* shared, const Window& window,
                                                 RowTile rows[kRowTiles]) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int first_row = task.query_offset + task.first_query + warp * kWarpRows;  // as a key position
    const half_t* q_tile = shared;
    const int n_tiles = (task.key_end + kKeyTile - 1) / kKeyTile;
    for (int tile = 0; tile < n_tiles; ++tile) {
        if (tile + 1 < n_tiles) {
            issue_key_tile(task, shared, tile + 1);
            async_wait<1>();
        } else {
            async_wait<0>();
        }
        __syncthreads();
        const half_t* k_tile = shared + kQueryTile * HEAD_DIM + (tile & 1) * 2 * kTileHalves;
        const half_t* v_tile = k_tile + kTileHalves;
        // The tile's keys in chunks of kScoreKeys (registers: S of the whole tile would not fit next
        // to O); a warp skips the chunks whose keys all lie above its rows.
#pragma unroll
        for (int chunk = 0; chunk < kKeyTile / kScoreKeys; ++chunk) {
            const int first_key = tile * kKeyTile + chunk * kScoreKeys;
            if (first_key >= first_row + kWarpRows) continue;
            const half_t* k_chunk = k_tile + chunk * kScoreKeys * HEAD_DIM;
            const half_t* v_chunk = v_tile + chunk * kScoreKeys * HEAD_DIM;

            // S = Q K^T. Per k16 step: ldmatrix x4 over Q gives an m16 tile's A fragment (lane i
            // addresses row i % 16, dimensions 16 s + 8 (i / 16) + [0, 8)); ldmatrix x4 over K gives
            // the B fragments of two n8 key tiles (lane i addresses key 16 j + i % 8 + 8 (i / 16),
            // dimensions 16 s + 8 ((i / 8) % 2) + [0, 8)). Rows of Q, K and V are multiples of 8
            // apart from lane % 8, so every swizzle below is by lane % 8.
            float score[kRowTiles][kScoreTiles][4] = {};
            const int key_row = lane % 8 + 8 * (lane / 16);
#pragma unroll
            for (int s = 0; s < kDimSteps; ++s) {
                unsigned a[kRowTiles][4], b[kScoreTiles / 2][4];  // loads first: their latencies overlap
#pragma unroll
                for (int m = 0; m < kRowTiles; ++m) {
                    const int q_row = warp * kWarpRows + 16 * m + lane % 16;
                    ldmatrix_x4(a[m], q_tile + swizzled_offset(q_row, 2 * s + lane / 16));
                }
#pragma unroll
                for (int j = 0; j < kScoreTiles / 2; ++j) {
                    ldmatrix_x4(b[j], k_chunk + swizzled_offset(16 * j + key_row, 2 * s + (lane / 8) % 2));
                }
#pragma unroll
                for (int j = 0; j < kScoreTiles / 2; ++j) {
#pragma unroll
                    for (int m = 0; m < kRowTiles; ++m) {
                        mma_16816(score[m][2 * j], a[m], b[j]);
                        mma_16816(score[m][2 * j + 1], a[m], b[j] + 2);
                    }
                }
            }

            unsigned p[kRowTiles][kKeySteps][4];
#pragma unroll
            for (int m = 0; m < kRowTiles; ++m) {
                const int m_first_row = first_row + 16 * m;
                if (first_key + kScoreKeys - 1 > m_first_row) {
                    scores_to_probabilities<kUnifiedMax, true>(score[m], first_key, m_first_row, window, rows[m], p[m]);
                } else {
                    scores_to_probabilities<kUnifiedMax, false>(score[m], first_key, m_first_row, window, rows[m], p[m]);
                }
            }

            // O += P V. ldmatrix x4 .trans over V gives the B fragments of two n8 dimension tiles for
            // one k16 step: lane i addresses key 16 s + i % 16, dimensions 16 j + 8 (i / 16) + [0, 8).
#pragma unroll
            for (int s = 0; s < kKeySteps; ++s) {
#pragma unroll
                for (int j = 0; j < kDimTiles / 2; ++j) {
                    unsigned b[4];
                    ldmatrix_x4_trans(b, v_chunk + swizzled_offset(16 * s + lane % 16, 2 * j + lane / 16));
#pragma unroll
                    for (int m = 0; m < kRowTiles; ++m) {
                        mma_16816(rows[m].o[2 * j], p[m][s], b);
                        mma_16816(rows[m].o[2 * j + 1], p[m][s], b + 2);
                    }
                }
            }
        }
        __syncthreads();  // both buffers may be overwritten from here on
    }
}

__device__ __forceinline__ void clear_rows(RowTile rows[kRowTiles]) {
#pragma unroll
    for (int m = 0; m < kRowTiles; ++m) {
#pragma unroll
        for (int n = 0; n < kDimTiles; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) rows[m].o[n][e] = 0.0f;
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            rows[m].l[r] = 0.0f;
            rows[m].m[r] = negative_infinity();
            rows[m].shifted_min[r] = positive_infinity();
            rows[m].shifted_max[r] = negative_infinity();
        }
    }
}

// out[query] = o[row r] / denominator for this thread's dimensions 8 n + 2 t, 8 n + 2 t + 1.
__device__ __forceinline__ void store_row(const Task& task, const RowTile& rows, int r, int query, float denominator) {
    const int t = threadIdx.x % 4;
    const float inverse = 1.0f / denominator;
    half_t* out_row = task.out + (size_t)query * task.q_stride + 2 * t;
#pragma unroll
    for (int n = 0; n < kDimTiles; ++n) {
        *reinterpret_cast<__half2*>(out_row + 8 * n) =
            __floats2half2_rn(rows.o[n][2 * r] * inverse, rows.o[n][2 * r + 1] * inverse);
    }
}

// The query of this thread's row r of its warp's m16 tile m.
__device__ __forceinline__ int thread_row_query(const Task& task, int m, int r) {
    return task.first_query + threadIdx.x / 32 * kWarpRows + 16 * m + threadIdx.x % 32 / 4 + 8 * r;
}

__device__ __forceinline__ half_t* start_block(const Task& task) {
    extern __shared__ uint4 dynamic_shared[];
    half_t* shared = reinterpret_cast<half_t*>(dynamic_shared);
    issue_tile<kQueryTile>(shared, task.q, task.q_stride, task.first_query, task.n_queries);
    async_commit();
    issue_key_tile(task, shared, 0);
    return shared;
}

__device__ __forceinline__ void attend_unified_max(const Task& task, const Window& window,
                                                   unsigned long long* recompute_counter) {
    half_t* shared = start_block(task);
    RowTile rows[kRowTiles];
    clear_rows(rows);
    attend_key_tiles<true>(task, shared, window, rows);

    unsigned unsafe_rows = 0;  // bit 2 m + r: this thread's row r of m16 tile m must be recomputed
#pragma unroll
    for (int m = 0; m < kRowTiles; ++m) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float shifted_min = quad_min(rows[m].shifted_min[r]), shifted_max = quad_max(rows[m].shifted_max[r]);
            const float denominator = quad_sum(rows[m].l[r]);
            const int query = thread_row_query(task, m, r);
            if (query >= task.n_queries) continue;
            if (row_is_safe(shifted_min, shifted_max, denominator, task.query_offset + query + 1, window)) {
                store_row(task, rows[m], r, query, denominator);
            } else {
                unsafe_rows |= 1u << (2 * m + r);
            }
        }
    }
    if (!__syncthreads_or(unsafe_rows != 0)) return;
    if (threadIdx.x % 4 == 0 && unsafe_rows != 0) atomicAdd(recompute_counter, (unsigned long long)__popc(unsafe_rows));
    issue_key_tile(task, shared, 0);  // Q is still in shared memory
    clear_rows(rows);
    attend_key_tiles<false>(task, shared, window, rows);
#pragma unroll
    for (int m = 0; m < kRowTiles; ++m) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float denominator = quad_sum(rows[m].l[r]);
            if (unsafe_rows >> (2 * m + r) & 1u) store_row(task, rows[m], r, thread_row_query(task, m, r), denominator);
        }
    }
}

__device__ __forceinline__ void attend_synchronised(const Task& task, const Window& window) {
    half_t* shared = start_block(task);
    RowTile rows[kRowTiles];
    clear_rows(rows);
    attend_key_tiles<false>(task, shared, window, rows);
#pragma unroll
    for (int m = 0; m < kRowTiles; ++m) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float denominator = quad_sum(rows[m].l[r]);
            const int query = thread_row_query(task, m, r);
            if (query < task.n_queries) store_row(task, rows[m], r, query, denominator);
        }
    }
}

}  // namespace prefill

#else
// =============================================================================================
// CUDA-core path
// =============================================================================================
#ifndef PREFILL_CORE_THREADS
#define PREFILL_CORE_THREADS 128
#endif
#ifndef PREFILL_CORE_QUERY_TILE
#define PREFILL_CORE_QUERY_TILE 64
#endif
#ifndef PREFILL_CORE_KEY_TILE
#define PREFILL_CORE_KEY_TILE 32
#endif
namespace prefill {

constexpr int kThreads = PREFILL_CORE_THREADS;
constexpr int kQueryTile = PREFILL_CORE_QUERY_TILE;
constexpr int kKeyTile = PREFILL_CORE_KEY_TILE;
constexpr int kBlocksPerMultiprocessor = 1;
constexpr int kRowLanes = 8;                                       // lanes that share a group of rows
constexpr int kRowsPerLane = kQueryTile / (kThreads / kRowLanes);  // 4
constexpr int kColumnsPerLane = kKeyTile / kRowLanes;              // 4
constexpr int kChunks = HEAD_DIM / 8;                              // 16-byte chunks in a row
constexpr int kChunksPerLane = kChunks / kRowLanes;                // output chunks a lane owns
static_assert(kRowsPerLane == 4 && kColumnsPerLane == 4, "the score micro-tile is 4 x 4");
static_assert(kRowLanes <= MINIFD_WARP_SIZE, "a row group lives in one warp");

struct alignas(16) Shared {
    half_t q_t[HEAD_DIM][kQueryTile];  // transposed: a lane reads 4 rows of one dimension at once
    half_t k_t[HEAD_DIM][kKeyTile];
    half_t v[kKeyTile][HEAD_DIM];
    float p[kQueryTile][kKeyTile + 1];  // +1: rows of one column fall in different banks
};

// Per lane, for each of its rows: output dims, partial denominator (its own columns), running max
// (synchronised) and the extremes of t - phi over its columns (unified max).
struct Rows {
    float o[kRowsPerLane][kChunksPerLane][8];
    float l[kRowsPerLane], m[kRowsPerLane], shifted_min[kRowsPerLane], shifted_max[kRowsPerLane];
};

__device__ __forceinline__ void halves4_to_float(const half_t* shared_ptr, float out[4]) {
    const uint2 packed = *reinterpret_cast<const uint2*>(shared_ptr);
    const __half2* pairs = reinterpret_cast<const __half2*>(&packed);
    const float2 low = __half22float2(pairs[0]), high = __half22float2(pairs[1]);
    out[0] = low.x, out[1] = low.y, out[2] = high.x, out[3] = high.y;
}

// Reductions over the 8 lanes of a row group (consecutive lanes of one warp).
__device__ __forceinline__ float row_group_sum(float value) { return lane_group_sum<kRowLanes>(value); }

__device__ __forceinline__ float row_group_max(float value) { return lane_group_max<kRowLanes>(value); }

__device__ __forceinline__ float row_group_min(float value) {
    for (int offset = kRowLanes / 2; offset > 0; offset /= 2) value = fminf(value, shuffle_xor(value, offset));
    return value;
}

// Copy rows [first, first + n_rows) of a [seq, heads, HEAD_DIM] array into shared memory; rows at or
// beyond seq read as zeros. transposed_out[d][row] when transposed_out, else rows_out[row][d].
template <int n_rows>
__device__ __forceinline__ void load_rows(const half_t* base, int stride, int first, int seq,
                                          half_t (*transposed_out)[n_rows], half_t (*rows_out)[HEAD_DIM]) {
    for (int i = threadIdx.x; i < n_rows * kChunks; i += kThreads) {
        const int row = i % n_rows, chunk = i / n_rows;  // consecutive lanes: consecutive rows, no bank conflicts
        uint4 packed = make_uint4(0, 0, 0, 0);
        if (first + row < seq) packed = load16(base + (size_t)(first + row) * stride + chunk * 8);
        if (rows_out != nullptr) {
            store16(&rows_out[row][chunk * 8], packed);
        } else {
            const half_t* halves = reinterpret_cast<const half_t*>(&packed);
#pragma unroll
            for (int e = 0; e < 8; ++e) transposed_out[chunk * 8 + e][row] = halves[e];
        }
    }
}

// Walk the key tiles once, accumulating this lane's rows.
template <bool kUnifiedMax>
__device__ __forceinline__ void attend_key_tiles(const Task& task, Shared& shared, const Window& window, Rows& rows) {
    const int group = threadIdx.x / kRowLanes, lane = threadIdx.x % kRowLanes;
    for (int first_key = 0; first_key < task.key_end; first_key += kKeyTile) {
        __syncthreads();  // the previous tile's K, V and P are no longer read
        load_rows<kKeyTile>(task.k, task.kv_stride, first_key, task.n_keys, shared.k_t, nullptr);
        load_rows<kKeyTile>(task.v, task.kv_stride, first_key, task.n_keys, nullptr, shared.v);
        __syncthreads();

        float score[kRowsPerLane][kColumnsPerLane] = {};
#pragma unroll 8
        for (int d = 0; d < HEAD_DIM; ++d) {
            float q4[4], k4[4];
            halves4_to_float(&shared.q_t[d][group * kRowsPerLane], q4);
            halves4_to_float(&shared.k_t[d][lane * kColumnsPerLane], k4);
#pragma unroll
            for (int i = 0; i < kRowsPerLane; ++i) {
#pragma unroll
                for (int j = 0; j < kColumnsPerLane; ++j) score[i][j] = fmaf(q4[i], k4[j], score[i][j]);
            }
        }
#pragma unroll
        for (int i = 0; i < kRowsPerLane; ++i) {
            const int row = group * kRowsPerLane + i, query = task.first_query + row;
            const int position = task.query_offset + query;  // the last key the query sees
            float p[kColumnsPerLane];
            if (kUnifiedMax) {
#pragma unroll
                for (int j = 0; j < kColumnsPerLane; ++j) {
                    const int key = first_key + lane * kColumnsPerLane + j;
                    const float shifted = score[i][j] * window.score_scale - window.phi;
                    p[j] = 0.0f;
                    if (key <= position) {
                        rows.shifted_min[i] = fminf(rows.shifted_min[i], shifted);
                        rows.shifted_max[i] = fmaxf(rows.shifted_max[i], shifted);
                        p[j] = exp2f(shifted);
                    }
                    rows.l[i] += p[j];
                }
            } else {
                float t[kColumnsPerLane], tile_max = negative_infinity();
#pragma unroll
                for (int j = 0; j < kColumnsPerLane; ++j) {
                    const int key = first_key + lane * kColumnsPerLane + j;
                    t[j] = key <= position && query < task.n_queries ? score[i][j] * window.score_scale
                                                                       : negative_infinity();
                    tile_max = fmaxf(tile_max, t[j]);
                }
                const float new_max = fmaxf(rows.m[i], row_group_max(tile_max));
                // A row that has seen no key keeps m = -inf and zero sums.
                const float correction = new_max == negative_infinity() ? 1.0f : exp2f(rows.m[i] - new_max);
                rows.l[i] *= correction;
#pragma unroll
                for (int c = 0; c < kChunksPerLane; ++c) {
#pragma unroll
                    for (int e = 0; e < 8; ++e) rows.o[i][c][e] *= correction;
                }
#pragma unroll
                for (int j = 0; j < kColumnsPerLane; ++j) {
                    p[j] = t[j] == negative_infinity() ? 0.0f : exp2f(t[j] - new_max);
                    rows.l[i] += p[j];
                }
                rows.m[i] = new_max;
            }
#pragma unroll
            for (int j = 0; j < kColumnsPerLane; ++j) shared.p[row][lane * kColumnsPerLane + j] = p[j];
        }
        __syncthreads();

        for (int key = 0; key < kKeyTile; ++key) {
            float p[kRowsPerLane];
#pragma unroll
            for (int i = 0; i < kRowsPerLane; ++i) p[i] = shared.p[group * kRowsPerLane + i][key];
#pragma unroll
            for (int c = 0; c < kChunksPerLane; ++c) {
                float v[8];
                halves8_to_float(load16(&shared.v[key][(lane + c * kRowLanes) * 8]), v);
#pragma unroll
                for (int i = 0; i < kRowsPerLane; ++i) {
#pragma unroll
                    for (int e = 0; e < 8; ++e) rows.o[i][c][e] = fmaf(p[i], v[e], rows.o[i][c][e]);
                }
            }
        }
    }
}

__device__ __forceinline__ void clear_rows(Rows& rows) {
#pragma unroll
    for (int i = 0; i < kRowsPerLane; ++i) {
        rows.l[i] = 0.0f;
        rows.m[i] = negative_infinity();
        rows.shifted_min[i] = positive_infinity();
        rows.shifted_max[i] = negative_infinity();
#pragma unroll
        for (int c = 0; c < kChunksPerLane; ++c) {
#pragma unroll
            for (int e = 0; e < 8; ++e) rows.o[i][c][e] = 0.0f;
        }
    }
}

// out = o / l for this lane's rows i (queries below n_queries) whose bit i is set in `selected`.
__device__ __forceinline__ void store_rows(const Task& task, const Rows& rows, const float denominators[kRowsPerLane],
                                           unsigned selected) {
    const int group = threadIdx.x / kRowLanes, lane = threadIdx.x % kRowLanes;
#pragma unroll
    for (int i = 0; i < kRowsPerLane; ++i) {
        const int query = task.first_query + group * kRowsPerLane + i;
        if (!(selected >> i & 1u) || query >= task.n_queries) continue;
        const float inverse = 1.0f / denominators[i];
#pragma unroll
        for (int c = 0; c < kChunksPerLane; ++c) {
            float scaled[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) scaled[e] = rows.o[i][c][e] * inverse;
            store16(task.out + (size_t)query * task.q_stride + (lane + c * kRowLanes) * 8, float_to_halves8(scaled));
        }
    }
}

__device__ __forceinline__ void row_denominators(const Rows& rows, float denominators[kRowsPerLane]) {
#pragma unroll
    for (int i = 0; i < kRowsPerLane; ++i) denominators[i] = row_group_sum(rows.l[i]);  // every lane shuffles
}

__device__ __forceinline__ void attend_unified_max(const Task& task, const Window& window,
                                                   unsigned long long* recompute_counter) {
    __shared__ Shared shared;
    Rows rows;
    float denominators[kRowsPerLane];
    load_rows<kQueryTile>(task.q, task.q_stride, task.first_query, task.n_queries, shared.q_t, nullptr);
    clear_rows(rows);
    attend_key_tiles<true>(task, shared, window, rows);

    row_denominators(rows, denominators);
    const int first_row = task.first_query + threadIdx.x / kRowLanes * kRowsPerLane;
    unsigned unsafe_rows = 0;  // bit i: row i of this lane's group must be recomputed
#pragma unroll
    for (int i = 0; i < kRowsPerLane; ++i) {
        const bool safe = row_is_safe(row_group_min(rows.shifted_min[i]), row_group_max(rows.shifted_max[i]),
                                      denominators[i], task.query_offset + first_row + i + 1, window);
        if (!safe && first_row + i < task.n_queries) unsafe_rows |= 1u << i;
    }
    store_rows(task, rows, denominators, ~unsafe_rows);
    if (!__syncthreads_or(unsafe_rows != 0)) return;
    clear_rows(rows);
    attend_key_tiles<false>(task, shared, window, rows);
    row_denominators(rows, denominators);
    store_rows(task, rows, denominators, unsafe_rows);
    if (threadIdx.x % kRowLanes == 0) {
#pragma unroll
        for (int i = 0; i < kRowsPerLane; ++i) {
            if (unsafe_rows >> i & 1u) atomicAdd(recompute_counter, 1ull);
        }
    }
}

__device__ __forceinline__ void attend_synchronised(const Task& task, const Window& window) {
    __shared__ Shared shared;
    Rows rows;
    float denominators[kRowsPerLane];
    load_rows<kQueryTile>(task.q, task.q_stride, task.first_query, task.n_queries, shared.q_t, nullptr);
    clear_rows(rows);
    attend_key_tiles<false>(task, shared, window, rows);
    row_denominators(rows, denominators);
    store_rows(task, rows, denominators, ~0u);
}

}  // namespace prefill
#endif

using namespace prefill;

extern "C" __global__ void __launch_bounds__(kThreads, kBlocksPerMultiprocessor)
prefill_unified_max(const half_t* q, const half_t* k, const half_t* v, const int* tiles, const int* sequences,
                    int n_heads, int n_kv_heads, long long slot_stride, int head_stride, int key_stride,
                    float score_scale, float phi, float low, float high, half_t* out,
                    unsigned long long* recompute_counter) {
    const Task task = locate_tile(q, k, v, out, tiles, sequences, n_heads, n_kv_heads,
                                  KeyLayout{slot_stride, head_stride, key_stride}, kQueryTile);
    attend_unified_max(task, Window{score_scale, phi, low, high}, recompute_counter);
}

extern "C" __global__ void __launch_bounds__(kThreads, kBlocksPerMultiprocessor)
prefill_synchronised(const half_t* q, const half_t* k, const half_t* v, const int* tiles, const int* sequences,
                     int n_heads, int n_kv_heads, long long slot_stride, int head_stride, int key_stride,
                     float score_scale, half_t* out) {
    const Task task = locate_tile(q, k, v, out, tiles, sequences, n_heads, n_kv_heads,
                                  KeyLayout{slot_stride, head_stride, key_stride}, kQueryTile);
    attend_synchronised(task, Window{score_scale, 0.0f, 0.0f, 0.0f});
}
