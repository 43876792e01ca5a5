// decode_attention.cu: decode attention with the unified max value phi (FlashDecoding++,
// asynchronised softmax), with an on-GPU recompute of the rows whose scores leave the safe window,
// splits and combine in one launch.
//
// Math (log2 units, t = q.k * log2(e) / sqrt(HEAD_DIM); phi, low, high also scaled by log2(e)):
// softmax is invariant to the value subtracted, so every split i of a row accumulates against the
// same fixed phi with no max exchange and no rescaling:
//     acc_i = sum_j exp2(t_j - phi) v_j,   den_i = sum_j exp2(t_j - phi)
//     out   = sum_i acc_i / sum_i den_i                                  (one sum and one division)
// This is exact to float32 rounding iff every t_j - phi lies in (low, high) (then no term overflows,
// and each is at least exp2(low), so den cannot underflow). A split that sees a key outside the
// window recomputes itself at once with the synchronised running-max pass (same block, same keys,
// still hot in L2) and flags itself; the combine rescales the partials of a flagged row to its max
// (decode_split_kv.cuh: combine_group), which is the synchronised result, and counts the row in
// a device counter. No host round trip: the step stays capturable in a CUDA graph.
//
// Fused steps: the split pass, the per-split recompute and the combine. The last split block of a
// head group to finish (an arrival counter per group, decode_split_kv.cuh: finish_split) combines
// the group's rows, so a layer's decode attention is one kernel: no second launch, ramp-up and drain.
//
// Launch geometry (thread layout in decode_split_kv.cuh):
//     decode_attention_unified_max: grid (n_splits, batch * n_heads / GROUP_SIZE), block 128
// Workspace: the partials of decode_split_kv.cuh, split_unsafe [rows, n_splits] (int, 1 = the
// partial is a running-max one) and arrivals [batch * n_heads / GROUP_SIZE] (int, zero between
// launches). Compile-time parameters: -DHEAD_DIM, -DGROUP_SIZE.
#include "decode_split_kv.cuh"

using namespace split_kv;

extern "C" __global__ void __launch_bounds__(kThreads)
decode_attention_unified_max(const half_t* q, const half_t* k_cache, const half_t* v_cache, const int* lengths,
                             int n_heads, int n_kv_heads, int max_seq, int keys_per_split, int n_splits,
                             float score_scale, float phi, float low, float high, float* partial_acc,
                             float* partial_den, float* partial_max, int* split_unsafe, int* arrivals, half_t* out,
                             unsigned long long* recompute_counter) {
    start_after_previous_kernel();
    SplitTask task;
    if (!locate_split(k_cache, v_cache, lengths, n_heads, n_kv_heads, max_seq, keys_per_split, task)) {
        if (blockIdx.x == 0) write_zero_rows(task, out);
        return;
    }
    const Partials partials{partial_acc, partial_den, partial_max, n_splits};
    float query[GROUP_SIZE][8], acc[GROUP_SIZE][8], den[GROUP_SIZE], running_max[GROUP_SIZE];
    bool outside[GROUP_SIZE];
    for (int g = 0; g < GROUP_SIZE; ++g) outside[g] = false;
    load_queries(q, task, score_scale, query);
    clear_partials(acc, den, running_max);
    accumulate_split<true>(task, query, phi, low, high, acc, den, running_max, outside);

    __shared__ ReduceScratch scratch;
    __shared__ unsigned unsafe_heads;  // bit g: head g saw a score outside the window
    if (threadIdx.x == 0) unsafe_heads = 0;
    __syncthreads();
    unsigned outside_heads = 0;
    for (int g = 0; g < GROUP_SIZE; ++g) outside_heads |= (outside[g] ? 1u : 0u) << g;
    if (outside_heads) atomicOr(&unsafe_heads, outside_heads);
    reduce_and_store<false>(acc, den, running_max, kAllHeads, task, partials, scratch);  // its barriers publish unsafe_heads
    const unsigned recompute_heads = unsafe_heads;
    if (threadIdx.x < GROUP_SIZE) {
        split_unsafe[(size_t)(task.first_row + threadIdx.x) * n_splits + blockIdx.x] = recompute_heads >> threadIdx.x & 1u;
    }
    if (recompute_heads) {  // block-uniform
        // The rare recompute takes one key per step: its registers must not limit the main pass's occupancy.
        clear_partials(acc, den, running_max);
        accumulate_split<false, 1>(task, query, phi, low, high, acc, den, running_max, outside);
        reduce_and_store<true>(acc, den, running_max, recompute_heads, task, partials, scratch);
    }
    finish_split(task, keys_per_split, arrivals,
                 CombineArgs{partial_acc, partial_den, partial_max, split_unsafe, n_splits, phi, out,
                             recompute_counter});
}
