"""Decode attention: the unified-max and synchronised split-KV emulations (CPU) and kernels (GPU)
against a float64 oracle, the recompute path on adversarial rows, and kernel == emulation."""

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from attention_cases import (as_float16, decode_inputs, decode_oracle, decode_scores, gpu_cupy, near_window_edge,
                             outside_window)
from minifd.errors import MinifdError
from minifd.kernels import attention
from minifd.kernels.decode_attention import decode_attention_emulated, decode_attention_gpu
from minifd.kernels.decode_attention_sync import (SPLIT_SIZES, choose_keys_per_split, decode_attention_sync_emulated,
                                                  heads_per_block)
from minifd.kernels.softmax_range import DEFAULT_SOFTMAX_RANGE, SoftmaxRange

ADVERSARIAL_SCORES = (-1000.0, -300.0, -75.0, 75.0, 120.0, 400.0)


@st.composite
def decode_cases(draw, max_seq_limit, long_lengths=()):
    """-> dict of shapes, ragged lengths, query scale, adversarial row scores, a softmax range and a seed."""
    n_kv_heads = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 3, 4, 8]))
    max_seq = draw(st.one_of(st.integers(1, max_seq_limit), st.sampled_from(long_lengths or [max_seq_limit])))
    batch = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(1, max_seq), min_size=batch, max_size=batch))
    return dict(batch=batch, n_heads=n_kv_heads * group, n_kv_heads=n_kv_heads,
                head_dim=draw(st.sampled_from([64, 128])), max_seq=max_seq, lengths=lengths,
                query_scale=draw(st.sampled_from([0.1, 1.0, 3.0])),
                adversarial=draw(st.lists(st.sampled_from(ADVERSARIAL_SCORES), max_size=3)),
                softmax_range=draw(st.sampled_from([DEFAULT_SOFTMAX_RANGE, SoftmaxRange(-4.0, -50.0, 40.0),
                                                    SoftmaxRange(100.0), SoftmaxRange(-100.0)])),
                keys_per_split=draw(st.sampled_from(SPLIT_SIZES)),
                seed=draw(st.integers(0, 2**32 - 1)))


def build(case, float16=False):
    rng = np.random.default_rng(case["seed"])
    arrays = decode_inputs(rng, case["batch"], case["n_heads"], case["n_kv_heads"], case["head_dim"],
                           case["max_seq"], case["lengths"], case["query_scale"], case["adversarial"])
    q, k_cache, v_cache, lengths = arrays
    if float16:
        q, k_cache, v_cache = as_float16(q, k_cache, v_cache)
    return q, k_cache, v_cache, lengths


def expected_recomputed_rows(q, k_cache, lengths, softmax_range):
    """float64 count of (sequence, head) rows with a score outside the window; None if any score sits
    on a window edge (float32 rounding could decide it either way)."""
    rows = decode_scores(q, k_cache, lengths)
    if any(near_window_edge(scores, softmax_range) for scores in rows):
        return None
    return sum(int(outside_window(scores, softmax_range).any(axis=-1).sum()) for scores in rows)


# ----------------------------------------------------------------------------------------------
# CPU: emulations
# ----------------------------------------------------------------------------------------------

@given(decode_cases(max_seq_limit=700, long_lengths=[2048, 5000]))
def test_unified_max_emulation_matches_oracle_and_counts_unsafe_rows(case):
    q, k_cache, v_cache, lengths = build(case)
    expected_rows = expected_recomputed_rows(q, k_cache, lengths, case["softmax_range"])
    assume(expected_rows is not None)
    out, recomputed = decode_attention_emulated(q, k_cache, v_cache, lengths, case["softmax_range"],
                                                case["keys_per_split"])
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, decode_oracle(q, k_cache, v_cache, lengths), atol=2e-4, rtol=1e-4)
    assert recomputed == expected_rows


@given(decode_cases(max_seq_limit=700, long_lengths=[3000]))
def test_synchronised_emulation_matches_oracle(case):
    q, k_cache, v_cache, lengths = build(case)
    out = decode_attention_sync_emulated(q, k_cache, v_cache, lengths, case["keys_per_split"])
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, decode_oracle(q, k_cache, v_cache, lengths), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_emulation_at_32k_keys(head_dim):
    rng = np.random.default_rng(head_dim)
    q, k_cache, v_cache, lengths = decode_inputs(rng, 2, 4, 2, head_dim, 32768, [32768, 20001], 2.0, [90.0])
    out, recomputed = decode_attention_emulated(q, k_cache, v_cache, lengths, DEFAULT_SOFTMAX_RANGE, 512)
    np.testing.assert_allclose(out, decode_oracle(q, k_cache, v_cache, lengths), atol=2e-4, rtol=1e-4)
    assert recomputed == 1


