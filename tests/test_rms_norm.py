"""rms_norm (minifd/kernels/rms_norm.py, .cu) against the float64 oracle, and the GPU kernel against the NumPy path.

The returned residual stream h must be x + residual rounded once to the output dtype; normed is then checked
against the oracle's RMSNorm of that h, so the tolerance is one output rounding plus float32 statistics.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minifd import oracle
from minifd.backend import cupy_or_none
from minifd.kernels.rms_norm import rms_norm

cupy = cupy_or_none()
needs_gpu = pytest.mark.skipif(cupy is None, reason="needs a GPU through CuPy")

EPS = 1e-5
FLOAT32_EPS = float(np.finfo(np.float32).eps)

# Non-multiples of 8 run the scalar kernel; 12296 makes each of 1024 threads take two 8-wide chunks.
CPU_HIDDEN = st.one_of(st.integers(1, 40), st.sampled_from([64, 576, 1000]))
GPU_HIDDEN = st.one_of(st.integers(1, 40), st.sampled_from([64, 576, 1000, 1027, 4096, 12296]))
SCALES = st.sampled_from([0.05, 1.0, 30.0])


def tolerance(dtype):
    # one rounding of the output plus float32 arithmetic in the statistics
    eps = float(np.finfo(dtype).eps)
    return dict(rtol=eps + 16 * FLOAT32_EPS, atol=float(np.finfo(dtype).smallest_subnormal))


def make_inputs(seed, rows, hidden, scale, with_residual, dtype):
    # -> x: [rows, hidden], weight: [hidden], residual: [rows, hidden] or None, all numpy of `dtype`
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, hidden)) * scale).astype(dtype)
    weight = rng.uniform(-2.0, 2.0, hidden).astype(dtype)
    residual = (rng.standard_normal((rows, hidden)) * scale).astype(dtype) if with_residual else None
    return x, weight, residual


def check_against_oracle(x, weight, residual, out, dtype):
    # x, weight, residual: numpy inputs; out: rms_norm's result moved to numpy
    if residual is None:
        normed, h = out, x
    else:
        normed, h = out
        assert h.dtype == dtype
        np.testing.assert_array_equal(h, (x.astype(np.float64) + residual).astype(dtype))
    assert normed.dtype == dtype and normed.shape == x.shape
    expected = oracle.rms_norm(h.astype(np.float64), weight.astype(np.float64), EPS)
    np.testing.assert_allclose(normed, expected, **tolerance(dtype))


@given(rows=st.integers(1, 6), hidden=CPU_HIDDEN, scale=SCALES, with_residual=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_numpy_rms_norm_matches_oracle(rows, hidden, scale, with_residual, seed):
    x, weight, residual = make_inputs(seed, rows, hidden, scale, with_residual, np.float32)
    check_against_oracle(x, weight, residual, rms_norm(x, weight, EPS, residual), np.float32)


def test_rms_norm_rejects_mismatched_shapes():
    x = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError):
        rms_norm(x, np.ones(7, np.float32), EPS)
    with pytest.raises(ValueError):
        rms_norm(x, np.ones(8, np.float32), EPS, residual=np.ones((3, 8), np.float32))


def to_device(array, aligned):
    # numpy array -> contiguous cupy copy; aligned=False starts it 2 bytes past a 16-byte boundary
    if array is None:
        return None
    if aligned:
        return cupy.asarray(array)
    buffer = cupy.empty(array.size + 1, dtype=array.dtype)
    device = buffer[1:].reshape(array.shape)
    device[...] = cupy.asarray(array)
    return device


@pytest.mark.gpu
@needs_gpu
@given(rows=st.integers(1, 40), hidden=GPU_HIDDEN, scale=SCALES, with_residual=st.booleans(), aligned=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_gpu_rms_norm_matches_oracle_and_numpy_path(rows, hidden, scale, with_residual, aligned, seed):
    x, weight, residual = make_inputs(seed, rows, hidden, scale, with_residual, np.float16)
    out = rms_norm(to_device(x, aligned), to_device(weight, aligned), EPS, to_device(residual, aligned))
    out = cupy.asnumpy(out) if residual is None else tuple(cupy.asnumpy(a) for a in out)
    check_against_oracle(x, weight, residual, out, np.float16)

    emulated = rms_norm(x, weight, EPS, residual)
    if residual is None:
        normed, emulated_normed = out, emulated
    else:
        (normed, h), (emulated_normed, emulated_h) = out, emulated
        np.testing.assert_array_equal(h, emulated_h)
    # same float16 inputs, same float32 math; only the order of the sum of squares differs
    np.testing.assert_allclose(normed, emulated_normed, rtol=float(np.finfo(np.float16).eps),
                               atol=float(np.finfo(np.float16).smallest_subnormal))
