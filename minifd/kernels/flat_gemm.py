"""ImplB: FlashDecoding++'s flat GEMM, flat in M (flat_gemm.cu), and its NumPy emulation.

    y = residual + Gate(W · RMSNorm(x))      each of RMSNorm, Gate (SwiGLU) and residual optional

Blocks own FLAT_ROWS rows of W and all of K; x rows go in tiles of M_PAD = 8, 16, 32 or 64 (grid.y
walks M beyond 64), so W is streamed once whatever M. The block's warps split each K chunk of
FlatChunk.width columns into runs of `pieces` K pieces, one run per warp, and their partial sums
are added in warp order; a piece is what four lanes read of a row, 4 x 16 bytes of codes (32 fp16,
64 int8 or 128 int4 weights). The emulation follows the same plan: one float32 product per warp
over that warp's columns, the warps' partials added in order, then the epilogue.
The weight is float16 or quantized (int8, int4: minifd.kernels.weight_formats), each format one
compiled module; the kernel dequantizes in fp16 arithmetic, one rounding to float16 per weight for
the MMA, and so does the emulation.
"""

import functools
from dataclasses import dataclass

import numpy as np

from minifd.kernels.compile import load_module
from minifd.kernels.gemv import FUSED_KERNELS, fusable, fused_steps, vectorisable
from minifd.kernels.launch import PLAIN
from minifd.kernels.silu_mul import GATE_TILE, silu_mul
from minifd.kernels.weight_formats import (PLAIN_FORMAT, ROW_PIECE_WEIGHTS, emulated_weight, format_name, format_option,
                                           is_quantized, kernel_operands)

FLAT_M_PADS = (8, 16, 32, 64)


