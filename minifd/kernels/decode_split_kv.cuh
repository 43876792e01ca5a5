// decode_split_kv.cuh: the split-KV (FlashDecoding) skeleton of decode attention, shared by the
// unified-max kernels (decode_attention.cu; decode_attention_mma.cu, which replaces the main pass
// below with tensor-core products) and the synchronised one (decode_attention_sync.cu).
//
// Decode attention for one sequence b and query head h over its n = lengths[b] cached keys:
//     out = sum_j exp(s_j - r) v_j / sum_j exp(s_j - r),   s_j = q.k_j / sqrt(HEAD_DIM)
// which holds for any reference r. The keys are cut into splits of `keys_per_split`; a split's
// partial is (acc = sum exp(s - r) v, den = sum exp(s - r), max = max s) for its own reference r,
// and partials with different references combine exactly after rescaling by exp(r_i - R).
// Everything is computed in log2 units (t = s * log2 e, exp2 instead of exp): the query is scaled by
// log2(e) / sqrt(HEAD_DIM) once, so a score costs one dot product.
//
// Launch geometry of a split kernel (one launch does the splits and their combine):
//     grid  = (n_splits, batch * n_heads / GROUP_SIZE), block = DECODE_THREADS threads (128; the
//     tensor-core kernel takes 256).
//     Block (x, y) handles split x of GROUP_SIZE query heads that share one KV head (GQA), so each
//     K/V row is read once for the whole group. Splits at or beyond lengths[b] exit at once, so the
//     grid depends only on max_seq and the step can be captured in a CUDA graph.
//     A "team" of HEAD_DIM / 8 consecutive lanes owns one key at a time: each lane loads 16 bytes
//     (8 halves) of the key and of the value, the team sums its partial dot products by shuffles, and
//     the lane accumulates its 8 output dimensions. DECODE_THREADS / team = keys in flight per step.
// Partials are written to a workspace indexed by row = b * n_heads + h:
//     partial_acc [rows, n_splits, HEAD_DIM], partial_den and partial_max [rows, n_splits] (fp32).
// The combine is fused into the same launch: every active split block, once its partials are
// written, counts itself in arrivals[blockIdx.y] (int32, zero between launches); the block that
// arrives last combines the GROUP_SIZE rows of its head group and sets the counter back to 0. Why
// fused: a separate combine kernel costs a launch, a ramp-up and a drain per layer (about 4% of a
// short-context decode step), for a few microseconds of work that the last split block can do while
// the partials are still in L2. A sequence without keys has no active split: its split-0 block
// writes zeros instead.
#pragma once
#include "portable.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef GROUP_SIZE
#define GROUP_SIZE 4
#endif
#ifndef DECODE_THREADS
#define DECODE_THREADS 128  // decode_split_kv.py passes the kernel's SplitKernel.threads
#endif

