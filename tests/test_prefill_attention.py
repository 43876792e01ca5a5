"""Causal prefill attention: the unified-max emulation (CPU) and kernel (GPU) against the float64
oracle, the synchronised recompute of adversarial rows, and kernel == emulation."""

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from attention_cases import as_float16, gpu_cupy, near_window_edge, outside_window, prefill_inputs, prefill_scores
from minifd.kernels import attention
from minifd.kernels.prefill_attention import (LARGEST_LOG2_PROBABILITY, SMALLEST_NORMAL_HALF,
                                              prefill_attention_emulated)
from minifd.kernels.softmax_range import DEFAULT_SOFTMAX_RANGE, SoftmaxRange
from minifd.oracle import causal_attention

ADVERSARIAL_SCORES = (-1000.0, -80.0, 70.0, 150.0, 600.0)


@st.composite
def prefill_cases(draw, max_seq):
    n_kv_heads = draw(st.integers(1, 3))
    return dict(seq=draw(st.integers(1, max_seq)), n_heads=n_kv_heads * draw(st.sampled_from([1, 2, 3, 4])),
                n_kv_heads=n_kv_heads, head_dim=draw(st.sampled_from([64, 128])),
                query_scale=draw(st.sampled_from([0.1, 1.0, 3.0])),
                adversarial=draw(st.lists(st.sampled_from(ADVERSARIAL_SCORES), max_size=3)),
                softmax_range=draw(st.sampled_from([DEFAULT_SOFTMAX_RANGE, SoftmaxRange(-3.0, -45.0, 35.0),
                                                    SoftmaxRange(12.0), SoftmaxRange(150.0), SoftmaxRange(-150.0)])),
                seed=draw(st.integers(0, 2**32 - 1)))


def build(case, float16=False):
    rng = np.random.default_rng(case["seed"])
    q, k, v = prefill_inputs(rng, case["seq"], case["n_heads"], case["n_kv_heads"], case["head_dim"],
                             case["query_scale"], case["adversarial"])
    return as_float16(q, k, v) if float16 else (q, k, v)


def oracle(q, k, v):
    return causal_attention(np.asarray(q, np.float64), np.asarray(k, np.float64), np.asarray(v, np.float64))


def half_precision_window(softmax_range):
    """The window the prefill kernels test: high capped so that every exp(s - phi) fits fp16."""
    return SoftmaxRange(softmax_range.phi, softmax_range.low,
                        min(softmax_range.high, LARGEST_LOG2_PROBABILITY / math.log2(math.e)))


def log2_mean_terms(scores, phi):
    """scores: [n_heads, seq, seq] float64, -inf masked -> log2 of each row's mean exp(s - phi): [n_heads, seq]"""
    row_max = scores.max(axis=-1, keepdims=True)
    log_sum = np.log(np.exp(scores - row_max).sum(axis=-1)) + row_max[..., 0] - phi
    return (log_sum - np.log(np.isfinite(scores).sum(axis=-1))) / math.log(2)


def expected_recomputed_rows(q, k, softmax_range):
    """(query, head) rows with a score outside the prefill window or a mean term below fp16's smallest
    normal; None when a score or a row mean sits so close to an edge that rounding could decide."""
    scores = prefill_scores(q, k)
    window = half_precision_window(softmax_range)
    log2_mean = log2_mean_terms(scores, softmax_range.phi)
    if near_window_edge(scores, window) or np.any(np.abs(log2_mean - math.log2(SMALLEST_NORMAL_HALF)) < 1e-2):
        return None
    unsafe = outside_window(scores, window).any(axis=-1) | (log2_mean < math.log2(SMALLEST_NORMAL_HALF))
    return int(unsafe.sum())


# ----------------------------------------------------------------------------------------------
# CPU: emulation
# ----------------------------------------------------------------------------------------------

@given(prefill_cases(max_seq=300))
def test_emulation_matches_oracle_and_counts_unsafe_rows(case):
    q, k, v = build(case)
    expected_rows = expected_recomputed_rows(q, k, case["softmax_range"])
    assume(expected_rows is not None)
    out, recomputed = prefill_attention_emulated(q, k, v, case["softmax_range"])
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, oracle(q, k, v), atol=2e-4, rtol=1e-4)
    assert recomputed == expected_rows


@given(prefill_cases(max_seq=200))
def test_synchronised_emulation_matches_oracle(case):
    q, k, v = build(case)
    out, recomputed = prefill_attention_emulated(q, k, v, case["softmax_range"], unified_max=False)
    assert recomputed == 0
    np.testing.assert_allclose(out, oracle(q, k, v), atol=2e-4, rtol=1e-4)


def test_seam_keeps_the_dtype_and_counts_rows():
    q, k, v = prefill_inputs(np.random.default_rng(0), 130, 6, 2, 64, 1.0, [300.0, -300.0])
    attention.reset_recompute_count()
    out = attention.prefill_attention(q, k, v)
    assert out.dtype == np.float32 and out.shape == q.shape
    assert attention.recompute_count() == 2
    np.testing.assert_allclose(out, oracle(q, k, v), atol=2e-4, rtol=1e-4)
    out = attention.prefill_attention(q, k, v, method="sync")
    assert attention.recompute_count() == 2
    np.testing.assert_allclose(out, oracle(q, k, v), atol=2e-4, rtol=1e-4)


# Scores near 0 except query 0 of head 0, which scores 12 against its only key: inside the (-60, 60)
# window, but exp(12) overflows fp16. Under phi = 12 that row is the only one whose terms do not
# average far below 2^-14 (the others sit near e^-12).
HALF_PRECISION_EDGES = [(DEFAULT_SOFTMAX_RANGE, 1), (SoftmaxRange(12.0), 2 * 70 - 1)]


