"""Float64 attention references, the error bound of an attention kernel, and random inputs with
adversarial rows: shared by the decode and prefill attention properties.

The bound, for output element (row r, dimension c) of a row that attends to n keys, with
s_j = q.k_j / sqrt(d) the scores, w_j = softmax(s)_j and S = sum_j w_j |v_jc| (float64):

    |out - out64| <= (2 eps_r + 2 (n + 4) u32) S + u_out |out64| + floor_out
    eps_r = u32 (2 (d + 2) sigma_r + 3 R_r + 16) + u_p

- Each weight p_j = exp(s_j - reference) is computed with a relative error of at most eps_r:
  the score is a float32 dot product of d terms (<= (d + 2) u32 sigma_r absolutely, sigma_r = the
  row's largest sum_i |q_i k_ji| / sqrt(d), including the rounding of q times the scale; the
  factor 2 covers tensor-core accumulators, which need not round to nearest); subtracting the
  reference (phi or the running max) rounds by u32 |s_j - reference| <= u32 R_r with
  R_r = 2 max_j |s_j| + |phi|; exp2 is within 2 ulps (4 u32); rescaling split or tile partials to a
  common reference costs two more exp2 and products (2 u32 R_r + 12 u32 more); and u_p is the
  rounding of p itself where a kernel stores it in a narrower type (float16 for tensor cores).
- Perturbing every weight by a factor (1 + eps_j), |eps_j| <= eps, moves the normalised average
  sum_j w_j v_j by at most 2 eps S (first order; the constants above absorb the second).
- The float32 sums of n terms in the numerator and denominator, in any order, and the division add
  at most 2 (n + 4) u32 S; rounding the result to the output dtype adds u_out |out64| + floor_out,
  the subnormal floor (tolerance.absolute_floor: 2^-24 for float16; for float32 2^-149 per rounded
  operation, here the n + d + 8 of the scores, the sums and the division).

The relative error a property reports is |out - out64| / S: the error against the average size of
the values the row mixes. Inputs are first rounded to the kernel's dtype, so the reference sees
exactly what the kernel sees.
"""

import math
from dataclasses import dataclass

import numpy as np

from minifd.properties.tolerance import (U32, PropertyFailure, absolute_floor, all_finite, unit_roundoff,
                                        within_bound)


@dataclass(frozen=True)
class AttentionReference:
    """float64 attention of every row, with the magnitudes its error bound is made of. Rows are
    [batch, n_heads] for decode and [seq, n_heads] for prefill."""

    out: np.ndarray  # [*rows, head_dim]: softmax(s) @ v
    magnitude: np.ndarray  # [*rows, head_dim]: softmax(s) @ |v|, the S of the bound
    keys: np.ndarray  # [*rows]: n, the keys the row attends to
    score_magnitude: np.ndarray  # [*rows]: sigma, max over keys of sum_i |q_i k_i| / sqrt(head_dim)
    min_score: np.ndarray  # [*rows]: smallest scaled score s (+inf for a row without keys)
    max_score: np.ndarray  # [*rows]: largest scaled score s (-inf for a row without keys)
    log_sum_exp: np.ndarray  # [*rows]: log sum_j exp(s_j) (-inf for a row without keys)
    largest_value: np.ndarray  # [*rows, head_dim]: max over the row's keys of |v|

    @property
    def largest_score(self):
        """[*rows]: max_j |s_j| (0 for rows without keys)."""
        return np.where(self.keys > 0, np.maximum(np.abs(self.min_score), np.abs(self.max_score)), 0.0)


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------

def _attend(query, keys, values, causal=None):
    """query: [n_q, g, d] (g query heads sharing one KV head); keys, values: [n, d] float64;
    causal: None or [n_q, n] bool -> out, magnitude [n_q, g, d]; sigma, min s, max s,
    log sum exp(s) [n_q, g]; largest |v| [n_q, 1, d]."""
    n_q, group, head_dim = query.shape
    flat = query.reshape(n_q * group, head_dim)  # one large product instead of n_q small ones
    scores = (flat @ keys.T).reshape(n_q, group, -1) / math.sqrt(head_dim)  # [n_q, g, n]
    sigma = (np.abs(flat) @ np.abs(keys).T).reshape(n_q, group, -1) / math.sqrt(head_dim)  # [n_q, g, n]
    if causal is None:
        largest_value = np.abs(values).max(axis=0)[None, None, :]  # [1, 1, d]
    else:
        scores = np.where(causal[:, None, :], scores, -np.inf)
        sigma = np.where(causal[:, None, :], sigma, 0.0)
        largest_value = np.maximum.accumulate(np.abs(values), axis=0)[:, None, :]  # query r sees keys 0..r
    max_score = scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores - max_score)
    total = weights.sum(axis=-1, keepdims=True)
    weights = (weights / total).reshape(n_q * group, -1)
    finite = np.isfinite(scores)
    return ((weights @ values).reshape(n_q, group, -1), (weights @ np.abs(values)).reshape(n_q, group, -1),
            sigma.max(axis=-1),
            np.where(finite, scores, np.inf).min(axis=-1), max_score[..., 0], (max_score + np.log(total))[..., 0],
            largest_value)


