"""ImplA: GEMV on CUDA cores (gemv.cu) and its NumPy emulation.

y[m, n] = sum_k x[m, k] W[n, k]. The kernel takes the rows of x in tiles of M_TILE (1, 2, 4 or 8;
one compiled kernel each) and walks K in chunks of GEMV_STAGE_HALVES / M_TILE, staging each chunk of
x in shared memory; the emulation accumulates the same K chunks in float32 in the same order.
"""

import functools

import numpy as np

from minifd.kernels.compile import load_module
from minifd.kernels.dispatch import gpu_properties

# Mirrors of gemv.cu's constants.
GEMV_THREADS = 256
GEMV_ROWS_PER_WARP = 2
GEMV_STAGE_HALVES = 8192
GEMV_M_TILES = (1, 2, 4, 8)


def gemv_m_tile(m):
    """Rows of x per block: the smallest compiled tile that holds M, else 8 (blockIdx.y walks the rest)."""
    return next((tile for tile in GEMV_M_TILES if m <= tile), GEMV_M_TILES[-1])


def gemv_emulated(x, weight):
    """x: [M, K], weight: [N, K] (NumPy) -> [M, N] float32, summed over K chunks like the kernel."""
    m, k = x.shape
    chunk = GEMV_STAGE_HALVES // gemv_m_tile(m)
    x32 = x.astype(np.float32, copy=False)
    y = np.zeros((m, weight.shape[0]), dtype=np.float32)
    for k0 in range(0, k, chunk):
        y += x32[:, k0:k0 + chunk] @ weight[:, k0:k0 + chunk].astype(np.float32, copy=False).T
    return y


def gemv_gpu(x, weight):
    """x: [M, K] float16, weight: [N, K] float16 (CuPy, C-contiguous) -> [M, N] float16. No host sync."""
    import cupy

    m, k = x.shape
    n = weight.shape[0]
    tile = gemv_m_tile(m)
    rows_per_block = GEMV_THREADS // gpu_properties().warp_size * GEMV_ROWS_PER_WARP
    y = cupy.empty((m, n), dtype=cupy.float16)
    grid = ((n + rows_per_block - 1) // rows_per_block, (m + tile - 1) // tile)
    _kernel(cupy.cuda.runtime.getDevice(), f"gemv_m{tile}")(
        grid, (GEMV_THREADS,), (x, weight, y, np.int32(m), np.int32(n), np.int32(k), np.int32(vectorisable(x, weight)))
    )
    return y


def vectorisable(x, weight):
    """True when every row of x and W starts on a 16-byte boundary, so kernels may move 8 halves at once."""
    return x.shape[1] % 8 == 0 and x.data.ptr % 16 == 0 and weight.data.ptr % 16 == 0


@functools.lru_cache(maxsize=None)
def _kernel(device_id, name):
    return load_module("gemv.cu").get_function(name)
