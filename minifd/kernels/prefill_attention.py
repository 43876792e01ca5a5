"""Causal prefill attention with the unified max value: NumPy emulation and CuPy launcher of
prefill_attention.cu, for one sequence or a ragged batch (RaggedQueries: a chunk of each of several
sequences, attending to its own KV-cache slot) in one launch.

In log2 units (t = q.k * log2(e) / sqrt(head_dim); phi, low, high times log2 e), query row r gets
    out_r = sum_{c <= r + offset} p_rc v_c / sum_{c <= r + offset} p_rc,   p_rc = exp2(t_rc - phi),
where offset = n_keys - n_queries: the queries are the last positions of the keys, a chunk of a
prompt whose earlier positions are already in the KV cache (offset 0 for a whole prompt).
The row is safe when every t_rc - phi lies in (low, min(high, 15)) and the mean of its p_rc is at
least 2^-14: on NVIDIA the tensor cores take P in fp16, so every p must stay below fp16's largest
finite value, and terms below fp16's smallest normal may not carry the row (prefill_attention.cu says
more). Other rows are recomputed with the running max (the synchronised online softmax) and counted.
Every backend applies this same test. The emulation walks the tensor-core kernel's query tiles of
128 rows, vectorised over heads; within a tile the key tiles of the kernel only change the float32
summation order, so it sums each row in one go.
"""

import functools
import math
from dataclasses import dataclass

import numpy as np

from minifd.kernels.compile import load_module
from minifd.kernels.decode_split_kv import check_head_dim, score_scale

# Launch geometry, passed to prefill_attention.cu as -D flags. Tensor cores (NVIDIA sm_80+): warps of
# ROW_TILES m16 query tiles each; CUDA cores (AMD, older NVIDIA): threads, query and key tiles.
WARPS, ROW_TILES, KEY_TILE = 4, 2, 64
QUERY_TILE, THREADS_PER_BLOCK = WARPS * 16 * ROW_TILES, 32 * WARPS
CUDA_CORE_QUERY_TILE, CUDA_CORE_THREADS_PER_BLOCK, CUDA_CORE_KEY_TILE = 64, 128, 32
TILE_OPTIONS = (f"-DPREFILL_WARPS={WARPS}", f"-DPREFILL_ROW_TILES={ROW_TILES}", f"-DPREFILL_KEY_TILE={KEY_TILE}",
                f"-DPREFILL_CORE_THREADS={CUDA_CORE_THREADS_PER_BLOCK}",
                f"-DPREFILL_CORE_QUERY_TILE={CUDA_CORE_QUERY_TILE}", f"-DPREFILL_CORE_KEY_TILE={CUDA_CORE_KEY_TILE}")
LARGEST_LOG2_PROBABILITY = 15.0  # kLargestLog2Probability: exp2(15) stays below fp16's 65504
SMALLEST_NORMAL_HALF = 2.0**-14  # kSmallestNormalHalf: a safe row's mean term is at least this


@dataclass(frozen=True)
class RaggedQueries:
    """Where the query rows of a ragged prefill pass come from: sequence j's lengths[j] rows follow
    those of sequences 0..j-1 and sit at positions [key_ends[j] - lengths[j], key_ends[j]) of cache
    slot slots[j]; they attend to that slot's positions [0, key_ends[j])."""

    lengths: tuple
    slots: tuple
    key_ends: tuple

    @property
    def row_starts(self):
        """-> each sequence's first row, [n_sequences] int"""
        return np.cumsum((0,) + self.lengths[:-1])

    def sequences(self):
        """-> (first row, rows, slot, key end) of each sequence"""
        return zip(self.row_starts.tolist(), self.lengths, self.slots, self.key_ends)

    def launch_tables(self, query_tile):
        """The kernel's tables for tiles of query_tile rows -> (tiles [n_tiles, 2] int32: (sequence,
        first query row within it), ordered by the keys the tile reaches, longest first; sequences
        [n_sequences, 4] int32: (first row, n_queries, n_keys, slot))."""
        sequences = np.array([(first, length, end, slot) for first, length, slot, end in self.sequences()],
                             np.int32).reshape(-1, 4)
        tiles = np.array([(j, first) for j, length in enumerate(self.lengths)
                          for first in range(0, length, query_tile)], np.int32).reshape(-1, 2)
        lengths, key_ends = np.asarray(self.lengths)[tiles[:, 0]], np.asarray(self.key_ends)[tiles[:, 0]]
        reach = np.minimum(tiles[:, 1] + query_tile, lengths) + key_ends - lengths  # [n_tiles]
        return tiles[np.argsort(-reach, kind="stable")], sequences