def half_precision_edge_inputs():
    return as_float16(*prefill_inputs(np.random.default_rng(1), 70, 2, 1, 64, 0.1, [12.0]))


@pytest.mark.parametrize("softmax_range, expected_rows", HALF_PRECISION_EDGES)
def test_emulation_recomputes_rows_beyond_half_precision(softmax_range, expected_rows):
    q, k, v = half_precision_edge_inputs()
    assert expected_recomputed_rows(q, k, softmax_range) == expected_rows
    out, recomputed = prefill_attention_emulated(q, k, v, softmax_range)
    assert recomputed == expected_rows
    np.testing.assert_allclose(out, oracle(q, k, v), atol=2e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# GPU: kernel
# ----------------------------------------------------------------------------------------------

FP16_TOLERANCE = dict(atol=4e-3, rtol=4e-3)


def run_kernel(cupy, q, k, v, softmax_range=None, method="async"):
    """float32 host arrays -> (kernel output as float32 host array, rows it recomputed)."""
    before = attention.recompute_count()
    out = attention.prefill_attention(*(cupy.asarray(a, cupy.float16) for a in (q, k, v)),
                                      softmax_range=softmax_range, method=method)
    assert out.dtype == cupy.float16 and out.shape == q.shape
    return cupy.asnumpy(out).astype(np.float32), attention.recompute_count() - before


@pytest.mark.gpu
@settings(max_examples=40)
@given(prefill_cases(max_seq=1500))
def test_kernel_matches_oracle_and_emulation(case):
    cupy = gpu_cupy()
    q, k, v = build(case, float16=True)
    expected_rows = expected_recomputed_rows(q, k, case["softmax_range"])
    assume(expected_rows is not None)
    out, recomputed = run_kernel(cupy, q, k, v, case["softmax_range"])
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, oracle(q, k, v), **FP16_TOLERANCE)
    assert recomputed == expected_rows
    emulated, emulated_rows = prefill_attention_emulated(q, k, v, case["softmax_range"])
    np.testing.assert_allclose(out, emulated, **FP16_TOLERANCE)
    assert recomputed == emulated_rows


@pytest.mark.gpu
@given(prefill_cases(max_seq=1000))
def test_synchronised_kernel_matches_oracle(case):
    cupy = gpu_cupy()
    q, k, v = build(case, float16=True)
    out, recomputed = run_kernel(cupy, q, k, v, case["softmax_range"], method="sync")
    assert recomputed == 0 and np.all(np.isfinite(out))
    np.testing.assert_allclose(out, oracle(q, k, v), **FP16_TOLERANCE)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernel_on_a_long_prompt_with_strided_inputs(head_dim):
    cupy = gpu_cupy()
    seq, n_heads, n_kv_heads = 2048, 4, 2
    q, k, v = as_float16(*prefill_inputs(np.random.default_rng(head_dim), seq, n_heads, n_kv_heads, head_dim, 1.0, [99.0]))
    # The engine passes k and v as column slices of one fused projection: non-contiguous views.
    fused = cupy.asarray(np.concatenate([q.reshape(seq, -1), k.reshape(seq, -1), v.reshape(seq, -1)], axis=1), cupy.float16)
    widths = np.cumsum([n_heads * head_dim, n_kv_heads * head_dim])
    views = [fused[:, :widths[0]], fused[:, widths[0]:widths[1]], fused[:, widths[1]:]]
    shapes = [(seq, n_heads, head_dim), (seq, n_kv_heads, head_dim), (seq, n_kv_heads, head_dim)]
    before = attention.recompute_count()
    out = attention.prefill_attention(*(view.reshape(shape) for view, shape in zip(views, shapes)))
    assert attention.recompute_count() - before == 1
    np.testing.assert_allclose(cupy.asnumpy(out).astype(np.float32), oracle(q, k, v), **FP16_TOLERANCE)


@pytest.mark.gpu
@pytest.mark.parametrize("softmax_range, expected_rows", HALF_PRECISION_EDGES)
def test_kernel_recomputes_rows_beyond_half_precision(softmax_range, expected_rows):
    cupy = gpu_cupy()
    q, k, v = half_precision_edge_inputs()
    out, recomputed = run_kernel(cupy, q, k, v, softmax_range)
    assert recomputed == expected_rows
    np.testing.assert_allclose(out, oracle(q, k, v), **FP16_TOLERANCE)


@pytest.mark.gpu
def test_kernel_reads_keys_and_values_through_cache_slices():
    cupy = gpu_cupy()
    seq, max_seq, n_heads, n_kv_heads, head_dim = 300, 512, 8, 2, 128
    q, k, v = as_float16(*prefill_inputs(np.random.default_rng(5), seq, n_heads, n_kv_heads, head_dim, 1.0))
    # The engine's prefill reads k, v as cache[slot, :, :seq].transpose(1, 0, 2): [seq, n_kv_heads, d] views.
    k_cache, v_cache = (cupy.zeros((n_kv_heads, max_seq, head_dim), cupy.float16) for _ in range(2))
    k_cache[:, :seq], v_cache[:, :seq] = (cupy.asarray(a.transpose(1, 0, 2), cupy.float16) for a in (k, v))
    out = attention.prefill_attention(cupy.asarray(q, cupy.float16), k_cache[:, :seq].transpose(1, 0, 2),
                                      v_cache[:, :seq].transpose(1, 0, 2))
    np.testing.assert_allclose(cupy.asnumpy(out).astype(np.float32), oracle(q, k, v), **FP16_TOLERANCE)
