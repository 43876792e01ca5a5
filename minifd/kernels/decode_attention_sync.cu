// decode_attention_sync.cu: synchronised split-KV decode attention (FlashDecoding), the baseline and
// the fallback of the unified-max kernel, splits and combine in one launch.
//
// Math (log2 units, t = q.k * log2(e) / sqrt(HEAD_DIM)): split i of a row keeps a running max m_i
// and, for every new key, rescales its sums by exp2(m_old - m_new) before adding exp2(t - m_new):
//     acc_i = sum_j exp2(t_j - m_i) v_j,   den_i = sum_j exp2(t_j - m_i)
// The combine exchanges the maxima of all splits, M = max_i m_i, and rescales each partial:
//     out = sum_i exp2(m_i - M) acc_i / sum_i exp2(m_i - M) den_i
// Fused steps: the splits and the combine. The last split block of a head group to finish (an
// arrival counter per group, decode_split_kv.cuh: finish_split) exchanges the maxima and combines
// the group's rows, so the baseline, like the unified-max kernel, is one launch per layer and the two
// differ only in the softmax.
//
// Launch geometry (see decode_split_kv.cuh for the thread layout):
//     decode_attention_sync: grid (n_splits, batch * n_heads / GROUP_SIZE), block 128
// Workspace: the partials of decode_split_kv.cuh and arrivals [batch * n_heads / GROUP_SIZE] (int,
// zero between launches). Compile-time parameters: -DHEAD_DIM=64|128, -DGROUP_SIZE=query heads per
// block (divides the GQA group).
#include "decode_split_kv.cuh"

using namespace split_kv;

extern "C" __global__ void __launch_bounds__(kThreads)
decode_attention_sync(const half_t* q, const half_t* k_cache, const half_t* v_cache, const int* lengths, int n_heads,
                      int n_kv_heads, int max_seq, int keys_per_split, int n_splits, float score_scale,
                      float* partial_acc, float* partial_den, float* partial_max, int* arrivals, half_t* out) {
    start_after_previous_kernel();
    SplitTask task;
    if (!locate_split(k_cache, v_cache, lengths, n_heads, n_kv_heads, max_seq, keys_per_split, task)) {
        if (blockIdx.x == 0) write_zero_rows(task, out);
        return;
    }
    float query[GROUP_SIZE][8], acc[GROUP_SIZE][8], den[GROUP_SIZE], running_max[GROUP_SIZE];
    bool unused_outside[GROUP_SIZE];
    __shared__ ReduceScratch scratch;
    load_queries(q, task, score_scale, query);
    clear_partials(acc, den, running_max);
    accumulate_split<false>(task, query, 0.0f, 0.0f, 0.0f, acc, den, running_max, unused_outside);
    reduce_and_store<true>(acc, den, running_max, kAllHeads, task, Partials{partial_acc, partial_den, partial_max, n_splits},
                           scratch);
    finish_split(task, keys_per_split, arrivals,
                 CombineArgs{partial_acc, partial_den, partial_max, nullptr, n_splits, 0.0f, out, nullptr});
}
