"""Decode attention properties: the unified-max split-KV kernel on CUDA cores (decode_attention.cu)
and on tensor cores (decode_attention_mma.cu), or their NumPy emulations on the CPU, their recompute
path, and the synchronised baseline (decode_attention_sync.cu), each against the float64 reference.

Tolerance: attention_reference's bound, per output element, from the output dtype (float16 on GPU,
float32 on CPU), the row's number of keys n (the reduction length of the softmax sums: 2 (n + 4) u32)
and head_dim d (the reduction length of each score: 2 (d + 2) u32 times the score's magnitude). The
tensor-core kernel rounds every weight p to tf32 before it multiplies v and is summed, a relative
error of at most u_p = 2^-11 per weight (tf32 has float32's exponent, so no p of the safe window is
subnormal there), and the same on its emulation; through the seam the bound is that of the kernel
the plan runs. The relative error is |out - out64| / (softmax(s) @ |v|). Recomputed rows are counted
exactly: a row must be recomputed iff a float64 score leaves phi + (low, high); rows with a score
within float32 rounding of a window edge may go either way, and only those.
"""

import numpy as np
from hypothesis import strategies as st

from minifd.backend import is_gpu, to_numpy
from minifd.kernels import attention
from minifd.kernels.decode_attention import UNIFIED_MAX_KERNEL, decode_attention_emulated, decode_attention_gpu
from minifd.kernels.decode_attention_mma import (PROBABILITY_ROUNDOFF, TENSOR_CORE_KERNEL,
                                                 decode_attention_mma_emulated)
from minifd.kernels.decode_attention_sync import decode_attention_sync_emulated
from minifd.kernels.decode_split_kv import SPLIT_SIZES, plan_for
from minifd.kernels.softmax_range import SoftmaxRange
from minifd.properties.attention_reference import (attention_allowed, check_emulation, check_recompute_count,
                                                   decode_inputs, decode_reference, recompute_strategy, rounded_to,
                                                   rows_outside_window)
from minifd.properties.registry import SEEDS, Property, storage_dtype
from minifd.properties.tolerance import PropertyFailure, all_finite, closest_to_bound, expect_layout, within_bound

# Scores aimed at by adversarial rows: all outside the default window (-60, 60); -1000 and 400
# underflow or overflow float32's exp2 against phi = 0.
ADVERSARIAL_SCORES = (-1000.0, -300.0, -75.0, 75.0, 120.0, 400.0)
# (phi, low, high): the default, a calibrated-looking one, and two whose phi is far from every score.
SOFTMAX_RANGES = ((0.0, -60.0, 60.0), (-4.0, -50.0, 40.0), (100.0, -60.0, 60.0), (-100.0, -60.0, 60.0))
# Every score of a normal row lies 140 or more below phi = 200 (exp2 underflows to 0) or above phi = -200 (overflows).
EVERY_ROW_RANGES = ((200.0, -60.0, 60.0), (-200.0, -60.0, 60.0))
# Cache capacities: up to the limit, plus long ones (which take many splits).
MAX_SEQ = {"cpu": (700, (2048, 5000)), "gpu": (4096, (8192, 32768))}


@st.composite
def decode_cases(draw, backend, adversarial=None, softmax_ranges=None):
    """-> a case: shapes, ragged lengths, query scale, adversarial row scores, a softmax range
    (phi, low, high), the split size and the NumPy seed of the inputs. adversarial, softmax_ranges:
    strategies replacing the defaults (up to 3 adversarial rows; any of SOFTMAX_RANGES)."""
    if adversarial is None:
        adversarial = st.lists(st.sampled_from(ADVERSARIAL_SCORES), max_size=3)
    if softmax_ranges is None:
        softmax_ranges = st.sampled_from(SOFTMAX_RANGES)
    limit, long_lengths = MAX_SEQ[backend]
    n_kv_heads = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 3, 4, 8]))
    max_seq = draw(st.one_of(st.integers(1, limit), st.sampled_from(long_lengths)))
    batch = draw(st.integers(1, 4))
    return dict(batch=batch, n_heads=n_kv_heads * group, n_kv_heads=n_kv_heads,
                head_dim=draw(st.sampled_from([64, 128])), max_seq=max_seq,
                lengths=draw(st.lists(st.integers(1, max_seq), min_size=batch, max_size=batch)),
                query_scale=draw(st.sampled_from([0.1, 1.0, 3.0])), adversarial=draw(adversarial),
                softmax_range=draw(softmax_ranges), keys_per_split=draw(st.sampled_from(SPLIT_SIZES)),
                seed=draw(SEEDS))


