// decode_attention_mma.cu: unified-max decode attention (FlashDecoding++, asynchronised softmax) for
// a GQA group of query heads, on tensor cores, with the same on-GPU recompute and fused combine as
// decode_attention.cu.
//
// Math (log2 units, t = (q.k) * log2(e) / sqrt(HEAD_DIM); phi, low, high also times log2 e): as in
// decode_attention.cu, every split i of a row sums against the fixed phi,
//     p_j = tf32(exp2(t_j - phi)),   acc_i = sum_j p_j v_j,   den_i = sum_j p_j,
//     out = sum_i acc_i / sum_i den_i,
// exact to float32 rounding and the rounding of each p_j to tf32 (10 mantissa bits: relative error
// at most 2^-11, the same as fp16) iff every t_j - phi lies in (low, high). tf32 and not fp16: the
// window reaches 2^+-86.6 (softmax_range.py), far outside fp16's 2^-14..2^16, while tf32 has
// float32's exponent, so the rule for a safe split is the CUDA-core kernel's, with no narrower window.
// den sums the same rounded p that multiply v, so the weights are p_j / sum p_j exactly. A split
// with a key outside the window recomputes itself with the synchronised running-max pass (on CUDA
// cores: decode_split_kv.cuh, accumulate_split<false, 1>) and is flagged; the last split block of
// the head group combines the group's rows (plain sum, or rescaled to the row max for a flagged
// row, which it counts). Fused steps: the two products of the split, its recompute and the combine.
//
// Why tensor cores: a block serves the GROUP_SIZE query heads that share one KV head, so every K and
// V row is read once per group. On CUDA cores each lane then does GROUP_SIZE dot products with
// log2(team) shuffle rounds per key and the kernel is bound by instructions, not memory; here a
// warp does the group's scores of 8 keys in HEAD_DIM / 16 mma and their weighted values in
// HEAD_DIM / 16 more.
//
// Layout. Warp w (a group of 32 lanes; g = lane / 4, t = lane % 4) takes 8-key tiles. Per tile:
//   S = Q K^T, mma m16n8k16 (fp16 in, fp32 accumulate): A = Q [16 query rows x 16 dims], rows
//     g < GROUP_SIZE the block's queries (unscaled), the rest zero; B = K^T [16 dims x 8 keys],
//     column n = key n of the tile. Fragment trick (as flat_gemm.cu): a dot product may visit the
//     dims in any order as long as both operands use the same one, so lane (g, t) loads 16
//     contiguous bytes, dims 32 p + 8 t .. + 8, of query row g and of key g, and their first four
//     halves are the k = {2t, 2t+1, 2t+8, 2t+9} of one mma, the last four those of the next: K goes
//     from global memory straight into B fragments. The lane's C holds S for query g and keys 2t,
//     2t + 1 (rows g + 8 are zero queries).
//   O^T += V^T P^T, mma m16n8k8 (tf32 in, fp32 accumulate): B = P^T [8 keys x 8 queries], and S's C
//     registers already are that fragment: B row t (k index) is key 2t, row t + 4 is key 2t + 1, and
//     column g is query g, the lane's own. A = V^T [16 dims x 8 keys] must then pair key 2t (col t)
//     and key 2t + 1 (col t + 4) for rows g and g + 8, so lane (g, t) loads V of keys 2t and 2t + 1,
//     16 bytes per 64 dims at dims 64 c + 8 g (8 lanes read 128 contiguous bytes of one key); the
//     lane's e-th dim (e < HEAD_DIM / 8) is 64 (e / 8) + 8 g + e % 8, and m16 tile i uses e = i as
//     row g and e = HEAD_DIM / 16 + i as row g + 8. fp16 V is exact in tf32. So neither product
//     needs shared memory, a barrier or a transpose; the lane's C holds O^T for its dims and queries
//     2t, 2t + 1.
//   A step issues the loads of DECODE_MMA_TILES tiles per warp before any mma (memory in flight);
//   the warps of a block take adjacent tiles. At the end the warps' partials are added in warp order
//   through shared memory and stored as decode_split_kv.cuh's partials.
//
// Launch geometry: as decode_attention.cu, grid (n_splits, batch * n_heads / GROUP_SIZE), but blocks
// of DECODE_THREADS = 256 (eight groups of 32 lanes: on a 64-wide wavefront each half is one) with
// one tile per warp per step, and splits of 512-4096 keys sized to about one wave of two blocks per
// SM (decode_attention_mma.py says why and what it measured). On targets without the mma
// instructions (AMD, NVIDIA before sm_80) portable.cuh runs the same fragments on CUDA cores.
// Workspace and arguments: those of decode_attention.cu. Compile-time parameters: -DHEAD_DIM,
// -DGROUP_SIZE (at most 8: the n8 columns), -DDECODE_THREADS, -DDECODE_MMA_TILES
// (decode_attention_mma.py passes them).
#include "decode_split_kv.cuh"

#ifndef DECODE_MMA_TILES
#define DECODE_MMA_TILES 1  // 8-key tiles per warp per step whose loads are in flight together
#endif

