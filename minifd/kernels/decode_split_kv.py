"""The split-KV machinery both decode attention paths share (decode_split_kv.cuh is its CUDA side):
the geometry (threads, heads per block, keys per split), the split partials and their combine as
NumPy functions the emulations are built from, and the launch plan with its workspace.

Each sequence's keys are cut into splits of `keys_per_split`; split i of a row computes, in log2
units (t = q.k * log2(e) / sqrt(head_dim)), its partial sums acc_i = sum_j p_j v_j and den_i = sum_j
p_j, and a combine adds the splits: the synchronised method (decode_attention_sync.py) with
p_j = exp2(t_j - m_i) for the split max m_i, rescaled by exp2(m_i - max_i m_i) in the combine; the
unified max (decode_attention.py on CUDA cores, decode_attention_mma.py on tensor cores) with
p_j = exp2(t_j - phi) and no rescaling. On the GPU the combine is part of the split kernel's launch:
the last split block of each head group does it. The plan (split_plan) says which kernel runs:
the unified max goes to tensor cores for blocks of TENSOR_CORE_MIN_HEADS or more query heads on
NVIDIA sm_80+ (uses_tensor_cores).
"""

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from minifd.errors import MinifdError
from minifd.kernels.compile import load_module

LOG2E = math.log2(math.e)
THREADS_PER_BLOCK = 128  # per block of the CUDA-core split kernels (SplitKernel.threads)
MAX_HEADS_PER_BLOCK = 8  # register budget: each query head costs 8 accumulators + 8 query floats per lane
TENSOR_CORE_MIN_HEADS = 4  # query heads per block from which the unified max runs on tensor cores
SPLIT_SIZES = (64, 128, 256, 512, 1024)
CPU_KEYS_PER_SPLIT = 256
SUPPORTED_HEAD_DIMS = (64, 128)


# ----------------------------------------------------------------------------------------------
# Geometry shared by the emulations and the kernels
# ----------------------------------------------------------------------------------------------

def score_scale(head_dim):
    """log2(e) / sqrt(head_dim) as the float32 the kernels multiply the query (CUDA cores) or the score
    (tensor cores) by."""
    return np.float32(LOG2E / math.sqrt(head_dim))


def heads_per_block(group):
    """Query heads one block serves: the largest divisor of the GQA group size that fits the registers."""
    return max(h for h in range(1, MAX_HEADS_PER_BLOCK + 1) if group % h == 0)


def choose_keys_per_split(blocks_per_split, max_seq, sm_count=None, blocks_per_sm=4):
    """The largest split size that still launches at least blocks_per_sm blocks per SM for
    a cache of max_seq keys (blocks_per_split = batch * n_heads / heads_per_block): fewer, longer
    splits leave less for the combine to add. Depends on the cache capacity, never on the current
    lengths, so a captured graph stays valid. sm_count=None (CPU) -> CPU_KEYS_PER_SPLIT."""
    if sm_count is None:
        return CPU_KEYS_PER_SPLIT
    for size in reversed(SPLIT_SIZES):
        if blocks_per_split * math.ceil(max_seq / size) >= blocks_per_sm * sm_count:
            return size
    return SPLIT_SIZES[0]


def nearest_wave_keys_per_split(blocks_per_split, max_seq, sm_count=None, blocks_per_sm=2, sizes=SPLIT_SIZES):
    """The split size (of `sizes`) whose grid comes nearest, by ratio, to one wave of blocks_per_sm
    resident blocks per SM, the larger on a tie: for kernels whose blocks cost more to start and to
    combine than a short split saves, a slightly short wave of long splits beats a full one of short
    splits. Like choose_keys_per_split, from the cache capacity only; sm_count=None (CPU) ->
    CPU_KEYS_PER_SPLIT."""
    if sm_count is None:
        return CPU_KEYS_PER_SPLIT
    wave = blocks_per_sm * sm_count
    return min(reversed(sizes), key=lambda size: abs(math.log(blocks_per_split * math.ceil(max_seq / size) / wave)))


def check_head_dim(head_dim):
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise MinifdError(f"the attention kernels support head_dim {' or '.join(map(str, SUPPORTED_HEAD_DIMS))}, "
                          f"not {head_dim}")


# ----------------------------------------------------------------------------------------------
# NumPy emulation
# ----------------------------------------------------------------------------------------------