def recompute_cases(backend):
    return recompute_strategy(decode_cases, backend, ADVERSARIAL_SCORES, SOFTMAX_RANGES[0], EVERY_ROW_RANGES)


def case_inputs(case, xp):
    """-> q, k_cache, v_cache (float32 NumPy holding values of the backend's dtype), lengths (int32)."""
    c = case
    q, k_cache, v_cache, lengths = decode_inputs(np.random.default_rng(c["seed"]), c["batch"], c["n_heads"],
                                                 c["n_kv_heads"], c["head_dim"], c["max_seq"], c["lengths"],
                                                 c["query_scale"], c["adversarial"])
    return (*rounded_to(storage_dtype(xp), q, k_cache, v_cache), lengths)


def _on_device(xp, q, k_cache, v_cache, lengths):
    dtype = storage_dtype(xp)
    return xp.asarray(q, dtype), xp.asarray(k_cache, dtype), xp.asarray(v_cache, dtype), xp.asarray(lengths)


# ----------------------------------------------------------------------------------------------
# The properties
# ----------------------------------------------------------------------------------------------

def seam_probability_roundoff(xp, q, k_cache, v_cache, lengths):
    """u_p of the unified-max kernel the seam runs for these device arrays (its plan's choice): tf32's
    on tensor cores, 0 on CUDA cores and on the CPU (whose seam runs decode_attention_emulated)."""
    if not is_gpu(xp):
        return 0.0
    plan, _ = plan_for(UNIFIED_MAX_KERNEL, TENSOR_CORE_KERNEL, q, k_cache, v_cache, lengths)
    return PROBABILITY_ROUNDOFF if plan.tensor_cores else 0.0


def check_unified_max_kernel(case, xp, tensor_cores):
    """The unified-max kernel on CUDA cores or on tensor cores at the case's split size (its launcher
    with the choice forced and a counter of its own), or its emulation on the CPU: output within the
    bound, exactly the rows outside the window recomputed; on GPU also the emulation's output and
    count, and the seam (its own split size and kernel, the global counter on the device)."""
    q, k_cache, v_cache, lengths = case_inputs(case, xp)
    softmax_range, head_dim = SoftmaxRange(*case["softmax_range"]), case["head_dim"]
    emulate, roundoff = ((decode_attention_mma_emulated, PROBABILITY_ROUNDOFF) if tensor_cores
                         else (decode_attention_emulated, 0.0))
    reference = decode_reference(q, k_cache, v_cache, lengths)
    certain, possible = rows_outside_window(reference, head_dim, softmax_range)
    emulated, emulated_rows = emulate(q, k_cache, v_cache, lengths, softmax_range, case["keys_per_split"])
    emulated_allowed = attention_allowed(reference, head_dim, softmax_range.phi, emulated.dtype, roundoff)
    if not is_gpu(xp):
        return check_emulation(emulated, emulated_rows, reference, emulated_allowed, certain, possible)
    counter = xp.zeros(1, xp.uint64)
    device = _on_device(xp, q, k_cache, v_cache, lengths)
    out = decode_attention_gpu(*device, softmax_range, counter, case["keys_per_split"], tensor_cores=tensor_cores)
    expect_layout("kernel out", out, np.float16, q.shape)
    out, recomputed = to_numpy(out), int(to_numpy(counter)[0])
    all_finite("kernel out", out)
    check_recompute_count("kernel", recomputed, certain, possible)
    if (certain == possible).all() and recomputed != emulated_rows:
        raise PropertyFailure(f"kernel recomputed {recomputed} rows, the emulation {emulated_rows}")
    allowed = attention_allowed(reference, head_dim, softmax_range.phi, out.dtype, roundoff)
    before = attention.recompute_count()
    seam_out = attention.decode_attention(*device, softmax_range=softmax_range)
    check_recompute_count("seam", attention.recompute_count() - before, certain, possible)
    seam_allowed = attention_allowed(reference, head_dim, softmax_range.phi, out.dtype,
                                     seam_probability_roundoff(xp, *device))
    return closest_to_bound(
        within_bound("kernel out", out, reference.out, allowed, reference.magnitude),
        within_bound("kernel out vs emulation", out, emulated.astype(np.float64), allowed + emulated_allowed,
                     reference.magnitude),
        within_bound("seam out", to_numpy(seam_out), reference.out, seam_allowed, reference.magnitude),
    ).with_recomputed(recomputed)


