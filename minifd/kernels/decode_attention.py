"""Unified-max (asynchronised softmax) split-KV decode attention: NumPy emulation and CuPy launcher
of decode_attention.cu.

In log2 units (t = q.k * log2(e) / sqrt(head_dim), phi/low/high of the SoftmaxRange times log2 e),
every split of a row accumulates against the fixed phi, with no max exchange:
    acc_i = sum_j exp2(t_j - phi) v_j,  den_i = sum_j exp2(t_j - phi),  out = sum_i acc_i / sum_i den_i.
A split that sees any t_j - phi outside (low, high) is recomputed with the synchronised running-max
pass and flagged; a row with a flagged split is combined by rescaling to its max (the synchronised
result) and counted as recomputed. On the GPU this is one launch: the last split block of a head
group to finish does the group's combine. The emulation uses the same splits, phi and range test in
float32, vectorised over batch, heads and splits, and combines every row at the end.
"""

import numpy as np

from minifd.kernels.decode_split_kv import (
    CPU_KEYS_PER_SPLIT, THREADS_PER_BLOCK, plan_for, rescaled_combine, running_max_partials, split_scores,
    weighted_values)
from minifd.kernels.launch import PLAIN


def decode_attention_emulated(q, k_cache, v_cache, lengths, softmax_range, keys_per_split=CPU_KEYS_PER_SPLIT):
    """The unified-max kernel on the CPU, float32.
    q: [batch, n_heads, head_dim]; k_cache, v_cache: [batch, n_kv_heads, max_seq, head_dim];
    lengths: [batch]; softmax_range: SoftmaxRange -> (out [batch, n_heads, head_dim] float32,
    number of recomputed rows)"""
    phi, low, high = softmax_range.in_log2_units()
    scores = split_scores(q, k_cache, v_cache, lengths, keys_per_split)
    shifted = scores.t - np.float32(phi)  # [batch, kv, group, splits, keys]
    split_unsafe = (scores.valid & ~((shifted > low) & (shifted < high))).any(axis=-1)  # [batch, kv, group, splits]
    # Overflowing splits are flagged and their rows replaced below; rows without keys give 0/0.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        p = np.exp2(np.where(scores.valid, shifted, -np.inf))
        acc, den = weighted_values(p, scores.values), p.sum(axis=-1)
        out = acc.sum(axis=-2) / den.sum(axis=-1)[..., None]
    split_max = np.where(scores.valid, scores.t, -np.inf).max(axis=-1)
    row_unsafe = split_unsafe.any(axis=-1)  # [batch, kv, group]
    if row_unsafe.any():
        sync_acc, sync_den, _ = running_max_partials(scores)
        acc = np.where(split_unsafe[..., None], sync_acc, acc)
        den = np.where(split_unsafe, sync_den, den)
        # Unified-max partials are first brought to their own split max: exp2(phi - max) is in float range.
        with np.errstate(over="ignore"):
            own_max_factor = np.where(split_unsafe | ~scores.active, np.float32(1.0),
                                      np.exp2(np.float32(phi) - split_max))
        rescaled = rescaled_combine(acc, den, split_max, scores.active, own_max_factor)
        out = np.where(row_unsafe[..., None], rescaled, out)
    out = np.where(scores.active.any(axis=-1)[..., None], out, np.float32(0.0))  # rows without keys give 0
    return out.reshape(q.shape).astype(np.float32), int(row_unsafe.sum())


def decode_attention_gpu(q, k_cache, v_cache, lengths, softmax_range, recompute_counter, keys_per_split=None,
                         launch=PLAIN):
    """decode_attention.cu on q's device, one launch. Shapes as the emulation; float16 in and out;
    recompute_counter: device uint64 [1], incremented once per recomputed row (never read here);
    launch: how the kernel is launched (minifd.kernels.launch)."""
    import cupy

    plan, lengths = plan_for("decode_attention.cu", "decode_attention_unified_max", q, k_cache, v_cache, lengths,
                             keys_per_split)
    phi, low, high = (np.float32(value) for value in softmax_range.in_log2_units())
    out = cupy.empty(q.shape, cupy.float16)
    launch(plan.kernel, plan.grid, (THREADS_PER_BLOCK,),
           (q, k_cache, v_cache, lengths) + plan.shape_args
           + (phi, low, high, plan.partial_acc, plan.partial_den, plan.partial_max, plan.split_unsafe, plan.arrivals,
              out, recompute_counter))
    return out