namespace split_kv {

constexpr int kThreads = DECODE_THREADS;
constexpr int kTeam = HEAD_DIM / 8;          // lanes that share one key
constexpr int kTeams = kThreads / kTeam;     // keys in flight per block
constexpr int kWarps = kThreads / MINIFD_WARP_SIZE;
constexpr int kUnroll = 4;                   // keys per team per step of a main pass: loads issued before any math
constexpr unsigned kAllHeads = (1u << GROUP_SIZE) - 1;
static_assert(HEAD_DIM % 8 == 0 && (kTeam & (kTeam - 1)) == 0, "HEAD_DIM must be 8 times a power of two");
static_assert(kTeam <= MINIFD_WARP_SIZE, "a team must fit in one warp");
static_assert(kThreads % MINIFD_WARP_SIZE == 0, "whole warps only");
static_assert(GROUP_SIZE >= 1 && GROUP_SIZE <= 16, "at most 16 query heads per block");

__device__ __forceinline__ float negative_infinity() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float team_sum(float value) {
#pragma unroll
    for (int offset = kTeam / 2; offset > 0; offset /= 2) value += shuffle_xor(value, offset);
    return value;
}

// Which keys this block owns, and where its data lives.
struct SplitTask {
    const half_t* head_keys;    // key 0 of (b, kv head), dimension 0; key j is + j * HEAD_DIM
    const half_t* head_values;  // same for values
    const half_t* keys;    // this lane's 8 dimensions of key 0 of (b, kv head) in a team (accumulate_split)
    const half_t* values;  // same for values
    int key_begin, key_end;
    int length;            // keys of the sequence (lengths[b], at most max_seq)
    int first_row;         // b * n_heads + first query head of the block
};

// -> false when the split starts at or beyond the sequence's length (the block has nothing to do);
// task.first_row and task.length are set either way.
__device__ __forceinline__ bool locate_split(const half_t* k_cache, const half_t* v_cache, const int* lengths,
                                             int n_heads, int n_kv_heads, int max_seq, int keys_per_split,
                                             SplitTask& task) {
    const int head_blocks = n_heads / GROUP_SIZE;
    const int b = blockIdx.y / head_blocks;
    const int first_head = (blockIdx.y % head_blocks) * GROUP_SIZE;
    const int kv_head = first_head / (n_heads / n_kv_heads);
    task.length = min(lengths[b], max_seq);
    task.first_row = b * n_heads + first_head;
    task.key_begin = blockIdx.x * keys_per_split;
    if (task.key_begin >= task.length) return false;
    task.key_end = min(task.key_begin + keys_per_split, task.length);
    const size_t head_offset = ((size_t)b * n_kv_heads + kv_head) * max_seq * HEAD_DIM;
    const size_t lane_offset = (threadIdx.x % kTeam) * 8;
    task.head_keys = k_cache + head_offset;
    task.head_values = v_cache + head_offset;
    task.keys = task.head_keys + lane_offset;
    task.values = task.head_values + lane_offset;
    return true;
}

// query[g][j] = q[row g, dim lane * 8 + j] * score_scale (score_scale = log2(e) / sqrt(HEAD_DIM)).
__device__ __forceinline__ void load_queries(const half_t* q, const SplitTask& task, float score_scale,
                                             float query[GROUP_SIZE][8]) {
    const int lane = threadIdx.x % kTeam;
#pragma unroll
    for (int g = 0; g < GROUP_SIZE; ++g) {
        halves8_to_float(load16(q + (size_t)(task.first_row + g) * HEAD_DIM + lane * 8), query[g]);
#pragma unroll
        for (int j = 0; j < 8; ++j) query[g][j] *= score_scale;
    }
}

// One pass over the split's keys, accumulating this lane's share of the partials.
//   kUnifiedMax: p = exp2(t - phi) with the fixed phi; `outside[g]` records any t - phi not in
//                (low, high); running_max only reports max t.
//   otherwise:   the synchronised online softmax: p = exp2(t - m) with m the running max, and the
//                sums are rescaled by exp2(m_old - m_new) whenever m grows.
// All lanes of a team see the same keys, so they agree on running_max, den and outside.
template <bool kUnifiedMax, int kKeysPerStep = kUnroll>
__device__ __forceinline__ void accumulate_split(const SplitTask& task, const float query[GROUP_SIZE][8], float phi,
                                                 float low, float high, float acc[GROUP_SIZE][8],
                                                 float den[GROUP_SIZE], float running_max[GROUP_SIZE],
                                                 bool outside[GROUP_SIZE]) {
    const int team = threadIdx.x / kTeam;
    // The loop bound is block-uniform, so every lane reaches the team shuffles.
    for (int base = task.key_begin; base < task.key_end; base += kTeams * kKeysPerStep) {
        uint4 k_packed[kKeysPerStep], v_packed[kKeysPerStep];
        bool valid[kKeysPerStep];
#pragma unroll
        for (int u = 0; u < kKeysPerStep; ++u) {
            const int key = base + u * kTeams + team;
            valid[u] = key < task.key_end;
            k_packed[u] = valid[u] ? load16(task.keys + (size_t)key * HEAD_DIM) : make_uint4(0, 0, 0, 0);
            v_packed[u] = valid[u] ? load16(task.values + (size_t)key * HEAD_DIM) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < kKeysPerStep; ++u) {
            float k[8], v[8];
            halves8_to_float(k_packed[u], k);
            halves8_to_float(v_packed[u], v);
#pragma unroll
            for (int g = 0; g < GROUP_SIZE; ++g) {
                float score = 0.0f;
#pragma unroll
                for (int j = 0; j < 8; ++j) score = fmaf(query[g][j], k[j], score);
                score = team_sum(score);
                if (!valid[u]) continue;
                if (kUnifiedMax) {
                    const float shifted = score - phi;
                    outside[g] |= !(shifted > low && shifted < high);
                    running_max[g] = fmaxf(running_max[g], score);
                    const float p = exp2f(shifted);
                    den[g] += p;
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[g][j] = fmaf(p, v[j], acc[g][j]);
                } else {
                    const float new_max = fmaxf(running_max[g], score);
                    const float correction = exp2f(running_max[g] - new_max);  // 0 on the first key
                    const float p = exp2f(score - new_max);
                    den[g] = fmaf(den[g], correction, p);
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[g][j] = fmaf(acc[g][j], correction, p * v[j]);
                    running_max[g] = new_max;
                }
            }
        }
    }
}

__device__ __forceinline__ void clear_partials(float acc[GROUP_SIZE][8], float den[GROUP_SIZE],
                                               float running_max[GROUP_SIZE]) {
#pragma unroll
    for (int g = 0; g < GROUP_SIZE; ++g) {
        den[g] = 0.0f;
        running_max[g] = negative_infinity();
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[g][j] = 0.0f;
    }
}

struct Partials {
    float* acc;  // [rows, n_splits, HEAD_DIM]
    float* den;  // [rows, n_splits]
    float* max;  // [rows, n_splits], log2 units
    int n_splits;
};

// Shared memory of reduce_and_store, declared once per kernel so that two calls share it.
struct ReduceScratch {
    float max[kTeams][GROUP_SIZE];
    float den[kTeams][GROUP_SIZE];
    float acc[kWarps][GROUP_SIZE][HEAD_DIM];
};

// Add the block's partial sums, left in shared memory by its parts (warps or lane groups) in order,
// into one partial per head and write it, for the heads whose bit is set in store_heads.
template <int kAccParts, int kDenParts, int kHeads>
__device__ __forceinline__ void store_block_partials(const float (&acc)[kAccParts][kHeads][HEAD_DIM],
                                                     const float (&den)[kDenParts][kHeads],
                                                     const float (&max)[kDenParts][kHeads], unsigned store_heads,
                                                     const SplitTask& task, const Partials& out) {
    const int split = blockIdx.x;
    for (int i = threadIdx.x; i < GROUP_SIZE * HEAD_DIM; i += kThreads) {
        const int g = i / HEAD_DIM, d = i % HEAD_DIM;
        if (!(store_heads >> g & 1u)) continue;
        float sum = 0.0f;
#pragma unroll
        for (int part = 0; part < kAccParts; ++part) sum += acc[part][g][d];
        out.acc[((size_t)(task.first_row + g) * out.n_splits + split) * HEAD_DIM + d] = sum;
    }
    if (threadIdx.x < GROUP_SIZE && (store_heads >> threadIdx.x & 1u)) {
        const int g = threadIdx.x;
        float sum = 0.0f, block_max = negative_infinity();
        for (int part = 0; part < kDenParts; ++part) {
            sum += den[part][g];
            block_max = fmaxf(block_max, max[part][g]);
        }
        out.den[(size_t)(task.first_row + g) * out.n_splits + split] = sum;
        out.max[(size_t)(task.first_row + g) * out.n_splits + split] = block_max;
    }
}

// Sum the block's lanes into one partial per head and write it for the heads whose bit is set in
// store_heads (bit g = head g of the block).
// kRescale: lanes hold running-max partials with different maxima; bring them to the block max
// first (the synchronised path). Unified-max partials share phi and simply add.
template <bool kRescale>
__device__ __forceinline__ void reduce_and_store(float acc[GROUP_SIZE][8], float den[GROUP_SIZE],
                                                 const float running_max[GROUP_SIZE], unsigned store_heads,
                                                 const SplitTask& task, const Partials& out, ReduceScratch& scratch) {
    const int team = threadIdx.x / kTeam, lane = threadIdx.x % kTeam;
    const int warp = threadIdx.x / MINIFD_WARP_SIZE, lane_in_warp = threadIdx.x % MINIFD_WARP_SIZE;
    if (lane == 0) {
#pragma unroll
        for (int g = 0; g < GROUP_SIZE; ++g) scratch.max[team][g] = running_max[g];
    }
    __syncthreads();
    if (kRescale) {
#pragma unroll
        for (int g = 0; g < GROUP_SIZE; ++g) {
            float block_max = negative_infinity();
            for (int t = 0; t < kTeams; ++t) block_max = fmaxf(block_max, scratch.max[t][g]);
            // A team that saw no key has running_max = -inf and zero sums: scale it to 0, not NaN.
            const float scale = running_max[g] == negative_infinity() ? 0.0f : exp2f(running_max[g] - block_max);
            den[g] *= scale;
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[g][j] *= scale;
        }
    }
    // Teams of one warp hold the same dimensions: add them with shuffles, then across warps in shared memory.
#pragma unroll
    for (int offset = kTeam; offset < MINIFD_WARP_SIZE; offset *= 2) {
#pragma unroll
        for (int g = 0; g < GROUP_SIZE; ++g) {
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[g][j] += shuffle_xor(acc[g][j], offset);
        }
    }
    if (lane_in_warp < kTeam) {
#pragma unroll
        for (int g = 0; g < GROUP_SIZE; ++g) {
#pragma unroll
            for (int j = 0; j < 8; ++j) scratch.acc[warp][g][lane * 8 + j] = acc[g][j];
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int g = 0; g < GROUP_SIZE; ++g) scratch.den[team][g] = den[g];
    }
    __syncthreads();
    store_block_partials(scratch.acc, scratch.den, scratch.max, store_heads, task, out);
    __syncthreads();  // the shared buffers may be reused by a second call
}

// Splits of a sequence of `length` keys that hold at least one key.
__device__ __forceinline__ int active_splits(int length, int keys_per_split, int n_splits) {
    return min((length + keys_per_split - 1) / keys_per_split, n_splits);
}

// The fused combine's arrival: called by every thread of an active split block once its partials
// are stored. Each thread's stores are made visible device-wide (__threadfence) before thread 0
// counts the block; the block that finds n_active - 1 earlier arrivals is the last one, resets the
// counter for the next launch (or graph replay) and returns true, all other blocks false.
__device__ __forceinline__ bool arrived_last(int* arrivals, int n_active) {
    __shared__ int is_last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        is_last = atomicAdd(arrivals, 1) == n_active - 1;
        if (is_last) atomicExch(arrivals, 0);  // every other block of the group has already counted
        __threadfence();
    }
    __syncthreads();
    return is_last;
}

