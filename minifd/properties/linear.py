"""Linear-layer properties: the GEMV (gemv.cu), the flat GEMM (flat_gemm.cu) and the dispatcher that
picks between them and the library GEMM, each against the float64 product y64 = x64 @ w64^T.

Tolerance, elementwise, for inputs exactly representable in their dtype (reduction length K):

    |y - y64| <= u_out |y64| + (1 + u_out) 2 (K + 1) u32 (|x64| @ |w64|^T) + floor_out

- each product x_k w_k is exact in float32 for float16 inputs and off by <= u32 |x_k w_k| for
  float32 inputs; summing K terms in float32 in any order (K tiles, lanes, split partials) adds at
  most K u32 sum |x_k w_k| (the classic gamma_K bound); the factor 2 covers tensor-core
  accumulators, which need not round to nearest;
- rounding the float32 result to the output dtype adds u_out |y| (u_out = 2^-11 for float16, 2^-24
  for float32) and, in the subnormal ranges, the floor floor_out = 2^-24 for float16 and 2^-149 per
  rounded operation, (K + 1) of them, for float32 (tolerance.absolute_floor);
- the library GEMM (ImplC: cuBLAS, or CuPy's own kernels for vector shapes) may round each product
  to the input dtype before the float32 sum (CuPy 14 does for M = N = 1 in float16), so its bound
  adds u_in (|x64| @ |w64|^T), u_in the unit roundoff of the inputs' dtype.

The relative error reported is |y - y64| / (|x64| @ |w64|^T), the error against the size of the
terms summed: near 2 K u32 means the accumulation, near u_out |y64| / magnitude the output rounding.
"""

import os
import tempfile
from contextlib import contextmanager

import numpy as np
from hypothesis import strategies as st

import minifd.kernels.linear as linear_seam
from minifd.backend import is_gpu, to_numpy
from minifd.kernels import dispatch
from minifd.kernels.flat_gemm import FlatGemmGeometry, flat_gemm_emulated, flat_gemm_gpu
from minifd.kernels.gemv import gemv_emulated, gemv_gpu
from minifd.kernels.rms_norm import RMSNorm
from minifd.kernels.rope import Rotary, pair_rotary_rows
from minifd.model.quantized import GROUP, QUANTIZERS, placed
from minifd.properties.registry import SEEDS, Property, storage_dtype
from minifd.properties.tolerance import (U32, PropertyFailure, absolute_floor, closest_to_bound, exactly_equal,
                                         expect_layout, relative_scale, unit_roundoff, within_bound)

# Sizes: on GPU, K up to 1100 crosses a staged GEMV chunk for M_TILE = 8 (1024 halves) and covers
# K % 8 != 0 (the 2-byte paths); N up to 700 gives ragged flat-GEMM tiles and, for small N, split K.
EPS = 1e-5  # the fused norm's epsilon
SIZES = {"cpu": dict(m=300, n=300, k=700), "gpu": dict(m=300, n=700, k=1100)}


# ----------------------------------------------------------------------------------------------
# Operands, reference and bound
# ----------------------------------------------------------------------------------------------

def random_operands(rng, m, n, k, dtype):
    """-> x: [m, k], w: [n, k] of `dtype` with values in [-1, 1)."""
    x = rng.uniform(-1, 1, (m, k)).astype(dtype)
    w = rng.uniform(-1, 1, (n, k)).astype(dtype)
    return x, w


def misaligned_on_device(array):
    """-> a contiguous CuPy copy of `array` starting 2 bytes past a 16-byte boundary, so a kernel must
    take its 2-byte-load path."""
    import cupy

    storage = cupy.empty(array.size + 1, dtype=array.dtype)
    storage[1:] = cupy.asarray(array).ravel()
    return storage[1:].reshape(array.shape)


def product_reference(x, w):
    """x: [M, K], w: [N, K] (NumPy) -> [M, N] float64."""
    return x.astype(np.float64) @ w.astype(np.float64).T


