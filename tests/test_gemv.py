"""ImplA, the CUDA-core GEMV: its NumPy emulation (CPU) and gemv.cu (GPU) against the float64 oracle."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from linear_oracle import assert_close_to_oracle, random_operands
from minifd.backend import cupy_or_none
from minifd.kernels.gemv import GEMV_M_TILES, GEMV_STAGE_HALVES, gemv_emulated, gemv_gpu, gemv_m_tile
from minifd.kernels.linear import linear

cupy = cupy_or_none()
gpu = pytest.mark.skipif(cupy is None, reason="needs a GPU through CuPy")
seeds = st.integers(0, 2**32 - 1)


def test_m_tile_is_the_smallest_compiled_tile_that_holds_m():
    assert [gemv_m_tile(m) for m in (1, 2, 3, 4, 5, 8, 9, 300)] == [1, 2, 4, 4, 8, 8, 8, 8]


# ----------------------------------------------------------------------------------------------
# CPU: the emulation
# ----------------------------------------------------------------------------------------------

@given(m=st.integers(1, 300), n=st.integers(1, 300), k=st.integers(1, 700), seed=seeds)
def test_emulation_matches_the_oracle(m, n, k, seed):
    x, w = random_operands(np.random.default_rng(seed), m, n, k, np.float32)
    y = gemv_emulated(x, w)
    assert y.dtype == np.float32
    assert_close_to_oracle(y, x, w)


@pytest.mark.parametrize("m", GEMV_M_TILES)
def test_emulation_across_several_k_chunks(m):
    k = 2 * (GEMV_STAGE_HALVES // gemv_m_tile(m)) + 37  # two full staged chunks and a ragged third
    x, w = random_operands(np.random.default_rng(m), m, 19, k, np.float32)
    assert_close_to_oracle(gemv_emulated(x, w), x, w)


# ----------------------------------------------------------------------------------------------
# GPU: the kernel
# ----------------------------------------------------------------------------------------------

def _on_gpu(x, w):
    return cupy.asarray(x), cupy.asarray(w)


@gpu
@given(m=st.integers(1, 300), n=st.integers(1, 600), k=st.integers(1, 1100), seed=seeds)
def test_kernel_matches_the_oracle(m, n, k, seed):
    # k up to 1100 crosses a staged chunk for M_TILE = 8 (1024 halves) and covers K % 8 != 0 (2-byte path)
    x, w = random_operands(np.random.default_rng(seed), m, n, k, np.float16)
    y = gemv_gpu(*_on_gpu(x, w))
    assert y.dtype == cupy.float16
    assert_close_to_oracle(y.get(), x, w)


@gpu
@pytest.mark.parametrize("m", GEMV_M_TILES)
def test_kernel_across_several_k_chunks(m):
    k = 2 * (GEMV_STAGE_HALVES // gemv_m_tile(m)) + 24
    x, w = random_operands(np.random.default_rng(m), m, 77, k, np.float16)
    assert_close_to_oracle(linear(*_on_gpu(x, w), impl="gemv").get(), x, w)


@gpu
def test_kernel_with_a_weight_that_is_not_16_byte_aligned():
    x, w = random_operands(np.random.default_rng(1), 3, 50, 64, np.float16)
    storage = cupy.empty(w.size + 1, dtype=cupy.float16)
    storage[1:] = cupy.asarray(w).ravel()
    w_misaligned = storage[1:].reshape(w.shape)  # contiguous, but 2 bytes past a 16-byte boundary
    assert w_misaligned.data.ptr % 16 != 0
    assert_close_to_oracle(gemv_gpu(cupy.asarray(x), w_misaligned).get(), x, w)
