"""Linear-layer seam: y = x @ W^T with W stored as Hugging Face stores it (row n = output n).

Every projection of the model comes through `linear`, which runs the heuristic dataflow of
minifd/kernels/dispatch.py: GEMV for the smallest M, the flat GEMM for decode-sized M, the library
GEMM beyond. On GPU (CuPy) the kernels take float16 and accumulate in float32; on CPU (NumPy) the
emulations of the same kernels run in float32, and the library path is plain `x @ W.T`.
"""

import contextlib

import numpy as np

from minifd.kernels.dispatch import CPU_DEVICE_NAME, IMPLEMENTATIONS, choose_implementation, gpu_properties
from minifd.kernels.flat_gemm import flat_gemm_emulated, flat_gemm_gpu
from minifd.kernels.gemv import gemv_emulated, gemv_gpu


def _library_cpu(x, weight):
    return x @ weight.T


def _library_gpu(x, weight):
    import cupy

    on_hip = getattr(cupy.cuda.runtime, "is_hip", False)  # HIP builds of CuPy record hipBLAS as they are
    if _RECORDING[0] and x.dtype == weight.dtype == cupy.float16 and not on_hip:
        return _library_gpu_recordable(x, weight)
    return cupy.matmul(x, weight.T)


_RECORDING = [False]
_ONE, _ZERO = np.ones(1, np.float32), np.zeros(1, np.float32)


@contextlib.contextmanager
def recordable():
    """Within this block every GPU product can be recorded into a CUDA graph, including cuBLAS ones.

    CuPy's matmul refuses to run while a stream is capturing (its guard sits in the binding of the
    cuBLAS handle to a stream), though cuBLAS itself supports capture. So here the library path calls
    cuBLAS's gemmEx directly: outside a capture (the eager warm-up step) it binds the handle to the
    current stream, and inside one it checks that binding still holds."""
    _RECORDING[0] = True
    try:
        yield
    finally:
        _RECORDING[0] = False


def _library_gpu_recordable(x, weight):
    """x: [M, K], weight: [N, K] float16 -> [M, N] float16 = x @ weight.T via cublasGemmEx (fp32 compute).

    cuBLAS is column-major: y^T [N, M] = W [N, K] (a K x N column-major matrix, transposed) times
    x^T [K, M] (x read as column-major K x M), so y comes out row-major [M, N]."""
    import cupy
    from cupy.cuda import cublas

    m, k = x.shape
    n = weight.shape[0]
    x, weight = cupy.ascontiguousarray(x), cupy.ascontiguousarray(weight)
    y = cupy.empty((m, n), dtype=cupy.float16)
    handle = cupy.cuda.device.get_cublas_handle()
    stream = cupy.cuda.get_current_stream()
    if stream.is_capturing():
        if cublas.getStream(handle) != stream.ptr:
            raise RuntimeError("the cuBLAS handle is bound to another stream than the one being captured")
    else:
        cublas.setStream(handle, stream.ptr)
        cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    half = cupy.cuda.runtime.CUDA_R_16F
    cublas.gemmEx(handle, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, n, m, k, _ONE.ctypes.data,
                  weight.data.ptr, half, k, x.data.ptr, half, k, _ZERO.ctypes.data, y.data.ptr, half, n,
                  cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT)
    return y


_CPU = {"gemv": gemv_emulated, "flat_gemm": flat_gemm_emulated, "library": _library_cpu}
_GPU = {"gemv": gemv_gpu, "flat_gemm": flat_gemm_gpu, "library": _library_gpu}


def linear(x, weight, *, impl=None):
    """x: [M, K]; weight: [N, K] -> y: [M, N].

    impl: None (the dispatcher picks from M and the tuned table) or one of "gemv", "flat_gemm",
    "library" to force an implementation. GPU: float16 in and out for the kernels; other dtypes take
    the library path (forcing a kernel on them is a TypeError). CPU: float32 in and out. The GPU
    path never synchronises with the host, so a decode step that calls it can be graph-captured.
    """
    m, k = x.shape
    n, weight_k = weight.shape
    if weight_k != k:
        raise ValueError(f"linear: x is [{m}, {k}] but weight is [{n}, {weight_k}]")
    if impl is not None and impl not in IMPLEMENTATIONS:
        raise ValueError(f"linear: impl must be one of {IMPLEMENTATIONS} or None, not {impl!r}")

    if isinstance(x, np.ndarray):
        if m == 0 or n == 0:
            return _library_cpu(x, weight)
        chosen = impl or choose_implementation(m, n, k, CPU_DEVICE_NAME)
        return _CPU[chosen](x, weight)

    import cupy

    half_precision = x.dtype == cupy.float16 and weight.dtype == cupy.float16
    if impl in ("gemv", "flat_gemm") and not half_precision:
        raise TypeError(f"linear: impl={impl!r} takes float16 arrays, not {x.dtype} and {weight.dtype}")
    if not half_precision or m == 0 or n == 0:
        return _library_gpu(x, weight)
    chosen = impl or choose_implementation(m, n, k, gpu_properties().name)
    if chosen != "library":
        x, weight = cupy.ascontiguousarray(x), cupy.ascontiguousarray(weight)
    return _GPU[chosen](x, weight)