def product_magnitude(x, w):
    """x: [M, K], w: [N, K] -> [M, N] float64: |x| @ |w|^T, the size of the terms each output sums."""
    return np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T


def product_allowed(x, w, out_dtype, library=False):
    """x: [M, K], w: [N, K] (NumPy) -> [M, N] float64: the largest error an implementation may make;
    library: the library GEMM computed it (its products may be rounded to the inputs' dtype)."""
    u_out = unit_roundoff(out_dtype)
    accumulation = 2 * (x.shape[1] + 1) * U32 + (unit_roundoff(x.dtype) if library else 0.0)
    return (u_out * np.abs(product_reference(x, w))
            + (1 + u_out) * accumulation * product_magnitude(x, w) + absolute_floor(out_dtype, x.shape[1] + 1))


def check_product(what, y, x, w, library=False):
    """y: [M, N] (NumPy) computed from x, w (by the library GEMM if `library`) -> Outcome; raises
    PropertyFailure naming the worst element."""
    return within_bound(what, y, product_reference(x, w), product_allowed(x, w, y.dtype, library),
                        product_magnitude(x, w))


def _operands(case, xp):
    return random_operands(np.random.default_rng(case["seed"]), case["m"], case["n"], case["k"], storage_dtype(xp))


# ----------------------------------------------------------------------------------------------
# GEMV and flat GEMM
# ----------------------------------------------------------------------------------------------

def product_cases(backend):
    """-> a case {m, n, k, seed}."""
    sizes = SIZES[backend]
    return st.fixed_dictionaries(dict(m=st.integers(1, sizes["m"]), n=st.integers(1, sizes["n"]),
                                      k=st.integers(1, sizes["k"]), seed=SEEDS))


def flat_gemm_cases(backend):
    """-> a product case; on the CPU also the geometry (warps, pieces) whose K split the emulation follows."""
    cases = product_cases(backend)
    if backend == "gpu":
        return cases
    geometries = st.builds(FlatGemmGeometry, warps=st.sampled_from((2, 4, 8)), pieces=st.sampled_from((1, 2, 4)))
    return st.tuples(cases, geometries).map(lambda pair: {**pair[0], "geometry": pair[1]})


def check_gemv(case, xp):
    """gemv.cu (float16) or its emulation (float32) against the float64 product."""
    x, w = _operands(case, xp)
    if is_gpu(xp):
        y = gemv_gpu(xp.asarray(x), xp.asarray(w))
    else:
        y = gemv_emulated(x, w)
    expect_layout("y", y, storage_dtype(xp), (case["m"], case["n"]))
    return check_product("y", to_numpy(y), x, w)


def check_flat_gemm(case, xp):
    """flat_gemm.cu (float16) or its emulation (float32, split by warp as the case's geometry
    splits K) against the float64 product; on GPU a second launch (the warps' partials are added in
    a fixed order, never by atomics) gives the same bits."""
    x, w = _operands(case, xp)
    if not is_gpu(xp):
        y = flat_gemm_emulated(x, w, geometry=case["geometry"])
        expect_layout("y", y, np.float32, (case["m"], case["n"]))
        return check_product("y", y, x, w)
    x_gpu, w_gpu = xp.asarray(x), xp.asarray(w)
    y = flat_gemm_gpu(x_gpu, w_gpu)
    expect_layout("y", y, np.float16, (case["m"], case["n"]))
    exactly_equal("replayed y", to_numpy(flat_gemm_gpu(x_gpu, w_gpu)), to_numpy(y))
    return check_product("y", to_numpy(y), x, w)