def check_unified_max(case, xp):
    return check_unified_max_kernel(case, xp, tensor_cores=False)


def check_tensor_cores(case, xp):
    return check_unified_max_kernel(case, xp, tensor_cores=True)


def check_recompute(case, xp):
    """Through the attention seam (its own split size, the global recompute counter): rows whose
    scores overflow or underflow exp2 against phi are recomputed, at least one, and never give NaN
    or Inf."""
    q, k_cache, v_cache, lengths = case_inputs(case, xp)
    softmax_range, head_dim = SoftmaxRange(*case["softmax_range"]), case["head_dim"]
    reference = decode_reference(q, k_cache, v_cache, lengths)
    certain, possible = rows_outside_window(reference, head_dim, softmax_range)
    device = _on_device(xp, q, k_cache, v_cache, lengths)
    before = attention.recompute_count()
    out = attention.decode_attention(*device, softmax_range=softmax_range)
    recomputed = attention.recompute_count() - before
    expect_layout("seam out", out, storage_dtype(xp), q.shape)
    out = to_numpy(out)
    all_finite("out", out)
    if recomputed == 0:
        raise PropertyFailure(f"no row took the recompute path; {int(certain.sum())} have scores outside the window")
    check_recompute_count("recompute counter", recomputed, certain, possible)
    allowed = attention_allowed(reference, head_dim, softmax_range.phi, out.dtype,
                                seam_probability_roundoff(xp, *device))
    return within_bound("out", out, reference.out, allowed, reference.magnitude).with_recomputed(recomputed)


def check_synchronised(case, xp):
    """The synchronised split-KV kernel (through the seam, method="sync", which recomputes nothing)
    or its emulation at the case's split size, against the reference."""
    q, k_cache, v_cache, lengths = case_inputs(case, xp)
    reference = decode_reference(q, k_cache, v_cache, lengths)
    if is_gpu(xp):
        before = attention.recompute_count()
        out = attention.decode_attention(*_on_device(xp, q, k_cache, v_cache, lengths), method="sync")
        if attention.recompute_count() != before:
            raise PropertyFailure("the synchronised kernel counted recomputed rows")
        expect_layout("kernel out", out, np.float16, q.shape)
        out = to_numpy(out)
    else:
        out = decode_attention_sync_emulated(q, k_cache, v_cache, lengths, case["keys_per_split"])
    all_finite("out", out)
    # The running max is the reference: phi plays no part.
    allowed = attention_allowed(reference, case["head_dim"], 0.0, out.dtype)
    return within_bound("out", out, reference.out, allowed, reference.magnitude)


PROPERTIES = (
    Property("decode_attention", "unified-max split-KV decode attention on CUDA cores vs float64, recomputed rows "
             "counted exactly",
             decode_cases, check_unified_max),
    Property("decode_attention_mma", "unified-max split-KV decode attention on tensor cores (p in tf32) vs "
             "float64, recomputed rows counted exactly", decode_cases, check_tensor_cores),
    Property("decode_attention_recompute", "rows leaving the window take the recompute path: counted, never NaN/Inf",
             recompute_cases, check_recompute),
    Property("decode_attention_sync", "synchronised split-KV decode attention vs float64",
             decode_cases, check_synchronised),
)
