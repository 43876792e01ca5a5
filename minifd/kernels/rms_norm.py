"""RMSNorm with the decoder's residual add fused in front of it.

    h      = x + residual            (in x's dtype: the residual stream the caller keeps)
    normed = h / sqrt(mean(h^2) + eps) * weight          (float32 arithmetic)

On CPU the NumPy function below is the implementation; on GPU rms_norm.cu computes the same in
one kernel that reads x and residual once and writes h and normed.
"""

import numpy as np

from minifd.backend import module_of
from minifd.kernels.compile import load_module


def rms_norm(x, weight, eps, residual=None):
    """x: [rows, hidden], weight: [hidden], residual: None or [rows, hidden]
    -> normed: [rows, hidden] without a residual, or (normed, h) with one, h = x + residual: [rows, hidden].

    Outputs have x's dtype (float16 on GPU). The GPU path launches one kernel and never waits on the device.
    """
    rows, hidden = x.shape
    if weight.shape != (hidden,) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"rms_norm: x {x.shape}, weight {weight.shape}, residual "
                         f"{None if residual is None else residual.shape} do not match")
    if module_of(x) is np:
        return _rms_norm_numpy(x, weight, eps, residual)
    return _rms_norm_gpu(x, weight, eps, residual)


def _rms_norm_numpy(x, weight, eps, residual):
    h = x if residual is None else x + residual  # [rows, hidden], x's dtype
    h32 = h.astype(np.float32)
    scale = 1.0 / np.sqrt((h32 * h32).mean(axis=-1, keepdims=True) + eps)  # [rows, 1]
    normed = (h32 * scale * weight.astype(np.float32)).astype(x.dtype)
    return normed if residual is None else (normed, h)


def _rms_norm_gpu(x, weight, eps, residual):
    import cupy

    if any(a is not None and a.dtype != cupy.float16 for a in (x, weight, residual)):
        raise ValueError("rms_norm on GPU takes float16 arrays")
    rows, hidden = x.shape
    x, weight = cupy.ascontiguousarray(x), cupy.ascontiguousarray(weight)
    residual = None if residual is None else cupy.ascontiguousarray(residual)
    normed = cupy.empty_like(x)  # [rows, hidden]
    h = None if residual is None else cupy.empty_like(x)  # [rows, hidden]
    arrays = [a for a in (x, weight, residual, normed, h) if a is not None]
    vectorised = hidden % 8 == 0 and all(a.data.ptr % 16 == 0 for a in arrays)
    chunks = hidden // 8 if vectorised else hidden
    threads = min(1024, max(64, -(-chunks // 64) * 64))  # whole warps of 32 or 64 lanes
    kernel = load_module("rms_norm.cu").get_function("rms_norm_vec8" if vectorised else "rms_norm_scalar")
    if rows:
        kernel((rows,), (threads,), (x, residual, weight, np.float32(eps), np.int32(hidden), normed, h))
    return normed if residual is None else (normed, h)
