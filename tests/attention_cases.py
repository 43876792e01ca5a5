"""Shared by the attention tests: float64 oracles, random inputs with adversarial rows, GPU access."""

import math

import numpy as np
import pytest

from minifd.backend import cupy_or_none


def gpu_cupy():
    """CuPy with a usable GPU, or skip the test."""
    cupy = cupy_or_none()
    if cupy is None:
        pytest.skip("needs a CUDA or ROCm GPU through CuPy")
    return cupy


# ----------------------------------------------------------------------------------------------
# Oracles
# ----------------------------------------------------------------------------------------------

def decode_scores(q, k_cache, lengths):
    """float64 scaled scores s = q.k / sqrt(d) of each (sequence, query head) row over its valid keys:
    q: [batch, n_heads, head_dim]; k_cache: [batch, n_kv_heads, max_seq, head_dim] -> list (per b) of [n_heads, length]"""
    batch, n_heads, head_dim = q.shape
    n_kv_heads = k_cache.shape[1]
    rows = []
    for b in range(batch):
        query = np.asarray(q[b], np.float64).reshape(n_kv_heads, n_heads // n_kv_heads, head_dim)
        keys = np.asarray(k_cache[b, :, :lengths[b]], np.float64)  # [n_kv_heads, length, head_dim]
        rows.append((query @ keys.transpose(0, 2, 1)).reshape(n_heads, -1) / math.sqrt(head_dim))
    return rows


def decode_oracle(q, k_cache, v_cache, lengths):
    """float64 decode attention: -> [batch, n_heads, head_dim]; a sequence of length 0 gives zeros."""
    batch, n_heads, head_dim = q.shape
    n_kv_heads = k_cache.shape[1]
    out = np.zeros((batch, n_heads, head_dim))
    for b, scores in enumerate(decode_scores(q, k_cache, lengths)):
        if lengths[b] == 0:
            continue
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        p = (p / p.sum(axis=-1, keepdims=True)).reshape(n_kv_heads, n_heads // n_kv_heads, -1)
        values = np.asarray(v_cache[b, :, :lengths[b]], np.float64)  # [n_kv_heads, length, head_dim]
        out[b] = (p @ values).reshape(n_heads, head_dim)
    return out


def prefill_scores(q, k):
    """float64 scaled causal scores: q: [seq, n_heads, d]; k: [seq, n_kv_heads, d] -> [n_heads, seq, seq], -inf above the diagonal"""
    seq, n_heads, head_dim = q.shape
    keys = np.repeat(np.asarray(k, np.float64), n_heads // k.shape[1], axis=1)
    scores = np.einsum("shd,thd->hst", np.asarray(q, np.float64), keys) / math.sqrt(head_dim)
    return np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)


def outside_window(scores, softmax_range):
    """scores: float64 array (-inf = masked) -> bool, same shape: the entries that leave phi + (low, high)."""
    shifted = scores - softmax_range.phi
    return np.isfinite(scores) & ~((shifted > softmax_range.low) & (shifted < softmax_range.high))


def near_window_edge(scores, softmax_range, margin=1e-2):
    """True if any score is so close to a window edge that float32 rounding could decide its side."""
    shifted = scores[np.isfinite(scores)] - softmax_range.phi
    return bool(np.any(np.abs(shifted - softmax_range.low) < margin) or np.any(np.abs(shifted - softmax_range.high) < margin))


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

def aim_at_key(query, key, score):
    """A query row whose scaled score against `key` is `score` (it points along the key)."""
    head_dim = key.shape[-1]
    return key * (score * math.sqrt(head_dim) / float(key @ key))


def decode_inputs(rng, batch, n_heads, n_kv_heads, head_dim, max_seq, lengths, query_scale, adversarial_scores=()):
    """Standard normal K/V cache and queries times query_scale (float32). adversarial_scores: a
    score per chosen row; row (b, h) = (i % batch, (7 i) % n_heads) is aimed at its first key so that
    its score there takes that value."""
    q = (rng.standard_normal((batch, n_heads, head_dim)) * query_scale).astype(np.float32)
    k_cache = rng.standard_normal((batch, n_kv_heads, max_seq, head_dim)).astype(np.float32)
    v_cache = rng.standard_normal((batch, n_kv_heads, max_seq, head_dim)).astype(np.float32)
    group = n_heads // n_kv_heads
    for i, score in enumerate(adversarial_scores):
        b, h = i % batch, (7 * i) % n_heads
        q[b, h] = aim_at_key(q[b, h], k_cache[b, h // group, 0].astype(np.float64), score)
    return q, k_cache, v_cache, np.asarray(lengths, np.int32)


def prefill_inputs(rng, seq, n_heads, n_kv_heads, head_dim, query_scale, adversarial_scores=()):
    """q: [seq, n_heads, d] normal times query_scale, k, v: [seq, n_kv_heads, d] normal (float32);
    adversarial_scores: row i (query (13 i) % seq, head i % n_heads) is aimed at key 0 with that score."""
    q = (rng.standard_normal((seq, n_heads, head_dim)) * query_scale).astype(np.float32)
    k = rng.standard_normal((seq, n_kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((seq, n_kv_heads, head_dim)).astype(np.float32)
    group = n_heads // n_kv_heads
    for i, score in enumerate(adversarial_scores):
        row, h = (13 * i) % seq, i % n_heads
        q[row, h] = aim_at_key(q[row, h], k[0, h // group].astype(np.float64), score)
    return q, k, v


def as_float16(*arrays):
    """Round to float16 and back to float32, so CPU and GPU see identical values."""
    return tuple(np.asarray(a, np.float16).astype(np.float32) for a in arrays)
