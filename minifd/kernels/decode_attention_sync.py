"""Synchronised split-KV decode attention (FlashDecoding): NumPy emulation and CuPy launcher of
decode_attention_sync.cu, the baseline and the recompute fallback of the unified-max kernel.

Split i of a row computes its max m_i and acc_i = sum_j exp2(t_j - m_i) v_j, den_i = sum_j
exp2(t_j - m_i) (decode_split_kv.py); the combine rescales by exp2(m_i - max_i m_i), sums and
divides (on the GPU in the same launch: the last split block of a head group combines it). The
emulation computes exactly these partials in float32, vectorised over batch, heads and splits (the
kernel's running max ends at the split max, so only the rounding order differs).
"""

from minifd.kernels.decode_split_kv import (CPU_KEYS_PER_SPLIT, SplitKernel, plan_for,
                                            rescaled_combine, running_max_partials, split_scores)
from minifd.kernels.launch import PLAIN

SYNC_KERNEL = SplitKernel("decode_attention_sync.cu", "decode_attention_sync")


def decode_attention_sync_emulated(q, k_cache, v_cache, lengths, keys_per_split=CPU_KEYS_PER_SPLIT):
    """The synchronised split-KV kernel on the CPU, float32.
    q: [batch, n_heads, head_dim]; k_cache, v_cache: [batch, n_kv_heads, max_seq, head_dim];
    lengths: [batch] -> [batch, n_heads, head_dim] float32"""
    scores = split_scores(q, k_cache, v_cache, lengths, keys_per_split)
    acc, den, split_max = running_max_partials(scores)
    return rescaled_combine(acc, den, split_max, scores.active).reshape(q.shape)


# ----------------------------------------------------------------------------------------------
# GPU launch
# ----------------------------------------------------------------------------------------------


def decode_attention_sync_gpu(q, k_cache, v_cache, lengths, keys_per_split=None, launch=PLAIN):
    """decode_attention_sync.cu on q's device, one launch; same shapes as the emulation, float16 ->
    float16; launch: how the kernel is launched (minifd.kernels.launch)."""
    import cupy

    plan, lengths = plan_for(SYNC_KERNEL, None, q, k_cache, v_cache, lengths, keys_per_split)
    out = cupy.empty(q.shape, cupy.float16)
    launch(plan.kernel, plan.grid, plan.block,
           (q, k_cache, v_cache, lengths) + plan.shape_args
           + (plan.partial_acc, plan.partial_den, plan.partial_max, plan.arrivals, out))
    return out