using namespace split_kv;

namespace mma_decode {

constexpr int kLaneGroups = kThreads / 32;  // warps of 32 lanes: the mma's unit
constexpr int kTilesPerStep = DECODE_MMA_TILES;
constexpr int kStepKeys = kLaneGroups * kTilesPerStep * 8;
constexpr int kPieces = HEAD_DIM / 32;     // 16-byte loads per lane of a query or key row (S)
constexpr int kChunks = HEAD_DIM / 64 > 0 ? HEAD_DIM / 64 : 1;  // 16-byte loads per lane of a value row
constexpr int kOwnDims = HEAD_DIM / 8;     // output dims per lane
constexpr int kDimTiles = HEAD_DIM / 16;   // m16 tiles of output dims (O^T += V^T P^T)
static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "the tensor-core decode kernel supports HEAD_DIM 64 and 128");
static_assert(GROUP_SIZE <= 8, "the query heads of a block are the n8 columns of the mma");
static_assert(kThreads % 32 == 0, "whole groups of 32 lanes");

// The lane's e-th output dimension (e < kOwnDims), g = lane / 4.
__device__ __forceinline__ int own_dim(int e, int g) { return 64 * (e / 8) + 8 * g + e % 8; }

// One lane's share of a split: o[i] = O^T fragment of m16 dim tile i (queries 2t, 2t + 1); den,
// running_max, outside: query g over the keys 2t, 2t + 1 of the lane's tiles.
struct LanePartial {
    float o[kDimTiles][4];
    float den, running_max;
    bool outside;
};

struct MmaScratch {
    float acc[kLaneGroups][8][HEAD_DIM];  // [warp][query][dim]
    float den[kLaneGroups][8];
    float max[kLaneGroups][8];
};

union Scratch {  // the main pass's reduction, then (rarely) the recompute's
    MmaScratch mma;
    ReduceScratch reduce;
};

__device__ __forceinline__ uint4 zero16() { return make_uint4(0u, 0u, 0u, 0u); }

// x rounded to tf32 (10 mantissa bits), to nearest with ties away from zero, as cvt.rna.tf32.f32:
// add half a tf32 ulp to the bits and drop the 13 low ones (an overflow carries into infinity; NaN
// is never passed). decode_attention_mma.py's round_to_tf32 does the same on the CPU.
__device__ __forceinline__ float round_to_tf32(float x) {
    return __uint_as_float((__float_as_uint(x) + 0x1000u) & 0xffffe000u);
}

// The unified-max pass over the split's keys (the file comment's layout).
__device__ __forceinline__ void accumulate_split_mma(const SplitTask& task, const half_t* q, float score_scale,
                                                     float phi, float low, float high, LanePartial& part) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const bool real_query = g < GROUP_SIZE;
    uint4 q_pieces[kPieces];  // query row g, dims 32 p + 8 t .. + 8
#pragma unroll
    for (int p = 0; p < kPieces; ++p) {
        q_pieces[p] = real_query ? load16(q + (size_t)(task.first_row + g) * HEAD_DIM + 32 * p + 8 * t) : zero16();
    }
#pragma unroll
    for (int i = 0; i < kDimTiles; ++i)
#pragma unroll
        for (int r = 0; r < 4; ++r) part.o[i][r] = 0.0f;
    part.den = 0.0f;
    part.running_max = negative_infinity();
    part.outside = false;

    // The loop bound is block-uniform, so every lane reaches every mma.
    for (int base = task.key_begin; base < task.key_end; base += kStepKeys) {
        uint4 k_pieces[kTilesPerStep][kPieces];    // key g of the tile, dims 32 p + 8 t .. + 8
        uint4 v_pieces[kTilesPerStep][2][kChunks]; // keys 2t, 2t + 1 of the tile, dims 64 c + 8 g .. + 8
#pragma unroll
        for (int u = 0; u < kTilesPerStep; ++u) {
            const int tile = base + (u * kLaneGroups + warp) * 8;
            const int key = tile + g;
#pragma unroll
            for (int p = 0; p < kPieces; ++p) {
                k_pieces[u][p] = key < task.key_end ? load16(task.head_keys + (size_t)key * HEAD_DIM + 32 * p + 8 * t)
                                                    : zero16();
            }
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int value_key = tile + 2 * t + r;
#pragma unroll
                for (int c = 0; c < kChunks; ++c) {
                    v_pieces[u][r][c] = value_key < task.key_end
                                            ? load16(task.head_values + (size_t)value_key * HEAD_DIM + 64 * c + 8 * g)
                                            : zero16();
                }
            }
        }
