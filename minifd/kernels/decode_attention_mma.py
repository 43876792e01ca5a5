"""Unified-max split-KV decode attention on tensor cores (decode_attention_mma.cu): its tile
constants, its rounding, and its NumPy emulation. It is launched like decode_attention.cu, with the
same arguments (decode_attention.py: decode_attention_gpu, where the plan picks it for blocks of
TENSOR_CORE_MIN_HEADS or more query heads on NVIDIA sm_80+).

The math is decode_attention.cu's, in log2 units, with every p = exp2(t - phi) rounded to tf32 (round
to nearest, ties away from zero, 10 mantissa bits) before it weighs v on the tensor cores and is
summed into den: out = sum_j p_j v_j / sum_j p_j with those p. tf32 keeps float32's exponent, so
every p of the safe window (low, high) is a normal number and its rounding a relative 2^-11; splits
with a score outside the window recompute with the synchronised pass in float32, as on CUDA cores.
The emulation is decode_attention.py's with that rounding (decode_split_kv.unified_max_emulated);
the kernel's other roundings (fp32 tensor-core sums, the score scaled after the dot product) only
reorder float32 arithmetic.
"""

import functools

import numpy as np

from minifd.kernels.decode_split_kv import (CPU_KEYS_PER_SPLIT, SplitKernel, nearest_wave_keys_per_split,
                                           unified_max_emulated)

THREADS, TILES_PER_STEP = 256, 1  # -DDECODE_THREADS, -DDECODE_MMA_TILES (8-key tiles per warp in flight together)
# Swept on an H200 at GQA 32/8, head_dim 128, batch 1 and 8, 8K-128K keys (BENCHMARKS.md): one tile
# per warp keeps the kernel at 128 registers, two resident 8-warp blocks per SM, and with splits of
# 512-4096 keys sized to about one wave of those blocks it streams K and V at 66-100% of copy
# bandwidth, 1.3-2.5x the 4-warp, 2-tile blocks on splits of 4 per SM it replaced. Shorter splits
# lose: every block pays its start, its partials' store and arrival, and the last block of a head
# group adds one partial per split.
TENSOR_CORE_SPLIT_SIZES = (512, 1024, 2048, 4096)
TENSOR_CORE_KERNEL = SplitKernel("decode_attention_mma.cu", "decode_attention_mma",
                                 (f"-DDECODE_MMA_TILES={TILES_PER_STEP}",), THREADS,
                                 functools.partial(nearest_wave_keys_per_split, blocks_per_sm=2,
                                                   sizes=TENSOR_CORE_SPLIT_SIZES))
PROBABILITY_ROUNDOFF = 2.0**-11  # unit roundoff of tf32: the relative error of each rounded p


def round_to_tf32(x):
    """float32 array -> float32 array rounded to tf32 as the kernel's round_to_tf32 does (cvt.rna):
    add half a tf32 ulp to the bits and drop the 13 low ones (an overflow carries into infinity)."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def decode_attention_mma_emulated(q, k_cache, v_cache, lengths, softmax_range, keys_per_split=CPU_KEYS_PER_SPLIT):
    """decode_attention_mma.cu on the CPU, float32 with p rounded to tf32. Shapes as
    decode_attention_emulated -> (out [batch, n_heads, head_dim] float32, number of recomputed rows)"""
    return unified_max_emulated(q, k_cache, v_cache, lengths, softmax_range, keys_per_split, round_to_tf32)
