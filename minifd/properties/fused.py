"""Properties of the small kernels around the large products: rms_norm, rope_and_cache (with the
KV-cache write) and silu_mul, each against minifd.oracle in float64 (the flat GEMM folds rms_norm and
silu_mul into its own prologue and epilogue: minifd/properties/linear.py covers that).
On GPU each kernel also agrees with the NumPy path of the same function on the same float16 inputs
(bit for bit where the kernel promises it, else within the sum of the two bounds), with inputs at
16-byte aligned addresses (the 8-wide kernels) or 2 bytes past one (the scalar kernels).

Tolerances, elementwise, with u_out the unit roundoff of the output dtype (2^-11 float16, 2^-24
float32), floor_out the subnormal floor (tolerance.absolute_floor: 2^-24 for float16, 2^-149 per
rounded operation for float32: hidden + 6 for rms_norm, 4 for rope, 8 for silu_mul), and every input exactly
representable in its dtype:
- rms_norm over a row of `hidden`: the sum of `hidden` squares (positive terms, any order) is off
  by at most hidden u32 relatively, the division by hidden, + eps, sqrt and 1 / x add 4 u32, the
  square root halves the rest, and h * scale * weight rounds twice more:
      |normed - normed64| <= (u_out + (1 + u_out)(hidden / 2 + 6) u32) |normed64| + floor_out,
  relative error against |normed64|.
- rope (a two-term reduction per element, a cos - b sin): the float32 tables are off by u32, the two
  products and their difference round once each:
      |out - out64| <= u_out |out64| + (1 + u_out) 4 u32 (|a| + |b|) + floor_out,
  relative error against |a| + |b| (the pair the element rotates). v and the untouched cache
  entries are exact.
- silu_mul (no reduction; exp within 2 ulps, then an add, a division and a product):
      |out - out64| <= (u_out + (1 + u_out) 8 u32) |out64| + floor_out,
  relative error against |out64|. exp(-gate) overflows float32 below gate = -ln(FLT_MAX) = -88.72:
  there the float32 formula gives gate / inf = -0, its limit, and the reference takes that value
  (the exact |SiLU(gate) up| is below 1e-36 |up|); within 1e-4 of that gate either is allowed.
Each relative error is taken against its magnitude plus floor_out over the relative bound
(tolerance.relative_scale), so that float16's subnormal outputs read like normal ones.
"""

import numpy as np
from hypothesis import strategies as st

from minifd import oracle
from minifd.backend import is_gpu, to_numpy
from minifd.kernels.rms_norm import rms_norm
from minifd.kernels.rope import pair_rotary_rows, rope_and_cache
from minifd.kernels.silu_mul import interleave_gate_up, silu_mul
from minifd.properties.registry import SEEDS, Property, storage_dtype
from minifd.properties.tolerance import (U32, absolute_floor, closest_to_bound, exactly_equal, expect_layout,
                                         relative_scale, unit_roundoff, within_bound)

EPS = 1e-5
# exp(-gate) overflows float32 for gate below this: -ln(largest float32).
OVERFLOWING_GATE = -float(np.log(np.finfo(np.float32).max))


def on_device(xp, array, aligned=True):
    """NumPy array -> contiguous xp copy (the kernels write some arguments in place); on GPU with
    aligned=False it starts 2 bytes past a 16-byte boundary (the scalar kernels). None stays None."""
    if array is None or not is_gpu(xp) or aligned:
        return None if array is None else xp.array(array)
    device = xp.empty(array.size + 1, dtype=array.dtype)[1:].reshape(array.shape)
    device[...] = xp.asarray(array)
    return device


def _alignment(backend):
    """GPU cases draw whether inputs are 16-byte aligned; on the CPU alignment means nothing."""
    return st.booleans() if backend == "gpu" else st.just(True)


# ----------------------------------------------------------------------------------------------
# rms_norm
# ----------------------------------------------------------------------------------------------

# Non-multiples of 8 run the scalar kernel; 12296 makes each of 1024 threads take two 8-wide chunks.
RMS_HIDDEN = {"cpu": st.one_of(st.integers(1, 40), st.sampled_from([64, 576, 1000])),
              "gpu": st.one_of(st.integers(1, 40), st.sampled_from([64, 576, 1000, 1027, 4096, 12296]))}


def rms_norm_cases(backend):
    return st.fixed_dictionaries(dict(
        rows=st.integers(1, 6 if backend == "cpu" else 40), hidden=RMS_HIDDEN[backend],
        scale=st.sampled_from([0.05, 1.0, 30.0]), aligned=_alignment(backend),
        seed=SEEDS))


def rms_norm_bound(hidden, dtype):
    """-> the relative bound of normed (module docstring)."""
    u_out = unit_roundoff(dtype)
    return u_out + (1 + u_out) * (hidden / 2 + 6) * U32


