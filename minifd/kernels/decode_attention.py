"""Unified-max (asynchronised softmax) split-KV decode attention: NumPy emulation and CuPy launcher
of decode_attention.cu.

In log2 units (t = q.k * log2(e) / sqrt(head_dim), phi/low/high of the SoftmaxRange times log2 e),
every split of a row accumulates against the fixed phi, with no max exchange:
    acc_i = sum_j exp2(t_j - phi) v_j,  den_i = sum_j exp2(t_j - phi),  out = sum_i acc_i / sum_i den_i.
A split that sees any t_j - phi outside (low, high) is recomputed with the synchronised running-max
pass and flagged; a row with a flagged split is combined by rescaling to its max (the synchronised
result) and counted as recomputed. On the GPU this is one launch: the last split block of a head
group to finish does the group's combine. The emulation (decode_split_kv.unified_max_emulated) uses
the same splits, phi and range test in float32, vectorised over batch, heads and splits, and
combines every row at the end. For GQA blocks of TENSOR_CORE_MIN_HEADS or more query heads on NVIDIA
sm_80+ the plan runs the tensor-core kernel instead (decode_attention_mma.py).
"""

import numpy as np

from minifd.kernels.decode_attention_mma import TENSOR_CORE_KERNEL
from minifd.kernels.decode_split_kv import (CPU_KEYS_PER_SPLIT, SplitKernel, plan_for,
                                            unified_max_emulated)
from minifd.kernels.launch import PLAIN

UNIFIED_MAX_KERNEL = SplitKernel("decode_attention.cu", "decode_attention_unified_max")


def decode_attention_emulated(q, k_cache, v_cache, lengths, softmax_range, keys_per_split=CPU_KEYS_PER_SPLIT):
    """The unified-max kernel decode_attention.cu on the CPU, float32 (p exact in float32).
    q: [batch, n_heads, head_dim]; k_cache, v_cache: [batch, n_kv_heads, max_seq, head_dim];
    lengths: [batch]; softmax_range: SoftmaxRange -> (out [batch, n_heads, head_dim] float32,
    number of recomputed rows)"""
    return unified_max_emulated(q, k_cache, v_cache, lengths, softmax_range, keys_per_split)


def decode_attention_gpu(q, k_cache, v_cache, lengths, softmax_range, recompute_counter, keys_per_split=None,
                         launch=PLAIN, tensor_cores=None):
    """The unified max on q's device, one launch: decode_attention.cu, or decode_attention_mma.cu where
    the plan picks tensor cores (decode_split_kv.uses_tensor_cores; tensor_cores=True/False forces
    it). Shapes as the emulation; float16 in and out; recompute_counter: device uint64 [1],
    incremented once per recomputed row (never read here); launch: how the kernel is launched
    (minifd.kernels.launch)."""
    import cupy

    plan, lengths = plan_for(UNIFIED_MAX_KERNEL, TENSOR_CORE_KERNEL, q, k_cache, v_cache, lengths, keys_per_split,
                             tensor_cores)
    phi, low, high = (np.float32(value) for value in softmax_range.in_log2_units())
    out = cupy.empty(q.shape, cupy.float16)
    launch(plan.kernel, plan.grid, plan.block,
           (q, k_cache, v_cache, lengths) + plan.shape_args
           + (phi, low, high, plan.partial_acc, plan.partial_den, plan.partial_max, plan.split_unsafe, plan.arrivals,
              out, recompute_counter))
    return out
