"""Causal prefill attention: the unified-max emulation (CPU) and kernel (GPU) against the float64
oracle, the synchronised recompute of adversarial rows, and kernel == emulation."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from attention_cases import as_float16, gpu_cupy, near_window_edge, outside_window, prefill_inputs, prefill_scores
from minifd.kernels import attention
from minifd.kernels.prefill_attention import prefill_attention_emulated
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
                                                    SoftmaxRange(150.0), SoftmaxRange(-150.0)])),
                seed=draw(st.integers(0, 2**32 - 1)))


def build(case, float16=False):
    rng = np.random.default_rng(case["seed"])
    q, k, v = prefill_inputs(rng, case["seq"], case["n_heads"], case["n_kv_heads"], case["head_dim"],
                             case["query_scale"], case["adversarial"])
    return as_float16(q, k, v) if float16 else (q, k, v)


def oracle(q, k, v):
    return causal_attention(np.asarray(q, np.float64), np.asarray(k, np.float64), np.asarray(v, np.float64))


def expected_recomputed_rows(q, k, softmax_range):
    """(query, head) rows with a score outside the window; None when a score sits on a window edge."""
    scores = prefill_scores(q, k)
    if near_window_edge(scores, softmax_range):
        return None
    return int(outside_window(scores, softmax_range).any(axis=-1).sum())


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