#pragma unroll
        for (int u = 0; u < kTilesPerStep; ++u) {
            const int tile = base + (u * kLaneGroups + warp) * 8;
            float scores[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // S: (query g, keys 2t, 2t + 1), then zero rows g + 8
#pragma unroll
            for (int p = 0; p < kPieces; ++p) {
                const uint4 qp = q_pieces[p], kp = k_pieces[u][p];
                const unsigned a_first[4] = {qp.x, 0u, qp.y, 0u}, b_first[2] = {kp.x, kp.y};
                const unsigned a_second[4] = {qp.z, 0u, qp.w, 0u}, b_second[2] = {kp.z, kp.w};
                mma_16x8x16(scores, a_first, b_first);
                mma_16x8x16(scores, a_second, b_second);
            }
            unsigned probabilities[2];  // P^T's B fragment: (key 2t, query g), (key 2t + 1, query g)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const bool valid = real_query && tile + 2 * t + r < task.key_end;
                const float score = scores[r] * score_scale;
                const float shifted = score - phi;
                float p = 0.0f;
                if (valid) {
                    part.outside |= !(shifted > low && shifted < high);
                    part.running_max = fmaxf(part.running_max, score);
                    p = round_to_tf32(exp2f(shifted));
                }
                part.den += p;
                probabilities[r] = __float_as_uint(p);
            }
            float values[2][kOwnDims];  // [key 2t + r][e]
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
                for (int c = 0; c < kChunks; ++c) halves8_to_float(v_pieces[u][r][c], values[r] + 8 * c);
#pragma unroll
            for (int i = 0; i < kDimTiles; ++i) {
                // V^T's A fragment: (dim e = i, key 2t), (e = kDimTiles + i, key 2t), then key 2t + 1.
                const unsigned a[4] = {__float_as_uint(values[0][i]), __float_as_uint(values[0][kDimTiles + i]),
                                       __float_as_uint(values[1][i]), __float_as_uint(values[1][kDimTiles + i])};
                mma_16x8x8_tf32(part.o[i], a, probabilities);
            }
        }
    }
}

// Add the warps' partials in warp order and store the split's partial of every query head.
__device__ __forceinline__ void reduce_and_store_mma(LanePartial& part, const SplitTask& task, const Partials& out,
                                                     MmaScratch& scratch) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int i = 0; i < kDimTiles; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // rows g (e = i) and g + 8 (e = kDimTiles + i) of tile i
            const int d = own_dim(h * kDimTiles + i, g);
            scratch.acc[warp][2 * t][d] = part.o[i][2 * h];
            scratch.acc[warp][2 * t + 1][d] = part.o[i][2 * h + 1];
        }
    }
    const float den = lane_group_sum<4>(part.den), running_max = lane_group_max<4>(part.running_max);
    if (t == 0) {
        scratch.den[warp][g] = den;
        scratch.max[warp][g] = running_max;
    }
    __syncthreads();
    store_block_partials(scratch.acc, scratch.den, scratch.max, kAllHeads, task, out);
    __syncthreads();  // the scratch is reused by the recompute
}

}  // namespace mma_decode

using namespace mma_decode;

extern "C" __global__ void __launch_bounds__(kThreads)
decode_attention_mma(const half_t* q, const half_t* k_cache, const half_t* v_cache, const int* lengths, int n_heads,
                     int n_kv_heads, int max_seq, int keys_per_split, int n_splits, float score_scale, float phi,
                     float low, float high, float* partial_acc, float* partial_den, float* partial_max,
                     int* split_unsafe, int* arrivals, half_t* out, unsigned long long* recompute_counter) {
    start_after_previous_kernel();
    SplitTask task;
    if (!locate_split(k_cache, v_cache, lengths, n_heads, n_kv_heads, max_seq, keys_per_split, task)) {
        if (blockIdx.x == 0) write_zero_rows(task, out);
        return;
    }
    const Partials partials{partial_acc, partial_den, partial_max, n_splits};
    __shared__ Scratch scratch;
    __shared__ unsigned unsafe_heads;  // bit g: head g saw a score outside the window
    if (threadIdx.x == 0) unsafe_heads = 0;
    __syncthreads();
    LanePartial part;
    accumulate_split_mma(task, q, score_scale, phi, low, high, part);
    if (part.outside) atomicOr(&unsafe_heads, 1u << (threadIdx.x % 32 / 4));  // only query lanes g < GROUP_SIZE
    reduce_and_store_mma(part, task, partials, scratch.mma);  // its barriers publish unsafe_heads
    const unsigned recompute_heads = unsafe_heads;
    if (threadIdx.x < GROUP_SIZE) {
        const size_t flag = (size_t)(task.first_row + threadIdx.x) * n_splits + blockIdx.x;
        split_unsafe[flag] = recompute_heads >> threadIdx.x & 1u;
    }
    if (recompute_heads) {  // block-uniform
        float query[GROUP_SIZE][8], acc[GROUP_SIZE][8], den[GROUP_SIZE], running_max[GROUP_SIZE];
        bool unused_outside[GROUP_SIZE];
        load_queries(q, task, score_scale, query);
        clear_partials(acc, den, running_max);
        accumulate_split<false, 1>(task, query, phi, low, high, acc, den, running_max, unused_outside);
        reduce_and_store<true>(acc, den, running_max, recompute_heads, task, partials, scratch.reduce);
    }
    finish_split(task, keys_per_split, arrivals,
                 CombineArgs{partial_acc, partial_den, partial_max, split_unsafe, n_splits, phi, out,
                             recompute_counter});
}
