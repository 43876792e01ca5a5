"""silu_mul (minifd/kernels/silu_mul.py, .cu) against the float64 oracle, and the GPU kernel against the NumPy path."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minifd import oracle
from minifd.backend import cupy_or_none
from minifd.kernels.silu_mul import silu_mul

cupy = cupy_or_none()
needs_gpu = pytest.mark.skipif(cupy is None, reason="needs a GPU through CuPy")

FLOAT32_EPS = float(np.finfo(np.float32).eps)

# Non-multiples of 8 run the scalar kernel; gate scale 100 drives exp(-gate) to overflow.
CPU_INTERMEDIATE = st.one_of(st.integers(1, 40), st.sampled_from([64, 1536]))
GPU_INTERMEDIATE = st.one_of(st.integers(1, 40), st.sampled_from([64, 1536, 1539, 11008]))
GATE_SCALES = st.sampled_from([0.1, 3.0, 100.0])


# exp(-gate) overflows float32 below gate = -88.7, flushing outputs under 89 e^-88.7 |up| < 1e-35 to -0.
FLUSHED_TO_ZERO = 1e-35


def tolerance(dtype):
    # one rounding of the output plus a few float32 operations (exp, add, divide, multiply)
    return dict(rtol=float(np.finfo(dtype).eps) + 16 * FLOAT32_EPS,
                atol=float(np.finfo(dtype).smallest_subnormal) + FLUSHED_TO_ZERO)


def make_gate_up(seed, rows, intermediate, gate_scale, dtype):
    # -> gate_up: [rows, 2 * intermediate] numpy of `dtype`
    rng = np.random.default_rng(seed)
    gate = rng.standard_normal((rows, intermediate)) * gate_scale
    up = rng.standard_normal((rows, intermediate))
    return np.concatenate([gate, up], axis=1).astype(dtype)


def expected_silu_mul(gate_up):
    # gate_up: [rows, 2 * intermediate] -> [rows, intermediate] float64
    gate, up = np.split(gate_up.astype(np.float64), 2, axis=1)
    return oracle.silu(gate) * up


@given(rows=st.integers(1, 8), intermediate=CPU_INTERMEDIATE, gate_scale=GATE_SCALES, seed=st.integers(0, 2**32 - 1))
def test_numpy_silu_mul_matches_oracle(rows, intermediate, gate_scale, seed):
    gate_up = make_gate_up(seed, rows, intermediate, gate_scale, np.float32)
    out = silu_mul(gate_up)
    assert out.dtype == np.float32 and out.shape == (rows, intermediate)
    np.testing.assert_allclose(out, expected_silu_mul(gate_up), **tolerance(np.float32))


def test_silu_mul_rejects_odd_width():
    with pytest.raises(ValueError):
        silu_mul(np.ones((2, 7), np.float32))


@pytest.mark.gpu
@needs_gpu
@given(rows=st.integers(1, 40), intermediate=GPU_INTERMEDIATE, gate_scale=GATE_SCALES, aligned=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_gpu_silu_mul_matches_oracle_and_numpy_path(rows, intermediate, gate_scale, aligned, seed):
    gate_up = make_gate_up(seed, rows, intermediate, gate_scale, np.float16)
    if aligned:
        device = cupy.asarray(gate_up)
    else:  # 2 bytes past a 16-byte boundary: the scalar kernel even where intermediate % 8 == 0
        device = cupy.empty(gate_up.size + 1, dtype=gate_up.dtype)[1:].reshape(gate_up.shape)
        device[...] = cupy.asarray(gate_up)
    out = cupy.asnumpy(silu_mul(device))
    assert out.dtype == np.float16 and out.shape == (rows, intermediate)
    np.testing.assert_allclose(out, expected_silu_mul(gate_up), **tolerance(np.float16))
    # same float16 inputs, same float32 math; expf and NumPy's exp may differ in the last float32 bit
    np.testing.assert_allclose(out, silu_mul(gate_up), rtol=float(np.finfo(np.float16).eps),
                               atol=float(np.finfo(np.float16).smallest_subnormal))
