"""How the decode step launches its kernels: plainly, or overlapping each kernel's start with the
tail of the one before (programmatic dependent launch).

A decode step is some 250 short kernels in a row. Launched plainly, each starts only once the one
before has finished, so every boundary leaves the memory bus idle while the last blocks drain and
the next kernel's blocks ramp up (about 3 us, BENCHMARKS.md). With programmatic dependent launch
(CUDA 12.3+, compute capability 9.0+), a kernel launched with the attribute
CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION may start as soon as every block of the kernel
before it has executed `griddepcontrol.launch_dependents`. Every minifd kernel the decode step
launches begins with `start_after_previous_kernel()` (portable.cuh): it lets the next kernel be
scheduled, then waits in `griddepcontrol.wait` until the previous kernel has completed and its
writes are visible, and touches no memory before. So the next kernel's blocks are already resident
and past their launch when the last blocks of the previous one drain, and correctness never
depends on the overlap: each kernel waits for the completion of the one before, which waited for
the one before it, and without the attribute the wait returns at once. On the H200 this gives
3-4% more decode tokens/s at batch 1 and 8 (BENCHMARKS.md); asking L2 for the product's weights
before the wait made every step slower (the prefetches doubled the requests of the blocks that do
not start early), so the kernels do nothing before waiting.

The launch goes through CUDA's own Python bindings (`cuda-bindings`, the optional extra
`minifd[overlap]`), since CuPy's kernel call cannot set launch attributes. A stream capture records
the overlap into the CUDA graph as programmatic edges.
"""

import ctypes
import functools
from dataclasses import dataclass

import numpy as np

_SCALAR_TYPES = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.uint32): ctypes.c_uint32,
                 np.dtype(np.int64): ctypes.c_int64, np.dtype(np.float32): ctypes.c_float}


@dataclass(frozen=True)
class Launch:
    """How the kernels of one call are launched.

    graph_captured: the call is being recorded into a CUDA graph (the dispatcher then never picks the
    library GEMM, which CuPy cannot record). overlap: launch with programmatic dependent launch (only
    where overlap_supported() says so).
    """

    graph_captured: bool = False
    overlap: bool = False

    def __call__(self, kernel, grid, block, args, shared_mem=0):
        """Launch a cupy RawKernel on the current stream: kernel(grid, block, args), overlapping or not."""
        if self.overlap:
            _launch_overlapping(kernel, grid, block, args, shared_mem)
        else:
            kernel(grid, block, args, shared_mem=shared_mem)


PLAIN = Launch()


@functools.lru_cache(maxsize=None)
def overlap_supported():
    """-> (True, "") where this GPU and software can overlap launches, else (False, why not)."""
    from minifd.backend import cupy_or_none

    cupy = cupy_or_none()
    if cupy is None:
        return False, "no GPU"
    if cupy.cuda.runtime.is_hip:
        return False, "programmatic dependent launch is CUDA-only"
    capability = cupy.cuda.Device().compute_capability  # e.g. "90"
    if int(capability) < 90:
        return False, f"compute capability {capability[:-1]}.{capability[-1]} < 9.0"
    try:
        from cuda.bindings import driver  # noqa: F401
    except ImportError:
        return False, "cuda-bindings is not installed (pip install 'minifd[overlap]')"
    return True, ""


def resolve_overlap(overlap):
    """overlap: True, False or None (wherever supported) -> whether launches will overlap here."""
    supported = overlap_supported()[0]
    return supported if overlap is None else overlap and supported


def _kernel_arguments(args):
    """cupy arrays and NumPy scalars -> the (values, ctypes types) pair cuLaunchKernelEx takes."""
    values, types = [], []
    for arg in args:
        if hasattr(arg, "data") and hasattr(arg.data, "ptr"):  # a cupy array: its device pointer
            values.append(arg.data.ptr)
            types.append(ctypes.c_void_p)
        else:
            scalar = np.asarray(arg)
            values.append(scalar.item())
            types.append(_SCALAR_TYPES[scalar.dtype])
    return tuple(values), tuple(types)


def _launch_overlapping(kernel, grid, block, args, shared_mem):
    import cupy
    from cuda.bindings import driver

    grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
    config = driver.CUlaunchConfig()
    config.gridDimX, config.gridDimY, config.gridDimZ = grid
    config.blockDimX, config.blockDimY, config.blockDimZ = block
    config.sharedMemBytes = shared_mem
    config.hStream = driver.CUstream(cupy.cuda.get_current_stream().ptr)
    attribute = driver.CUlaunchAttribute()
    attribute.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attribute.value.programmaticStreamSerializationAllowed = 1
    config.attrs = [attribute]
    config.numAttrs = 1
    (error,) = driver.cuLaunchKernelEx(config, driver.CUfunction(kernel.kernel.ptr), _kernel_arguments(args), 0)
    if error != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuLaunchKernelEx failed: {error}")
