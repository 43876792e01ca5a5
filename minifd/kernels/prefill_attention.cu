// prefill_attention.cu: causal prefill attention, FlashAttention-style tiles, with the unified max
// value phi (FlashDecoding++) and an in-block synchronised recompute of rows that leave the window.
//
// Math (log2 units: t = (q.k) * log2(e) / sqrt(HEAD_DIM); phi, low, high also times log2 e), for
// query row r over keys c <= r:
//   unified max:  out_r = sum_c exp2(t_rc - phi) v_c / sum_c exp2(t_rc - phi)
//                 Each key tile adds to the row's sums directly: no running max, no rescaling,
//                 no max reduction across the lanes of a row. Exact to float32 rounding iff every
//                 t_rc - phi lies in (low, high).
//   synchronised: per key tile, the row max m is reduced across the row's lanes and the sums are
//                 rescaled by exp2(m_old - m_new) (online softmax). After the unified-max pass, a
//                 block with any row outside the window runs this pass again over the same tiles
//                 and overwrites those rows; each such row adds 1 to a device counter.
//
// Launch geometry: grid (ceil(seq / 64), n_heads), block 128 threads; the longest query tiles are
// scheduled first. A block owns 64 query rows of one head and walks the key tiles of 32 keys up to
// its diagonal. Lanes form row groups of 8: group g owns rows 4g..4g+3; in a tile, lane l of the
// group computes the scores of key columns 4l..4l+3 for its 4 rows, and owns output dimensions
// [8 (l + 8 c), 8 (l + 8 c) + 8) for c < HEAD_DIM / 64. Q (transposed), K (transposed), V and the
// tile's probabilities P sit in shared memory; fp16 in, fp32 arithmetic (CUDA cores).
// Arrays: q [seq, n_heads, HEAD_DIM], k, v [seq, n_kv_heads, HEAD_DIM], out like q (fp16, contiguous).
#include "portable.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif

namespace prefill {

constexpr int kThreads = 128;
constexpr int kQueryTile = 64;
constexpr int kKeyTile = 32;
constexpr int kRowLanes = 8;                                 // lanes that share a group of rows
constexpr int kRowsPerLane = kQueryTile / (kThreads / kRowLanes);  // 4
constexpr int kColumnsPerLane = kKeyTile / kRowLanes;        // 4
constexpr int kChunks = HEAD_DIM / 8;                        // 16-byte chunks in a row
constexpr int kChunksPerLane = kChunks / kRowLanes;          // output chunks a lane owns
static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "prefill attention supports HEAD_DIM 64 and 128");
static_assert(kRowsPerLane == 4 && kColumnsPerLane == 4, "the score micro-tile is 4 x 4");
static_assert(kRowLanes <= MINIFD_WARP_SIZE, "a row group lives in one warp");

struct alignas(16) Shared {
    half_t q_t[HEAD_DIM][kQueryTile];  // transposed: a lane reads 4 rows of one dimension at once
    half_t k_t[HEAD_DIM][kKeyTile];
    half_t v[kKeyTile][HEAD_DIM];
    float p[kQueryTile][kKeyTile + 1];  // +1: rows of one column fall in different banks
};

struct Task {
    const half_t* q;  // row 0 of this head: q + head * HEAD_DIM, row stride n_heads * HEAD_DIM
    const half_t* k;  // key 0 of the KV head, row stride n_kv_heads * HEAD_DIM
    const half_t* v;
    int q_stride, kv_stride;
    int first_query, seq;
    int key_end;  // keys [0, key_end) can be seen by some row of the tile
};

__device__ __forceinline__ float negative_infinity() { return __int_as_float(0xff800000); }

__device__ __forceinline__ void halves4_to_float(const half_t* shared_ptr, float out[4]) {
    const uint2 packed = *reinterpret_cast<const uint2*>(shared_ptr);
    const __half2* pairs = reinterpret_cast<const __half2*>(&packed);
    const float2 low = __half22float2(pairs[0]), high = __half22float2(pairs[1]);
    out[0] = low.x, out[1] = low.y, out[2] = high.x, out[3] = high.y;
}

// Reductions over the 8 lanes of a row group (consecutive lanes of one warp).
__device__ __forceinline__ float row_group_sum(float value) {
    for (int offset = kRowLanes / 2; offset > 0; offset /= 2) value += shuffle_xor(value, offset);
    return value;
}

