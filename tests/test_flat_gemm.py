"""ImplB, the flat GEMM, beyond its properties (minifd/properties/linear.py, run by
test_properties.py): the warp order of the emulation's K split, the fused steps against the
unfused seam, decode shapes replayed bit for bit, and a misaligned weight."""

import numpy as np
import pytest

from minifd.backend import cupy_or_none
from minifd.kernels.flat_gemm import FlatGemmGeometry, flat_gemm_emulated, flat_gemm_gpu, flat_m_pad
from minifd.kernels.rms_norm import RMSNorm, rms_norm
from minifd.kernels.silu_mul import silu_mul
from minifd.properties import PROPERTIES
from minifd.properties.linear import check_product, misaligned_on_device, random_operands

cupy = cupy_or_none()


# ----------------------------------------------------------------------------------------------
# CPU: the emulation
# ----------------------------------------------------------------------------------------------

def test_emulation_adds_the_warps_partials_in_warp_order():
    geometry = FlatGemmGeometry(warps=4, pieces=2)
    width = geometry.chunk_width(flat_m_pad(5))  # 4 warps x 2 pieces x 32 columns per chunk
    x, w = random_operands(np.random.default_rng(3), 5, 40, 2 * width + 70, np.float32)
    run = width // geometry.warps
    owner = (np.arange(x.shape[1]) % width) // run  # warp w takes columns [w run, (w + 1) run) of every chunk
    expected = np.zeros((5, 40), np.float32)
    for warp in range(geometry.warps):
        expected += x[:, owner == warp] @ w[:, owner == warp].T
    np.testing.assert_array_equal(flat_gemm_emulated(x, w, geometry=geometry), expected)


def test_pieces_per_warp_shrink_with_the_x_tile():
    geometry = FlatGemmGeometry(warps=8, pieces=4)
    assert [geometry.pieces_at(pad) for pad in (8, 16, 32, 64)] == [4, 4, 2, 1]
    assert [flat_m_pad(m) for m in (1, 8, 9, 33, 64, 65, 300)] == [8, 8, 16, 64, 64, 64, 64]


@pytest.mark.parametrize("fused", ["norm", "gated", "residual"])
def test_fused_steps_equal_the_steps_one_after_another(fused):
    rng = np.random.default_rng(7)
    x, w = random_operands(rng, 6, 64, 300, np.float32)
    norm = RMSNorm(rng.uniform(0.5, 1.5, 300).astype(np.float32), 1e-5)
    residual = rng.standard_normal((6, 64)).astype(np.float32)
    if fused == "norm":
        got, expected = flat_gemm_emulated(x, w, norm=norm), rms_norm(x, norm.weight, norm.eps) @ w.T
    elif fused == "gated":
        got = flat_gemm_emulated(x, w, norm=norm, gated=True)
        expected = silu_mul(rms_norm(x, norm.weight, norm.eps) @ w.T)
    else:
        got, expected = flat_gemm_emulated(x, w, residual=residual), x @ w.T + residual
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# GPU: the kernel
# ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k", [(1, 4096, 4096), (8, 300, 1000), (20, 129, 2048), (64, 1000, 4104),
                                     (70, 48, 1024)])
def test_kernel_repeats_bit_for_bit(m, n, k):
    # the property launches twice and compares the bits
    PROPERTIES["flat_gemm"].check(dict(m=m, n=n, k=k, seed=m), cupy)


@pytest.mark.gpu
def test_kernel_with_a_weight_that_is_not_16_byte_aligned():
    x, w = random_operands(np.random.default_rng(2), 6, 200, 256, np.float16)
    w_misaligned = misaligned_on_device(w)
    assert w_misaligned.data.ptr % 16 != 0
    check_product("y", flat_gemm_gpu(cupy.asarray(x), w_misaligned).get(), x, w)
