"""Attention seam: decode (one query per sequence against the KV cache) and causal prefill, of one
sequence's chunk or of a ragged batch of chunks of several sequences read from their KV-cache slots.

On GPU (CuPy, float16) the calls launch the unified-max kernels (decode: decode_attention.cu, or
decode_attention_mma.cu on tensor cores where the launch plan picks it for GQA groups, one launch per
call; prefill: prefill_attention.cu, one launch for a ragged batch too); on CPU (NumPy, float32)
they run the NumPy emulations that block the work the same way (decode: decode_attention.cu's, with
p exact in float32).
`method="sync"` selects the synchronised running-max path instead (the baseline).

softmax_range: the layer's SoftmaxRange (phi and its safe window, from `minifd calibrate`); None
means DEFAULT_SOFTMAX_RANGE (phi = 0, window (-60, 60)). Rows whose scaled scores leave the window
are recomputed with the synchronised method on the device itself; `recompute_count()` reports how
many rows took that path (a device-to-host read: statistics only, never inside a step).
"""

import numpy as np

from minifd.kernels.decode_attention import decode_attention_emulated, decode_attention_gpu
from minifd.kernels.decode_attention_sync import decode_attention_sync_emulated, decode_attention_sync_gpu
from minifd.kernels.launch import PLAIN
from minifd.kernels.prefill_attention import (RaggedQueries, prefill_attention_emulated, prefill_attention_gpu,
                                              prefill_attention_ragged_emulated, prefill_attention_ragged_gpu)
from minifd.kernels.softmax_range import DEFAULT_SOFTMAX_RANGE

METHODS = ("async", "sync")


# ----------------------------------------------------------------------------------------------
# Recompute statistics
# ----------------------------------------------------------------------------------------------

_cpu_recomputed_rows = 0
_device_counters = {}  # device id -> cupy uint64 [1]


def _device_counter(array):
    """The recompute counter of the device `array` lives on."""
    import cupy

    device_id = array.device.id
    if device_id not in _device_counters:
        with cupy.cuda.Device(device_id):
            _device_counters[device_id] = cupy.zeros(1, dtype=cupy.uint64)
    return _device_counters[device_id]


def recompute_count():
    """Rows recomputed with the synchronised method since the last reset, CPU and all GPUs together."""
    return _cpu_recomputed_rows + sum(int(counter.get()[0]) for counter in _device_counters.values())


def reset_recompute_count():
    global _cpu_recomputed_rows
    _cpu_recomputed_rows = 0
    for counter in _device_counters.values():
        counter.fill(0)


def _count_cpu_rows(n_rows):
    global _cpu_recomputed_rows
    _cpu_recomputed_rows += n_rows


# ----------------------------------------------------------------------------------------------
# The two entry points
# ----------------------------------------------------------------------------------------------

def decode_attention(q, k_cache, v_cache, lengths, softmax_range=None, method="async", launch=PLAIN):
    """Attention of one new query token per sequence over that sequence's cached keys and values.

    q: [batch, n_heads, head_dim]; k_cache, v_cache: [batch, n_kv_heads, max_seq, head_dim];
    lengths: [batch] int32 (valid cache entries per sequence; a device array on GPU, never read by
    the host) -> [batch, n_heads, head_dim], q's dtype. Sequences of length 0 give zeros. launch: how
    the GPU kernels are launched (minifd.kernels.launch).
    """
    softmax_range = softmax_range or DEFAULT_SOFTMAX_RANGE
    _check_method(method)
    if isinstance(q, np.ndarray):
        if method == "sync":
            return decode_attention_sync_emulated(q, k_cache, v_cache, lengths).astype(q.dtype)
        out, n_recomputed = decode_attention_emulated(q, k_cache, v_cache, lengths, softmax_range)
        _count_cpu_rows(n_recomputed)
        return out.astype(q.dtype)
    if method == "sync":
        return decode_attention_sync_gpu(q, k_cache, v_cache, lengths, launch=launch)
    return decode_attention_gpu(q, k_cache, v_cache, lengths, softmax_range, _device_counter(q), launch=launch)


def prefill_attention(q, k, v, softmax_range=None, method="async"):
    """Causal self-attention of a prompt, or of a chunk of it whose earlier positions are cached.

    q: [n_queries, n_heads, head_dim], the last n_queries positions of k, v: [n_keys, n_kv_heads,
    head_dim] (n_keys = n_queries for a whole prompt) -> [n_queries, n_heads, head_dim], q's dtype.
    Query row r sits at position r + n_keys - n_queries and attends to the keys up to it.
    """
    softmax_range = softmax_range or DEFAULT_SOFTMAX_RANGE
    _check_method(method)
    if isinstance(q, np.ndarray):
        out, n_recomputed = prefill_attention_emulated(q, k, v, softmax_range, unified_max=method == "async")
        _count_cpu_rows(n_recomputed)
        return out.astype(q.dtype)
    return prefill_attention_gpu(q, k, v, softmax_range, _device_counter(q), unified_max=method == "async")


def prefill_attention_ragged(q, k_cache, v_cache, ragged, softmax_range=None, method="async"):
    """Causal attention of a ragged prefill pass: each sequence's chunk against its own cache slot.

    q: [rows, n_heads, head_dim], the chunks of ragged.lengths rows one after another; k_cache,
    v_cache: [batch, n_kv_heads, max_seq, head_dim] holding every chunk's keys and values already;
    ragged: RaggedQueries (sequence j's rows sit at positions [key_ends[j] - lengths[j], key_ends[j])
    of slot slots[j] and attend to that slot's positions [0, key_ends[j])) -> [rows, n_heads, head_dim].
    """
    softmax_range = softmax_range or DEFAULT_SOFTMAX_RANGE
    _check_method(method)
    if isinstance(q, np.ndarray):
        out, n_recomputed = prefill_attention_ragged_emulated(q, k_cache, v_cache, ragged, softmax_range,
                                                              unified_max=method == "async")
        _count_cpu_rows(n_recomputed)
        return out.astype(q.dtype)
    return prefill_attention_ragged_gpu(q, k_cache, v_cache, ragged, softmax_range, _device_counter(q),
                                        unified_max=method == "async")


def _check_method(method):
    if method not in METHODS:
        raise ValueError(f"attention method must be one of {METHODS}, not {method!r}")