__device__ __forceinline__ float row_group_max(float value) {
    for (int offset = kRowLanes / 2; offset > 0; offset /= 2) value = fmaxf(value, shuffle_xor(value, offset));
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

// Walk the key tiles once. o, l, m: this lane's rows' output dims, partial denominators (its own
// columns) and running maxima. kUnifiedMax records in `outside` whether any score left the window.
template <bool kUnifiedMax>
__device__ __forceinline__ void attend_key_tiles(const Task& task, Shared& shared, float score_scale, float phi,
                                                 float low, float high, float o[kRowsPerLane][kChunksPerLane][8],
                                                 float l[kRowsPerLane], float m[kRowsPerLane],
                                                 bool outside[kRowsPerLane]) {
    const int group = threadIdx.x / kRowLanes, lane = threadIdx.x % kRowLanes;
    for (int first_key = 0; first_key < task.key_end; first_key += kKeyTile) {
        __syncthreads();  // the previous tile's K, V and P are no longer read
        load_rows<kKeyTile>(task.k, task.kv_stride, first_key, task.seq, shared.k_t, nullptr);
        load_rows<kKeyTile>(task.v, task.kv_stride, first_key, task.seq, nullptr, shared.v);
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
            float p[kColumnsPerLane];
            if (kUnifiedMax) {
#pragma unroll
                for (int j = 0; j < kColumnsPerLane; ++j) {
                    const int key = first_key + lane * kColumnsPerLane + j;
                    const float shifted = score[i][j] * score_scale - phi;
                    const bool valid = key <= query && query < task.seq;
                    if (valid) outside[i] |= !(shifted > low && shifted < high);
                    p[j] = valid ? exp2f(shifted) : 0.0f;
                    l[i] += p[j];
                }
            } else {
                float t[kColumnsPerLane], tile_max = negative_infinity();
#pragma unroll
                for (int j = 0; j < kColumnsPerLane; ++j) {
                    const int key = first_key + lane * kColumnsPerLane + j;
                    t[j] = key <= query && query < task.seq ? score[i][j] * score_scale : negative_infinity();
                    tile_max = fmaxf(tile_max, t[j]);
                }
                const float new_max = fmaxf(m[i], row_group_max(tile_max));
                // A row that has seen no key keeps m = -inf and zero sums.
                const float correction = new_max == negative_infinity() ? 1.0f : exp2f(m[i] - new_max);
                l[i] *= correction;
#pragma unroll
                for (int c = 0; c < kChunksPerLane; ++c) {
#pragma unroll
                    for (int e = 0; e < 8; ++e) o[i][c][e] *= correction;
                }
#pragma unroll
                for (int j = 0; j < kColumnsPerLane; ++j) {
                    p[j] = t[j] == negative_infinity() ? 0.0f : exp2f(t[j] - new_max);
                    l[i] += p[j];
                }
                m[i] = new_max;
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
                    for (int e = 0; e < 8; ++e) o[i][c][e] = fmaf(p[i], v[e], o[i][c][e]);
                }
            }
        }
    }
}

__device__ __forceinline__ void clear_rows(float o[kRowsPerLane][kChunksPerLane][8], float l[kRowsPerLane],
                                           float m[kRowsPerLane]) {
#pragma unroll
    for (int i = 0; i < kRowsPerLane; ++i) {
        l[i] = 0.0f;
        m[i] = negative_infinity();
#pragma unroll
        for (int c = 0; c < kChunksPerLane; ++c) {
#pragma unroll
            for (int e = 0; e < 8; ++e) o[i][c][e] = 0.0f;
        }
    }
}

// out = o / l for this lane's rows whose bit is set in `rows` (bit i = row i of the lane).
__device__ __forceinline__ void store_rows(half_t* out, int out_stride, const Task& task,
                                           float o[kRowsPerLane][kChunksPerLane][8], const float l[kRowsPerLane],
                                           unsigned rows) {
    const int group = threadIdx.x / kRowLanes, lane = threadIdx.x % kRowLanes;
#pragma unroll
    for (int i = 0; i < kRowsPerLane; ++i) {
        const float denominator = row_group_sum(l[i]);  // every lane takes part in the shuffles
        const int query = task.first_query + group * kRowsPerLane + i;
        if (!(rows >> i & 1u) || query >= task.seq) continue;
        const float inverse = 1.0f / denominator;
#pragma unroll
        for (int c = 0; c < kChunksPerLane; ++c) {
            uint4 packed;
            __half2* pairs = reinterpret_cast<__half2*>(&packed);
#pragma unroll
            for (int e = 0; e < 4; ++e) pairs[e] = __floats2half2_rn(o[i][c][2 * e] * inverse, o[i][c][2 * e + 1] * inverse);
            store16(out + (size_t)query * out_stride + (lane + c * kRowLanes) * 8, packed);
        }
    }
}