def decode_reference(q, k_cache, v_cache, lengths):
    """q: [batch, n_heads, head_dim]; k_cache, v_cache: [batch, n_kv_heads, max_seq, head_dim];
    lengths: [batch] -> AttentionReference over rows [batch, n_heads]; a sequence of length 0 gives zeros."""
    batch, n_heads, head_dim = q.shape
    n_kv_heads = k_cache.shape[1]
    group = n_heads // n_kv_heads
    out, magnitude, largest_value = (np.zeros((batch, n_heads, head_dim)) for _ in range(3))
    sigma, keys = np.zeros((batch, n_heads)), np.zeros((batch, n_heads))
    min_score = np.full((batch, n_heads), np.inf)
    max_score, log_sum_exp = np.full((batch, n_heads), -np.inf), np.full((batch, n_heads), -np.inf)
    for b in range(batch):
        n = int(lengths[b])
        if n == 0:
            continue
        keys[b] = n
        for kv in range(n_kv_heads):
            heads = slice(kv * group, (kv + 1) * group)
            query = np.asarray(q[b, heads], np.float64)[None]  # [1, group, head_dim]
            key_rows, value_rows = (np.asarray(cache[b, kv, :n], np.float64) for cache in (k_cache, v_cache))  # [n, d]
            parts = _attend(query, key_rows, value_rows)
            (out[b, heads], magnitude[b, heads], sigma[b, heads], min_score[b, heads], max_score[b, heads],
             log_sum_exp[b, heads], largest_value[b, heads]) = (part[0] for part in parts)
    return AttentionReference(out, magnitude, keys, sigma, min_score, max_score, log_sum_exp, largest_value)


def prefill_reference(q, k, v):
    """q: [seq, n_heads, head_dim]; k, v: [seq, n_kv_heads, head_dim] -> AttentionReference over
    rows [seq, n_heads] of causal attention (query r sees keys 0..r)."""
    seq, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    group = n_heads // n_kv_heads
    causal = np.tril(np.ones((seq, seq), bool))
    out, magnitude, largest_value = (np.zeros((seq, n_heads, head_dim)) for _ in range(3))
    sigma, min_score, max_score, log_sum_exp = (np.zeros((seq, n_heads)) for _ in range(4))
    for kv in range(n_kv_heads):
        heads = slice(kv * group, (kv + 1) * group)
        (out[:, heads], magnitude[:, heads], sigma[:, heads], min_score[:, heads], max_score[:, heads],
         log_sum_exp[:, heads], largest_value[:, heads]) = _attend(
            np.asarray(q[:, heads], np.float64), np.asarray(k[:, kv], np.float64), np.asarray(v[:, kv], np.float64),
            causal)
    keys = np.broadcast_to(np.arange(1, seq + 1, dtype=np.float64)[:, None], (seq, n_heads))
    return AttentionReference(out, magnitude, keys, sigma, min_score, max_score, log_sum_exp, largest_value)


# ----------------------------------------------------------------------------------------------
# The bound, and which rows leave the safe window
# ----------------------------------------------------------------------------------------------

def probability_error(reference, head_dim, phi, probability_roundoff=0.0):
    """[*rows]: eps_r, the relative error of each weight exp(s - reference) (see the module docstring)."""
    reach = 2.0 * reference.largest_score + abs(phi)
    return U32 * (2 * (head_dim + 2) * reference.score_magnitude + 3 * reach + 16) + probability_roundoff


def attention_allowed(reference, head_dim, phi, out_dtype, probability_roundoff=0.0):
    """-> [*rows, head_dim] float64: the largest |out - out64| the module docstring's bound allows."""
    eps = probability_error(reference, head_dim, phi, probability_roundoff)
    per_row = 2 * eps + 2 * (reference.keys + 4) * U32  # [*rows]
    return (per_row[..., None] * reference.magnitude + unit_roundoff(out_dtype) * np.abs(reference.out)
            + absolute_floor(out_dtype, reference.keys[..., None] + head_dim + 8))


def score_uncertainty(reference, head_dim, softmax_range):
    """[*rows]: how far float32 rounding may move a score, or the window edges it is compared with
    (in natural units): a score closer than this to an edge may fall on either side of it."""
    edges = abs(softmax_range.phi) + abs(softmax_range.low) + abs(softmax_range.high)
    return U32 * (2 * (head_dim + 2) * reference.score_magnitude + 2.0 * reference.largest_score + 2 * edges + 8)