struct CombineArgs {
    const float* acc;        // the Partials' buffers
    const float* den;
    const float* max;
    const int* split_unsafe; // [rows, n_splits] 1 = running-max partial; nullptr: all are (synchronised)
    int n_splits;
    float phi;
    half_t* out;             // [rows, HEAD_DIM]
    unsigned long long* recompute_counter;  // + 1 per row combined from a flagged split (unified max)
};

// Thread layout of the combine: the group's rows are cut into items of 4 output dims (one 16-byte
// load per partial); kCombineLanes consecutive threads share an item and take every
// kCombineLanes-th split, so a whole block's loads are in flight at once however few rows there are.
constexpr int kCombineColumns = HEAD_DIM / 4;
constexpr int kCombineItems = GROUP_SIZE * kCombineColumns;
constexpr int kCombineLanes = kCombineItems >= kThreads ? 1 : kThreads / kCombineItems;

struct CombineScratch {
    float4 acc[kCombineLanes][kCombineItems];
    float den[kCombineLanes][kCombineItems];
    float warp_max[kWarps][GROUP_SIZE];
    float row_max[GROUP_SIZE];
    unsigned flagged_heads;  // bit g: a split of head g was recomputed
};

// The last block of a head group writes the group's GROUP_SIZE output rows from the partials of its
// n_active splits (written by other blocks: read from L2, portable.cuh):
//     out = sum_i w_i acc_i / sum_i w_i den_i
// With split_unsafe, a row none of whose splits is flagged shares phi: w_i = 1, the plain sum.
// Otherwise (always without split_unsafe) the partials are rescaled to the row max R = max_i max_i:
// w_i = exp2(r_i - R), where running-max partials have r_i = max_i and unified-max ones r_i = phi,
// first brought to their own max by exp2(phi - max_i), which lies in (2^-high, 2^-low), so no
// intermediate leaves float range; that is the synchronised result, and a flagged row is counted.
// Each item's lanes are added in lane order: the result does not depend on which block combines.
__device__ __forceinline__ void combine_group(const SplitTask& task, int n_active, const CombineArgs& args) {
    __shared__ CombineScratch scratch;
    const int warp = threadIdx.x / MINIFD_WARP_SIZE, lane_in_warp = threadIdx.x % MINIFD_WARP_SIZE;
    if (threadIdx.x == 0) scratch.flagged_heads = 0;
    __syncthreads();
    if (args.split_unsafe != nullptr) {
        unsigned local = 0;
        for (int i = threadIdx.x; i < GROUP_SIZE * n_active; i += kThreads) {
            const int g = i / n_active, split = i % n_active;
            local |= (load_from_l2(args.split_unsafe + (size_t)(task.first_row + g) * args.n_splits + split) ? 1u : 0u)
                     << g;
        }
        if (local) atomicOr(&scratch.flagged_heads, local);
        __syncthreads();
    }
    const unsigned rescale_heads = args.split_unsafe == nullptr ? kAllHeads : scratch.flagged_heads;
    if (rescale_heads) {  // block-uniform: the row maxima R
#pragma unroll
        for (int g = 0; g < GROUP_SIZE; ++g) {
            float local = negative_infinity();
            for (int i = threadIdx.x; i < n_active; i += kThreads) {
                local = fmaxf(local, load_from_l2(args.max + (size_t)(task.first_row + g) * args.n_splits + i));
            }
            local = warp_max(local);
            if (lane_in_warp == 0) scratch.warp_max[warp][g] = local;
        }
        __syncthreads();
        if (threadIdx.x < GROUP_SIZE) {
            float row_max = negative_infinity();
            for (int w = 0; w < kWarps; ++w) row_max = fmaxf(row_max, scratch.warp_max[w][threadIdx.x]);
            scratch.row_max[threadIdx.x] = row_max;
        }
        __syncthreads();
    }
    const int lane = threadIdx.x % kCombineLanes;
    for (int item = threadIdx.x / kCombineLanes; item < kCombineItems; item += kThreads / kCombineLanes) {
        const int g = item / kCombineColumns, column = item % kCombineColumns;
        const size_t first = (size_t)(task.first_row + g) * args.n_splits;
        const bool rescale = rescale_heads >> g & 1u;
        float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        float den = 0.0f;
#pragma unroll 8
        for (int i = lane; i < n_active; i += kCombineLanes) {
            float weight = 1.0f;
            if (rescale) {
                const float split_max = load_from_l2(args.max + first + i);
                const bool running_max_partial =
                    args.split_unsafe == nullptr || load_from_l2(args.split_unsafe + first + i);
                const float to_own_max = running_max_partial ? 1.0f : exp2f(args.phi - split_max);
                weight = to_own_max * exp2f(split_max - scratch.row_max[g]);
            }
            const float4 acc = load16_from_l2(args.acc + (first + i) * HEAD_DIM + 4 * column);
            sum.x = fmaf(acc.x, weight, sum.x);
            sum.y = fmaf(acc.y, weight, sum.y);
            sum.z = fmaf(acc.z, weight, sum.z);
            sum.w = fmaf(acc.w, weight, sum.w);
            den = fmaf(load_from_l2(args.den + first + i), weight, den);
        }
        scratch.acc[lane][item] = sum;
        scratch.den[lane][item] = den;
    }
    __syncthreads();
    for (int item = threadIdx.x; item < kCombineItems; item += kThreads) {
        const int g = item / kCombineColumns, column = item % kCombineColumns;
        float numerator[4] = {0.0f, 0.0f, 0.0f, 0.0f}, denominator = 0.0f;
        for (int l = 0; l < kCombineLanes; ++l) {
            const float4 part = scratch.acc[l][item];
            numerator[0] += part.x;
            numerator[1] += part.y;
            numerator[2] += part.z;
            numerator[3] += part.w;
            denominator += scratch.den[l][item];
        }
        half_t* out = args.out + (size_t)(task.first_row + g) * HEAD_DIM + 4 * column;
        for (int j = 0; j < 4; ++j) out[j] = __float2half(numerator[j] / denominator);
    }
    if (args.split_unsafe != nullptr && threadIdx.x < GROUP_SIZE && (rescale_heads >> threadIdx.x & 1u)) {
        atomicAdd(args.recompute_counter, 1ull);
    }
}

// A sequence without keys: its split-0 block writes the group's rows as zeros (no split arrives).
__device__ __forceinline__ void write_zero_rows(const SplitTask& task, half_t* out) {
    for (int i = threadIdx.x; i < GROUP_SIZE * HEAD_DIM; i += kThreads) {
        out[(size_t)task.first_row * HEAD_DIM + i] = __float2half(0.0f);
    }
}

// Everything after a split block's partials are stored: count the block, and combine if it is last.
__device__ __forceinline__ void finish_split(const SplitTask& task, int keys_per_split, int* arrivals,
                                             const CombineArgs& args) {
    const int n_active = active_splits(task.length, keys_per_split, args.n_splits);
    if (arrived_last(arrivals + blockIdx.y, n_active)) combine_group(task, n_active, args);
}

}  // namespace split_kv