@dataclass
class SplitScores:
    """Scores of every query head against its sequence's keys, cut into splits."""

    t: np.ndarray  # [batch, n_kv_heads, group, n_splits, keys_per_split] float32, log2 units
    valid: np.ndarray  # [batch, 1, 1, n_splits, keys_per_split] bool: key < length
    active: np.ndarray  # [batch, 1, 1, n_splits] bool: the split holds at least one key
    values: np.ndarray  # [batch, n_kv_heads, n_splits, keys_per_split, head_dim] float32


def split_scores(q, k_cache, v_cache, lengths, keys_per_split):
    """q: [batch, n_heads, head_dim]; k_cache, v_cache: [batch, n_kv_heads, max_seq, head_dim];
    lengths: [batch] -> SplitScores covering the splits up to the longest sequence."""
    batch, n_heads, head_dim = q.shape
    n_kv_heads, max_seq = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv_heads
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64), max_seq)
    n_splits = max(1, math.ceil(int(lengths.max(initial=0)) / keys_per_split))
    n_keys = n_splits * keys_per_split
    keys = k_cache[:, :, :n_keys].astype(np.float32, copy=False)  # [batch, n_kv_heads, n_keys, head_dim]
    values = v_cache[:, :, :n_keys].astype(np.float32, copy=False)
    if n_keys > max_seq:  # the last split runs past the cache: pad it with zero keys (masked anyway)
        pad = ((0, 0), (0, 0), (0, n_keys - max_seq), (0, 0))
        keys, values = np.pad(keys, pad), np.pad(values, pad)
    query = q.astype(np.float32).reshape(batch, n_kv_heads, group, head_dim) * score_scale(head_dim)
    t = query @ keys.transpose(0, 1, 3, 2)  # [batch, n_kv_heads, group, n_keys]
    valid = np.arange(n_keys)[None, :] < lengths[:, None]  # [batch, n_keys]
    split_shape = (batch, 1, 1, n_splits, keys_per_split)
    return SplitScores(t.reshape(batch, n_kv_heads, group, n_splits, keys_per_split),
                       valid.reshape(split_shape), valid.reshape(split_shape).any(axis=-1),
                       values.reshape(batch, n_kv_heads, n_splits, keys_per_split, head_dim))


def weighted_values(p, values):
    """p: [batch, kv, group, splits, keys]; values: [batch, kv, splits, keys, dim] -> [batch, kv, group, splits, dim]"""
    return (p.transpose(0, 1, 3, 2, 4) @ values).transpose(0, 1, 3, 2, 4)


def running_max_partials(scores):
    """SplitScores -> acc [batch, kv, group, splits, dim], den [batch, kv, group, splits],
    max [batch, kv, group, splits] (log2 units; -inf for empty splits), each relative to its split max."""
    split_max = np.where(scores.valid, scores.t, -np.inf).max(axis=-1)
    shifted = scores.t - np.where(np.isfinite(split_max), split_max, 0.0)[..., None]
    p = np.where(scores.valid, np.exp2(np.minimum(shifted, 0.0)), np.float32(0.0))
    return weighted_values(p, scores.values), p.sum(axis=-1), split_max