# ----------------------------------------------------------------------------------------------
# The fused steps of the flat GEMM and the GEMV
# ----------------------------------------------------------------------------------------------
# y = residual + Gate(W a), a = x g / rms(x), each step optional (flat_gemm.cu, gemv.cu). Bound, elementwise,
# with T = rinv64 (|a64| @ |W64|^T) the size of the terms a row of W sums (rinv64 = 1 without norm):
# - staging a = x g rounds once to the kernel's input dtype (u_in: float16 on GPU, float32 on CPU),
#   and the float32 sum adds the product bound's 2 (K + 1) u32: e_s = (u_in + 2 (K + 2) u32) T;
# - 1 / rms: K squares summed in float32 ((K + 1) u32), the mean, + eps and rsqrt (4 u32), halved
#   by the square root, then one more product: (K / 2 + 6) u32 |s64|;
# - gated, out = SiLU(G) U with |SiLU'| <= 1.1: 1.1 e_G (|U64| + e_U) + |SiLU(G64)| e_U, plus 8 u32
#   |out64| for exp, the add, the division and the product (as silu_mul's property);
# - residual: the float32 add rounds once, u32 |y64|;
# - the store rounds to the output dtype: u_out |y64| + floor_out (tolerance.absolute_floor, with
#   K + 12 rounded float32 operations behind each element).
# The relative error reported is against the magnitude the bound scales with (T, or for the gate
# 1.1 T_G |U64| + |SiLU(G64)| T_U).
# Quantized weights (quantized_product): the oracle multiplies by the float64 dequantization of the
# codes, d q + m; the kernels rebuild each weight with one float32 rounding (GEMV, u32 |w|) or that
# and a float16 one (the flat GEMM's MMA operand, u16 |w| more), which adds u_w T to e_s.

FUSED_STEPS = {"flat_gemm": ("norm", "residual", "gated", "gated_norm"), "gemv": ("norm", "residual", "gated", "gated_norm")}


def fused_product_cases(backend):
    """-> a case {impl, steps, m, n, k, seed}: the kernel, which fused steps run, and the product's
    sizes (n is rounded up to whole 16-row tiles when gated)."""
    sizes = SIZES[backend]
    kernels = st.one_of(*(st.tuples(st.just(impl), st.sampled_from(steps)) for impl, steps in FUSED_STEPS.items()))
    sized = st.fixed_dictionaries(dict(m=st.integers(1, 70 if backend == "gpu" else 20), n=st.integers(1, 320),
                                       k=st.integers(1, sizes["k"]), seed=SEEDS))
    return st.tuples(kernels, sized).map(lambda pair: {"impl": pair[0][0], "steps": pair[0][1], **pair[1]})


def quantized_product_cases(backend):
    """-> a fused_product case with a quantized weight: {format, impl, steps, m, n, k, seed}, K a
    multiple of the group (32); steps include the plain product (store)."""
    groups = (SIZES[backend]["k"] + GROUP - 1) // GROUP
    kernels = st.tuples(st.sampled_from(tuple(FUSED_STEPS)), st.sampled_from(("store",) + FUSED_STEPS["gemv"]))
    sized = st.fixed_dictionaries(dict(format=st.sampled_from(tuple(QUANTIZERS)),
                                       m=st.integers(1, 64 if backend == "gpu" else 20), n=st.integers(1, 320),
                                       k=st.integers(1, groups).map(lambda g: GROUP * g), seed=SEEDS))
    return st.tuples(kernels, sized).map(lambda pair: {"impl": pair[0][0], "steps": pair[0][1], **pair[1]})


def product_weight(w, case, xp):
    """w: [N, K] (NumPy) -> (the weight the kernel takes, in module xp; its float64 values, the
    oracle's; the unit roundoff of the kernel's rebuilding of one weight from it). With a "format"
    in the case, w is quantized to it first."""
    if case.get("format") is None:
        return xp.asarray(w), w.astype(np.float64), 0.0
    quantized = QUANTIZERS[case["format"]](w)
    rebuilt = U32 + (unit_roundoff(np.float16) if case["impl"] == "flat_gemm" else 0.0)
    return placed(quantized, xp), quantized.dequantize(np.float64), rebuilt


