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

import numpy as np

from minifd.kernels.decode_split_kv import CPU_KEYS_PER_SPLIT, SplitKernel, unified_max_emulated

TILES_PER_STEP = 2  # -DDECODE_MMA_TILES: 8-key tiles per warp whose loads are in flight together
# A block keeps 4 warps x TILES_PER_STEP x 4 KB (K and V of 8 keys at head_dim 128) of loads in flight:
# two per SM cover the H200's bandwidth x latency per SM (about 4.8 TB/s x 1 us / 132 SMs = 36 KB),
# and the fewer, longer splits this allows shrink what the last block of each head group must add.
BLOCKS_PER_SM = 2
TENSOR_CORE_KERNEL = SplitKernel("decode_attention_mma.cu", "decode_attention_mma",
                                 (f"-DDECODE_MMA_TILES={TILES_PER_STEP}",), BLOCKS_PER_SM)
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
