"""The launch plan (minifd/kernels/launch.py): plain launches go through CuPy's kernel call unchanged,
overlapping ones hand cuLaunchKernelEx device pointers and C scalars, and a machine that cannot
overlap says why. The GPU side (same tokens with and without overlap) is tests/test_decode_graph.py."""

import ctypes
from types import SimpleNamespace

import numpy as np

from minifd.backend import cupy_or_none
from minifd.kernels.launch import PLAIN, Launch, _kernel_arguments, overlap_supported


def test_a_plain_launch_is_the_kernel_call_itself():
    calls = []
    Launch(graph_captured=True)(lambda *args, **kwargs: calls.append((args, kwargs)), (3, 2), (128,), ("x",), 64)
    PLAIN(lambda *args, **kwargs: calls.append((args, kwargs)), (1,), (32,), ())
    assert calls == [(((3, 2), (128,), ("x",)), {"shared_mem": 64}), (((1,), (32,), ()), {"shared_mem": 0})]


def test_overlapping_launch_arguments_are_pointers_and_c_scalars():
    array = SimpleNamespace(data=SimpleNamespace(ptr=0x7F0000001000))  # stands in for a cupy array
    values, types = _kernel_arguments((array, np.int32(-3), np.float32(0.5), np.uint32(7), np.int64(1 << 40)))
    assert values == (0x7F0000001000, -3, 0.5, 7, 1 << 40)
    assert types == (ctypes.c_void_p, ctypes.c_int32, ctypes.c_float, ctypes.c_uint32, ctypes.c_int64)


def test_a_machine_that_cannot_overlap_says_why():
    supported, why_not = overlap_supported()
    if cupy_or_none() is None:
        assert (supported, why_not) == (False, "no GPU")
    else:
        assert supported == (why_not == "")
