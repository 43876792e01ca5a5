"""ImplB: FlashDecoding++'s flat GEMM (flat_gemm.cu) and its NumPy emulation.

y[m, n] = sum_k x[m, k] W[n, k]. Blocks own FLAT_BN output features by M_TILE rows of x (M padded
to 8, 16 or 32, never to 64) and run their K tiles of FLAT_BK[M_TILE] in sequence. When the
ceil(N / FLAT_BN) blocks per M group cannot fill the GPU, K is split across blocks: each split sums
its own run of K tiles, and the split partials are added in split order. The emulation follows the
same plan (with EMULATED_MULTIPROCESSORS standing in for the GPU): M padded to the tile, one float32
partial per split over that split's K range, the partials added in split order.

Paper's analysis: parallelism = N / FLAT_BN blocks per M group, hence split K for small N.
"""

import functools
from dataclasses import dataclass

import numpy as np

from minifd.kernels.compile import load_module
from minifd.kernels.dispatch import gpu_properties
from minifd.kernels.gemv import vectorisable

# Mirrors of flat_gemm.cu's constants.
FLAT_THREADS = 128
FLAT_BN = 32
FLAT_BK = {8: 256, 16: 128, 32: 128}  # K per stage for each M tile (FlatTile::bk)
FLAT_M_TILES = (8, 16, 32)
# Split K until the grid holds up to this many blocks per multiprocessor: with 26-42 KB of shared
# memory a block, 4 fit on one at every M tile, so splitting never adds a wave of its own. (A grid
# one wave deep streams best: a second, partial wave leaves a few blocks streaming alone at the end.)
BLOCKS_PER_MULTIPROCESSOR = 4
# The CPU emulation plans as an H100 (132 multiprocessors) would.
EMULATED_MULTIPROCESSORS = 132


@dataclass(frozen=True)
class FlatGemmPlan:
    m_tile: int           # rows of x per block (8, 16 or 32); K tiles are FLAT_BK[m_tile] wide
    m_groups: int         # ceil(M / m_tile): grid.z
    n_blocks: int         # ceil(N / FLAT_BN): grid.x
    k_tiles: int          # ceil(K / FLAT_BK[m_tile])
    splits: int           # grid.y: K tiles split across this many blocks per output tile
    tiles_per_split: int  # K tiles each split runs in sequence (the last split may run fewer)


def plan_flat_gemm(m, n, k, multiprocessors):
    """Shape [M, K] x [N, K]^T on a GPU with `multiprocessors` SMs/CUs -> FlatGemmPlan."""
    m_tile = next((tile for tile in FLAT_M_TILES if m <= tile), FLAT_M_TILES[-1])
    bk = FLAT_BK[m_tile]
    m_groups = -(-m // m_tile)
    n_blocks = -(-n // FLAT_BN)
    k_tiles = max(1, -(-k // bk))
    one_wave = BLOCKS_PER_MULTIPROCESSOR * multiprocessors // (n_blocks * m_groups)
    splits = min(max(one_wave, 1), k_tiles)
    tiles_per_split = -(-k_tiles // splits)
    splits = -(-k_tiles // tiles_per_split)  # no split left without tiles
    return FlatGemmPlan(m_tile, m_groups, n_blocks, k_tiles, splits, tiles_per_split)


def flat_gemm_emulated(x, weight, multiprocessors=EMULATED_MULTIPROCESSORS):
    """x: [M, K], weight: [N, K] (NumPy) -> [M, N] float32, split like the kernel.

    A split's K tiles are consecutive and the kernel sums them in sequence into one float32 tile, so
    each split is one float32 product over its K range; the splits' partials are then added in split
    order, as the last-arriving block of the kernel does. Output tiles along N are independent.
    """
    m, k = x.shape
    n = weight.shape[0]
    plan = plan_flat_gemm(m, n, k, multiprocessors)
    x_padded = np.zeros((plan.m_groups * plan.m_tile, k), dtype=np.float32)  # M padded to the tile, not to 64
    x_padded[:m] = x
    split_width = plan.tiles_per_split * FLAT_BK[plan.m_tile]
    y = None
    for split in range(plan.splits):
        columns = slice(split * split_width, (split + 1) * split_width)
        partial = x_padded[:, columns] @ weight[:, columns].astype(np.float32, copy=False).T  # [M_pad, N]
        y = partial if y is None else y + partial
    return y[:m]


def flat_gemm_gpu(x, weight):
    """x: [M, K] float16, weight: [N, K] float16 (CuPy, C-contiguous) -> [M, N] float16. No host sync:
    the split-K workspace and arrival counters are allocated once per shape and reused."""
    import cupy

    m, k = x.shape
    n = weight.shape[0]
    device_id = cupy.cuda.runtime.getDevice()
    plan = plan_flat_gemm(m, n, k, gpu_properties().multiprocessors)
    workspace, counters = _split_k_buffers(device_id, n, plan.splits, plan.m_tile, plan.m_groups)
    y = cupy.empty((m, n), dtype=cupy.float16)
    _kernel(device_id, f"flat_gemm_m{plan.m_tile}")(
        (plan.n_blocks, plan.splits, plan.m_groups),
        (FLAT_THREADS,),
        (x, weight, y, workspace, counters, np.int32(m), np.int32(n), np.int32(k),
         np.int32(plan.tiles_per_split), np.int32(vectorisable(x, weight))),
    )
    return y


@functools.lru_cache(maxsize=None)
def _split_k_buffers(device_id, n, splits, m_tile, m_groups):
    """-> (workspace [splits * m_groups * m_tile * n] float32, counters [m_groups * n_blocks] int32 zeros).
    Without a split the kernel never touches them, so one element each stands in."""
    import cupy

    if splits == 1:
        return cupy.empty(1, dtype=cupy.float32), cupy.zeros(1, dtype=cupy.int32)
    n_blocks = -(-n // FLAT_BN)
    workspace = cupy.empty(splits * m_groups * m_tile * n, dtype=cupy.float32)
    return workspace, cupy.zeros(m_groups * n_blocks, dtype=cupy.int32)


@functools.lru_cache(maxsize=None)
def _kernel(device_id, name):
    return load_module("flat_gemm.cu").get_function(name)
