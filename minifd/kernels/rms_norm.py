"""RMSNorm, for the products that do not fold it into their prologue.

    normed = x / sqrt(mean(x^2) + eps) * weight          (float32 arithmetic)

On CPU the NumPy function below is the implementation; on GPU rms_norm.cu computes the same in one
kernel. The decode-sized products fold this into their prologue (gemv.cu, flat_gemm.cu), which
take the same RMSNorm description, except where minifd/kernels/linear.py says it costs more there.
"""

from dataclasses import dataclass

import numpy as np

from minifd.backend import module_of
from minifd.kernels.compile import load_module
from minifd.kernels.launch import PLAIN


@dataclass(frozen=True)
class RMSNorm:
    """The norm a product's input goes through: its gain vector and epsilon."""

    weight: object  # [hidden]
    eps: float


def rms_norm(x, weight, eps, launch=PLAIN):
    """x: [rows, hidden], weight: [hidden] -> normed: [rows, hidden], x's dtype (float16 on GPU).

    The GPU path launches one kernel (minifd.kernels.launch says how) and never waits on the device.
    """
    rows, hidden = x.shape
    if weight.shape != (hidden,):
        raise ValueError(f"rms_norm: x {x.shape} and weight {weight.shape} do not match")
    if module_of(x) is np:
        return _rms_norm_numpy(x, weight, eps)
    return _rms_norm_gpu(x, weight, eps, launch)


def _rms_norm_numpy(x, weight, eps):
    x32 = x.astype(np.float32)
    scale = 1.0 / np.sqrt((x32 * x32).mean(axis=-1, keepdims=True) + eps)  # [rows, 1]
    return (x32 * scale * weight.astype(np.float32)).astype(x.dtype)


def _rms_norm_gpu(x, weight, eps, launch):
    import cupy

    if x.dtype != cupy.float16 or weight.dtype != cupy.float16:
        raise ValueError("rms_norm on GPU takes float16 arrays")
    rows, hidden = x.shape
    x, weight = cupy.ascontiguousarray(x), cupy.ascontiguousarray(weight)
    normed = cupy.empty_like(x)  # [rows, hidden]
    vectorised = hidden % 8 == 0 and all(a.data.ptr % 16 == 0 for a in (x, weight, normed))
    chunks = hidden // 8 if vectorised else hidden
    threads = min(1024, max(64, -(-chunks // 64) * 64))  # whole warps of 32 or 64 lanes
    kernel = load_module("rms_norm.cu").get_function("rms_norm_vec8" if vectorised else "rms_norm_scalar")
    if rows:
        launch(kernel, (rows,), (threads,), (x, weight, np.float32(eps), np.int32(hidden), normed))
    return normed
