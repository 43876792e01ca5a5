"""Array-module selection: the model is written once against `xp`, which is numpy or cupy."""

import numpy as np

from minifd.errors import MinifdError


def cupy_or_none():
    """CuPy if it imports and sees at least one GPU, else None."""
    try:
        import cupy
    except Exception:
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:
        return None
    return cupy


def array_module(device):
    """device: 'auto' | 'cpu' | 'cuda' -> numpy or cupy."""
    if device == "cpu":
        return np
    if device not in ("auto", "cuda"):
        raise MinifdError(f"device must be auto, cpu or cuda, not {device!r}", parameter="device")
    cupy = cupy_or_none()
    if cupy is not None:
        return cupy
    if device == "cuda":
        try:
            import cupy  # noqa: F401
        except Exception:
            raise MinifdError("device cuda: CuPy is not installed (pip install 'minifd[cuda12]' or 'minifd[cuda13]')",
                              parameter="device") from None
        raise MinifdError("device cuda: CuPy is installed but sees no usable GPU", parameter="device")
    return np


def is_gpu(xp):
    return xp is not np


def to_numpy(array):
    """Any xp array -> numpy array (a device-to-host copy on GPU)."""
    return array.get() if hasattr(array, "get") else np.asarray(array)


def module_of(array):
    """-> numpy or cupy, whichever module `array` belongs to."""
    if isinstance(array, (np.ndarray, np.generic, int, float)):
        return np
    import cupy

    return cupy


def out_of_memory_errors(xp):
    """The exception types that mean 'the device ran out of memory' for this array module."""
    if xp is np:
        return (MemoryError,)
    return (MemoryError, xp.cuda.memory.OutOfMemoryError)


def free_memory_text(xp):
    """e.g. '12.3 GiB free of 79.1 GiB' for the current GPU, or '' on the CPU."""
    if xp is np:
        return ""
    free, total = xp.cuda.runtime.memGetInfo()
    return f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB"