def check_rms_norm(case, xp):
    """normed against oracle.rms_norm of x."""
    dtype = storage_dtype(xp)
    rng = np.random.default_rng(case["seed"])
    rows, hidden, scale = case["rows"], case["hidden"], case["scale"]
    x = (rng.standard_normal((rows, hidden)) * scale).astype(dtype)  # [rows, hidden]
    weight = rng.uniform(-2.0, 2.0, hidden).astype(dtype)  # [hidden]
    normed = rms_norm(*(on_device(xp, a, case["aligned"]) for a in (x, weight)), EPS)
    expect_layout("normed", normed, dtype, x.shape)
    normed = to_numpy(normed)
    reference = oracle.rms_norm(x.astype(np.float64), weight.astype(np.float64), EPS)
    relative = rms_norm_bound(hidden, dtype)
    allowed = relative * np.abs(reference) + absolute_floor(dtype, hidden + 6)
    scale = relative_scale(np.abs(reference), relative, dtype)
    outcome = within_bound("normed", normed, reference, allowed, scale)
    if is_gpu(xp):
        within_bound("normed vs the NumPy path", normed, rms_norm(x, weight, EPS).astype(np.float64), 2 * allowed, scale)
    return outcome


# ----------------------------------------------------------------------------------------------
# rope_and_cache
# ----------------------------------------------------------------------------------------------

@st.composite
def rope_cases(draw, backend):
    """-> sizes and the (slot, position) of every row, for a decode call (one row per cache slot,
    ragged positions) or a prefill call (one slot, positions 0..seq-1), with grouped-query heads.
    64 and 128 run the 8-wide kernel; the other head sizes (head_dim % 16 != 0) the scalar one."""
    n_kv_heads = draw(st.integers(1, 3))
    batch, max_seq = draw(st.integers(1, 4 if backend == "cpu" else 8)), draw(st.integers(1, 48))
    if draw(st.booleans()):  # decode: row b is the newest token of slot b
        slots = list(range(batch))
        positions = draw(st.lists(st.integers(0, max_seq - 1), min_size=batch, max_size=batch))
    else:  # prefill of one slot
        seq = draw(st.integers(1, max_seq))
        slots, positions = [draw(st.integers(0, batch - 1))] * seq, list(range(seq))
    return dict(head_dim=draw(st.sampled_from([2, 6, 10, 24, 64, 128])), n_kv_heads=n_kv_heads,
                n_heads=n_kv_heads * draw(st.integers(1, 4)), batch=batch, max_seq=max_seq, slots=slots,
                positions=positions, theta=draw(st.sampled_from([10000.0, 500000.0])),
                aligned=draw(_alignment(backend)), seed=draw(SEEDS))


def rope_inputs(case, dtype):
    """-> inv_freq: [head_dim // 2] float64; cos, sin: [max_seq, head_dim // 2] float32 (as
    llama.rope_tables makes them); qkv: [rows, (n_heads + 2 n_kv_heads) head_dim];
    k_cache, v_cache: [batch, n_kv_heads, max_seq, head_dim], of `dtype`."""
    c = case
    rng = np.random.default_rng(c["seed"])
    inv_freq = c["theta"] ** (-np.arange(0, c["head_dim"], 2, dtype=np.float64) / c["head_dim"])
    angles = np.outer(np.arange(c["max_seq"], dtype=np.float64), inv_freq)
    qkv = rng.standard_normal((len(c["positions"]), (c["n_heads"] + 2 * c["n_kv_heads"]) * c["head_dim"])).astype(dtype)
    cache_shape = (c["batch"], c["n_kv_heads"], c["max_seq"], c["head_dim"])
    k_cache, v_cache = (rng.standard_normal(cache_shape).astype(dtype) for _ in range(2))
    return inv_freq, np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32), qkv, k_cache, v_cache


def paired_columns(qkv, n_heads, n_kv_heads, head_dim):
    """qkv: [rows, (n_heads + 2 n_kv_heads) head_dim] with every head in natural order -> the same
    values with the q and k heads in the paired layout rope_and_cache reads (rope.py)."""
    rotary = (n_heads + n_kv_heads) * head_dim
    return np.concatenate([pair_rotary_rows(qkv[:, :rotary].T, head_dim).T, qkv[:, rotary:]], axis=1)


def _pair_magnitude(x):
    # x: [..., head_dim] -> [..., head_dim] float64: |x_i| + |x_(i +- half)|, the pair element i rotates
    half = x.shape[-1] // 2
    pair = np.abs(x[..., :half]) + np.abs(x[..., half:])
    return np.concatenate([pair, pair], axis=-1)


