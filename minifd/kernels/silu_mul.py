"""The SwiGLU gate of the MLP, read straight out of the fused gate/up projection.

    out = SiLU(gate) * up = gate / (1 + exp(-gate)) * up          (float32 arithmetic)

The gate/up projection's output features are interleaved in tiles of 2 GATE_TILE columns: the
gate values of features [8j, 8j + 8), then the up values of the same features. That is the order
in which minifd/model/weights.py stacks the weight rows, so that one 16-row tile of the weight
(one block of the flat GEMM, whose epilogue applies this same gate) holds both halves of its
outputs. On CPU the NumPy function below is the implementation; on GPU silu_mul.cu computes the
same in one kernel (for products that do not fuse the gate into their epilogue).
"""

import numpy as np

from minifd.backend import module_of
from minifd.kernels.compile import load_module
from minifd.kernels.launch import PLAIN

GATE_TILE = 8  # features per interleaved tile


def padded_features(intermediate):
    """Features of the interleaved layout: intermediate rounded up to whole tiles."""
    return -(-intermediate // GATE_TILE) * GATE_TILE


def interleave_gate_up(gate, up):
    """gate, up: [intermediate, hidden] weight rows -> [2 * padded_features(intermediate), hidden],
    tiles of GATE_TILE gate rows then the same features' up rows; features past intermediate are
    zero rows (their gated output is SiLU(0) * 0 = 0)."""
    intermediate, hidden = gate.shape
    features = padded_features(intermediate)
    padded = np.zeros((2, features, hidden), dtype=gate.dtype)  # [gate | up, feature, hidden]
    padded[0, :intermediate], padded[1, :intermediate] = gate, up
    tiles = padded.reshape(2, features // GATE_TILE, GATE_TILE, hidden).transpose(1, 0, 2, 3)  # [tile, gate | up, 8, hidden]
    return np.ascontiguousarray(tiles).reshape(2 * features, hidden)


def silu_mul(gate_up, launch=PLAIN):
    """gate_up: [rows, 2 * features], interleaved as above -> SiLU(gate) * up: [rows, features].

    The output has gate_up's dtype (float16 on GPU); the GPU path never waits on the device. launch:
    how the GPU kernel is launched (minifd.kernels.launch).
    """
    rows, width = gate_up.shape
    if width % (2 * GATE_TILE):
        raise ValueError(f"silu_mul: gate_up has {width} columns, not whole tiles of {2 * GATE_TILE}")
    if module_of(gate_up) is np:
        return _silu_mul_numpy(gate_up)
    return _silu_mul_gpu(gate_up, width // 2, launch)


def _silu_mul_numpy(gate_up):
    rows, width = gate_up.shape
    tiles = gate_up.astype(np.float32).reshape(rows, width // (2 * GATE_TILE), 2, GATE_TILE)
    gate, up = tiles[:, :, 0].reshape(rows, -1), tiles[:, :, 1].reshape(rows, -1)  # [rows, features] each
    # exp(-gate) overflows to inf for gate < -88; gate / inf = -0 is the right limit.
    with np.errstate(over="ignore"):
        return (gate / (1.0 + np.exp(-gate)) * up).astype(gate_up.dtype)


def _silu_mul_gpu(gate_up, features, launch):
    import cupy

    if gate_up.dtype != cupy.float16:
        raise ValueError("silu_mul on GPU takes a float16 array")
    rows = gate_up.shape[0]
    gate_up = cupy.ascontiguousarray(gate_up)
    out = cupy.empty((rows, features), dtype=gate_up.dtype)
    vectorised = gate_up.data.ptr % 16 == 0 and out.data.ptr % 16 == 0
    chunks = rows * (features // GATE_TILE if vectorised else features)
    kernel = load_module("silu_mul.cu").get_function("silu_mul_vec8" if vectorised else "silu_mul_scalar")
    if chunks:
        launch(kernel, (-(-chunks // 256),), (256,), (gate_up, np.int32(rows), np.int32(features), out))
    return out
