"""rope_and_cache beyond its property (minifd/properties/fused.py, run by test_properties.py): shape
errors, and one captured CUDA graph replayed with new positions."""

import numpy as np
import pytest

from minifd.backend import cupy_or_none
from minifd.kernels.rope import rope_and_cache
from minifd.properties.fused import rope_inputs

cupy = cupy_or_none()


def test_rope_and_cache_rejects_a_qkv_width_that_does_not_fit_the_cache():
    k_cache = np.zeros((1, 2, 4, 8), np.float32)
    cos = np.ones((4, 4), np.float32)
    rows = np.zeros(1, np.int32)
    with pytest.raises(ValueError):
        rope_and_cache(np.zeros((1, 4 * 8 + 3), np.float32), cos, cos, rows, rows, k_cache, k_cache.copy())
    with pytest.raises(ValueError):  # room for the k and v heads but not for one q head
        rope_and_cache(np.zeros((1, 4 * 8), np.float32), cos, cos, rows, rows, k_cache, k_cache.copy())


@pytest.mark.gpu
def test_gpu_rope_and_cache_replays_in_a_cuda_graph_with_new_positions():
    """Positions are read on the device, so one captured launch serves every decode step."""
    problem = dict(head_dim=128, n_kv_heads=2, n_heads=8, batch=4, max_seq=32, theta=10000.0, seed=0,
                   slots=[0, 1, 2, 3], positions=[0, 0, 0, 0])
    _, cos, sin, qkv, k_cache, v_cache = rope_inputs(problem, np.float16)
    first_positions, slots_host = np.array(problem["positions"], np.int32), np.array(problem["slots"], np.int32)
    device_qkv, device_cos, device_sin, positions, slots, device_k, device_v = (
        cupy.asarray(a) for a in (qkv, cos, sin, first_positions, slots_host, k_cache, v_cache))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        # the first call compiles the kernel and leaves a block of q's size in the memory pool for the capture
        rope_and_cache(device_qkv, device_cos, device_sin, positions, slots, device_k, device_v)
        rope_and_cache(qkv, cos, sin, first_positions, slots_host, k_cache, v_cache)
        stream.begin_capture()
        q = rope_and_cache(device_qkv, device_cos, device_sin, positions, slots, device_k, device_v)
        graph = stream.end_capture()
        for step in ([3, 7, 0, 31], [4, 8, 1, 30]):
            step = np.array(step, np.int32)
            positions.set(step, stream=stream)
            graph.launch(stream)
            emulated_q = rope_and_cache(qkv, cos, sin, step, slots_host, k_cache, v_cache)
            np.testing.assert_array_equal(cupy.asnumpy(q, stream=stream, blocking=True), emulated_q)
    np.testing.assert_array_equal(cupy.asnumpy(device_k), k_cache)
    np.testing.assert_array_equal(cupy.asnumpy(device_v), v_cache)
