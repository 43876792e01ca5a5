"""Prefill attention properties: causal attention with the unified max (prefill_attention.cu, or its
NumPy emulation on the CPU), its recompute path, its synchronised method, a prompt prefilled chunk by
chunk (each chunk's queries at an offset into the keys), and a ragged batch (a chunk of each of
several prompts in one launch, against their KV-cache slots), each against the float64 reference.

Tolerance: attention_reference's bound, per output element, from the output dtype (float16 on GPU,
float32 on CPU), the row's number of keys n = query position + 1 (the reduction length of the
softmax sums) and head_dim d (that of each score). On GPU the tensor cores take P in float16, so
u_p = 2^-11, and a weight below float16's smallest normal 2^-14 is off by up to 2^-25 absolutely:
n such terms move the output by at most n 2^-25 (max_j |v_j| + |out|) / denominator, where the
denominator is at least n 2^-14 on a safe row (the rule below) and at least 1 on a recomputed one
(its largest term), hence the extra (2^-11 + n 2^-25) (max_j |v_j| + |out64|) on GPU.

Recomputed rows: a row is safe, and stays on the unified-max path, iff every score s has
phi + low < s < phi + min(high, 15 ln 2) (exp2(15) keeps p within float16) and the mean of
exp(s - phi) over its keys is at least 2^-14 (prefill_attention.py). A row must be recomputed iff
that fails in float64; rows within float32 rounding of an edge may go either way, and only those.
"""

import dataclasses
import math

import numpy as np
from hypothesis import strategies as st

from minifd.backend import is_gpu, to_numpy
from minifd.kernels import attention
from minifd.kernels.prefill_attention import (LARGEST_LOG2_PROBABILITY, SMALLEST_NORMAL_HALF, RaggedQueries,
                                              prefill_attention_emulated, prefill_attention_gpu,
                                              prefill_attention_ragged_emulated)
from minifd.kernels.softmax_range import SoftmaxRange
from minifd.properties.attention_reference import (attention_allowed, check_emulation, check_recompute_count,
                                                   prefill_inputs, prefill_reference, probability_error,
                                                   recompute_strategy, rounded_to, rows_outside_window)
from minifd.properties.registry import SEEDS, Property, storage_dtype
from minifd.properties.tolerance import (U16, U32, PropertyFailure, all_finite, closest_to_bound, expect_layout,
                                         within_bound)

# Scores aimed at by adversarial rows: all outside the default window.
ADVERSARIAL_SCORES = (-1000.0, -80.0, 70.0, 150.0, 600.0)
# (phi, low, high): the default, a calibrated-looking one, phi = 12 (most rows' terms average below
# 2^-14), and two whose phi is far from every score.
SOFTMAX_RANGES = ((0.0, -60.0, 60.0), (-3.0, -45.0, 35.0), (12.0, -60.0, 60.0), (150.0, -60.0, 60.0),
                  (-150.0, -60.0, 60.0))
EVERY_ROW_RANGES = ((200.0, -60.0, 60.0), (-200.0, -60.0, 60.0))
MAX_SEQ = {"cpu": 300, "gpu": 1500}
# The largest safe score above phi in natural units: exp2(15) = exp(15 ln 2).
LARGEST_SAFE_SHIFT = LARGEST_LOG2_PROBABILITY * math.log(2.0)


@st.composite
def prefill_cases(draw, backend, adversarial=None, softmax_ranges=None):
    """-> a case: prompt length, heads, query scale, adversarial row scores, a softmax range
    (phi, low, high) and the NumPy seed of the inputs. adversarial, softmax_ranges: strategies
    replacing the defaults (up to 3 adversarial rows; any of SOFTMAX_RANGES)."""
    if adversarial is None:
        adversarial = st.lists(st.sampled_from(ADVERSARIAL_SCORES), max_size=3)
    if softmax_ranges is None:
        softmax_ranges = st.sampled_from(SOFTMAX_RANGES)
    n_kv_heads = draw(st.integers(1, 3))
    return dict(seq=draw(st.integers(1, MAX_SEQ[backend])), n_heads=n_kv_heads * draw(st.sampled_from([1, 2, 3, 4])),
                n_kv_heads=n_kv_heads, head_dim=draw(st.sampled_from([64, 128])),
                query_scale=draw(st.sampled_from([0.1, 1.0, 3.0])), adversarial=draw(adversarial),
                softmax_range=draw(softmax_ranges), seed=draw(SEEDS))


