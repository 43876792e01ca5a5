"""Attention seam: decode (one query per sequence against the KV cache) and causal prefill."""

import math


def decode_attention(q, k_cache, v_cache, lengths, softmax_range=None):
    """Attention of one new query token per sequence over that sequence's cached keys and values.

    q: [batch, n_heads, head_dim]; k_cache, v_cache: [batch, n_kv_heads, max_seq, head_dim];
    lengths: [batch] int (valid cache entries per sequence) -> [batch, n_heads, head_dim]
    """
    xp = _xp(q)
    batch, n_heads, head_dim = q.shape
    group = n_heads // k_cache.shape[1]
    out = xp.empty(q.shape, dtype=q.dtype)
    for b in range(batch):
        n = int(lengths[b])
        k = xp.repeat(k_cache[b, :, :n], group, axis=0)  # [n_heads, n, head_dim]
        v = xp.repeat(v_cache[b, :, :n], group, axis=0)
        scores = xp.einsum("hd,hnd->hn", q[b], k) / math.sqrt(head_dim)  # [n_heads, n]
        p = xp.exp(scores - scores.max(axis=-1, keepdims=True))
        out[b] = xp.einsum("hn,hnd->hd", p / p.sum(axis=-1, keepdims=True), v)
    return out


def prefill_attention(q, k, v, softmax_range=None):
    """Causal self-attention over a whole prompt.

    q: [seq, n_heads, head_dim]; k, v: [seq, n_kv_heads, head_dim] -> [seq, n_heads, head_dim]
    """
    xp = _xp(q)
    seq, n_heads, head_dim = q.shape
    group = n_heads // k.shape[1]
    k = xp.repeat(k, group, axis=1)
    v = xp.repeat(v, group, axis=1)
    scores = xp.einsum("shd,thd->hst", q, k) / math.sqrt(head_dim)  # [n_heads, seq, seq]
    future = xp.triu(xp.ones((seq, seq), dtype=bool), k=1)
    scores = xp.where(future, -xp.inf, scores)
    p = xp.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return xp.einsum("hst,thd->shd", p, v).astype(q.dtype)


def load_softmax_ranges(weights_dir, n_layers):
    """Per-layer unified-max settings; none yet: the running-max softmax above needs none."""
    return [None] * n_layers


def _xp(array):
    import numpy

    return numpy if isinstance(array, numpy.ndarray) else __import__("cupy")
