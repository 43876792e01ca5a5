"""Prefill attention beyond its properties (minifd/properties/prefill_attention.py, run by
test_properties.py): the seam's dtype and counter, rows that only float16 makes unsafe, a long prompt
through strided views, keys and values read through KV-cache slices, and a prompt prefilled chunk by
chunk from the cache."""

import numpy as np
import pytest

from minifd.backend import cupy_or_none
from minifd.kernels import attention
from minifd.properties import PROPERTIES
from minifd.properties.attention_reference import prefill_inputs, prefill_reference, rounded_to

cupy = cupy_or_none()
FP16_TOLERANCE = dict(atol=4e-3, rtol=4e-3)


def test_seam_keeps_the_dtype_and_counts_rows():
    q, k, v = prefill_inputs(np.random.default_rng(0), 130, 6, 2, 64, 1.0, [300.0, -300.0])
    expected = prefill_reference(q, k, v).out
    attention.reset_recompute_count()
    out = attention.prefill_attention(q, k, v)
    assert out.dtype == np.float32 and out.shape == q.shape
    assert attention.recompute_count() == 2
    np.testing.assert_allclose(out, expected, atol=2e-4, rtol=1e-4)
    out = attention.prefill_attention(q, k, v, method="sync")
    assert attention.recompute_count() == 2
    np.testing.assert_allclose(out, expected, atol=2e-4, rtol=1e-4)


# Scores near 0 except query 0 of head 0, which scores 12 against its only key: inside the (-60, 60)
# window, but exp(12) overflows fp16. Under phi = 12 that row is the only one whose terms do not
# average far below 2^-14 (the others sit near e^-12).
@pytest.mark.parametrize("phi, expected_rows", [(0.0, 1), (12.0, 2 * 70 - 1)])
def test_rows_beyond_half_precision_are_recomputed(xp, phi, expected_rows):
    case = dict(seq=70, n_heads=2, n_kv_heads=1, head_dim=64, query_scale=0.1, adversarial=[12.0],
                softmax_range=(phi, -60.0, 60.0), seed=1)
    assert PROPERTIES["prefill_attention"].check(case, xp).recomputed == expected_rows


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernel_on_a_long_prompt_with_strided_inputs(head_dim):
    seq, n_heads, n_kv_heads = 2048, 4, 2
    q, k, v = rounded_to(np.float16, *prefill_inputs(np.random.default_rng(head_dim), seq, n_heads, n_kv_heads,
                                                     head_dim, 1.0, [99.0]))
    # The engine passes k and v as column slices of one fused projection: non-contiguous views.
    fused = cupy.asarray(np.concatenate([q.reshape(seq, -1), k.reshape(seq, -1), v.reshape(seq, -1)], axis=1),
                         cupy.float16)
    widths = np.cumsum([n_heads * head_dim, n_kv_heads * head_dim])
    views = [fused[:, :widths[0]], fused[:, widths[0]:widths[1]], fused[:, widths[1]:]]
    shapes = [(seq, n_heads, head_dim), (seq, n_kv_heads, head_dim), (seq, n_kv_heads, head_dim)]
    before = attention.recompute_count()
    out = attention.prefill_attention(*(view.reshape(shape) for view, shape in zip(views, shapes)))
    assert attention.recompute_count() - before == 1
    np.testing.assert_allclose(cupy.asnumpy(out).astype(np.float32), prefill_reference(q, k, v).out, **FP16_TOLERANCE)