def prefill_attention_emulated(q, k, v, softmax_range, unified_max=True):
    """q: [n_queries, n_heads, head_dim]; k, v: [n_keys, n_kv_heads, head_dim], n_keys >= n_queries
    -> (out [n_queries, n_heads, head_dim] float32, number of recomputed rows). unified_max=False runs
    the synchronised method on every row."""
    n_queries, n_heads, head_dim = q.shape
    n_keys, n_kv_heads = k.shape[:2]
    offset = n_keys - n_queries  # query row r sits at key position r + offset
    group = n_heads // n_kv_heads
    phi, low, high = (np.float32(value) for value in softmax_range.in_log2_units())
    high = min(high, np.float32(LARGEST_LOG2_PROBABILITY))
    query = q.astype(np.float32).transpose(1, 0, 2).reshape(n_kv_heads, group, n_queries, head_dim)
    keys = k.astype(np.float32).transpose(1, 2, 0)[:, None]  # [n_kv_heads, 1, head_dim, n_keys]
    values = v.astype(np.float32).transpose(1, 0, 2)[:, None]  # [n_kv_heads, 1, n_keys, head_dim]
    out = np.empty((n_kv_heads, group, n_queries, head_dim), np.float32)
    n_recomputed = 0
    for first in range(0, n_queries, QUERY_TILE):
        last = min(first + QUERY_TILE, n_queries)
        positions = offset + np.arange(first, last)  # [rows]
        visible = offset + last  # rows [first, last) see keys [0, visible)
        t = (query[:, :, first:last] @ keys[..., :visible]) * score_scale(head_dim)  # [kv, group, rows, visible]
        causal = np.arange(visible)[None, :] <= positions[:, None]  # [rows, visible]
        if unified_max:
            shifted = t - phi
            with np.errstate(over="ignore", invalid="ignore"):  # unsafe rows are replaced below
                p = np.exp2(np.where(causal, shifted, -np.inf))
                denominator = p.sum(axis=-1, keepdims=True)  # [kv, group, rows, 1]
                tile_out = (p @ values[:, :, :visible]) / denominator
            row_keys = (positions + 1).astype(np.float32)  # [rows]
            unsafe = ((causal & ~((shifted > low) & (shifted < high))).any(axis=-1)
                      | (denominator[..., 0] < row_keys * np.float32(SMALLEST_NORMAL_HALF)))  # [kv, group, rows]
            if unsafe.any():
                tile_out = np.where(unsafe[..., None], _synchronised(t, causal, values[:, :, :visible]), tile_out)
                n_recomputed += int(unsafe.sum())
        else:
            tile_out = _synchronised(t, causal, values[:, :, :visible])
        out[:, :, first:last] = tile_out
    return out.reshape(n_heads, n_queries, head_dim).transpose(1, 0, 2), n_recomputed


def prefill_attention_ragged_emulated(q, k_cache, v_cache, ragged, softmax_range, unified_max=True):
    """The ragged launch's emulation: q [rows, n_heads, head_dim]; k_cache, v_cache [batch, n_kv_heads,
    max_seq, head_dim]; ragged: RaggedQueries -> (out [rows, n_heads, head_dim] float32, number of
    recomputed rows). The kernel tiles each sequence from its own first row, as this runs each alone."""
    out, n_recomputed = np.empty(q.shape, np.float32), 0
    for first, length, slot, end in ragged.sequences():
        keys, values = k_cache[slot, :, :end].transpose(1, 0, 2), v_cache[slot, :, :end].transpose(1, 0, 2)
        out[first:first + length], recomputed = prefill_attention_emulated(
            q[first:first + length], keys, values, softmax_range, unified_max)  # [length, n_heads, head_dim]
        n_recomputed += recomputed
    return out, n_recomputed


def _synchronised(t, causal, values):
    """t: [kv, group, rows, keys] log2-unit scores; causal: [rows, keys]; values: [kv, 1, keys, dim]
    -> [kv, group, rows, dim], softmax against each row's own max."""
    row_max = np.where(causal, t, -np.inf).max(axis=-1, keepdims=True)
    p = np.exp2(np.where(causal, t - row_max, -np.inf))
    return (p @ values) / p.sum(axis=-1, keepdims=True)


def prefill_attention_gpu(q, k, v, softmax_range, recompute_counter, unified_max=True):
    """prefill_attention.cu on the current device for one sequence; shapes as the emulation, float16
    in and out. q, k, v may be strided views (contiguous copies are made). recompute_counter: device
    uint64 [1], incremented once per recomputed row."""
    import cupy

    n_queries, n_heads, head_dim = q.shape
    n_keys, n_kv_heads = k.shape[:2]
    if n_heads % n_kv_heads or k.shape != v.shape or k.shape[2] != head_dim or n_keys < n_queries:
        raise ValueError(f"prefill attention shapes q {q.shape}, k {k.shape}, v {v.shape} do not match")
    q, k, v = (cupy.ascontiguousarray(array, dtype=cupy.float16) for array in (q, k, v))
    key_layout = (0, head_dim, n_kv_heads * head_dim)  # one sequence: slot 0, keys row after row
    return _launch(q, k, v, RaggedQueries((n_queries,), (0,), (n_keys,)), n_kv_heads, key_layout, softmax_range,
                   recompute_counter, unified_max)