def rows_outside_window(reference, head_dim, softmax_range):
    """-> (certain, possible): [*rows] bool, rows with a score surely / perhaps outside
    phi + (low, high) once float32 rounding is accounted for. They differ only for rows whose scores
    touch a window edge within score_uncertainty."""
    margin = score_uncertainty(reference, head_dim, softmax_range)
    low = softmax_range.phi + softmax_range.low
    high = softmax_range.phi + softmax_range.high
    certain = (reference.min_score < low - margin) | (reference.max_score > high + margin)
    possible = (reference.min_score <= low + margin) | (reference.max_score >= high - margin)
    return certain, possible


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

def aim_at_key(key, score):
    """A query row whose scaled score against `key` ([head_dim] float64) is `score` (it points along the key)."""
    head_dim = key.shape[-1]
    return key * (score * math.sqrt(head_dim) / float(key @ key))


def decode_inputs(rng, batch, n_heads, n_kv_heads, head_dim, max_seq, lengths, query_scale, adversarial_scores=()):
    """-> q: [batch, n_heads, head_dim] standard normal times query_scale; k_cache, v_cache:
    [batch, n_kv_heads, max_seq, head_dim] standard normal (float32); lengths: [batch] int32.
    adversarial_scores: a score per chosen row; row (b, h) = (i % batch, (7 i) % n_heads) is aimed at
    its first key so that its score there takes that value."""
    q = (rng.standard_normal((batch, n_heads, head_dim), np.float32) * np.float32(query_scale))
    k_cache = rng.standard_normal((batch, n_kv_heads, max_seq, head_dim), np.float32)
    v_cache = rng.standard_normal((batch, n_kv_heads, max_seq, head_dim), np.float32)
    group = n_heads // n_kv_heads
    for i, score in enumerate(adversarial_scores):
        b, h = i % batch, (7 * i) % n_heads
        q[b, h] = aim_at_key(k_cache[b, h // group, 0].astype(np.float64), score)
    return q, k_cache, v_cache, np.asarray(lengths, np.int32)


def prefill_inputs(rng, seq, n_heads, n_kv_heads, head_dim, query_scale, adversarial_scores=()):
    """-> q: [seq, n_heads, head_dim] standard normal times query_scale; k, v: [seq, n_kv_heads,
    head_dim] standard normal (float32). adversarial_scores: row i (query (13 i) % seq, head
    i % n_heads) is aimed at key 0 with that score."""
    q = rng.standard_normal((seq, n_heads, head_dim), np.float32) * np.float32(query_scale)
    k = rng.standard_normal((seq, n_kv_heads, head_dim), np.float32)
    v = rng.standard_normal((seq, n_kv_heads, head_dim), np.float32)
    group = n_heads // n_kv_heads
    for i, score in enumerate(adversarial_scores):
        row, h = (13 * i) % seq, i % n_heads
        q[row, h] = aim_at_key(k[0, h // group].astype(np.float64), score)
    return q, k, v


def rounded_to(dtype, *arrays):
    """The arrays' values rounded to `dtype`, kept as float32: what a kernel of that dtype sees."""
    return tuple(np.asarray(a, dtype).astype(np.float32) for a in arrays)


def check_recompute_count(what, recomputed, certain, possible):
    """recomputed must lie between the rows surely (certain) and perhaps (possible) outside the window."""
    low, high = int(certain.sum()), int(possible.sum())
    if not low <= recomputed <= high:
        expected = str(low) if low == high else f"{low} to {high}"
        raise PropertyFailure(f"{what}: {recomputed} rows recomputed, float64 scores say {expected}")


def recompute_strategy(cases, backend, adversarial_scores, default_range, every_row_ranges):
    """Cases where rows must be recomputed: every row (phi far from all scores) or at least one
    adversarial row (under default_range). cases(backend, adversarial=..., softmax_ranges=...) draws one."""
    from hypothesis import strategies as st

    every_row = cases(backend, adversarial=st.just([]), softmax_ranges=st.sampled_from(every_row_ranges))
    adversarial_rows = cases(backend, adversarial=st.lists(st.sampled_from(adversarial_scores), min_size=1,
                                                           max_size=3),
                             softmax_ranges=st.just(default_range))
    return st.one_of(every_row, adversarial_rows)


def check_emulation(emulated, emulated_rows, reference, allowed, certain, possible):
    """The CPU half of an attention property: the emulation's output finite and within `allowed` of
    the reference, and its recompute count between the rows surely and perhaps outside the window."""
    all_finite("emulated out", emulated)
    check_recompute_count("emulation", emulated_rows, certain, possible)
    result = within_bound("emulated out", emulated, reference.out, allowed, reference.magnitude)
    return result.with_recomputed(emulated_rows)
