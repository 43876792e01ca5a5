"""Quantized weight formats: what a dequantizing GEMV would stream for a projection W [N, K].

Both formats keep W row-major (row n = output n, as Hugging Face stores it) and cut every row into
groups of GROUP = 32 consecutive weights along K, each group with its own fp16 scale (and min): a
kernel streaming a row reads its codes in order, and one scale (and min) per 32 of them from arrays
of their own, row-major [N, K / 32] too:

| format | one weight w = | codes | per group of 32 | bits per weight |
| --- | --- | --- | --- | --- |
| int8 | s * q | int8 q, [N, K] | fp16 s, [N, K / 32] | 8 + 16 / 32 = 8.5 |
| int4 | d * q + m | 4-bit q in [0, 15], two per byte, [N, K / 2] | fp16 d and m, [N, K / 32] each | 4 + 32 / 32 = 5 |

int8 is symmetric: with 255 levels the step s = max|w| / 127 is fine already, and no min keeps the
product a plain integer dot product scaled once per group. int4 is asymmetric: 16 levels are few,
and a group's weights are rarely centred on zero, so a symmetric grid would leave levels unused on
the side the group does not reach; spanning exactly [min, max] gives the finest step 16 levels
allow. Their arithmetic is GGUF's Q8_0 (w = d * q) and Q4_1 (w = d * q + m), so those blocks, and
Q5_0's (d * (q - 16): codes q - 16) and Q4_0's (d * (q - 8) = d * q - 8d), map onto these formats
without changing a weight's value, and Q4_K's sub-blocks of 32 ((d * sc) * q - dmin * mn) map onto
int4 groups once their scale d * sc and min -dmin * mn are rounded to fp16 (minifd.model.repack):
a .gguf file's projections of those types stay quantized on the GPU:

| GGUF type | held as | how |
| --- | --- | --- |
| Q8_0 | int8 | codes q and scale d as they are |
| Q5_0 | int8 | codes q - 16, scale d |
| Q4_1 | int4 | d and m as they are, the nibbles reordered |
| Q4_0 | int4 | d, m = -8d, the nibbles reordered |
| Q4_K | int4 | a group per sub-block, d = fp16(d * sc), m = fp16(-dmin * mn), the nibbles reordered; not exact: d * sc has up to 17 significant bits, fp16 11, so a weight moves by up to q half-ulps of d plus half an ulp of m (relative ~2^-11, as much as rounding the weight itself to fp16) |
| Q5_1, Q5_K | float16 | dequantized: a min with 5-bit codes, which int8 has not (and int4 holds 4 bits) |
| Q6_K | float16 | dequantized: a scale per 16 weights, finer than a group of 32 |
| F16, BF16, F32 | float16 | not quantized in blocks |

A projection fused from several tensors (q, k, v; gate, up) stays quantized only when all of them
map to one format (a Q4_K_M file stores some layers' v in Q6_K: their wqkv is dequantized, its Q4_K
q and k with it).

quantize_int8(w) and quantize_int4(w) round to nearest, group by group. The fp16 scale (and min)
are rounded outward, so every weight lies inside its group's grid (no code clips) and a weight
moves by at most half its group's step: |w - dequantize(w)| <= step / 2 (max_error()), plus the
float32 rounding of dequantizing. The functions take NumPy or CuPy arrays and keep to that module.
"""

from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np

from minifd.errors import MinifdError

GROUP = 32  # weights per group along K, each group with its own scale (and min)


def _array_module(array):
    """numpy, or cupy for a cupy array (without importing cupy otherwise)."""
    if isinstance(array, np.ndarray):
        return np
    import cupy

    return cupy.get_array_module(array)


