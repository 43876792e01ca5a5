"""GGUF tensor data -> float32, exactly as the GGUF format (ggml's dequantize_row_*) defines it.

A quantized GGUF row is a run of blocks; a block holds the codes of `block_size` consecutive weights
and the scales that turn them into numbers. Each function below takes the blocks of a tensor as a
[n_blocks, block_bytes] uint8 array and returns [n_blocks, block_size] float32 weights, computing in
float32 in ggml's order of operations, so the values are the ones llama.cpp's CPU path produces.
All multi-byte fields are little-endian; "fp16" is an IEEE half-precision scale. The K formats
group 256 weights into a super-block of sub-blocks, each with its own scale (and min).
"""

from dataclasses import dataclass

import numpy as np

from minifd.errors import MinifdError

K_BLOCK = 256  # weights per super-block of the K formats (ggml's QK_K)


def byte_fields(blocks, *widths):
    """blocks: [n, block_bytes] -> the block's consecutive byte fields, each [n, width]."""
    return np.split(blocks, np.cumsum(widths)[:-1], axis=1)


def _fp16(field):
    """field: [n, 2] bytes of one fp16 per block -> [n, 1] float32."""
    return field.view("<f2").astype(np.float32)


def nibbles(packed):
    """packed: [..., k] bytes -> [..., 2k] codes: every byte's low nibble, then every byte's high nibble."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _bits(packed):
    """packed: [..., k] bytes -> [..., 8k] 0/1 codes, bit i of the little-endian bit string at position i."""
    return np.unpackbits(packed, axis=-1, bitorder="little")


def dequantize_f32(blocks):
    """F32: one little-endian float32 per weight."""
    return blocks.view("<f4").astype(np.float32)


def dequantize_f16(blocks):
    """F16: one fp16 per weight, widened (exactly) to float32."""
    return blocks.view("<f2").astype(np.float32)


def dequantize_bf16(blocks):
    """BF16: the top 16 bits of a float32 per weight; widened by shifting them back up (exact)."""
    return (blocks.view("<u2").astype(np.uint32) << 16).view(np.float32)


def dequantize_q8_0(blocks):
    """Q8_0, 32 weights in 34 bytes: d (fp16), then 32 int8 codes q. w = d * q."""
    d, q = byte_fields(blocks, 2, 32)
    return _fp16(d) * q.view(np.int8).astype(np.float32)


def dequantize_q4_0(blocks):
    """Q4_0, 32 weights in 18 bytes: d (fp16), then 16 bytes of 4-bit codes q: byte j holds weight j in
    its low nibble and weight j + 16 in its high nibble. w = d * (q - 8)."""
    d, packed = byte_fields(blocks, 2, 16)
    return _fp16(d) * (nibbles(packed).astype(np.float32) - 8)


def dequantize_q4_1(blocks):
    """Q4_1, 32 weights in 20 bytes: d (fp16), m (fp16), then 16 bytes of 4-bit codes q packed as in
    Q4_0. w = d * q + m."""
    d, m, packed = byte_fields(blocks, 2, 2, 16)
    return _fp16(d) * nibbles(packed).astype(np.float32) + _fp16(m)


def five_bit_codes(high_bits, packed):
    """high_bits: [n, 4] (a little-endian uint32 whose bit i is weight i's fifth bit); packed: [n, 16]
    low nibbles as in Q4_0 -> [n, 32] codes 0..31."""
    return nibbles(packed) | (_bits(high_bits) << 4)


def dequantize_q5_0(blocks):
    """Q5_0, 32 weights in 22 bytes: d (fp16), 4 bytes of fifth bits (bit i of the little-endian uint32
    belongs to weight i), then 16 bytes of low nibbles packed as in Q4_0. w = d * (q - 16)."""
    d, high_bits, packed = byte_fields(blocks, 2, 4, 16)
    return _fp16(d) * (five_bit_codes(high_bits, packed).astype(np.float32) - 16)


def dequantize_q5_1(blocks):
    """Q5_1, 32 weights in 24 bytes: d (fp16), m (fp16), then the fifth bits and low nibbles of Q5_0.
    w = d * q + m."""
    d, m, high_bits, packed = byte_fields(blocks, 2, 2, 4, 16)
    return _fp16(d) * five_bit_codes(high_bits, packed).astype(np.float32) + _fp16(m)


def k_scales_and_mins(packed):
    """packed: [n, 12], the 6-bit scales and mins of 8 sub-blocks (ggml's get_scale_min_k4) -> two [n, 8]
    float32. With the 12 bytes as three rows a, b, c of 4: for sub-block j < 4 the scale is a[j] & 63
    and the min b[j] & 63; for j = 4 + k the low 4 bits come from c[k] (scale: low nibble, min: high
    nibble) and the top 2 bits from the top bits of a[k] (scale) and b[k] (min)."""
    a, b, c = (row[:, 0] for row in np.split(packed.reshape(-1, 3, 4), 3, axis=1))  # each [n, 4]
    scales = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mins = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def k_four_bit_codes(packed):
    """packed: [n, 128] -> [n, 8, 32] codes of the 8 sub-blocks: each 32 bytes hold two sub-blocks,
    the first in the low nibbles, the second in the high nibbles."""
    return nibbles(packed.reshape(-1, 4, 32)).reshape(-1, 8, 32)


def dequantize_q4_k(blocks):
    """Q4_K, 256 weights in 144 bytes: d (fp16), dmin (fp16), 12 bytes of 6-bit sub-block scales sc and
    mins m (see k_scales_and_mins), then 128 bytes of 4-bit codes q (see k_four_bit_codes), 8
    sub-blocks of 32. w = (d * sc) * q - (dmin * m)."""
    d, dmin, packed_scales, packed = byte_fields(blocks, 2, 2, 12, 128)
    scales, mins = k_scales_and_mins(packed_scales)
    codes = k_four_bit_codes(packed).astype(np.float32)  # [n, 8, 32]
    weights = (_fp16(d) * scales)[:, :, None] * codes - (_fp16(dmin) * mins)[:, :, None]
    return weights.reshape(-1, K_BLOCK)


def dequantize_q5_k(blocks):
    """Q5_K, 256 weights in 176 bytes: d, dmin, the 12 scale bytes of Q4_K, 32 bytes of fifth bits (bit s
    of byte l is the fifth bit of weight l of sub-block s), then the 128 bytes of low nibbles of Q4_K.
    w = (d * sc) * q - (dmin * m)."""
    d, dmin, packed_scales, high_bits, packed = byte_fields(blocks, 2, 2, 12, 32, 128)
    scales, mins = k_scales_and_mins(packed_scales)
    fifth_bits = _bits(high_bits[:, :, None]).transpose(0, 2, 1)  # [n, 32 bytes, 8 bits] -> [n, 8, 32]
    codes = (k_four_bit_codes(packed) | (fifth_bits << 4)).astype(np.float32)
    weights = (_fp16(d) * scales)[:, :, None] * codes - (_fp16(dmin) * mins)[:, :, None]
    return weights.reshape(-1, K_BLOCK)


def dequantize_q6_k(blocks):
    """Q6_K, 256 weights in 210 bytes: 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 int8
    scales sc (one per 16 consecutive weights), then d (fp16). Each half of 128 weights uses 64 low
    bytes (byte j: weight j in its low nibble, weight 64 + j in its high one) and 32 high bytes (byte l:
    bits 2k..2k+1 are the high part of weight 32k + l). w = (d * sc) * (q - 32), q = low | high << 4."""
    low, high, scales, d = byte_fields(blocks, 128, 64, 16, 2)
    low_codes = nibbles(low.reshape(-1, 2, 64))  # [n, half, 128]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]
    high_codes = ((high.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 2, 128)  # [n, half, 4 x 32]
    codes = (low_codes | (high_codes << 4)).astype(np.float32) - 32
    sub_block_scales = _fp16(d) * scales.view(np.int8).astype(np.float32)  # [n, 16]
    return (sub_block_scales[:, :, None] * codes.reshape(-1, 16, 16)).reshape(-1, K_BLOCK)


@dataclass(frozen=True)
class BlockFormat:
    block_size: int  # weights per block
    block_bytes: int
    dequantize_blocks: object  # [n_blocks, block_bytes] uint8 -> [n_blocks, block_size] float32


# GGUF tensor type name -> its block layout.
BLOCK_FORMATS = {
    "F32": BlockFormat(1, 4, dequantize_f32),
    "F16": BlockFormat(1, 2, dequantize_f16),
    "BF16": BlockFormat(1, 2, dequantize_bf16),
    "Q8_0": BlockFormat(32, 34, dequantize_q8_0),
    "Q4_0": BlockFormat(32, 18, dequantize_q4_0),
    "Q4_1": BlockFormat(32, 20, dequantize_q4_1),
    "Q5_0": BlockFormat(32, 22, dequantize_q5_0),
    "Q5_1": BlockFormat(32, 24, dequantize_q5_1),
    "Q4_K": BlockFormat(K_BLOCK, 144, dequantize_q4_k),
    "Q5_K": BlockFormat(K_BLOCK, 176, dequantize_q5_k),
    "Q6_K": BlockFormat(K_BLOCK, 210, dequantize_q6_k),
}


def dequantize(data, type_name, shape):
    """data: the tensor's bytes (uint8); type_name: its GGUF type; shape: NumPy order, the last axis a
    whole number of blocks -> float32 array of that shape."""
    block_format = BLOCK_FORMATS.get(type_name)
    if block_format is None:
        raise MinifdError(f"GGUF tensor type {type_name} is not supported (supported: {', '.join(BLOCK_FORMATS)})")
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, block_format.block_bytes)
    return block_format.dequantize_blocks(blocks).reshape(shape)
