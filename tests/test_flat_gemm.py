"""ImplB, the flat GEMM, beyond its property (minifd/properties/linear.py, run by
test_properties.py): its launch plan, the split-K order of the emulation, decode shapes replayed
bit for bit (split K re-arms its arrival counters), and a misaligned weight."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minifd.backend import cupy_or_none
from minifd.kernels.flat_gemm import (
    BLOCKS_PER_MULTIPROCESSOR,
    FLAT_BK,
    FLAT_BN,
    FLAT_M_TILES,
    flat_gemm_emulated,
    flat_gemm_gpu,
    plan_flat_gemm,
)
from minifd.properties import PROPERTIES
from minifd.properties.linear import check_product, misaligned_on_device, random_operands

cupy = cupy_or_none()
gpu = pytest.mark.skipif(cupy is None, reason="needs a GPU through CuPy")


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------

@given(m=st.integers(1, 2000), n=st.integers(1, 200_000), k=st.integers(1, 30_000), sms=st.integers(1, 256))
def test_plan_covers_every_tile_once(m, n, k, sms):
    plan = plan_flat_gemm(m, n, k, sms)
    bk = FLAT_BK[plan.m_tile]
    assert plan.m_tile == min([t for t in FLAT_M_TILES if t >= m] or [FLAT_M_TILES[-1]])
    assert (plan.m_groups - 1) * plan.m_tile < m <= plan.m_groups * plan.m_tile
    assert (plan.n_blocks - 1) * FLAT_BN < n <= plan.n_blocks * FLAT_BN
    assert (plan.k_tiles - 1) * bk < k <= plan.k_tiles * bk
    # every split has at least one K tile and together they hold all of them
    assert (plan.splits - 1) * plan.tiles_per_split < plan.k_tiles <= plan.splits * plan.tiles_per_split
    blocks, one_wave = plan.n_blocks * plan.m_groups, BLOCKS_PER_MULTIPROCESSOR * sms
    if blocks >= one_wave:
        assert plan.splits == 1  # N alone fills the GPU: no split
    else:
        assert blocks * plan.splits <= one_wave  # splitting never adds a second wave
    if 2 * blocks <= one_wave and plan.k_tiles > 1:
        assert plan.splits > 1  # N alone leaves the GPU half empty: split K


def test_decode_shapes_split_k_on_an_h100():
    # Llama-2-7B O projection at batch 1: 128 column blocks cannot fill 132 SMs 4 deep, so K is split.
    plan = plan_flat_gemm(1, 4096, 4096, 132)
    assert plan.m_tile == 8 and plan.n_blocks == 4096 // FLAT_BN and plan.splits > 1
    assert plan.n_blocks * plan.splits >= BLOCKS_PER_MULTIPROCESSOR * 132 // 2


# ----------------------------------------------------------------------------------------------
# CPU: the emulation
# ----------------------------------------------------------------------------------------------

def test_emulation_adds_the_split_partials_in_split_order():
    bk = FLAT_BK[8]
    x, w = random_operands(np.random.default_rng(3), 5, 40, bk * 7 + 3, np.float32)
    plan = plan_flat_gemm(5, 40, x.shape[1], 132)
    assert plan.splits == 8 and plan.tiles_per_split == 1
    x_padded = np.vstack([x, np.zeros((3, x.shape[1]), np.float32)])  # M padded to 8
    partials = [x_padded[:, s * bk:(s + 1) * bk] @ w[:, s * bk:(s + 1) * bk].T for s in range(plan.splits)]
    expected = partials[0]
    for partial in partials[1:]:
        expected = expected + partial
    np.testing.assert_array_equal(flat_gemm_emulated(x, w, multiprocessors=132), expected[:5])


# ----------------------------------------------------------------------------------------------
# GPU: the kernel
# ----------------------------------------------------------------------------------------------

@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k", [(1, 4096, 4096), (8, 300, 1000), (20, 129, 2048), (64, 1000, 4104)])
def test_kernel_repeats_bit_for_bit(m, n, k):
    # the property launches twice and compares the bits
    PROPERTIES["flat_gemm"].check(dict(m=m, n=n, k=k, seed=m), cupy)


@gpu
@pytest.mark.gpu
def test_kernel_with_a_weight_that_is_not_16_byte_aligned():
    x, w = random_operands(np.random.default_rng(2), 6, 200, 256, np.float16)
    w_misaligned = misaligned_on_device(w)
    assert w_misaligned.data.ptr % 16 != 0
    check_product("y", flat_gemm_gpu(cupy.asarray(x), w_misaligned).get(), x, w)