def _groups(w):
    """w: [N, K] -> [N, K / GROUP, GROUP] float32 (a view when w is float32 already)."""
    n, k = w.shape
    if k % GROUP:
        raise MinifdError(f"quantizing a [{n}, {k}] weight needs K a multiple of {GROUP}, not {k}")
    return w.astype(np.float32, copy=False).reshape(n, k // GROUP, GROUP)


def _fp16_outward(value, xp, direction):
    """float32 or float64 value -> the fp16 nearest to it, moved one fp16 step in `direction` (+1 or -1)
    where rounding went the other way: fp16(value) >= value for +1, <= value for -1."""
    rounded = value.astype(np.float16)
    if not bool(xp.isfinite(rounded).all()):
        raise MinifdError("weights beyond what fp16 scales hold (|w| up to about 1e6), or not finite: "
                          "they cannot be quantized")
    wrong_side = (rounded.astype(np.float32) - value) * direction < 0
    stepped = xp.nextafter(rounded, xp.asarray(np.inf * direction, dtype=np.float16))
    return xp.where(wrong_side, stepped, rounded)


@dataclass
class Int8Groups:
    """int8 codes with one fp16 scale per group of 32 along K: w = s * q; 8.5 bits per weight."""

    codes: object  # [N, K] int8 (quantize_int8 gives -127..127; Q8_0 blocks may hold -128 too)
    scales: object  # [N, K / GROUP] float16

    name: ClassVar[str] = "int8"
    bits_per_weight: ClassVar[float] = 8 + 16 / GROUP
    layout: ClassVar[str] = "int8 codes, an fp16 scale per 32 weights along K"

    @property
    def shape(self):
        return self.codes.shape

    @property
    def nbytes(self):
        return self.codes.nbytes + self.scales.nbytes

    def dequantize(self, dtype=np.float32):
        """-> [N, K] `dtype` (float32, or float64 for an oracle), s * q."""
        n, k = self.codes.shape
        codes = self.codes.reshape(n, k // GROUP, GROUP).astype(dtype)
        return (codes * self.scales.astype(dtype)[:, :, None]).reshape(n, k)

    def max_error(self):
        """-> [N, K / GROUP] float32: half of each group's step s, the most round to nearest moves a weight."""
        return self.scales.astype(np.float32) / 2


@dataclass
class Int4Groups:
    """4-bit codes with an fp16 scale and min per group of 32 along K: w = d * q + m; 5 bits per weight.
    Nibble order (pack_nibbles): each 32-bit word of a row (4 bytes, little-endian, 8 weights) holds
    its weight 2p in nibble p and weight 2p + 1 in nibble p + 4, p = 0..3, where nibble p is bits
    4p..4p + 3: the order in which the flat GEMM lifts consecutive pairs out of a word with one mask
    (weight_formats.cuh)."""

    packed: object  # [N, K / 2] uint8
    scales: object  # [N, K / GROUP] float16: d
    mins: object  # [N, K / GROUP] float16: m

    name: ClassVar[str] = "int4"
    bits_per_weight: ClassVar[float] = 4 + 32 / GROUP
    layout: ClassVar[str] = "4-bit codes, an fp16 scale and min per 32 weights along K"

    @property
    def shape(self):
        n, half_k = self.packed.shape
        return n, 2 * half_k

    @property
    def nbytes(self):
        return self.packed.nbytes + self.scales.nbytes + self.mins.nbytes

    def codes(self):
        """-> [N, K] uint8 codes in [0, 15]."""
        xp = _array_module(self.packed)
        n, k = self.shape
        nibbles = xp.stack([self.packed & 0x0F, self.packed >> 4], axis=-1).reshape(n, k // 8, 8)  # word order
        return xp.stack([nibbles[:, :, :4], nibbles[:, :, 4:]], axis=-1).reshape(n, k)  # weight 2p, 2p + 1

    def dequantize(self, dtype=np.float32):
        """-> [N, K] `dtype` (float32, or float64 for an oracle), d * q + m."""
        n, k = self.shape
        codes = self.codes().reshape(n, k // GROUP, GROUP).astype(dtype)
        scales, mins = self.scales.astype(dtype)[:, :, None], self.mins.astype(dtype)[:, :, None]
        return (codes * scales + mins).reshape(n, k)

    def max_error(self):
        """-> [N, K / GROUP] float32: half of each group's step d."""
        return self.scales.astype(np.float32) / 2


def quantize_int8(w):
    """w: [N, K] (K a multiple of 32) -> Int8Groups: s = max|w| / 127 per group (fp16, rounded up),
    q = round(w / s)."""
    xp = _array_module(w)
    groups = _groups(w)  # [N, K / GROUP, GROUP]
    scales = _fp16_outward(xp.abs(groups).max(axis=-1) / 127, xp, +1)  # [N, K / GROUP]
    step = scales.astype(np.float32)[:, :, None]
    codes = xp.where(step > 0, xp.rint(groups / xp.where(step > 0, step, 1)), 0)
    return Int8Groups(codes.astype(np.int8).reshape(w.shape), scales)


def quantize_int4(w):
    """w: [N, K] (K a multiple of 32) -> Int4Groups: m = min w per group (fp16, rounded down),
    d = (max w - m) / 15 (fp16, rounded up), q = round((w - m) / d)."""
    xp = _array_module(w)
    groups = _groups(w)  # [N, K / GROUP, GROUP]
    mins = _fp16_outward(groups.min(axis=-1), xp, -1)  # [N, K / GROUP]
    low = mins.astype(np.float32)[:, :, None]
    # The span in float64: in float32, max - min drops a max tiny beside |min| (1e-13 - 7.5 = -7.5), and
    # the grid would stop short of it.
    span = groups.max(axis=-1).astype(np.float64) - mins.astype(np.float64)  # [N, K / GROUP]
    scales = _fp16_outward(span / 15, xp, +1)
    step = scales.astype(np.float32)[:, :, None]
    codes = xp.where(step > 0, xp.rint((groups - low) / xp.where(step > 0, step, 1)), 0)
    return Int4Groups(pack_nibbles(xp.clip(codes, 0, 15).astype(np.uint8).reshape(w.shape)), scales, mins)


def pack_nibbles(codes):
    """codes: [N, K] uint8 in [0, 15] -> [N, K / 2] uint8 in Int4Groups' nibble order: per 8 weights
    (one 32-bit word) the even ones in nibbles 0-3, the odd ones in nibbles 4-7."""
    xp = _array_module(codes)
    words = codes.reshape(codes.shape[0], -1, 8)  # [N, K / 8, 8]
    nibbles = xp.concatenate([words[:, :, 0::2], words[:, :, 1::2]], axis=-1)  # [N, K / 8, 8] in word order
    pairs = nibbles.reshape(codes.shape[0], -1, 2)  # [N, K / 2, 2]: byte j's low and high nibble
    return pairs[:, :, 0] | (pairs[:, :, 1] << 4)


def placed(weight, xp):
    """An Int8Groups or Int4Groups -> the same weight with its arrays in module `xp` (numpy or cupy)."""
    return type(weight)(*(xp.asarray(getattr(weight, field.name)) for field in fields(weight)))


def rowwise(operation, *weights):
    """operation(*arrays): moves, stacks or adds rows of [N, X] arrays, whatever X (a row permutation, a
    concatenation, zero rows) -> its result on `weights`: plain arrays, or quantized matrices of one
    format, to each of whose arrays (codes, scales, mins: row n of each belongs to output n) it is
    applied alike, so a row's codes, scales and mins move together. Zero rows are zero weights in
    both formats (codes 0, scale 0, min 0)."""
    first = weights[0]
    if not isinstance(first, tuple(FORMATS.values())):
        return operation(*weights)
    if any(type(weight) is not type(first) for weight in weights):
        raise ValueError(f"rowwise: the weights mix formats: {', '.join(type(w).__name__ for w in weights)}")
    return type(first)(*(operation(*(getattr(weight, field.name) for weight in weights)) for field in fields(first)))


def stack_rows(*weights):
    """Weights [N_i, K], plain or quantized in one format -> [sum N_i, K], their rows one after another."""
    return rowwise(lambda *arrays: _array_module(arrays[0]).concatenate(arrays), *weights)


QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4}
FORMATS = {"int8": Int8Groups, "int4": Int4Groups}
