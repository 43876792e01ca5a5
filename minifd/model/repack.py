"""GGUF blocks -> the kernel formats of minifd.model.quantized: every weight's value unchanged, but for
Q4_K's, whose sub-block scales and mins are rounded to fp16.

A GGUF row of K weights is K / 32 blocks of 32 consecutive weights (K / 256 super-blocks of 8
sub-blocks of 32 for Q4_K), which is exactly a kernel format's row of K / 32 groups: a block's (or
sub-block's) scale and min become its group's, and its codes the group's codes. Five GGUF types have
a format that computes what they compute:

| GGUF type | block bytes | w = | kernel format | codes | per group |
| --- | --- | --- | --- | --- | --- |
| Q8_0 | d (fp16), 32 int8 q | d * q | Int8Groups | q as they are | s = d |
| Q5_0 | d (fp16), 4 bytes of fifth bits, 16 bytes of low nibbles | d * (q - 16) | Int8Groups | q - 16 in [-16, 15] | s = d |
| Q4_1 | d, m (fp16), 16 bytes of 4-bit q | d * q + m | Int4Groups | q, nibbles reordered | d, m |
| Q4_0 | d (fp16), 16 bytes of 4-bit q | d * (q - 8) | Int4Groups | q, nibbles reordered | d, m = -8d |
| Q4_K | per 256: d, dmin (fp16), 12 bytes of 6-bit sc, mn per 32, 128 bytes of 4-bit q | (d * sc) * q - dmin * mn | Int4Groups | q, nibbles reordered | fp16(d * sc), fp16(-(dmin * mn)) |

GGUF packs a 4-bit block's weight j in the low nibble of byte j and weight j + 16 in its high
nibble (Q4_K: each 32 bytes hold one sub-block in their low nibbles and the next in their high ones);
Int4Groups has a nibble order of its own (minifd.model.quantized.pack_nibbles), so the codes are
unpacked in weight order and packed again.

Why the values are the same: Q8_0 and Q4_1 dequantize with the very operations of the kernel
formats (float32 d * q, then + m), and Q5_0 with Int8Groups' product of d and the integer q - 16.
For Q4_0, -8d is exact in fp16 (a power of two, |8d| <= 65504 for |d| <= 8188; larger scales are
refused), d * q is exact in float32 (11 by 4 significant bits), and the exact d * (q - 8) is a
float32, so d * q + (-8d) rounds to it. The one difference is the sign of zero: where GGUF's d * 0
is -0 (d < 0, q = 8; or d = 0) d * 8 - 8d is +0, which multiplies and adds as -0 does but for the
sign of an all-zero sum.

Why Q4_K's differ, slightly: d * sc and dmin * mn are exact in float32 (11 by 6 significant bits),
but an fp16 scale holds 11 bits, so each is rounded to the nearest fp16 once. A weight then moves by
at most q times half an fp16 ulp of d * sc plus half an fp16 ulp of dmin * mn: relative 2^-11, the
order of the fp16 rounding every weight gets anyway before the GPU's tensor-core product. A
sub-block whose scale or min rounds past fp16's 65504 is refused.

The other types are dequantized (minifd.model.dequantize): Q5_1 and Q5_K need a min with 5-bit
codes (int8 has no min, int4 no fifth bit); Q6_K has a scale per 16 weights, finer than a group of
32; F16, BF16 and F32 are not block-quantized. REPACKED_FORMATS says which are repacked.
"""

import numpy as np

from minifd.errors import MinifdError
from minifd.model.dequantize import (BLOCK_FORMATS, five_bit_codes, k_four_bit_codes, k_scales_and_mins,
                                     byte_fields, nibbles)
from minifd.model.quantized import Int4Groups, Int8Groups, pack_nibbles

# GGUF type -> kernel format name
REPACKED_FORMATS = {"Q8_0": "int8", "Q5_0": "int8", "Q4_1": "int4", "Q4_0": "int4", "Q4_K": "int4"}
SCALES_ROUNDED_TO_FP16 = {"Q4_K"}  # repacked types whose weights move slightly (fp16 group scales); the others' do not
Q4_0_LARGEST_SCALE = 8188  # the largest fp16 d whose -8d is still an fp16 (65504)


def _group_values(field, rows):
    """field: [n_blocks, 2] bytes of one fp16 per block -> [rows, n_blocks / rows] float16."""
    return field.view("<f2").astype(np.float16).reshape(rows, -1)


def _int4_codes(packed, rows):
    """packed: [n_blocks, 16] GGUF 4-bit codes -> [rows, K / 2] in Int4Groups' packing."""
    return pack_nibbles(nibbles(packed).reshape(rows, -1))  # codes [rows, K] in weight order, packed again