__device__ __forceinline__ Task locate_tile(const half_t* q, const half_t* k, const half_t* v, int seq, int n_heads,
                                            int n_kv_heads) {
    const int head = blockIdx.y, kv_head = head / (n_heads / n_kv_heads);
    const int tile = gridDim.x - 1 - blockIdx.x;  // longest tiles first
    Task task;
    task.q = q + (size_t)head * HEAD_DIM;
    task.k = k + (size_t)kv_head * HEAD_DIM;
    task.v = v + (size_t)kv_head * HEAD_DIM;
    task.q_stride = n_heads * HEAD_DIM;
    task.kv_stride = n_kv_heads * HEAD_DIM;
    task.first_query = tile * kQueryTile;
    task.seq = seq;
    task.key_end = min(task.first_query + kQueryTile, seq);
    return task;
}

}  // namespace prefill

using namespace prefill;

extern "C" __global__ void __launch_bounds__(kThreads)
prefill_unified_max(const half_t* q, const half_t* k, const half_t* v, int seq, int n_heads, int n_kv_heads,
                    float score_scale, float phi, float low, float high, half_t* out,
                    unsigned long long* recompute_counter) {
    __shared__ Shared shared;
    const Task task = locate_tile(q, k, v, seq, n_heads, n_kv_heads);
    load_rows<kQueryTile>(task.q, task.q_stride, task.first_query, seq, shared.q_t, nullptr);
    float o[kRowsPerLane][kChunksPerLane][8], l[kRowsPerLane], m[kRowsPerLane];
    bool outside[kRowsPerLane] = {};
    clear_rows(o, l, m);
    attend_key_tiles<true>(task, shared, score_scale, phi, low, high, o, l, m, outside);

    unsigned unsafe_rows = 0;  // bit i: row i of this lane had a score outside the window in some lane
#pragma unroll
    for (int i = 0; i < kRowsPerLane; ++i) unsafe_rows |= (row_group_max(outside[i] ? 1.0f : 0.0f) > 0.0f ? 1u : 0u) << i;
    half_t* out_head = out + (size_t)blockIdx.y * HEAD_DIM;
    store_rows(out_head, task.q_stride, task, o, l, ~unsafe_rows);
    if (!__syncthreads_or(unsafe_rows != 0)) return;
    clear_rows(o, l, m);
    attend_key_tiles<false>(task, shared, score_scale, phi, low, high, o, l, m, outside);
    store_rows(out_head, task.q_stride, task, o, l, unsafe_rows);
    if (threadIdx.x % kRowLanes == 0) {
        const int first_row = task.first_query + threadIdx.x / kRowLanes * kRowsPerLane;
#pragma unroll
        for (int i = 0; i < kRowsPerLane; ++i) {
            if ((unsafe_rows >> i & 1u) && first_row + i < seq) atomicAdd(recompute_counter, 1ull);
        }
    }
}

extern "C" __global__ void __launch_bounds__(kThreads)
prefill_synchronised(const half_t* q, const half_t* k, const half_t* v, int seq, int n_heads, int n_kv_heads,
                     float score_scale, half_t* out) {
    __shared__ Shared shared;
    const Task task = locate_tile(q, k, v, seq, n_heads, n_kv_heads);
    load_rows<kQueryTile>(task.q, task.q_stride, task.first_query, seq, shared.q_t, nullptr);
    float o[kRowsPerLane][kChunksPerLane][8], l[kRowsPerLane], m[kRowsPerLane];
    bool unused_outside[kRowsPerLane] = {};
    clear_rows(o, l, m);
    attend_key_tiles<false>(task, shared, score_scale, 0.0f, 0.0f, 0.0f, o, l, m, unused_outside);
    store_rows(out + (size_t)blockIdx.y * HEAD_DIM, task.q_stride, task, o, l, ~0u);
}