def rescaled_combine(acc, den, split_max, active, own_max_factor=None):
    """Combine partials relative to different references by rescaling to the row max.
    acc: [..., splits, dim]; den, split_max: [..., splits]; active: broadcastable to den;
    own_max_factor: [..., splits] factor that brings each partial to its split max (None: already
    there) -> [..., dim]; rows without keys give 0."""
    row_max = np.where(active, split_max, -np.inf).max(axis=-1, keepdims=True)
    to_row_max = np.where(active, np.exp2(split_max - np.where(np.isfinite(row_max), row_max, 0.0)), np.float32(0.0))
    weight = to_row_max if own_max_factor is None else own_max_factor * to_row_max
    numerator = (acc * weight[..., None]).sum(axis=-2)
    denominator = (den * weight).sum(axis=-1)[..., None]
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def unified_max_emulated(q, k_cache, v_cache, lengths, softmax_range, keys_per_split, round_probability=None):
    """A unified-max split kernel on the CPU, float32 (decode_attention.py, decode_attention_mma.py).
    q: [batch, n_heads, head_dim]; k_cache, v_cache: [batch, n_kv_heads, max_seq, head_dim];
    lengths: [batch]; softmax_range: SoftmaxRange; round_probability: None, or how the kernel rounds
    every p = exp2(t - phi) before it multiplies v and is summed (float32 -> float32)
    -> (out [batch, n_heads, head_dim] float32, number of recomputed rows)"""
    phi, low, high = softmax_range.in_log2_units()
    scores = split_scores(q, k_cache, v_cache, lengths, keys_per_split)
    shifted = scores.t - np.float32(phi)  # [batch, kv, group, splits, keys]
    split_unsafe = (scores.valid & ~((shifted > low) & (shifted < high))).any(axis=-1)  # [batch, kv, group, splits]
    # Overflowing splits are flagged and their rows replaced below; rows without keys give 0/0.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        p = np.exp2(np.where(scores.valid, shifted, -np.inf))
        if round_probability is not None:
            p = round_probability(p)
        acc, den = weighted_values(p, scores.values), p.sum(axis=-1)
        out = acc.sum(axis=-2) / den.sum(axis=-1)[..., None]
    split_max = np.where(scores.valid, scores.t, -np.inf).max(axis=-1)
    row_unsafe = split_unsafe.any(axis=-1)  # [batch, kv, group]
    if row_unsafe.any():
        sync_acc, sync_den, _ = running_max_partials(scores)
        acc = np.where(split_unsafe[..., None], sync_acc, acc)
        den = np.where(split_unsafe, sync_den, den)
        # Unified-max partials are first brought to their own split max: exp2(phi - max) is in float range.
        with np.errstate(over="ignore"):
            own_max_factor = np.where(split_unsafe | ~scores.active, np.float32(1.0),
                                      np.exp2(np.float32(phi) - split_max))
        rescaled = rescaled_combine(acc, den, split_max, scores.active, own_max_factor)
        out = np.where(row_unsafe[..., None], rescaled, out)
    out = np.where(scores.active.any(axis=-1)[..., None], out, np.float32(0.0))  # rows without keys give 0
    return out.reshape(q.shape).astype(np.float32), int(row_unsafe.sum())



@dataclass(frozen=True)
class SplitKernel:
    """A split kernel (splits and combine in one launch): its source, its name, the -D flags of its
    own tile constants (the shared ones, HEAD_DIM, GROUP_SIZE, DECODE_THREADS, come from the plan),
    its block size and how it sizes its splits."""

    source: str
    name: str
    options: tuple = ()
    threads: int = THREADS_PER_BLOCK  # per block, passed as -DDECODE_THREADS
    # (blocks_per_split, max_seq, sm_count) -> keys per split; the default: at least 4 resident blocks
    # per SM, what the CUDA-core kernels need to keep the memory busy
    keys_per_split: Callable = choose_keys_per_split


def uses_tensor_cores(per_block, device_id):
    """Whether the unified-max plan runs the tensor-core kernel (decode_attention_mma.cu) for blocks of
    per_block query heads: where the mma is an instruction (NVIDIA sm_80+; elsewhere portable.cuh would
    run it on CUDA cores) and the group fills enough of its 8 columns for the two products to beat the
    CUDA-core kernel's per-head dot products and shuffles (MHA and small groups stay on CUDA cores)."""
    import cupy

    if per_block < TENSOR_CORE_MIN_HEADS or getattr(cupy.cuda.runtime, "is_hip", False):
        return False
    return int(cupy.cuda.Device(device_id).compute_capability) >= 80


@dataclass(frozen=True)
class SplitPlan:
    """Everything a split kernel's launch needs that follows from the shapes alone, computed once per
    (device, kernels, shapes): which kernel, grid, split size, workspace and the compiled kernel (which
    does the splits and their combine in one launch)."""

    kernel: object
    tensor_cores: bool  # the kernel is the tensor-core one (SplitKernel tensor_core of split_plan)
    grid: tuple  # (n_splits, batch * n_heads / heads_per_block)
    block: tuple  # (threads,)
    shape_args: tuple  # n_heads, n_kv_heads, max_seq, keys_per_split, n_splits (int32) and score_scale (float32)
    keys_per_split: int
    partial_acc: object  # [batch * n_heads, n_splits, head_dim] float32
    partial_den: object  # [batch * n_heads, n_splits] float32
    partial_max: object  # [batch * n_heads, n_splits] float32, log2 units
    split_unsafe: object  # [batch * n_heads, n_splits] int32
    arrivals: object  # [batch * n_heads] int32, zero between launches: split blocks of a head group done


