"""Rotary position embedding of q and k, fused with the KV-cache write.

HF "rotate half" convention: dimension i pairs with i + head_dim / 2, angle = position * inv_freq[i],

    out[i]        = x[i] cos - x[i + half] sin
    out[i + half] = x[i + half] cos + x[i] sin

One call takes a block of rows of the fused QKV projection, rotates its q and k heads, writes k and v
into the KV cache at each row's (slot, position) and returns q. On CPU the NumPy function below is the
implementation; on GPU rope.cu does all of it in one kernel, or gemv.cu in its epilogue.

The fused QKV projection's q and k heads come in the paired layout (rotary_cache.cuh): in tiles of
2T columns, T = pair_tile(head_dim), the first-half dimensions [tT, tT + T) and then their partners
[half + tT, half + tT + T). pair_rotary_rows stacks the weight's rows that way, so the two rows one
rotation needs sit T apart in one tile and one warp of a product can rotate its own outputs.
"""

import math
from dataclasses import dataclass

import numpy as np

from minifd.backend import module_of
from minifd.kernels.compile import load_module
from minifd.kernels.launch import PLAIN


def pair_tile(head_dim):
    """T of the paired layout: 8 where head_dim / 2 allows it (the 8-row halves of a product's 16-row
    tile), else the largest power of two that divides head_dim / 2."""
    return math.gcd(8, head_dim // 2)


def pair_rotary_rows(rows, head_dim):
    """rows: [heads * head_dim, hidden] of a q or k projection, natural order -> the same rows in the
    paired layout: per head, T first-half rows, then those T dimensions' partner rows, and so on."""
    tile, hidden = pair_tile(head_dim), rows.shape[-1]
    heads = rows.reshape(-1, 2, head_dim // 2 // tile, tile, hidden)  # [head, first | partner, tile, T, hidden]
    return np.ascontiguousarray(heads.transpose(0, 2, 1, 3, 4)).reshape(rows.shape)


def unpair_rotary_columns(heads):
    """heads: [..., head_dim] q or k heads in the paired layout -> (first, partner): [..., head_dim // 2]
    each, in natural order: dimensions i and i + head_dim / 2."""
    head_dim = heads.shape[-1]
    tile = pair_tile(head_dim)
    tiles = heads.reshape(*heads.shape[:-1], head_dim // 2 // tile, 2, tile)  # [..., tile, first | partner, T]
    return (tiles[..., 0, :].reshape(*heads.shape[:-1], -1), tiles[..., 1, :].reshape(*heads.shape[:-1], -1))


@dataclass(frozen=True)
class Rotary:
    """Where RoPE and the KV-cache write of a QKV projection take their tables and put their results
    (rope_and_cache's arguments after qkv), so a product can run them in its epilogue."""

    cos: object  # [max_positions, head_dim // 2] float32
    sin: object  # [max_positions, head_dim // 2] float32
    positions: object  # [rows] int32
    slots: object  # [rows] int32
    k_cache: object  # [batch, n_kv_heads, max_seq, head_dim]
    v_cache: object  # [batch, n_kv_heads, max_seq, head_dim]

    def apply(self, qkv, launch=PLAIN):
        """qkv: [rows, (n_heads + 2 n_kv_heads) head_dim], paired -> q: [rows, n_heads, head_dim]."""
        return rope_and_cache(qkv, self.cos, self.sin, self.positions, self.slots, self.k_cache, self.v_cache,
                              launch=launch)

    def epilogue_arguments(self, rows, n, product):
        """For a GPU product of `rows` x rows and n output rows that ends in this step (rotary_cache.cuh's
        MINIFD_ROTARY_PRODUCT_KERNEL) -> (q: [rows, n_heads, head_dim] to be written, the kernel's
        arguments after the product's own). product names the kernel in the error."""
        head_dim = self.k_cache.shape[3]
        if pair_tile(head_dim) != 8 or n % head_dim:
            raise ValueError(f"{product}: the rotary epilogue takes whole heads of a head_dim that is a multiple of "
                             f"16, not {n} rows of head_dim {head_dim}")
        return rotary_kernel_arguments(self.cos, self.sin, self.positions, self.slots, self.k_cache, self.v_cache, rows,
                                       n // head_dim - 2 * self.k_cache.shape[1])


def rope_and_cache(qkv, cos, sin, positions, slots, k_cache, v_cache, launch=PLAIN):
    """Rotate q and k of the fused QKV projection and store k and v in the KV cache.

    qkv: [rows, (n_heads + 2 * n_kv_heads) * head_dim] (q heads in the paired layout, then k heads
    likewise, then v heads in natural order);
    cos, sin: [max_positions, head_dim // 2] float32 tables (angle = position * inv_freq);
    positions, slots: [rows] int32, row r is position positions[r] of cache slot slots[r];
    k_cache, v_cache: [batch, n_kv_heads, max_seq, head_dim], written in place at [slots[r], :, positions[r]]
    -> q: [rows, n_heads, head_dim] rotated, in qkv's dtype.

    Decode: rows = batch, slots = arange(batch), positions = each sequence's length so far.
    Prefill of one sequence: rows = seq, slots = its slot on every row, positions = arange(seq).
    Every position must be below both max_seq and max_positions: the caller checks. On GPU positions and
    slots stay on the device and nothing waits on it, so a decode step around this is capturable in a CUDA graph.
    launch: how the GPU kernel is launched (minifd.kernels.launch).
    """
    n_heads, n_kv_heads, head_dim = _head_counts(qkv, k_cache)
    rows = qkv.shape[0]
    if cos.shape[1:] != (head_dim // 2,) or sin.shape != cos.shape or {positions.shape, slots.shape} != {(rows,)}:
        raise ValueError(f"rope_and_cache: tables {cos.shape}, {sin.shape} (want [*, {head_dim // 2}]), positions "
                         f"{positions.shape}, slots {slots.shape} (want [{rows}])")
    if module_of(qkv) is np:
        return _rope_and_cache_numpy(qkv, cos, sin, positions, slots, k_cache, v_cache, n_heads, n_kv_heads, head_dim)
    return _rope_and_cache_gpu(qkv, cos, sin, positions, slots, k_cache, v_cache, n_heads, n_kv_heads, head_dim,
                               launch)


def _head_counts(qkv, k_cache):
    # -> n_heads, n_kv_heads, head_dim, read from the cache layout and qkv's width
    _, n_kv_heads, _, head_dim = k_cache.shape
    heads_per_row, leftover = divmod(qkv.shape[1], head_dim)
    n_heads = heads_per_row - 2 * n_kv_heads
    if head_dim % 2 or leftover or n_heads < 1:
        raise ValueError(f"rope_and_cache: qkv width {qkv.shape[1]} does not fit a cache of {n_kv_heads} kv heads "
                         f"of head_dim {head_dim} (even head_dim, n_heads + 2 * n_kv_heads whole heads)")
    return n_heads, n_kv_heads, head_dim


def _rotate_half(x, cos, sin):
    # x: [rows, heads, head_dim] paired, cos, sin: [rows, 1, head_dim // 2] float32
    # -> [rows, heads, head_dim] in natural order, x's dtype
    first, second = (part.astype(np.float32) for part in unpair_rotary_columns(x))
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1).astype(x.dtype)


def _rope_and_cache_numpy(qkv, cos, sin, positions, slots, k_cache, v_cache, n_heads, n_kv_heads, head_dim):
    rows = qkv.shape[0]
    heads = qkv.reshape(rows, n_heads + 2 * n_kv_heads, head_dim)
    cos_rows, sin_rows = cos[positions][:, None, :], sin[positions][:, None, :]  # [rows, 1, head_dim // 2]
    k_cache[slots, :, positions] = _rotate_half(heads[:, n_heads:n_heads + n_kv_heads], cos_rows, sin_rows)
    v_cache[slots, :, positions] = heads[:, n_heads + n_kv_heads:]
    return _rotate_half(heads[:, :n_heads], cos_rows, sin_rows)


def rotary_kernel_arguments(cos, sin, positions, slots, k_cache, v_cache, rows, n_heads):
    """Check a GPU call's tables, positions and caches -> (q: [rows, n_heads, head_dim] float16, to be
    written, and the arguments rotary_cache.cuh's RotaryCache is built from, after the pair tile:
    cos, sin, positions, slots, q, k_cache, v_cache, n_heads, n_kv_heads, head_dim, max_seq)."""
    import cupy

    if k_cache.dtype != cupy.float16 or v_cache.dtype != cupy.float16:
        raise ValueError("rope_and_cache on GPU takes float16 caches")
    if cos.dtype != cupy.float32 or sin.dtype != cupy.float32:
        raise ValueError("rope_and_cache: the cos/sin tables must be float32")
    if not (k_cache.flags.c_contiguous and v_cache.flags.c_contiguous) or v_cache.shape != k_cache.shape:
        raise ValueError("rope_and_cache: k_cache and v_cache must be contiguous arrays of one shape")
    _, n_kv_heads, max_seq, head_dim = k_cache.shape
    q = cupy.empty((rows, n_heads, head_dim), dtype=cupy.float16)
    return q, (cupy.ascontiguousarray(cos), cupy.ascontiguousarray(sin),
               cupy.ascontiguousarray(positions, dtype=cupy.int32),  # [rows]; a no-op for int32 device arrays
               cupy.ascontiguousarray(slots, dtype=cupy.int32),  # [rows]
               q, k_cache, v_cache, np.int32(n_heads), np.int32(n_kv_heads), np.int32(head_dim), np.int32(max_seq))


def _rope_and_cache_gpu(qkv, cos, sin, positions, slots, k_cache, v_cache, n_heads, n_kv_heads, head_dim, launch):
    import cupy

    if qkv.dtype != cupy.float16:
        raise ValueError("rope_and_cache on GPU takes float16 qkv")
    rows = qkv.shape[0]
    qkv = cupy.ascontiguousarray(qkv)
    q, rotary_arguments = rotary_kernel_arguments(cos, sin, positions, slots, k_cache, v_cache, rows, n_heads)
    tile = pair_tile(head_dim)
    vectorised = tile == 8 and all(a.data.ptr % 16 == 0 for a in (qkv, q, k_cache, v_cache))
    width = 8 if vectorised else 1
    runs = rows * (n_heads + 2 * n_kv_heads) * (head_dim // 2 // width)
    kernel = load_module("rope.cu").get_function("rope_and_cache_vec8" if vectorised else "rope_and_cache_scalar")
    if runs:
        launch(kernel, (-(-runs // 256),), (256,), (qkv, np.int32(rows), np.int32(tile)) + rotary_arguments)
    return q
