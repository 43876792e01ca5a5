"""ImplA: GEMV on CUDA cores (gemv.cu) and its NumPy emulation.

y[m, n] = sum_k x[m, k] W[n, k], optionally of RMSNorm(x), and then plus a residual, through the
SwiGLU gate, or (the QKV projection) through RoPE into q and the KV cache (gemv.cu says how;
FUSED_KERNELS lists the combinations).
The kernel takes the rows of x in tiles of M_TILE (1, 2, 4 or 8; one compiled kernel each) and walks
K in chunks of GEMV_STAGE_HALVES / M_TILE, staging each chunk of x in shared memory; the emulation
accumulates the same K chunks in float32 in the same order.
The weight is float16 or quantized (int8, int4: minifd.kernels.weight_formats), each format one
compiled module; the kernel dequantizes in float32, and so does the emulation.
"""

import functools
from dataclasses import dataclass

import numpy as np

from minifd.kernels.compile import load_module
from minifd.kernels.dispatch import gpu_properties
from minifd.kernels.launch import PLAIN
from minifd.kernels.silu_mul import GATE_TILE, silu_mul
from minifd.kernels.weight_formats import (emulated_weight, format_name, format_option, kernel_operands,
                                           weights_aligned)

GEMV_M_TILES = (1, 2, 4, 8)
# The fused steps gemv.cu and flat_gemm.cu have kernels for, (gated, residual, norm, rotary) -> kernel
# name suffix.
FUSED_KERNELS = {(False, False, False, False): "store", (False, False, True, False): "store_norm",
                 (False, True, False, False): "residual", (True, False, False, False): "gated",
                 (True, False, True, False): "gated_norm",
                 (False, False, False, True): "rotary", (False, False, True, True): "rotary_norm"}


@dataclass(frozen=True)
class GemvGeometry:
    """Compile-time launch geometry of gemv.cu (its -D values)."""

    threads: int = 128  # per block
    rows_per_warp: int = 1  # rows of W each warp owns
    unroll: int = 8  # 16-byte pieces per row in flight per lane (M tiles <= 2)
    stage_halves: int = 8192  # x staged in shared memory per K chunk: the chunk is this / M tile

    def options(self):
        return (f"-DGEMV_THREADS={self.threads}", f"-DGEMV_ROWS_PER_WARP={self.rows_per_warp}",
                f"-DGEMV_UNROLL={self.unroll}", f"-DGEMV_STAGE_HALVES={self.stage_halves}")


# Best of 18 geometries in scripts/sweep_gemv.py on an H200 (M = 1, Llama-2-7B shapes, CUDA graphs):
# 3.51 ms of GEMV per decode step against 3.61 ms for 256 threads x 2 rows, 4.48 ms at worst.
DEFAULT_GEOMETRY = GemvGeometry()
GEMV_STAGE_HALVES = DEFAULT_GEOMETRY.stage_halves


def gemv_m_tile(m):
    """Rows of x per block: the smallest compiled tile that holds M, else 8 (blockIdx.y walks the rest)."""
    return next((tile for tile in GEMV_M_TILES if m <= tile), GEMV_M_TILES[-1])


def fused_steps(norm, residual, gated, rotary=None):
    """The FUSED_KERNELS key of a combination of fused steps."""
    return gated, residual is not None, norm is not None, rotary is not None


def fusable(norm, residual, gated, rotary=None):
    """Whether gemv.cu and flat_gemm.cu have a kernel for this combination of fused steps."""
    return fused_steps(norm, residual, gated, rotary) in FUSED_KERNELS


def gemv_emulated(x, weight, geometry=None, *, norm=None, residual=None, gated=False, rotary=None):
    """x: [M, K], weight: [N, K] (NumPy, or a quantized weight of NumPy arrays), norm: None or an
    RMSNorm, residual: None or [M, N], rotary: None or a minifd.kernels.rope.Rotary -> [M, N] float32 ([M, N / 2] when gated; with
    rotary q: [M, n_heads, head_dim], k and v written to its caches), summed over K chunks like the
    kernel."""
    m, k = x.shape
    chunk = (geometry or DEFAULT_GEOMETRY).stage_halves // gemv_m_tile(m)
    x32 = x.astype(np.float32, copy=False)
    staged = x32 if norm is None else x32 * norm.weight.astype(np.float32)
    w = emulated_weight(weight)  # [N, K] float32
    y = np.zeros((m, w.shape[0]), dtype=np.float32)
    for k0 in range(0, k, chunk):
        y += staged[:, k0:k0 + chunk] @ w[:, k0:k0 + chunk].T
    if norm is not None:
        y *= 1.0 / np.sqrt((x32 * x32).mean(axis=-1, keepdims=True) + np.float32(norm.eps))
    if gated:
        y = silu_mul(y)  # [M, N / 2]
    if residual is not None:
        y += residual
    return y if rotary is None else rotary.apply(y)