_workspaces = {}


def _workspace(cupy, device_id, rows, n_splits, head_dim):
    """Partials buffers and arrival counters, shared by every plan of one device and shape (launches on
    one stream run one after another, and each leaves its counters at zero): steady decoding
    allocates nothing. The counters are zeroed once, here; a head group uses its blockIdx.y's."""
    key = (device_id, rows, n_splits, head_dim)
    if key not in _workspaces:
        _workspaces[key] = (cupy.empty((rows, n_splits, head_dim), cupy.float32),
                            cupy.empty((rows, n_splits), cupy.float32),
                            cupy.empty((rows, n_splits), cupy.float32),
                            cupy.empty((rows, n_splits), cupy.int32),
                            cupy.zeros(rows, cupy.int32))
    return _workspaces[key]


@functools.lru_cache(maxsize=None)
def split_plan(device_id, cuda_core, tensor_core, batch, n_heads, n_kv_heads, max_seq, head_dim, keys_per_split=None,
               tensor_cores=None):
    """-> SplitPlan on the current device for the SplitKernel cuda_core, or tensor_core (a SplitKernel
    with the same arguments, or None) where uses_tensor_cores says so; tensor_cores=True/False forces
    the choice (properties, benchmarks)."""
    import cupy

    check_head_dim(head_dim)
    per_block = heads_per_block(n_heads // n_kv_heads)
    if tensor_cores is None:
        tensor_cores = uses_tensor_cores(per_block, device_id)
    tensor_cores = tensor_cores and tensor_core is not None
    kernel = tensor_core if tensor_cores else cuda_core
    if keys_per_split is None:
        sm_count = cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]
        keys_per_split = kernel.keys_per_split(batch * n_heads // per_block, max_seq, sm_count)
    n_splits = math.ceil(max_seq / keys_per_split)
    module = load_module(kernel.source, (f"-DHEAD_DIM={head_dim}", f"-DGROUP_SIZE={per_block}",
                                         f"-DDECODE_THREADS={kernel.threads}") + kernel.options)
    i32 = np.int32
    with cupy.cuda.Device(device_id):
        workspace = _workspace(cupy, device_id, batch * n_heads, n_splits, head_dim)
    return SplitPlan(module.get_function(kernel.name), tensor_cores, (n_splits, batch * n_heads // per_block),
                     (kernel.threads,), (i32(n_heads), i32(n_kv_heads), i32(max_seq), i32(keys_per_split), i32(n_splits),
                      score_scale(head_dim)),
                     keys_per_split, *workspace)


def plan_for(cuda_core, tensor_core, q, k_cache, v_cache, lengths, keys_per_split=None, tensor_cores=None):
    """Check the arrays (float16, C-contiguous, 16-byte aligned, matching shapes) -> (SplitPlan of
    split_plan, lengths as a device int32 array). q: [batch, n_heads, head_dim];
    k_cache, v_cache: [batch, n_kv_heads, max_seq, head_dim]; lengths: [batch]"""
    import cupy

    batch, n_heads, head_dim = q.shape
    n_kv_heads, max_seq = k_cache.shape[1], k_cache.shape[2]
    if n_heads % n_kv_heads or k_cache.shape != v_cache.shape or k_cache.shape[::3] != (batch, head_dim):
        raise ValueError(f"decode attention shapes q {q.shape}, k {k_cache.shape}, v {v_cache.shape} do not match")
    for name, array in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if array.dtype != cupy.float16 or not array.flags.c_contiguous or array.data.ptr % 16:
            raise ValueError(f"decode attention needs {name} float16, C-contiguous and 16-byte aligned")
    if not (isinstance(lengths, cupy.ndarray) and lengths.dtype == cupy.int32):
        lengths = cupy.asarray(lengths, dtype=cupy.int32)  # a host copy: the engine passes device int32
    plan = split_plan(q.device.id, cuda_core, tensor_core, batch, n_heads, n_kv_heads, max_seq, head_dim,
                      keys_per_split, tensor_cores)
    return plan, lengths
