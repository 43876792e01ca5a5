"""Causal prefill attention with the unified max value: NumPy emulation and CuPy launcher of
prefill_attention.cu.

In log2 units (t = q.k * log2(e) / sqrt(head_dim); phi, low, high times log2 e), query row r gets
    out_r = sum_{c <= r} exp2(t_rc - phi) v_c / sum_{c <= r} exp2(t_rc - phi),
and a row with any t_rc - phi outside (low, high) is recomputed with the running max (the
synchronised online softmax) and counted. The emulation walks the kernel's query tiles of 64 rows,
vectorised over heads; within a tile the key tiles of the kernel only change the float32 summation
order, so it sums each row in one go.
"""

import functools
import math

import numpy as np

from minifd.kernels.compile import load_module
from minifd.kernels.decode_attention_sync import check_head_dim, score_scale

QUERY_TILE = 64  # kQueryTile in prefill_attention.cu
THREADS_PER_BLOCK = 128


def prefill_attention_emulated(q, k, v, softmax_range, unified_max=True):
    """q: [seq, n_heads, head_dim]; k, v: [seq, n_kv_heads, head_dim] -> (out [seq, n_heads, head_dim]
    float32, number of recomputed rows). unified_max=False runs the synchronised method on every row."""
    seq, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    group = n_heads // n_kv_heads
    phi, low, high = (np.float32(value) for value in softmax_range.in_log2_units())
    query = q.astype(np.float32).transpose(1, 0, 2).reshape(n_kv_heads, group, seq, head_dim)
    keys = k.astype(np.float32).transpose(1, 2, 0)[:, None]  # [n_kv_heads, 1, head_dim, seq]
    values = v.astype(np.float32).transpose(1, 0, 2)[:, None]  # [n_kv_heads, 1, seq, head_dim]
    out = np.empty((n_kv_heads, group, seq, head_dim), np.float32)
    n_recomputed = 0
    for first in range(0, seq, QUERY_TILE):
        last = min(first + QUERY_TILE, seq)  # rows [first, last) see keys [0, last)
        t = (query[:, :, first:last] @ keys[..., :last]) * score_scale(head_dim)  # [kv, group, rows, last]
        causal = np.arange(last)[None, :] <= np.arange(first, last)[:, None]  # [rows, last]
        if unified_max:
            shifted = t - phi
            unsafe = (causal & ~((shifted > low) & (shifted < high))).any(axis=-1)  # [kv, group, rows]
            with np.errstate(over="ignore", invalid="ignore"):  # unsafe rows are replaced below
                p = np.exp2(np.where(causal, shifted, -np.inf))
                tile_out = (p @ values[:, :, :last]) / p.sum(axis=-1, keepdims=True)
            if unsafe.any():
                tile_out = np.where(unsafe[..., None], _synchronised(t, causal, values[:, :, :last]), tile_out)
                n_recomputed += int(unsafe.sum())
        else:
            tile_out = _synchronised(t, causal, values[:, :, :last])
        out[:, :, first:last] = tile_out
    return out.reshape(n_heads, seq, head_dim).transpose(1, 0, 2), n_recomputed


def _synchronised(t, causal, values):
    """t: [kv, group, rows, keys] log2-unit scores; causal: [rows, keys]; values: [kv, 1, keys, dim]
    -> [kv, group, rows, dim], softmax against each row's own max."""
    row_max = np.where(causal, t, -np.inf).max(axis=-1, keepdims=True)
    p = np.exp2(np.where(causal, t - row_max, -np.inf))
    return (p @ values) / p.sum(axis=-1, keepdims=True)


def prefill_attention_gpu(q, k, v, softmax_range, recompute_counter, unified_max=True):
    """prefill_attention.cu on the current device; shapes as the emulation, float16 in and out.
    recompute_counter: device uint64 [1], incremented once per recomputed row."""
    import cupy

    seq, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    check_head_dim(head_dim)
    if n_heads % n_kv_heads or k.shape != v.shape or k.shape[::2] != (seq, head_dim):
        raise ValueError(f"prefill attention shapes q {q.shape}, k {k.shape}, v {v.shape} do not match")
    q, k, v = (cupy.ascontiguousarray(array, dtype=cupy.float16) for array in (q, k, v))
    out = cupy.empty(q.shape, cupy.float16)
    if seq == 0:
        return out
    grid = (math.ceil(seq / QUERY_TILE), n_heads)
    shape_args = (q, k, v, np.int32(seq), np.int32(n_heads), np.int32(n_kv_heads), score_scale(head_dim))
    if unified_max:
        phi, low, high = (np.float32(value) for value in softmax_range.in_log2_units())
        _kernel(head_dim, "prefill_unified_max")(grid, (THREADS_PER_BLOCK,),
                                                 shape_args + (phi, low, high, out, recompute_counter))
    else:
        _kernel(head_dim, "prefill_synchronised")(grid, (THREADS_PER_BLOCK,), shape_args + (out,))
    return out


@functools.lru_cache(maxsize=None)
def _kernel(head_dim, name):
    return load_module("prefill_attention.cu", (f"-DHEAD_DIM={head_dim}",)).get_function(name)