@st.composite
def chunked_cases(draw, backend):
    """-> a prefill case plus `chunk`: how many positions of the prompt each prefill call takes."""
    case = draw(prefill_cases(backend))
    return dict(case, chunk=draw(st.integers(max(1, case["seq"] // 8), case["seq"])))


@st.composite
def ragged_cases(draw, backend):
    """-> a prefill case (its heads, scale, range) plus `prompts`: per sequence of the batch, (prompt
    length, first position of the chunk the pass takes, adversarial row scores, seed), and `slots`:
    the cache slot of each (a permutation, one slot left empty)."""
    case = draw(prefill_cases(backend))
    n_sequences = draw(st.integers(1, 5))
    prompts = []
    for _ in range(n_sequences):
        length = draw(st.integers(1, MAX_SEQ[backend] // 2))
        prompts.append((length, draw(st.integers(0, length - 1)),
                        draw(st.lists(st.sampled_from(ADVERSARIAL_SCORES), max_size=2)), draw(SEEDS)))
    return dict(case, prompts=prompts, slots=draw(st.permutations(range(n_sequences + 1)))[:n_sequences])


def recompute_cases(backend):
    return recompute_strategy(prefill_cases, backend, ADVERSARIAL_SCORES, SOFTMAX_RANGES[0], EVERY_ROW_RANGES)


def case_inputs(case, xp):
    """-> q, k, v: float32 NumPy holding values of the backend's dtype."""
    c = case
    q, k, v = prefill_inputs(np.random.default_rng(c["seed"]), c["seq"], c["n_heads"], c["n_kv_heads"],
                             c["head_dim"], c["query_scale"], c["adversarial"])
    return rounded_to(storage_dtype(xp), q, k, v)


def prefill_allowed(reference, head_dim, phi, xp):
    """[seq, n_heads, head_dim]: the module docstring's bound on this backend."""
    if not is_gpu(xp):
        return attention_allowed(reference, head_dim, phi, np.float32)
    flushed_terms = (U16 + reference.keys * 2.0**-25)[..., None] * (reference.largest_value + np.abs(reference.out))
    return attention_allowed(reference, head_dim, phi, np.float16, probability_roundoff=U16) + flushed_terms


def rows_to_recompute(reference, head_dim, softmax_range):
    """-> (certain, possible): [seq, n_heads] bool, rows surely / perhaps unsafe under the module
    docstring's rule once float32 rounding (and float16 P) are accounted for."""
    capped = SoftmaxRange(softmax_range.phi, softmax_range.low,
                          min(softmax_range.high, LARGEST_SAFE_SHIFT))
    certain, possible = rows_outside_window(reference, head_dim, capped)
    log_mean = reference.log_sum_exp - softmax_range.phi - np.log(reference.keys)  # log of the mean exp(s - phi)
    # The float32 denominator is off by at most this much relatively (attention_reference's eps and sums).
    margin = 2 * probability_error(reference, head_dim, softmax_range.phi, U16) + 2 * (reference.keys + 4) * U32
    threshold = math.log(SMALLEST_NORMAL_HALF)
    return certain | (log_mean < threshold - margin), possible | (log_mean <= threshold + margin)


# ----------------------------------------------------------------------------------------------
# The properties
# ----------------------------------------------------------------------------------------------

def check_unified_max(case, xp):
    """The unified-max kernel (its launcher, with a counter of its own) or the emulation on the CPU:
    output within the bound, exactly the unsafe rows recomputed; on GPU also the emulation's output
    and count."""
    q, k, v = case_inputs(case, xp)
    softmax_range, head_dim = SoftmaxRange(*case["softmax_range"]), case["head_dim"]
    reference = prefill_reference(q, k, v)
    certain, possible = rows_to_recompute(reference, head_dim, softmax_range)
    emulated, emulated_rows = prefill_attention_emulated(q, k, v, softmax_range)
    emulated_allowed = prefill_allowed(reference, head_dim, softmax_range.phi, np)
    if not is_gpu(xp):
        return check_emulation(emulated, emulated_rows, reference, emulated_allowed, certain, possible)
    counter = xp.zeros(1, xp.uint64)
    out = prefill_attention_gpu(xp.asarray(q, xp.float16), xp.asarray(k, xp.float16), xp.asarray(v, xp.float16),
                                softmax_range, counter)
    expect_layout("kernel out", out, np.float16, q.shape)
    out, recomputed = to_numpy(out), int(to_numpy(counter)[0])
    all_finite("kernel out", out)
    check_recompute_count("kernel", recomputed, certain, possible)
    if (certain == possible).all() and recomputed != emulated_rows:
        raise PropertyFailure(f"kernel recomputed {recomputed} rows, the emulation {emulated_rows}")
    allowed = prefill_allowed(reference, head_dim, softmax_range.phi, xp)
    return closest_to_bound(
        within_bound("kernel out", out, reference.out, allowed, reference.magnitude),
        within_bound("kernel out vs emulation", out, emulated.astype(np.float64), allowed + emulated_allowed,
                     reference.magnitude)).with_recomputed(recomputed)


def check_recompute(case, xp):
    """Through the attention seam and its global recompute counter: rows whose scores overflow or
    underflow against phi are recomputed, at least one, and never give NaN or Inf."""
    q, k, v = case_inputs(case, xp)
    softmax_range, head_dim = SoftmaxRange(*case["softmax_range"]), case["head_dim"]
    reference = prefill_reference(q, k, v)
    certain, possible = rows_to_recompute(reference, head_dim, softmax_range)
    dtype = storage_dtype(xp)
    before = attention.recompute_count()
    out = attention.prefill_attention(xp.asarray(q, dtype), xp.asarray(k, dtype), xp.asarray(v, dtype),
                                      softmax_range=softmax_range)
    recomputed = attention.recompute_count() - before
    expect_layout("seam out", out, dtype, q.shape)
    out = to_numpy(out)
    all_finite("out", out)
    if recomputed == 0:
        raise PropertyFailure(f"no row took the recompute path; {int(certain.sum())} must")
    check_recompute_count("recompute counter", recomputed, certain, possible)
    allowed = prefill_allowed(reference, head_dim, softmax_range.phi, xp)
    return within_bound("out", out, reference.out, allowed, reference.magnitude).with_recomputed(recomputed)


def check_synchronised(case, xp):
    """The synchronised method on every row (the seam's method="sync" on GPU, the emulation's on the
    CPU), which recomputes nothing, against the reference."""
    q, k, v = case_inputs(case, xp)
    reference = prefill_reference(q, k, v)
    if is_gpu(xp):
        before = attention.recompute_count()
        out = attention.prefill_attention(xp.asarray(q, xp.float16), xp.asarray(k, xp.float16),
                                          xp.asarray(v, xp.float16), method="sync")
        recomputed = attention.recompute_count() - before
        expect_layout("kernel out", out, np.float16, q.shape)
        out = to_numpy(out)
    else:
        out, recomputed = prefill_attention_emulated(q, k, v, SoftmaxRange(*case["softmax_range"]),
                                                     unified_max=False)
    if recomputed:
        raise PropertyFailure(f"the synchronised method counted {recomputed} recomputed rows")
    all_finite("out", out)
    # The running max is the reference: phi plays no part.
    return within_bound("out", out, reference.out, prefill_allowed(reference, case["head_dim"], 0.0, xp),
                        reference.magnitude)


def check_chunked(case, xp):
    """The prompt prefilled `chunk` positions at a time through the seam, as the engine runs a long
    prompt: each chunk's queries against the keys of every position so far. Together the chunks must
    meet the whole prompt's bound against its float64 reference and recompute the same rows (a row's
    safety depends on its own scores alone)."""
    q, k, v = case_inputs(case, xp)
    softmax_range, head_dim, seq = SoftmaxRange(*case["softmax_range"]), case["head_dim"], case["seq"]
    reference = prefill_reference(q, k, v)
    certain, possible = rows_to_recompute(reference, head_dim, softmax_range)
    dtype = storage_dtype(xp)
    q, k, v = (xp.asarray(array, dtype) for array in (q, k, v))
    before = attention.recompute_count()
    chunks = []
    for start in range(0, seq, case["chunk"]):
        end = start + case["chunk"]  # the last chunk's slices stop at seq
        chunks.append(attention.prefill_attention(q[start:end], k[:end], v[:end], softmax_range=softmax_range))
    recomputed = attention.recompute_count() - before
    out = xp.concatenate(chunks)  # [seq, n_heads, head_dim]
    expect_layout("chunked out", out, dtype, q.shape)
    out = to_numpy(out)
    all_finite("chunked out", out)
    check_recompute_count("chunked prefill", recomputed, certain, possible)
    allowed = prefill_allowed(reference, head_dim, softmax_range.phi, xp)
    return within_bound("chunked out", out, reference.out, allowed, reference.magnitude).with_recomputed(recomputed)


def check_ragged(case, xp):
    """A ragged pass: sequence j's chunk, positions [start_j, length_j) of its prompt, attends to its
    cache slot's keys [0, length_j), the chunks of all sequences in one launch (on GPU) or through the
    ragged emulation. Each chunk's rows must meet its prompt's bound against the float64 reference and
    recompute exactly its unsafe rows; on GPU the output also agrees with the ragged emulation."""
    c, dtype = case, storage_dtype(xp)
    softmax_range, head_dim = SoftmaxRange(*c["softmax_range"]), c["head_dim"]
    max_seq = max(length for length, _, _, _ in c["prompts"])
    k_cache, v_cache = (np.zeros((len(c["slots"]) + 1, c["n_kv_heads"], max_seq, head_dim), np.float32)
                        for _ in range(2))
    queries, references, certain, possible = [], [], [], []
    for (length, start, adversarial, seed), slot in zip(c["prompts"], c["slots"]):
        q, k, v = rounded_to(dtype, *prefill_inputs(np.random.default_rng(seed), length, c["n_heads"],
                                                    c["n_kv_heads"], head_dim, c["query_scale"], adversarial))
        k_cache[slot, :, :length], v_cache[slot, :, :length] = k.transpose(1, 0, 2), v.transpose(1, 0, 2)
        reference = prefill_reference(q, k, v)
        unsafe, perhaps = rows_to_recompute(reference, head_dim, softmax_range)
        queries.append(q[start:])
        references.append(reference)
        certain.append(unsafe[start:])
        possible.append(perhaps[start:])
    starts = [start for _, start, _, _ in c["prompts"]]
    reference = dataclasses.replace(references[0], **{  # the chunks' rows of every field, one after another
        field.name: np.concatenate([getattr(r, field.name)[start:] for r, start in zip(references, starts)])
        for field in dataclasses.fields(references[0])})
    certain, possible = np.concatenate(certain), np.concatenate(possible)
    q = np.concatenate(queries)  # [rows, n_heads, head_dim]
    ragged = RaggedQueries(tuple(length - start for length, start, _, _ in c["prompts"]), tuple(c["slots"]),
                           tuple(length for length, _, _, _ in c["prompts"]))
    emulated, emulated_rows = prefill_attention_ragged_emulated(q, k_cache, v_cache, ragged, softmax_range)
    emulated_allowed = prefill_allowed(reference, head_dim, softmax_range.phi, np)
    if not is_gpu(xp):
        return check_emulation(emulated, emulated_rows, reference, emulated_allowed, certain, possible)
    before = attention.recompute_count()
    out = attention.prefill_attention_ragged(*(xp.asarray(array, xp.float16) for array in (q, k_cache, v_cache)),
                                             ragged, softmax_range=softmax_range)
    recomputed = attention.recompute_count() - before
    expect_layout("ragged kernel out", out, np.float16, q.shape)
    out = to_numpy(out)
    all_finite("ragged kernel out", out)
    check_recompute_count("ragged kernel", recomputed, certain, possible)
    allowed = prefill_allowed(reference, head_dim, softmax_range.phi, xp)
    return closest_to_bound(
        within_bound("ragged kernel out", out, reference.out, allowed, reference.magnitude),
        within_bound("ragged kernel out vs emulation", out, emulated.astype(np.float64), allowed + emulated_allowed,
                     reference.magnitude)).with_recomputed(recomputed)


PROPERTIES = (
    Property("prefill_attention", "unified-max causal prefill attention vs float64, recomputed rows counted exactly",
             prefill_cases, check_unified_max),
    Property("prefill_attention_recompute", "rows leaving the safe range take the recompute path: counted, "
             "never NaN/Inf", recompute_cases, check_recompute),
    Property("prefill_attention_sync", "synchronised causal prefill attention vs float64",
             prefill_cases, check_synchronised),
    Property("prefill_attention_chunked", "a prompt prefilled chunk by chunk (queries at a key offset) vs "
             "the whole prompt's float64 reference", chunked_cases, check_chunked),
    Property("prefill_attention_ragged", "a ragged batch: a chunk of each of several prompts against its cache "
             "slot, one launch, vs each prompt's float64 reference, recomputed rows counted", ragged_cases,
             check_ragged),
)
