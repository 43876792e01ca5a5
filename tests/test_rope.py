"""rope_and_cache (minifd/kernels/rope.py, .cu) against the float64 oracle, and the GPU kernel against the NumPy path.

Both uses are drawn: decode (one row per cache slot, ragged positions) and prefill (one slot, positions 0..seq-1),
with grouped-query heads. Cache entries the call does not own must come back untouched.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minifd import oracle
from minifd.backend import cupy_or_none
from minifd.kernels.rope import rope_and_cache

cupy = cupy_or_none()
needs_gpu = pytest.mark.skipif(cupy is None, reason="needs a GPU through CuPy")

FLOAT32_EPS = float(np.finfo(np.float32).eps)

# 64 and 128 run the 8-wide kernel; the others (head_dim % 16 != 0) the scalar one.
HEAD_DIMS = st.sampled_from([2, 6, 10, 24, 64, 128])


@st.composite
def rope_problems(draw, max_batch):
    """-> dict of the sizes and the (slot, position) of every row, for a decode or a prefill call."""
    n_kv_heads = draw(st.integers(1, 3))
    problem = dict(head_dim=draw(HEAD_DIMS), n_kv_heads=n_kv_heads, n_heads=n_kv_heads * draw(st.integers(1, 4)),
                   batch=draw(st.integers(1, max_batch)), max_seq=draw(st.integers(1, 48)),
                   theta=draw(st.sampled_from([10000.0, 500000.0])), seed=draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):  # decode: row b is the newest token of slot b
        problem["slots"] = np.arange(problem["batch"], dtype=np.int32)
        problem["positions"] = np.array(draw(st.lists(st.integers(0, problem["max_seq"] - 1),
                                                      min_size=problem["batch"], max_size=problem["batch"])), np.int32)
    else:  # prefill of one slot
        seq = draw(st.integers(1, problem["max_seq"]))
        problem["slots"] = np.full(seq, draw(st.integers(0, problem["batch"] - 1)), np.int32)
        problem["positions"] = np.arange(seq, dtype=np.int32)
    return problem


def make_inputs(problem, dtype):
    # -> inv_freq: [head_dim // 2] float64, cos, sin: [max_seq, head_dim // 2] float32 (as llama.rope_tables),
    #    qkv: [rows, (n_heads + 2 * n_kv_heads) * head_dim], k_cache, v_cache: [batch, n_kv_heads, max_seq, head_dim]
    p = problem
    rng = np.random.default_rng(p["seed"])
    inv_freq = p["theta"] ** (-np.arange(0, p["head_dim"], 2, dtype=np.float64) / p["head_dim"])
    angles = np.outer(np.arange(p["max_seq"], dtype=np.float64), inv_freq)
    rows = len(p["positions"])
    qkv = rng.standard_normal((rows, (p["n_heads"] + 2 * p["n_kv_heads"]) * p["head_dim"])).astype(dtype)
    cache_shape = (p["batch"], p["n_kv_heads"], p["max_seq"], p["head_dim"])
    k_cache, v_cache = (rng.standard_normal(cache_shape).astype(dtype) for _ in range(2))
    return inv_freq, np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32), qkv, k_cache, v_cache


def check_against_oracle(problem, inv_freq, qkv, k_before, v_before, q, k_cache, v_cache, dtype):
    # inputs as made by make_inputs; q, k_cache, v_cache: the call's results moved to numpy
    p = problem
    rows, slots, positions = len(p["positions"]), p["slots"], p["positions"]
    heads = qkv.astype(np.float64).reshape(rows, p["n_heads"] + 2 * p["n_kv_heads"], p["head_dim"])
    k_end = p["n_heads"] + p["n_kv_heads"]
    expected_k, expected_v = k_before.astype(np.float64), v_before.copy()
    expected_k[slots, :, positions] = oracle.rope(heads[:, p["n_heads"]:k_end], positions.astype(np.float64), inv_freq)
    expected_v[slots, :, positions] = qkv.reshape(heads.shape)[:, k_end:]
    expected_q = oracle.rope(heads[:, :p["n_heads"]], positions.astype(np.float64), inv_freq)

    # one rounding of the output, plus float32 products of inputs of size up to max|qkv| and rounded tables
    tolerance = dict(rtol=float(np.finfo(dtype).eps),
                     atol=4 * FLOAT32_EPS * float(np.abs(qkv).max()) + float(np.finfo(dtype).smallest_subnormal))
    assert q.dtype == dtype and q.shape == (rows, p["n_heads"], p["head_dim"])
    np.testing.assert_allclose(q, expected_q, **tolerance)
    np.testing.assert_allclose(k_cache, expected_k, **tolerance)
    np.testing.assert_array_equal(v_cache, expected_v)


@given(problem=rope_problems(max_batch=4))
def test_numpy_rope_and_cache_matches_oracle(problem):
    inv_freq, cos, sin, qkv, k_cache, v_cache = make_inputs(problem, np.float32)
    k_before, v_before = k_cache.copy(), v_cache.copy()
    q = rope_and_cache(qkv, cos, sin, problem["positions"], problem["slots"], k_cache, v_cache)
    check_against_oracle(problem, inv_freq, qkv, k_before, v_before, q, k_cache, v_cache, np.float32)


def test_rope_and_cache_rejects_a_qkv_width_that_does_not_fit_the_cache():
    k_cache = np.zeros((1, 2, 4, 8), np.float32)
    cos = np.ones((4, 4), np.float32)
    rows = np.zeros(1, np.int32)
    with pytest.raises(ValueError):
        rope_and_cache(np.zeros((1, 4 * 8 + 3), np.float32), cos, cos, rows, rows, k_cache, k_cache.copy())
    with pytest.raises(ValueError):  # room for the k and v heads but not for one q head
        rope_and_cache(np.zeros((1, 4 * 8), np.float32), cos, cos, rows, rows, k_cache, k_cache.copy())


@pytest.mark.gpu
@needs_gpu
@given(problem=rope_problems(max_batch=8), aligned=st.booleans())
def test_gpu_rope_and_cache_matches_oracle_and_numpy_path(problem, aligned):
    inv_freq, cos, sin, qkv, k_cache, v_cache = make_inputs(problem, np.float16)
    if aligned:
        device_qkv = cupy.asarray(qkv)
    else:  # 2 bytes past a 16-byte boundary: the scalar kernel even for head_dim 64 and 128
        device_qkv = cupy.empty(qkv.size + 1, dtype=qkv.dtype)[1:].reshape(qkv.shape)
        device_qkv[...] = cupy.asarray(qkv)
    device_k, device_v = cupy.asarray(k_cache), cupy.asarray(v_cache)
    q = rope_and_cache(device_qkv, cupy.asarray(cos), cupy.asarray(sin), cupy.asarray(problem["positions"]),
                       cupy.asarray(problem["slots"]), device_k, device_v)
    q, device_k, device_v = cupy.asnumpy(q), cupy.asnumpy(device_k), cupy.asnumpy(device_v)
    check_against_oracle(problem, inv_freq, qkv, k_cache, v_cache, q, device_k, device_v, np.float16)

    # the kernel rounds each product like NumPy does, so it is bit-identical to the NumPy path
    emulated_q = rope_and_cache(qkv, cos, sin, problem["positions"], problem["slots"], k_cache, v_cache)
    np.testing.assert_array_equal(q, emulated_q)
    np.testing.assert_array_equal(device_k, k_cache)
    np.testing.assert_array_equal(device_v, v_cache)


@pytest.mark.gpu
@needs_gpu
def test_gpu_rope_and_cache_replays_in_a_cuda_graph_with_new_positions():
    """Positions are read on the device, so one captured launch serves every decode step."""
    problem = dict(head_dim=128, n_kv_heads=2, n_heads=8, batch=4, max_seq=32, theta=10000.0, seed=0,
                   slots=np.arange(4, dtype=np.int32), positions=np.zeros(4, np.int32))
    _, cos, sin, qkv, k_cache, v_cache = make_inputs(problem, np.float16)
    device_qkv, device_cos, device_sin, positions, slots, device_k, device_v = (
        cupy.asarray(a) for a in (qkv, cos, sin, problem["positions"], problem["slots"], k_cache, v_cache))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        # the first call compiles the kernel and leaves a block of q's size in the memory pool for the capture
        rope_and_cache(device_qkv, device_cos, device_sin, positions, slots, device_k, device_v)
        rope_and_cache(qkv, cos, sin, problem["positions"], problem["slots"], k_cache, v_cache)
        stream.begin_capture()
        q = rope_and_cache(device_qkv, device_cos, device_sin, positions, slots, device_k, device_v)
        graph = stream.end_capture()
        for step in ([3, 7, 0, 31], [4, 8, 1, 30]):
            step = np.array(step, np.int32)
            positions.set(step, stream=stream)
            graph.launch(stream)
            emulated_q = rope_and_cache(qkv, cos, sin, step, problem["slots"], k_cache, v_cache)
            np.testing.assert_array_equal(cupy.asnumpy(q, stream=stream, blocking=True), emulated_q)
    np.testing.assert_array_equal(cupy.asnumpy(device_k), k_cache)
    np.testing.assert_array_equal(cupy.asnumpy(device_v), v_cache)
