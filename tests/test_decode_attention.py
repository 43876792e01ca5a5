"""Decode attention beyond its properties (minifd/properties/decode_attention.py, run by
test_properties.py): fixed cases at 32k keys and with every row recomputed, on CUDA cores and on
tensor cores, the tf32 rounding, the seam's counter and methods, the split size and the plan's choice
of kernel, the arrival counters of the fused combine, and a captured CUDA graph."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minifd.backend import cupy_or_none
from minifd.errors import MinifdError
from minifd.kernels import attention
from minifd.kernels.decode_attention import UNIFIED_MAX_KERNEL
from minifd.kernels.decode_attention_mma import TENSOR_CORE_KERNEL, TENSOR_CORE_SPLIT_SIZES, round_to_tf32
from minifd.kernels.decode_split_kv import SPLIT_SIZES, choose_keys_per_split, heads_per_block, plan_for
from minifd.kernels.softmax_range import SoftmaxRange
from minifd.properties import PROPERTIES
from minifd.properties.attention_reference import decode_inputs, decode_reference, rounded_to

DEFAULT_RANGE = (0.0, -60.0, 60.0)


def case(batch, n_heads, n_kv_heads, head_dim, max_seq, lengths, query_scale, adversarial=(),
         softmax_range=DEFAULT_RANGE, keys_per_split=256, seed=0):
    """A decode property case, as its strategy would draw it."""
    return dict(batch=batch, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, max_seq=max_seq,
                lengths=list(lengths), query_scale=query_scale, adversarial=list(adversarial),
                softmax_range=softmax_range, keys_per_split=keys_per_split, seed=seed)


UNIFIED_MAX_PROPERTIES = ["decode_attention", "decode_attention_mma"]  # CUDA cores, tensor cores


@pytest.mark.parametrize("name", UNIFIED_MAX_PROPERTIES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_emulation_at_32k_keys(name, head_dim):
    outcome = PROPERTIES[name].check(
        case(2, 8, 2, head_dim, 32768, [32768, 20001], 2.0, [90.0], keys_per_split=512, seed=head_dim), np)
    assert outcome.recomputed == 1


@pytest.mark.parametrize("name", UNIFIED_MAX_PROPERTIES)
@pytest.mark.parametrize("phi", [200.0, -200.0])
def test_every_row_recomputes_when_all_scores_underflow_or_overflow(name, phi):
    # every exp2(t - phi) underflows to 0, or overflows to inf, in float32
    outcome = PROPERTIES[name].check(
        case(3, 6, 2, 64, 300, [1, 150, 300], 1.0, softmax_range=(phi, -60.0, 60.0), keys_per_split=64, seed=1), np)
    assert outcome.recomputed == 3 * 6


@pytest.mark.gpu
@pytest.mark.parametrize("name", UNIFIED_MAX_PROPERTIES)
def test_kernels_on_the_gpu_at_32k_keys(name):
    # each unified-max kernel at a long context, GQA group 4, a row that must recompute
    cupy = cupy_or_none()
    outcome = PROPERTIES[name].check(
        case(2, 16, 4, 128, 32768, [32768, 9001], 1.0, [90.0], keys_per_split=1024, seed=11), cupy)
    assert outcome.recomputed == 1


def test_tf32_rounding_is_to_nearest_with_ties_away():
    rng = np.random.default_rng(4)
    x = np.concatenate([np.exp2(rng.uniform(-120, 120, 10000)).astype(np.float32),
                        np.float32([1 + 2**-11, 1 + 3 * 2**-11, 1 - 2**-25, np.finfo(np.float32).max, np.inf, 0.0])])
    rounded = round_to_tf32(x)
    assert not (rounded.view(np.uint32) & 0x1FFF).any()  # 10 mantissa bits left
    exponent = np.exp2(np.floor(np.log2(x.astype(np.float64), where=x > 0, out=np.zeros(x.shape))))
    half_ulp = exponent * 2.0**-11
    finite = np.isfinite(rounded) & np.isfinite(x)
    error = np.abs(rounded[finite].astype(np.float64) - x[finite])
    assert (error <= half_ulp[finite]).all()
    np.testing.assert_array_equal(rounded[-6:], np.float32([1 + 2**-10, 1 + 2**-9, 1.0, np.inf, np.inf, 0.0]))


@pytest.mark.parametrize("phi", [200.0, -200.0])
def test_every_row_recomputes_through_the_seam(xp, phi):
    outcome = PROPERTIES["decode_attention_recompute"].check(
        case(3, 9, 3, 64, 3000, [1, 1500, 3000], 1.0, softmax_range=(phi, -60.0, 60.0), seed=5), xp)
    assert outcome.recomputed == 3 * 9


def test_sequence_without_keys_gives_zeros(xp):
    # the bound of a row without keys is 0 (float16's half subnormal step on GPU): its output must be 0
    outcome = PROPERTIES["decode_attention"].check(case(2, 2, 1, 64, 10, [0, 10], 1.0, keys_per_split=64, seed=3), xp)
    assert outcome.recomputed == 0


def test_seam_counts_recomputed_rows_and_selects_the_method():
    rng = np.random.default_rng(2)
    q, k_cache, v_cache, lengths = decode_inputs(rng, 2, 4, 4, 64, 100, [100, 37], 1.0, [500.0, -500.0])
    expected = decode_reference(q, k_cache, v_cache, lengths).out
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


@given(st.integers(1, 512), st.integers(1, 1 << 17), st.integers(1, 256))
def test_split_size_fills_the_gpu_and_depends_only_on_capacity(blocks_per_split, max_seq, sms):
    size = choose_keys_per_split(blocks_per_split, max_seq, sms)
    assert size in SPLIT_SIZES
    if size != SPLIT_SIZES[0]:
        assert blocks_per_split * math.ceil(max_seq / size) >= 4 * sms
    if size != SPLIT_SIZES[-1]:  # the next larger size would not have filled the GPU
        assert blocks_per_split * math.ceil(max_seq / (2 * size)) < 4 * sms


@given(st.integers(1, 512), st.integers(1, 1 << 17), st.integers(1, 256))
def test_tensor_core_split_size_is_the_nearest_wave(blocks_per_split, max_seq, sms):
    size = TENSOR_CORE_KERNEL.keys_per_split(blocks_per_split, max_seq, sms)
    assert size in TENSOR_CORE_SPLIT_SIZES

    def distance(s):  # of the grid from one wave of 2 blocks per SM, as a ratio
        return abs(math.log(blocks_per_split * math.ceil(max_seq / s) / (2 * sms)))
    assert all(distance(size) <= distance(other) for other in TENSOR_CORE_SPLIT_SIZES)


def test_tensor_core_split_sizes_measured_on_the_h200():
    # GQA 32/8 (8 head groups per sequence) on 132 SMs: the sizes the BENCHMARKS.md sweep found fastest
    cases = {(1, 8192): 512, (1, 32768): 1024, (1, 131072): 4096, (8, 8192): 2048, (8, 131072): 4096}
    for (batch, max_seq), best in cases.items():
        assert TENSOR_CORE_KERNEL.keys_per_split(8 * batch, max_seq, 132) == best


def test_heads_per_block_divides_the_group():
    assert [heads_per_block(g) for g in (1, 3, 4, 8, 9, 16, 7, 14)] == [1, 3, 4, 8, 3, 8, 7, 7]


def test_softmax_range_rejects_an_unsafe_window():
    for low, high in ((-61.0, 10.0), (-10.0, 61.0), (5.0, 10.0), (-10.0, -1.0)):
        with pytest.raises(MinifdError):
            SoftmaxRange(0.0, low, high)
    with pytest.raises(MinifdError):
        SoftmaxRange(float("nan"))


@pytest.mark.gpu
def test_captured_graph_follows_device_lengths():
    cupy = cupy_or_none()
    rng = np.random.default_rng(6)
    q, k_cache, v_cache, lengths = decode_inputs(rng, 2, 8, 2, 128, 2048, [100, 2048], 1.0)
    q, k_cache, v_cache = rounded_to(np.float16, q, k_cache, v_cache)
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
                               decode_reference(q, k_cache, v_cache, new_lengths).out, atol=4e-3, rtol=4e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("n_heads, n_kv_heads, tensor_cores", [(32, 32, False), (32, 16, False), (32, 8, True),
                                                                (64, 8, True)])
def test_plan_runs_gqa_groups_of_four_or_more_on_tensor_cores(n_heads, n_kv_heads, tensor_cores):
    cupy = cupy_or_none()
    q = cupy.zeros((1, n_heads, 128), cupy.float16)
    k_cache = cupy.zeros((1, n_kv_heads, 64, 128), cupy.float16)
    plan, _ = plan_for(UNIFIED_MAX_KERNEL, TENSOR_CORE_KERNEL, q, k_cache, k_cache, [64])
    has_mma = not cupy.cuda.runtime.is_hip and int(cupy.cuda.Device().compute_capability) >= 80
    assert plan.tensor_cores == (tensor_cores and has_mma)
    assert not plan_for(UNIFIED_MAX_KERNEL, None, q, k_cache, k_cache, [64])[0].tensor_cores


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["async", "sync"])
def test_one_launch_leaves_its_arrival_counters_at_zero(method):
    # the last split block of each head group resets its counter; a stale count would make the next
    # launch combine too early (or never), so two launches in a row must agree and leave zeros
    from minifd.kernels.decode_attention_sync import SYNC_KERNEL

    cupy = cupy_or_none()
    rng = np.random.default_rng(7)
    q, k_cache, v_cache, lengths = decode_inputs(rng, 3, 8, 2, 128, 3000, [3000, 1, 1777], 1.0, [400.0])
    q, k_cache, v_cache = rounded_to(np.float16, q, k_cache, v_cache)
    device = [cupy.asarray(a, cupy.float16) for a in (q, k_cache, v_cache)] + [cupy.asarray(lengths)]
    plan, _ = (plan_for(UNIFIED_MAX_KERNEL, TENSOR_CORE_KERNEL, *device) if method == "async"
               else plan_for(SYNC_KERNEL, None, *device))
    first = cupy.asnumpy(attention.decode_attention(*device, method=method))
    second = cupy.asnumpy(attention.decode_attention(*device, method=method))
    assert not cupy.asnumpy(plan.arrivals).any()
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first.astype(np.float32), decode_reference(q, k_cache, v_cache, lengths).out,
                               atol=4e-3, rtol=4e-3)