def gemv_gpu(x, weight, geometry=None, *, norm=None, residual=None, gated=False, rotary=None,
             launch=PLAIN):
    """x: [M, K] float16, weight: [N, K] float16 (CuPy, C-contiguous) or a quantized weight of CuPy
    arrays (minifd.kernels.weight_formats), norm: None or an RMSNorm of
    float16 weights, residual: None or [M, N] float16; gated: the weight's rows are gate/up
    interleaved (minifd.kernels.silu_mul); rotary: None or a minifd.kernels.rope.Rotary (float16
    caches, head_dim % 16 == 0) -> [M, N] float16 ([M, N / 2] when gated; with rotary q:
    [M, n_heads, head_dim], k and v written to its caches). The combination of fused steps must be
    in FUSED_KERNELS. No host sync. launch: how the kernel is launched (minifd.kernels.launch);
    geometry: None for DEFAULT_GEOMETRY (every format reads 16-byte pieces)."""
    import cupy

    if not fusable(norm, residual, gated, rotary):
        raise ValueError(f"gemv: no kernel fuses norm={norm is not None}, residual={residual is not None}, "
                         f"gated={gated}, rotary={rotary is not None}")
    m, k = x.shape
    n = weight.shape[0]
    if gated and n % (2 * GATE_TILE):
        raise ValueError(f"gemv: a gated weight has whole tiles of {2 * GATE_TILE} rows, not {n}")
    tile = gemv_m_tile(m)
    geometry = geometry or DEFAULT_GEOMETRY
    warps = geometry.threads // gpu_properties().warp_size
    # Two warps share each pair of rows (a feature's gate and up, or a rotary pair): one warp per row.
    warps_needed = n if gated or rotary is not None else -(-n // geometry.rows_per_warp)
    grid = (-(-warps_needed // warps), -(-m // tile))
    gain = norm.weight if norm is not None else x  # unread without NORM
    vector_ok = vectorisable(x, weight) and gain.data.ptr % 16 == 0
    kernel = _kernel(cupy.cuda.runtime.getDevice(), f"gemv_m{tile}_{FUSED_KERNELS[fused_steps(norm, residual, gated, rotary)]}",
                     geometry, format_name(weight))
    weight_operands = kernel_operands(weight)  # (codes, scales, mins)
    shape_arguments = (np.int32(m), np.int32(n), np.int32(k), np.float32(norm.eps if norm is not None else 0.0),
                       np.int32(vector_ok))
    if rotary is not None:
        q, rotary_arguments = rotary.epilogue_arguments(m, n, "gemv")
        launch(kernel, grid, (geometry.threads,), (x, *weight_operands, gain) + shape_arguments + rotary_arguments)
        return q
    y = cupy.empty((m, n // 2 if gated else n), dtype=cupy.float16)
    residual_in = cupy.ascontiguousarray(residual) if residual is not None else y  # unread without RESIDUAL
    launch(kernel, grid, (geometry.threads,), (x, *weight_operands, y, gain, residual_in) + shape_arguments)
    return y


def vectorisable(x, weight):
    """True when every row of x and W starts on a 16-byte boundary, so kernels may move 8 halves (or 8
    weights' codes) at once; a quantized weight's K is a multiple of 32, so its rows are aligned
    whenever its arrays are."""
    return x.shape[1] % 8 == 0 and x.data.ptr % 16 == 0 and weights_aligned(weight)


@functools.lru_cache(maxsize=None)
def _kernel(device_id, name, geometry, weight_format):
    return load_module("gemv.cu", geometry.options() + (format_option(weight_format),)).get_function(name)