def check_rope(case, xp):
    """q and the written k rows against oracle.rope, v written exactly, every other cache entry untouched."""
    c, dtype = case, storage_dtype(xp)
    inv_freq, cos, sin, qkv, k_cache, v_cache = rope_inputs(case, dtype)
    positions, slots = np.array(c["positions"], np.int32), np.array(c["slots"], np.int32)
    rows, n_heads, n_kv_heads, head_dim = len(positions), c["n_heads"], c["n_kv_heads"], c["head_dim"]
    paired = paired_columns(qkv, n_heads, n_kv_heads, head_dim)
    device = [on_device(xp, paired, c["aligned"])] + [on_device(xp, a)
                                                      for a in (cos, sin, positions, slots, k_cache, v_cache)]
    q = rope_and_cache(*device)
    expect_layout("q", q, dtype, (rows, n_heads, head_dim))
    q, k_out, v_out = to_numpy(q), to_numpy(device[-2]), to_numpy(device[-1])

    heads = qkv.astype(np.float64).reshape(rows, n_heads + 2 * n_kv_heads, head_dim)
    k_heads, v_heads = heads[:, n_heads:n_heads + n_kv_heads], qkv.reshape(heads.shape)[:, n_heads + n_kv_heads:]
    u_out = unit_roundoff(dtype)

    def allowed(reference, pair):
        return u_out * np.abs(reference) + (1 + u_out) * 4 * U32 * pair + absolute_floor(dtype, 4)

    def scale(pair):  # |reference| <= pair: the bound relative to the pair is at most this
        return relative_scale(pair, u_out + (1 + u_out) * 4 * U32, dtype)

    expected_q = oracle.rope(heads[:, :n_heads], positions.astype(np.float64), inv_freq)
    expected_k = k_cache.astype(np.float64)  # untouched entries: exact (allowed 0)
    allowed_k, scale_k = np.zeros(k_cache.shape), np.abs(expected_k)
    expected_k[slots, :, positions] = oracle.rope(k_heads, positions.astype(np.float64), inv_freq)
    allowed_k[slots, :, positions] = allowed(expected_k[slots, :, positions], _pair_magnitude(k_heads))
    scale_k[slots, :, positions] = scale(_pair_magnitude(k_heads))
    expected_v = v_cache.copy()
    expected_v[slots, :, positions] = v_heads
    exactly_equal("v_cache", v_out, expected_v)
    q_pairs = _pair_magnitude(heads[:, :n_heads])
    outcome = closest_to_bound(within_bound("q", q, expected_q, allowed(expected_q, q_pairs), scale(q_pairs)),
                               within_bound("k_cache", k_out, expected_k, allowed_k, scale_k))
    if is_gpu(xp):  # the kernel rounds each product like NumPy does: bit-identical to the NumPy path
        numpy_q = rope_and_cache(paired, cos, sin, positions, slots, k_cache, v_cache)
        exactly_equal("q vs the NumPy path", q, numpy_q)
        exactly_equal("k_cache vs the NumPy path", k_out, k_cache)
        exactly_equal("v_cache vs the NumPy path", v_out, v_cache)
    return outcome


# ----------------------------------------------------------------------------------------------
# silu_mul
# ----------------------------------------------------------------------------------------------

# Features come in whole interleaved tiles of 8 (silu_mul.py); unaligned inputs run the scalar
# kernel; gate scale 100 drives exp(-gate) to overflow.
SILU_INTERMEDIATE = {"cpu": st.sampled_from([8, 16, 40, 64, 1536]),
                     "gpu": st.sampled_from([8, 16, 40, 64, 1536, 11008, 14336])}


def silu_mul_cases(backend):
    return st.fixed_dictionaries(dict(
        rows=st.integers(1, 8 if backend == "cpu" else 40), intermediate=SILU_INTERMEDIATE[backend],
        gate_scale=st.sampled_from([0.1, 3.0, 100.0]), aligned=_alignment(backend), seed=SEEDS))


def check_silu_mul(case, xp):
    """SiLU(gate) * up against oracle.silu in float64."""
    dtype = storage_dtype(xp)
    rows, intermediate = case["rows"], case["intermediate"]
    rng = np.random.default_rng(case["seed"])
    gate = rng.standard_normal((rows, intermediate)) * case["gate_scale"]
    up = rng.standard_normal((rows, intermediate))
    gate_up = interleave_gate_up(gate.T, up.T).T.astype(dtype)  # [rows, 2 * intermediate], tiles of gate | up
    out = silu_mul(on_device(xp, gate_up, case["aligned"]))
    expect_layout("out", out, dtype, (rows, intermediate))
    out = to_numpy(out)
    gate64, up64 = gate.astype(dtype).astype(np.float64), up.astype(dtype).astype(np.float64)
    exact = oracle.silu(gate64) * up64
    reference = np.where(gate64 < OVERFLOWING_GATE, 0.0, exact)  # the float32 limit, -0 (see the docstring)
    u_out = unit_roundoff(dtype)
    relative = u_out + (1 + u_out) * 8 * U32
    allowed = (relative * np.abs(reference) + absolute_floor(dtype, 8)
               + np.where(np.abs(gate64 - OVERFLOWING_GATE) < 1e-4, np.abs(exact), 0.0))
    scale = relative_scale(np.abs(reference), relative, dtype)
    outcome = within_bound("out", out, reference, allowed, scale)
    if is_gpu(xp):
        within_bound("out vs the NumPy path", out, silu_mul(gate_up).astype(np.float64), 2 * allowed, scale)
    return outcome


PROPERTIES = (
    Property("rms_norm", "RMSNorm vs float64", rms_norm_cases, check_rms_norm),
    Property("rope", "RoPE with the fused KV-cache write vs float64", rope_cases, check_rope),
    Property("silu_mul", "SiLU(gate) * up vs float64", silu_mul_cases, check_silu_mul),
)