def repack_q8_0(blocks, rows):
    """blocks: [n_blocks, 34] Q8_0 blocks of a [rows, K] tensor -> Int8Groups, s = d, codes q."""
    d, q = byte_fields(blocks, 2, 32)
    codes = np.ascontiguousarray(q).view(np.int8).reshape(rows, -1)  # [rows, K] int8
    return Int8Groups(codes, _group_values(d, rows))  # scales [rows, K / 32] float16


def repack_q5_0(blocks, rows):
    """blocks: [n_blocks, 22] Q5_0 blocks -> Int8Groups, s = d, codes q - 16 (d * (q - 16) as GGUF computes it)."""
    d, high_bits, packed = byte_fields(blocks, 2, 4, 16)
    codes = five_bit_codes(high_bits, packed).astype(np.int8) - np.int8(16)  # [n_blocks, 32] in [-16, 15]
    return Int8Groups(codes.reshape(rows, -1), _group_values(d, rows))


def repack_q4_1(blocks, rows):
    """blocks: [n_blocks, 20] Q4_1 blocks -> Int4Groups with the blocks' own d and m."""
    d, m, packed = byte_fields(blocks, 2, 2, 16)
    return Int4Groups(_int4_codes(packed, rows), _group_values(d, rows), _group_values(m, rows))


def repack_q4_0(blocks, rows, source):
    """blocks: [n_blocks, 18] Q4_0 blocks -> Int4Groups with d and m = -8d (d * (q - 8) = d * q - 8d)."""
    d, packed = byte_fields(blocks, 2, 16)
    scales = _group_values(d, rows)  # [rows, K / 32] float16
    with np.errstate(over="ignore", invalid="ignore"):
        mins = scales * np.float16(-8)  # exact: a power of two, unless it leaves fp16's range
    if not np.isfinite(mins).all():
        largest = np.abs(scales.astype(np.float32)).max()
        raise MinifdError(f"{source}: a Q4_0 block has scale {largest:g}: int4 holds Q4_0 blocks of scales up to "
                          f"{Q4_0_LARGEST_SCALE} (their min, -8 times the scale, is an fp16)")
    return Int4Groups(_int4_codes(packed, rows), scales, mins)


def repack_q4_k(blocks, rows, source):
    """blocks: [n_blocks, 144] Q4_K super-blocks -> Int4Groups, one group per sub-block of 32:
    d = fp16(d * sc), m = fp16(-(dmin * mn)), each rounded once from its exact float32 value."""
    d, dmin, packed_scales, packed = byte_fields(blocks, 2, 2, 12, 128)
    sub_block_scales, sub_block_mins = k_scales_and_mins(packed_scales)  # [n_blocks, 8] float32 each
    with np.errstate(over="ignore", invalid="ignore"):  # a non-finite d or dmin in the file: refused below
        exact_scales = d.view("<f2").astype(np.float32) * sub_block_scales  # exact: 11 by 6 significant bits
        exact_mins = -(dmin.view("<f2").astype(np.float32) * sub_block_mins)
        scales, mins = (values.astype(np.float16).reshape(rows, -1) for values in (exact_scales, exact_mins))
    if not (np.isfinite(scales).all() and np.isfinite(mins).all()):
        largest = np.abs(np.concatenate([exact_scales, exact_mins])).max()
        raise MinifdError(f"{source}: a Q4_K sub-block's scale or min (d * sc or dmin * m) is {largest:g} in "
                          f"magnitude: int4 holds them rounded to fp16, up to 65504")
    codes = k_four_bit_codes(packed).reshape(rows, -1)  # [rows, K] in weight order
    return Int4Groups(pack_nibbles(codes), scales, mins)


def repack(data, type_name, shape, source):
    """data: a [N, K] tensor's bytes (uint8) as a GGUF file stores them; type_name: its type, one of
    REPACKED_FORMATS; source: the tensor's place, for errors -> Int8Groups or Int4Groups, [N, K]."""
    if type_name not in REPACKED_FORMATS:
        raise ValueError(f"repack: GGUF type {type_name} has no kernel format (those with one: "
                         f"{', '.join(REPACKED_FORMATS)})")
    rows, _ = shape
    blocks = np.asarray(data, dtype=np.uint8).reshape(-1, BLOCK_FORMATS[type_name].block_bytes)
    if type_name == "Q8_0":
        return repack_q8_0(blocks, rows)
    if type_name == "Q5_0":
        return repack_q5_0(blocks, rows)
    if type_name == "Q4_1":
        return repack_q4_1(blocks, rows)
    if type_name == "Q4_K":
        return repack_q4_k(blocks, rows, source)
    return repack_q4_0(blocks, rows, source)