def prefill_attention_ragged_gpu(q, k_cache, v_cache, ragged, softmax_range, recompute_counter, unified_max=True):
    """prefill_attention.cu on the current device for a ragged batch, one launch; shapes as
    prefill_attention_ragged_emulated, float16 in and out. The caches are read in place (contiguous,
    as KVCache allocates them); q may be a strided view."""
    import cupy

    batch, n_kv_heads, max_seq, head_dim = k_cache.shape
    if (q.shape[0] != sum(ragged.lengths) or q.shape[2] != head_dim or q.shape[1] % n_kv_heads
            or v_cache.shape != k_cache.shape or not (k_cache.flags.c_contiguous and v_cache.flags.c_contiguous)
            or k_cache.dtype != cupy.float16 or v_cache.dtype != cupy.float16):
        raise ValueError(f"ragged prefill attention shapes q {q.shape}, caches {k_cache.shape}, {v_cache.shape} "
                         f"(contiguous float16) and lengths {ragged.lengths} do not match")
    if not all(length <= end <= max_seq and 0 <= slot < batch
               for length, slot, end in zip(ragged.lengths, ragged.slots, ragged.key_ends)):
        raise ValueError(f"ragged prefill attention: slots {ragged.slots}, key ends {ragged.key_ends} outside the "
                         f"cache of {batch} slots x {max_seq} positions, or short of the lengths {ragged.lengths}")
    key_layout = (n_kv_heads * max_seq * head_dim, max_seq * head_dim, head_dim)  # [batch, n_kv_heads, max_seq, d]
    return _launch(cupy.ascontiguousarray(q, dtype=cupy.float16), k_cache, v_cache, ragged, n_kv_heads, key_layout,
                   softmax_range, recompute_counter, unified_max)


def _launch(q, k, v, ragged, n_kv_heads, key_layout, softmax_range, recompute_counter, unified_max):
    """One launch over ragged's query tiles. q: [rows, n_heads, head_dim] contiguous float16; k, v: read
    at key_layout = (slot stride, KV-head stride, key stride) in halves -> out like q."""
    import cupy

    rows, n_heads, head_dim = q.shape
    check_head_dim(head_dim)
    out = cupy.empty(q.shape, cupy.float16)
    if rows == 0:
        return out
    device = cupy.cuda.Device()
    query_tile, threads, shared_bytes = _launch_geometry(cupy, device, head_dim)
    tiles, sequences = _device_tables(ragged, query_tile, device.id)
    slot_stride, head_stride, key_stride = key_layout
    shape_args = (q, k, v, tiles, sequences, np.int32(n_heads), np.int32(n_kv_heads), np.int64(slot_stride),
                  np.int32(head_stride), np.int32(key_stride), score_scale(head_dim))
    grid = (tiles.shape[0], n_heads)
    if unified_max:
        phi, low, high = (np.float32(value) for value in softmax_range.in_log2_units())
        kernel = _kernel(device.id, head_dim, "prefill_unified_max", shared_bytes)
        kernel(grid, (threads,), shape_args + (phi, low, high, out, recompute_counter), shared_mem=shared_bytes)
    else:
        kernel = _kernel(device.id, head_dim, "prefill_synchronised", shared_bytes)
        kernel(grid, (threads,), shape_args + (out,), shared_mem=shared_bytes)
    return out


@functools.lru_cache(maxsize=64)
def _device_tables(ragged, query_tile, device_id):
    """ragged.launch_tables(query_tile) on device_id, uploaded once: a prefill pass's layers share them."""
    import cupy

    with cupy.cuda.Device(device_id):
        return tuple(cupy.asarray(table) for table in ragged.launch_tables(query_tile))


def _launch_geometry(cupy, device, head_dim):
    """-> (query rows per block, threads per block, dynamic shared memory bytes) of the path the
    device compiles: tensor cores on NVIDIA sm_80+ (the Q tile and two K, V tile pairs in dynamic
    shared memory, fp16), CUDA cores elsewhere (static shared memory only)."""
    if getattr(cupy.cuda.runtime, "is_hip", False) or int(device.compute_capability) < 80:
        return CUDA_CORE_QUERY_TILE, CUDA_CORE_THREADS_PER_BLOCK, 0
    return QUERY_TILE, THREADS_PER_BLOCK, (QUERY_TILE + 4 * KEY_TILE) * head_dim * 2


@functools.lru_cache(maxsize=None)
def _kernel(device_id, head_dim, name, shared_bytes):
    """The kernel, allowed shared_bytes of dynamic shared memory on device_id (above 48 KB needs an opt-in)."""
    kernel = load_module("prefill_attention.cu", (f"-DHEAD_DIM={head_dim}",) + TILE_OPTIONS).get_function(name)
    if shared_bytes:
        kernel.max_dynamic_shared_size_bytes = shared_bytes
    return kernel