def test_every_row_recomputes_when_all_scores_underflow_or_overflow():
    rng = np.random.default_rng(1)
    q, k_cache, v_cache, lengths = decode_inputs(rng, 3, 6, 2, 64, 300, [1, 150, 300], 1.0)
    expected = decode_oracle(q, k_cache, v_cache, lengths)
    for phi in (200.0, -200.0):  # every exp2(t - phi) underflows to 0, or overflows to inf, in float32
        out, recomputed = decode_attention_emulated(q, k_cache, v_cache, lengths, SoftmaxRange(phi), 64)
        assert recomputed == 3 * 6
        np.testing.assert_allclose(out, expected, atol=2e-4, rtol=1e-4)


def test_seam_counts_recomputed_rows_and_selects_the_method():
    rng = np.random.default_rng(2)
    q, k_cache, v_cache, lengths = decode_inputs(rng, 2, 4, 4, 64, 100, [100, 37], 1.0, [500.0, -500.0])
    expected = decode_oracle(q, k_cache, v_cache, lengths)
    attention.reset_recompute_count()
    out = attention.decode_attention(q, k_cache, v_cache, lengths)
    assert attention.recompute_count() == 2
    np.testing.assert_allclose(out, expected, atol=2e-4, rtol=1e-4)
    out = attention.decode_attention(q, k_cache, v_cache, lengths, method="sync")
    assert attention.recompute_count() == 2
    np.testing.assert_allclose(out, expected, atol=2e-4, rtol=1e-4)
    attention.reset_recompute_count()
    assert attention.recompute_count() == 0
    with pytest.raises(ValueError):
        attention.decode_attention(q, k_cache, v_cache, lengths, method="fast")


def test_sequence_without_keys_gives_zeros():
    rng = np.random.default_rng(3)
    q, k_cache, v_cache, lengths = decode_inputs(rng, 2, 2, 1, 64, 10, [0, 10], 1.0)
    out, recomputed = decode_attention_emulated(q, k_cache, v_cache, lengths, DEFAULT_SOFTMAX_RANGE, 64)
    assert recomputed == 0 and np.all(out[0] == 0)
    np.testing.assert_allclose(out, decode_oracle(q, k_cache, v_cache, lengths), atol=2e-4, rtol=1e-4)


@given(st.integers(1, 512), st.integers(1, 1 << 17), st.integers(1, 256))
def test_split_size_fills_the_gpu_and_depends_only_on_capacity(blocks_per_split, max_seq, sms):
    size = choose_keys_per_split(blocks_per_split, max_seq, sms)
    assert size in SPLIT_SIZES
    if size != SPLIT_SIZES[0]:
        assert blocks_per_split * math.ceil(max_seq / size) >= 4 * sms
    if size != SPLIT_SIZES[-1]:  # the next larger size would not have filled the GPU
        assert blocks_per_split * math.ceil(max_seq / (2 * size)) < 4 * sms


def test_heads_per_block_divides_the_group():
    assert [heads_per_block(g) for g in (1, 3, 4, 8, 9, 16, 7, 14)] == [1, 3, 4, 8, 3, 8, 7, 7]


def test_softmax_range_rejects_an_unsafe_window():
    for low, high in ((-61.0, 10.0), (-10.0, 61.0), (5.0, 10.0), (-10.0, -1.0)):
        with pytest.raises(MinifdError):
            SoftmaxRange(0.0, low, high)
    with pytest.raises(MinifdError):
        SoftmaxRange(float("nan"))


# ----------------------------------------------------------------------------------------------
# GPU: kernels
# ----------------------------------------------------------------------------------------------

def run_kernel(cupy, q, k_cache, v_cache, lengths, softmax_range=None, method="async"):
    """float32 host arrays -> (kernel output as float32 host array, rows it recomputed)."""
    before = attention.recompute_count()
    out = attention.decode_attention(cupy.asarray(q, cupy.float16), cupy.asarray(k_cache, cupy.float16),
                                     cupy.asarray(v_cache, cupy.float16), cupy.asarray(lengths, cupy.int32),
                                     softmax_range=softmax_range, method=method)
    assert out.dtype == cupy.float16 and out.shape == q.shape
    return cupy.asnumpy(out).astype(np.float32), attention.recompute_count() - before


FP16_TOLERANCE = dict(atol=4e-3, rtol=4e-3)