@dataclass(frozen=True)
class FlatGemmGeometry:
    """Compile-time launch geometry of flat_gemm.cu (its -D values)."""

    warps: int = 8       # per block; they split K
    row_tiles: int = 1   # 16-row tiles of W per block
    pieces: int = 2      # K pieces per warp per chunk at M_PAD <= 16
    min_blocks: int = 4  # blocks per SM the compiler must leave registers for

    @property
    def rows_per_block(self):
        return 16 * self.row_tiles

    def pieces_at(self, m_pad):
        """K pieces per warp per chunk for an x tile of m_pad rows (FlatChunk::pieces)."""
        return self.pieces if m_pad <= 16 else max(self.pieces * 16 // m_pad, 1)

    def chunk_width(self, m_pad, weight_format=PLAIN_FORMAT):
        """K columns per chunk (FlatChunk::width): a piece is four lanes' 16-byte reads of a row."""
        return self.warps * 4 * ROW_PIECE_WEIGHTS[weight_format] * self.pieces_at(m_pad)

    def options(self):
        return (f"-DFLAT_WARPS={self.warps}", f"-DFLAT_ROW_TILES={self.row_tiles}", f"-DFLAT_PIECES={self.pieces}",
                f"-DFLAT_MIN_BLOCKS={self.min_blocks}")


# scripts/sweep_flat_gemm.py on an H200, the fused kernels at M = 8 (BENCHMARKS.md): 8 warps with 2
# pieces at 4 blocks per SM (64 registers) is within 3% of the best geometry on every Llama shape and
# 3-17% ahead of the same warps with 4 pieces at the 2 blocks per SM that 104 registers allow.
DEFAULT_GEOMETRY = FlatGemmGeometry()


def flat_m_pad(m):
    """Rows of x per block: the smallest tile that holds M, else 64 (grid.y walks the rest)."""
    return next((pad for pad in FLAT_M_PADS if m <= pad), FLAT_M_PADS[-1])


def flat_gemm_emulated(x, weight, norm=None, residual=None, gated=False, geometry=DEFAULT_GEOMETRY, rotary=None):
    """x: [M, K], weight: [N, K] (NumPy, or a quantized weight of NumPy arrays), norm: None or an
    RMSNorm, residual: None or [M, N], rotary: None or a minifd.kernels.rope.Rotary -> [M, N] float32
    ([M, N / 2] when gated; with rotary q: [M, n_heads, head_dim], k and v written to its caches),
    summed by warp like the kernel."""
    m, k = x.shape
    a = x.astype(np.float32)  # [M, K]
    if norm is not None:
        row_scale = 1.0 / np.sqrt((a * a).mean(axis=-1, keepdims=True) + np.float32(norm.eps))  # [M, 1]
        a = a * norm.weight.astype(np.float32)
    width = geometry.chunk_width(flat_m_pad(m), format_name(weight))
    run = width // geometry.warps
    warp_of_column = (np.arange(k) % width) // run  # [K]
    w = emulated_weight(weight, rounded_to_half=is_quantized(weight))  # [N, K] float32
    s = np.zeros((m, w.shape[0]), np.float32)  # [M, N]
    for warp in range(geometry.warps):
        columns = warp_of_column == warp
        if columns.any():
            s += a[:, columns] @ w[:, columns].T
    if norm is not None:
        s *= row_scale
    if gated:
        s = silu_mul(s)  # [M, N / 2]
    if residual is not None:
        s = s + residual.astype(np.float32)
    return s if rotary is None else rotary.apply(s)


def flat_gemm_gpu(x, weight, norm=None, residual=None, gated=False, geometry=DEFAULT_GEOMETRY, launch=PLAIN,
                  rotary=None):
    """x: [M, K] float16, weight: [N, K] float16 (CuPy, C-contiguous) or a quantized weight of CuPy
    arrays (minifd.kernels.weight_formats), norm: None or an RMSNorm of
    float16 weights, residual: None or [M, N] float16, rotary: None or a minifd.kernels.rope.Rotary
    (float16 caches, head_dim % 16 == 0) -> [M, N] float16 ([M, N / 2] when gated; with rotary q:
    [M, n_heads, head_dim], k and v written to its caches). One launch (minifd.kernels.launch says
    how); no host sync. The combination of fused steps must be in FUSED_KERNELS."""
    import cupy

    m, k = x.shape
    n = weight.shape[0]
    if not fusable(norm, residual, gated, rotary):
        raise ValueError(f"flat_gemm: no kernel fuses norm={norm is not None}, residual={residual is not None}, "
                         f"gated={gated}, rotary={rotary is not None}")
    if gated and n % GATE_TILE:
        raise ValueError(f"flat_gemm: a gated weight has whole tiles of {GATE_TILE} rows, not {n}")
    m_pad = flat_m_pad(m)
    norm_weight = norm.weight if norm is not None else x  # unread without NORM
    vector_ok = vectorisable(x, weight) and (norm is None or norm_weight.data.ptr % 16 == 0)
    grid = (-(-n // geometry.rows_per_block), -(-m // m_pad))
    kernel_name = f"flat_gemm_m{m_pad}_{FUSED_KERNELS[fused_steps(norm, residual, gated, rotary)]}"
    kernel = _kernel(cupy.cuda.runtime.getDevice(), kernel_name, geometry, format_name(weight))
    shape_arguments = (np.int32(m), np.int32(n), np.int32(k), np.float32(norm.eps if norm is not None else 0.0),
                       np.int32(vector_ok))
    if rotary is not None:
        q, rotary_arguments = rotary.epilogue_arguments(m, n, "flat_gemm")
        launch(kernel, grid, (geometry.warps * 32,), (x, *kernel_operands(weight), norm_weight) + shape_arguments +
               rotary_arguments)
        return q
    y = cupy.empty((m, n // 2 if gated else n), dtype=cupy.float16)
    residual_in = cupy.ascontiguousarray(residual) if residual is not None else y  # unread without RESIDUAL
    launch(kernel, grid, (geometry.warps * 32,),
           (x, *kernel_operands(weight), y, norm_weight, residual_in) + shape_arguments)
    return y


@functools.lru_cache(maxsize=None)
def _kernel(device_id, name, geometry, weight_format):
    return load_module("flat_gemm.cu", geometry.options() + (format_option(weight_format),)).get_function(name)