@pytest.mark.gpu
def test_kernel_reads_keys_and_values_through_cache_slices():
    seq, max_seq, n_heads, n_kv_heads, head_dim = 300, 512, 8, 2, 128
    q, k, v = rounded_to(np.float16, *prefill_inputs(np.random.default_rng(5), seq, n_heads, n_kv_heads, head_dim, 1.0))
    # The engine's prefill reads k, v as cache[slot, :, :seq].transpose(1, 0, 2): [seq, n_kv_heads, d] views.
    k_cache, v_cache = (cupy.zeros((n_kv_heads, max_seq, head_dim), cupy.float16) for _ in range(2))
    k_cache[:, :seq], v_cache[:, :seq] = (cupy.asarray(a.transpose(1, 0, 2), cupy.float16) for a in (k, v))
    out = attention.prefill_attention(cupy.asarray(q, cupy.float16), k_cache[:, :seq].transpose(1, 0, 2),
                                      v_cache[:, :seq].transpose(1, 0, 2))
    np.testing.assert_allclose(cupy.asnumpy(out).astype(np.float32), prefill_reference(q, k, v).out, **FP16_TOLERANCE)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernel_prefills_chunk_by_chunk_from_cache_slices(head_dim):
    seq, chunk, n_heads, n_kv_heads = 1000, 300, 8, 2  # chunks start off the 128- and 64-row tiles
    q, k, v = rounded_to(np.float16, *prefill_inputs(np.random.default_rng(head_dim), seq, n_heads, n_kv_heads,
                                                     head_dim, 1.0, [99.0]))
    k_cache, v_cache = (cupy.asarray(a.transpose(1, 0, 2), cupy.float16) for a in (k, v))  # [n_kv_heads, seq, d]
    before = attention.recompute_count()
    chunks = []
    for start in range(0, seq, chunk):
        end = start + chunk  # as the engine's prefill: the chunk's queries, the keys of positions [0, end)
        chunks.append(attention.prefill_attention(cupy.asarray(q[start:end], cupy.float16),
                                                  k_cache[:, :end].transpose(1, 0, 2),
                                                  v_cache[:, :end].transpose(1, 0, 2)))
    assert attention.recompute_count() - before == 1
    out = cupy.asnumpy(cupy.concatenate(chunks)).astype(np.float32)
    np.testing.assert_allclose(out, prefill_reference(q, k, v).out, **FP16_TOLERANCE)


# Three prompts of different lengths in slots 2, 0, 3 (slot 1 empty), each with a chunk past its cached
# positions: two cross the 128- and 64-row query tiles, one is a single row. Adversarial rows (query
# 13 i of the prompt) overflow or underflow the window: rows 13 and 26 of the first chunk and 13 of the
# third recompute; row 0 of those prompts is cached, not queried.
RAGGED_CASE = dict(seq=1, n_heads=4, n_kv_heads=2, head_dim=64, query_scale=1.0, adversarial=[],
                   softmax_range=(0.0, -60.0, 60.0), seed=0, slots=[2, 0, 3],
                   prompts=[(260, 3, [150.0, -1000.0, 70.0], 11), (1, 0, [], 12), (140, 10, [600.0, -80.0], 13)])


def test_a_ragged_batch_recomputes_the_unsafe_rows_of_its_chunks(xp):
    assert PROPERTIES["prefill_attention_ragged"].check(RAGGED_CASE, xp).recomputed == 3


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["async", "sync"])
def test_the_ragged_kernel_gives_what_one_launch_per_sequence_gives(method):
    """The ragged launch reads each chunk's keys in its cache slot; one launch per chunk over
    contiguous copies of those keys must give the same rows bit for bit (same tiles, same order)."""
    rng = np.random.default_rng(7)
    lengths, starts, slots = [300, 17, 129], [0, 5, 64], [1, 2, 0]  # slot 1's chunk spans three 128-row tiles
    max_seq, n_heads, n_kv_heads, head_dim = 320, 8, 2, 128
    k_cache, v_cache = (cupy.asarray(rng.standard_normal((3, n_kv_heads, max_seq, head_dim)), cupy.float16)
                        for _ in range(2))
    q = cupy.asarray(rng.standard_normal((sum(lengths) - sum(starts), n_heads, head_dim)), cupy.float16)
    ragged = attention.RaggedQueries(tuple(l - s for l, s in zip(lengths, starts)), tuple(slots), tuple(lengths))
    out = attention.prefill_attention_ragged(q, k_cache, v_cache, ragged, method=method)
    for first, length, slot, end in ragged.sequences():
        alone = attention.prefill_attention(q[first:first + length], k_cache[slot, :, :end].transpose(1, 0, 2),
                                            v_cache[slot, :, :end].transpose(1, 0, 2), method=method)
        assert (out[first:first + length] == alone).all()