def silu64(values):
    return values / (1.0 + np.exp(-values))


def check_fused_product(case, xp):
    """flat_gemm.cu or gemv.cu with a norm prologue, a residual or SwiGLU epilogue (float16), or
    their emulations (float32), against the same steps in float64; with a "format" in the case, of
    the weight quantized to it."""
    dtype = storage_dtype(xp)
    norm_in, gated = case["steps"] in ("norm", "gated_norm"), case["steps"] in ("gated", "gated_norm")
    m, k = case["m"], case["k"]
    n = -(-case["n"] // 16) * 16 if gated else case["n"]
    rng = np.random.default_rng(case["seed"])
    x, w = random_operands(rng, m, n, k, dtype)
    gain = rng.uniform(-2.0, 2.0, k).astype(dtype)
    residual = rng.uniform(-4.0, 4.0, (m, n)).astype(dtype) if case["steps"] == "residual" else None

    weight, w64, weight_rounding = product_weight(w, case, xp)
    x64, gain64 = x.astype(np.float64), gain.astype(np.float64)
    rinv64 = 1.0 / np.sqrt((x64 * x64).mean(axis=-1, keepdims=True) + EPS) if norm_in else np.ones((m, 1))
    a64 = x64 * gain64 if norm_in else x64  # [m, k]
    s64 = (a64 @ w64.T) * rinv64  # [m, n]
    terms = (np.abs(a64) @ np.abs(w64).T) * rinv64  # [m, n]: T
    error_s = (unit_roundoff(dtype) + weight_rounding + 2 * (k + 2) * U32) * terms + ((k / 2 + 6) * U32 * np.abs(s64) if norm_in else 0.0)
    if gated:
        tiles = lambda v: v.reshape(m, n // 16, 2, 8)  # noqa: E731 - [m, tile, gate | up, 8]
        gate, up = tiles(s64)[:, :, 0].reshape(m, -1), tiles(s64)[:, :, 1].reshape(m, -1)
        error_gate, error_up = (tiles(error_s)[:, :, h].reshape(m, -1) for h in (0, 1))
        terms_gate, terms_up = (tiles(terms)[:, :, h].reshape(m, -1) for h in (0, 1))
        reference = silu64(gate) * up
        error = 1.1 * error_gate * (np.abs(up) + error_up) + np.abs(silu64(gate)) * error_up + 8 * U32 * np.abs(reference)
        magnitude = 1.1 * terms_gate * np.abs(up) + np.abs(silu64(gate)) * terms_up
    elif residual is not None:
        reference = s64 + residual.astype(np.float64)
        error, magnitude = error_s + U32 * np.abs(reference), terms + np.abs(residual.astype(np.float64))
    else:
        reference, error, magnitude = s64, error_s, terms
    u_out = unit_roundoff(dtype)
    allowed = error * (1 + u_out) + u_out * np.abs(reference) + absolute_floor(dtype, k + 12)

    norm = RMSNorm(xp.asarray(gain), EPS) if norm_in else None
    arguments = dict(norm=norm, residual=None if residual is None else xp.asarray(residual), gated=gated)
    if case["impl"] == "gemv":
        kernel = gemv_gpu if is_gpu(xp) else gemv_emulated
    else:
        kernel = flat_gemm_gpu if is_gpu(xp) else flat_gemm_emulated
    y = kernel(xp.asarray(x), weight, **arguments)
    expect_layout("y", y, dtype, reference.shape)
    return within_bound("y", to_numpy(y), reference, allowed, relative_scale(magnitude, unit_roundoff(dtype), dtype))


# ----------------------------------------------------------------------------------------------
# The QKV projection with RoPE and the KV-cache write in its epilogue (gemv.cu and flat_gemm.cu)
# ----------------------------------------------------------------------------------------------
# Tolerance: the product s = RMSNorm(x) W^T carries fused_product's e_s per element (its norm
# prologue included). A rotary pair (a, b) -> (a cos - b sin, b cos + a sin) with |cos|, |sin| <= 1
# carries e_a + e_b from its inputs and, from the float32 tables (u32 each), two rounded products
# and the add, 4 u32 (|a| + |b|): the rope property's bound. v is stored unrotated (e_s). Then the
# store rounds to the output dtype: u_out |r64| + floor_out. Cache entries the call does not write
# must stay exactly as they were. The projection goes through linear(), which decides whether the
# norm rides in the product's prologue (rotary_norm) or runs first (rotary: the flat GEMM over
# quantized weights); either rounds the normed x once, to float16, before the MMA or the FMAs.

@st.composite
def rotary_product_cases(draw, backend):
    """-> a decode-shaped QKV projection: the product (GEMV or flat GEMM) and weight format, rows m
    (one per cache slot), K (whole groups of 32 when quantized), the heads and head_dim (a multiple of
    16: the epilogue's pair tile is 8), every slot's position, and the seed."""
    impl, weight_format = draw(st.sampled_from(tuple(FUSED_STEPS))), draw(st.sampled_from((None,) + tuple(QUANTIZERS)))
    m = draw(st.integers(1, 8 if backend == "gpu" else 4))
    max_seq = draw(st.integers(1, 40))
    n_kv_heads = draw(st.integers(1, 2))
    k = draw(st.integers(1, SIZES[backend]["k"]))
    k = k if weight_format is None else -(-k // GROUP) * GROUP
    return dict(impl=impl, format=weight_format, m=m, k=k, head_dim=draw(st.sampled_from([16, 64, 128])),
                n_kv_heads=n_kv_heads, n_heads=n_kv_heads * draw(st.integers(1, 3)), max_seq=max_seq,
                positions=draw(st.lists(st.integers(0, max_seq - 1), min_size=m, max_size=m)), seed=draw(SEEDS))


def check_rotary_product(case, xp):
    """q and the written cache rows of the fused QKV projection vs the float64 product, rotated."""
    dtype, c = storage_dtype(xp), case
    m, k, head_dim, n_heads, n_kv_heads = c["m"], c["k"], c["head_dim"], c["n_heads"], c["n_kv_heads"]
    heads, half = n_heads + 2 * n_kv_heads, head_dim // 2
    rng = np.random.default_rng(c["seed"])
    x, w = random_operands(rng, m, heads * head_dim, k, dtype)  # w: natural rows
    gain = rng.uniform(-2.0, 2.0, k).astype(dtype)
    angles = np.outer(np.arange(c["max_seq"], dtype=np.float64),
                      10000.0 ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))  # [max_seq, half]
    cache_shape = (m, n_kv_heads, c["max_seq"], head_dim)
    k_cache, v_cache = (rng.standard_normal(cache_shape).astype(dtype) for _ in range(2))
    positions, slots = np.array(c["positions"], np.int32), np.arange(m, dtype=np.int32)

    weight, w64, weight_rounding = product_weight(w, case, xp)
    x64, gain64 = x.astype(np.float64), gain.astype(np.float64)
    rinv64 = 1.0 / np.sqrt((x64 * x64).mean(axis=-1, keepdims=True) + EPS)  # [m, 1]
    s64 = ((x64 * gain64) @ w64.T * rinv64).reshape(m, heads, head_dim)  # [m, heads, head_dim] natural
    terms = ((np.abs(x64 * gain64) @ np.abs(w64).T) * rinv64).reshape(s64.shape)
    error_s = (unit_roundoff(dtype) + weight_rounding + 2 * (k + 2) * U32) * terms + (k / 2 + 6) * U32 * np.abs(s64)
    cos64, sin64 = np.cos(angles)[positions][:, None], np.sin(angles)[positions][:, None]  # [m, 1, half]
    first, second = s64[..., :half], s64[..., half:]
    rotated = np.concatenate([first * cos64 - second * sin64, second * cos64 + first * sin64], axis=-1)
    pair_error = error_s[..., :half] + error_s[..., half:]
    pair_size = np.abs(first) + np.abs(second)
    rotation_error = np.concatenate([pair_error + 4 * U32 * pair_size] * 2, axis=-1)  # [m, heads, head_dim]
    rotary_magnitude = np.concatenate([terms[..., :half] + terms[..., half:]] * 2, axis=-1)  # what errors scale with
    u_out = unit_roundoff(dtype)

    def allowed(reference, error):
        return error * (1 + u_out) + u_out * np.abs(reference) + absolute_floor(dtype, k + 16)

    paired_w = np.concatenate([pair_rotary_rows(w[:(n_heads + n_kv_heads) * head_dim], head_dim),
                               w[(n_heads + n_kv_heads) * head_dim:]])
    device_k, device_v = xp.asarray(k_cache), xp.asarray(v_cache)
    rotary = Rotary(xp.asarray(np.cos(angles).astype(np.float32)), xp.asarray(np.sin(angles).astype(np.float32)),
                    xp.asarray(positions), xp.asarray(slots), device_k, device_v)
    paired_weight = product_weight(paired_w, case, xp)[0]
    q = linear_seam.linear(xp.asarray(x), paired_weight, norm=RMSNorm(xp.asarray(gain), EPS), rotary=rotary, impl=c["impl"])
    expect_layout("q", q, dtype, (m, n_heads, head_dim))

    expected_q = rotated[:, :n_heads]
    k_heads, v_heads = slice(n_heads, n_heads + n_kv_heads), slice(n_heads + n_kv_heads, heads)
    expected_k, expected_v = k_cache.astype(np.float64), v_cache.astype(np.float64)
    allowed_k, allowed_v = np.zeros(cache_shape), np.zeros(cache_shape)  # unwritten entries: exact
    scale_k, scale_v = np.abs(expected_k), np.abs(expected_v)
    expected_k[slots, :, positions] = rotated[:, k_heads]
    allowed_k[slots, :, positions] = allowed(rotated[:, k_heads], rotation_error[:, k_heads])
    scale_k[slots, :, positions] = relative_scale(rotary_magnitude[:, k_heads], u_out, dtype)
    expected_v[slots, :, positions] = s64[:, v_heads]
    allowed_v[slots, :, positions] = allowed(s64[:, v_heads], error_s[:, v_heads])
    scale_v[slots, :, positions] = relative_scale(terms[:, v_heads], u_out, dtype)
    return closest_to_bound(
        within_bound("q", to_numpy(q), expected_q, allowed(expected_q, rotation_error[:, :n_heads]),
                     relative_scale(rotary_magnitude[:, :n_heads], u_out, dtype)),
        within_bound("k_cache", to_numpy(device_k), expected_k, allowed_k, scale_k),
        within_bound("v_cache", to_numpy(device_v), expected_v, allowed_v, scale_v))


# ----------------------------------------------------------------------------------------------
# The dispatcher
# ----------------------------------------------------------------------------------------------

def dispatch_cases(backend):
    """-> a case: a product {m, n, k, seed}, the thresholds (m1, m2) a temporary table gives its
    weight shape, and the implementation forced on the seam (None: the dispatcher chooses)."""
    sizes = SIZES[backend]
    return st.fixed_dictionaries(dict(
        m=st.integers(1, sizes["m"]), n=st.integers(1, sizes["n"]), k=st.integers(1, sizes["k"]),
        m1=st.integers(1, 40), span=st.integers(0, 100), impl=st.sampled_from((None,) + dispatch.IMPLEMENTATIONS),
        seed=SEEDS))


def expected_choice(m, m1, m2):
    return "gemv" if m < m1 else "flat_gemm" if m < m2 else "library"


@contextmanager
def temporary_table(devices):
    """Point the dispatcher at a temporary cache directory holding `devices` as its table."""
    previous = os.environ.get("MINIFD_CACHE")
    with tempfile.TemporaryDirectory() as directory:
        os.environ["MINIFD_CACHE"] = directory
        try:
            dispatch.write_table(dispatch.table_path(), devices)
            yield
        finally:
            if previous is None:
                del os.environ["MINIFD_CACHE"]
            else:
                os.environ["MINIFD_CACHE"] = previous
            dispatch.forget_tables()


@contextmanager
def recording_implementations(on_gpu):
    """Wrap the seam's implementations (its private name -> function table) so each call notes its
    name -> the list of names that ran; the table is restored afterwards."""
    table = linear_seam._GPU if on_gpu else linear_seam._CPU
    originals = dict(table)
    ran = []
    for name, implementation in originals.items():
        table[name] = (lambda x, w, name=name, implementation=implementation, **fused:
                       ran.append(name) or implementation(x, w, **fused))
    try:
        yield ran
    finally:
        table.update(originals)


def check_dispatch(case, xp):
    """With a temporary table for this device and weight shape, `choose_implementation` follows it
    (and the defaults elsewhere: another shape, another device), `linear` runs the implementation it
    chose, or the forced one, and its result meets the product bound."""
    m, n, k, m1 = case["m"], case["n"], case["k"], case["m1"]
    m2 = m1 + case["span"]
    device = dispatch.gpu_properties().name if is_gpu(xp) else dispatch.CPU_DEVICE_NAME
    default = expected_choice(m, *dispatch.DEFAULT_THRESHOLDS)
    x, w = _operands(case, xp)
    with temporary_table({device: {dispatch.shape_key(n, k): {"m1": m1, "m2": m2, "max_m": 256}}}):
        choices = (dispatch.choose_implementation(m, n, k, device), dispatch.choose_implementation(m, n, k + 1, device),
                   dispatch.choose_implementation(m, n, k, device + " (another)"))
        if choices != (expected_choice(m, m1, m2), default, default):
            raise PropertyFailure(f"table M1={m1} M2={m2} at M={m}: chose {choices[0]} (tuned shape), {choices[1]} "
                                  f"(untuned shape), {choices[2]} (untuned device); expected "
                                  f"{expected_choice(m, m1, m2)}, {default}, {default}")
        with recording_implementations(is_gpu(xp)) as ran:
            y = linear_seam.linear(xp.asarray(x), xp.asarray(w), impl=case["impl"])
    expected_run = case["impl"] or expected_choice(m, m1, m2)
    if ran != [expected_run]:
        raise PropertyFailure(f"linear ran {ran}, expected [{expected_run!r}] "
                              f"(impl={case['impl']!r}, M1={m1}, M2={m2})")
    expect_layout("y", y, storage_dtype(xp), (m, n))
    return check_product("y", to_numpy(y), x, w, library=expected_run == "library")


PROPERTIES = (
    Property("gemv", "GEMV (ImplA) vs the float64 product", product_cases, check_gemv),
    Property("flat_gemm", "flat GEMM, flat in M (ImplB) vs the float64 product", flat_gemm_cases, check_flat_gemm),
    Property("fused_product", "flat GEMM and GEMV with an RMSNorm prologue, a residual or SwiGLU epilogue vs float64",
             fused_product_cases, check_fused_product),
    Property("quantized_product", "flat GEMM and GEMV reading int8 / int4 weights, fused steps and all, "
             "vs float64 on the dequantized weights", quantized_product_cases, check_fused_product),
    Property("rotary_product", "the QKV product (GEMV, flat GEMM; fp16, int8, int4) with RoPE and the KV-cache write "
             "in its epilogue vs float64",
             rotary_product_cases, check_rotary_product),
    Property("dispatch", "the seam runs what a temporary dispatch table says (or the forced implementation)",
             dispatch_cases, check_dispatch),
)
