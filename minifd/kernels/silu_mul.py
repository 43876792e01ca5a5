"""The SwiGLU gate of the MLP, read straight out of the fused gate/up projection.

    out = SiLU(gate) * up = gate / (1 + exp(-gate)) * up          (float32 arithmetic)

with gate and up the two column halves of gate_up. On CPU the NumPy function below is the
implementation; on GPU silu_mul.cu computes the same in one kernel.
"""

import numpy as np

from minifd.backend import module_of
from minifd.kernels.compile import load_module


def silu_mul(gate_up):
    """gate_up: [rows, 2 * intermediate] (gate columns first, then up) -> SiLU(gate) * up: [rows, intermediate].

    The output has gate_up's dtype (float16 on GPU); the GPU path never waits on the device.
    """
    rows, width = gate_up.shape
    if width % 2:
        raise ValueError(f"silu_mul: gate_up has an odd number of columns ({width})")
    if module_of(gate_up) is np:
        return _silu_mul_numpy(gate_up, width // 2)
    return _silu_mul_gpu(gate_up, width // 2)


def _silu_mul_numpy(gate_up, intermediate):
    gate = gate_up[:, :intermediate].astype(np.float32)  # [rows, intermediate]
    up = gate_up[:, intermediate:].astype(np.float32)  # [rows, intermediate]
    # exp(-gate) overflows to inf for gate < -88; gate / inf = -0 is the right limit.
    with np.errstate(over="ignore"):
        return (gate / (1.0 + np.exp(-gate)) * up).astype(gate_up.dtype)


def _silu_mul_gpu(gate_up, intermediate):
    import cupy

    if gate_up.dtype != cupy.float16:
        raise ValueError("silu_mul on GPU takes a float16 array")
    rows = gate_up.shape[0]
    gate_up = cupy.ascontiguousarray(gate_up)
    out = cupy.empty((rows, intermediate), dtype=gate_up.dtype)
    vectorised = intermediate % 8 == 0 and gate_up.data.ptr % 16 == 0 and out.data.ptr % 16 == 0
    chunks = rows * (intermediate // 8 if vectorised else intermediate)
    kernel = load_module("silu_mul.cu").get_function("silu_mul_vec8" if vectorised else "silu_mul_scalar")
    if chunks:
        kernel((-(-chunks // 256),), (256,), (gate_up, np.int32(rows), np.int32(intermediate), out))
    return out