@pytest.mark.gpu
@settings(max_examples=40)
@given(decode_cases(max_seq_limit=4096, long_lengths=[8192, 32768]))
def test_kernel_matches_oracle_and_emulation(case):
    """The kernel at the case's split size against the oracle, and against the emulation at that size."""
    cupy = gpu_cupy()
    q, k_cache, v_cache, lengths = build(case, float16=True)
    expected_rows = expected_recomputed_rows(q, k_cache, lengths, case["softmax_range"])
    assume(expected_rows is not None)
    counter = cupy.zeros(1, cupy.uint64)
    out = decode_attention_gpu(*(cupy.asarray(a, cupy.float16) for a in (q, k_cache, v_cache)),
                               cupy.asarray(lengths), case["softmax_range"], counter, case["keys_per_split"])
    out, recomputed = cupy.asnumpy(out).astype(np.float32), int(counter.get()[0])
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, decode_oracle(q, k_cache, v_cache, lengths), **FP16_TOLERANCE)
    assert recomputed == expected_rows
    emulated, emulated_rows = decode_attention_emulated(q, k_cache, v_cache, lengths, case["softmax_range"],
                                                        case["keys_per_split"])
    np.testing.assert_allclose(out, emulated, **FP16_TOLERANCE)
    assert recomputed == emulated_rows


@pytest.mark.gpu
@settings(max_examples=15)
@given(decode_cases(max_seq_limit=4096, long_lengths=[32768]))
def test_seam_picks_a_split_size_and_counts_on_the_device(case):
    cupy = gpu_cupy()
    q, k_cache, v_cache, lengths = build(case, float16=True)
    expected_rows = expected_recomputed_rows(q, k_cache, lengths, case["softmax_range"])
    assume(expected_rows is not None)
    out, recomputed = run_kernel(cupy, q, k_cache, v_cache, lengths, case["softmax_range"])
    np.testing.assert_allclose(out, decode_oracle(q, k_cache, v_cache, lengths), **FP16_TOLERANCE)
    assert recomputed == expected_rows


@pytest.mark.gpu
@given(decode_cases(max_seq_limit=4096, long_lengths=[32768]))
def test_synchronised_kernel_matches_oracle(case):
    cupy = gpu_cupy()
    q, k_cache, v_cache, lengths = build(case, float16=True)
    out, recomputed = run_kernel(cupy, q, k_cache, v_cache, lengths, method="sync")
    assert np.all(np.isfinite(out)) and recomputed == 0
    np.testing.assert_allclose(out, decode_oracle(q, k_cache, v_cache, lengths), **FP16_TOLERANCE)


@pytest.mark.gpu
@pytest.mark.parametrize("phi", [200.0, -200.0])
def test_kernel_recomputes_rows_whose_exponentials_leave_float32(phi):
    cupy = gpu_cupy()
    rng = np.random.default_rng(5)
    q, k_cache, v_cache, lengths = decode_inputs(rng, 3, 9, 3, 64, 3000, [1, 1500, 3000], 1.0)
    q, k_cache, v_cache = as_float16(q, k_cache, v_cache)
    out, recomputed = run_kernel(cupy, q, k_cache, v_cache, lengths, SoftmaxRange(phi))
    assert recomputed == 3 * 9 and np.all(np.isfinite(out))
    np.testing.assert_allclose(out, decode_oracle(q, k_cache, v_cache, lengths), **FP16_TOLERANCE)


@pytest.mark.gpu
def test_captured_graph_follows_device_lengths():
    cupy = gpu_cupy()
    rng = np.random.default_rng(6)
    q, k_cache, v_cache, lengths = decode_inputs(rng, 2, 8, 2, 128, 2048, [100, 2048], 1.0)
    q, k_cache, v_cache = as_float16(q, k_cache, v_cache)
    device = [cupy.asarray(a, cupy.float16) for a in (q, k_cache, v_cache)]
    device_lengths = cupy.asarray(lengths)
    cupy.cuda.Device().synchronize()  # the copies above ran on the legacy stream, which `stream` does not wait for
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        warm_up = attention.decode_attention(*device, device_lengths)  # compile; allocate workspace and counter
        del warm_up  # its memory returns to the pool, for the captured call to reuse without cudaMalloc
        stream.synchronize()
        stream.begin_capture()
        out = attention.decode_attention(*device, device_lengths)
        graph = stream.end_capture()
        new_lengths = np.array([1500, 7], np.int32)
        device_lengths.set(new_lengths)
        graph.launch(stream)
        stream.synchronize()
    np.testing.assert_allclose(cupy.asnumpy(out).astype(np.float32),
                               decode_oracle(q, k_cache, v_cache, new_lengths), **FP16_TOLERANCE)
