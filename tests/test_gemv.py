"""ImplA, the CUDA-core GEMV, beyond its property (minifd/properties/linear.py, run by
test_properties.py): its M tiles, K spanning several staged chunks, and a misaligned weight."""

import numpy as np
import pytest

from minifd.backend import cupy_or_none
from minifd.kernels.gemv import GEMV_M_TILES, GEMV_STAGE_HALVES, gemv_gpu, gemv_m_tile
from minifd.properties import PROPERTIES
from minifd.properties.linear import check_product, misaligned_on_device, random_operands

cupy = cupy_or_none()


def test_m_tile_is_the_smallest_compiled_tile_that_holds_m():
    assert [gemv_m_tile(m) for m in (1, 2, 3, 4, 5, 8, 9, 300)] == [1, 2, 4, 4, 8, 8, 8, 8]


@pytest.mark.parametrize("m", GEMV_M_TILES)
def test_across_several_k_chunks(xp, m):
    k = 2 * (GEMV_STAGE_HALVES // gemv_m_tile(m)) + 37  # two full staged chunks and a ragged third
    PROPERTIES["gemv"].check(dict(m=m, n=77, k=k, seed=m), xp)


@pytest.mark.gpu
def test_kernel_with_a_weight_that_is_not_16_byte_aligned():
    x, w = random_operands(np.random.default_rng(1), 3, 50, 64, np.float16)
    w_misaligned = misaligned_on_device(w)
    assert w_misaligned.data.ptr % 16 != 0
    check_product("y", gemv_gpu(cupy.asarray(x), w_misaligned).get(), x, w)
