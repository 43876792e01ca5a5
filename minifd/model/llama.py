"""The Llama decoder, written once against an array module `xp` (numpy on CPU, cupy on GPU).

    token ids -> embedding -> n_layers x [ x += Attention(RMSNorm(x)); x += SwiGLU(RMSNorm(x)) ]
              -> RMSNorm -> LM head -> logits

A prompt is prefilled in one pass (every position at once, causal attention); afterwards each
decode step feeds one token per sequence and attends over that sequence's KV cache. The two hot
spots go through the seams in minifd.kernels: `linear` for every projection and
`prefill_attention` / `decode_attention` for attention.
"""

from dataclasses import dataclass

import numpy as np

from minifd.kernels.attention import decode_attention, prefill_attention
from minifd.kernels.linear import linear
from minifd.backend import module_of
from minifd.model.config import rope_inverse_frequencies


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

def rms_norm(x, weight, eps):
    # x: [rows, hidden], weight: [hidden] -> [rows, hidden]; statistics in float32 whatever x's dtype
    xp = module_of(x)
    x32 = x.astype(xp.float32)
    scale = 1.0 / xp.sqrt((x32 * x32).mean(axis=-1, keepdims=True) + eps)
    return (x32 * scale).astype(x.dtype) * weight


def rope_tables(config, max_seq, xp):
    # -> cos, sin: [max_seq, head_dim // 2] float32, angle = position * inv_freq
    angles = np.outer(np.arange(max_seq, dtype=np.float64), rope_inverse_frequencies(config))
    return xp.asarray(np.cos(angles), dtype=xp.float32), xp.asarray(np.sin(angles), dtype=xp.float32)


def apply_rope(x, cos, sin):
    # x: [rows, heads, head_dim], cos/sin: [rows, head_dim // 2] -> [rows, heads, head_dim]
    # HF "rotate half" convention: dimension i pairs with i + head_dim / 2.
    xp = module_of(x)
    half = x.shape[-1] // 2
    x32 = x.astype(xp.float32)
    first, second = x32[..., :half], x32[..., half:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return xp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1).astype(x.dtype)


def silu_times(gate, up):
    # gate, up: [rows, intermediate] -> SiLU(gate) * up, [rows, intermediate]
    xp = module_of(gate)
    gate32 = gate.astype(xp.float32)
    return (gate32 / (1.0 + xp.exp(-gate32)) * up.astype(xp.float32)).astype(gate.dtype)


@dataclass
class KVCache:
    """Per layer, keys and values of every sequence in the batch, preallocated for max_seq positions."""

    k: list  # n_layers x [batch, n_kv_heads, max_seq, head_dim]
    v: list  # n_layers x [batch, n_kv_heads, max_seq, head_dim]

    @classmethod
    def allocate(cls, config, batch, max_seq, xp, dtype):
        shape = (batch, config.n_kv_heads, max_seq, config.head_dim)
        return cls([xp.zeros(shape, dtype) for _ in range(config.n_layers)],
                   [xp.zeros(shape, dtype) for _ in range(config.n_layers)])

    @property
    def max_seq(self):
        return self.k[0].shape[2]

    def nbytes_per_position(self):
        """Bytes of K and V one cached position holds across all layers."""
        batch, n_kv_heads, _, head_dim = self.k[0].shape
        return 2 * len(self.k) * n_kv_heads * head_dim * self.k[0].itemsize


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class Llama:
    def __init__(self, config, weights, xp, softmax_ranges=None, max_seq=None):
        self.config, self.weights, self.xp = config, weights, xp
        self.dtype = weights.embed.dtype
        self.softmax_ranges = softmax_ranges or [None] * config.n_layers
        self.max_seq = max_seq or config.max_position_embeddings
        self.cos, self.sin = rope_tables(config, self.max_seq, xp)

    def _split_heads(self, qkv):
        # qkv: [rows, (n_heads + 2 * n_kv_heads) * head_dim] -> q: [rows, n_heads, head_dim], k, v: [rows, n_kv_heads, head_dim]
        c = self.config
        q_end, k_end = c.n_heads * c.head_dim, (c.n_heads + c.n_kv_heads) * c.head_dim
        rows = qkv.shape[0]
        return (qkv[:, :q_end].reshape(rows, c.n_heads, c.head_dim),
                qkv[:, q_end:k_end].reshape(rows, c.n_kv_heads, c.head_dim),
                qkv[:, k_end:].reshape(rows, c.n_kv_heads, c.head_dim))

    def _mlp(self, x, layer):
        # x: [rows, hidden] -> x + SwiGLU(RMSNorm(x)), [rows, hidden]
        h = rms_norm(x, layer.mlp_norm, self.config.rms_norm_eps)
        gate_up = linear(h, layer.w_gate_up)  # [rows, 2 * intermediate]
        inner = self.config.intermediate_size
        return x + linear(silu_times(gate_up[:, :inner], gate_up[:, inner:]), layer.w_down)

    def _logits(self, x):
        # x: [rows, hidden] -> [rows, vocab] float32
        h = rms_norm(x, self.weights.norm, self.config.rms_norm_eps)
        return linear(h, self.weights.lm_head).astype(self.xp.float32)

    def prefill(self, cache, slot, token_ids):
        """Run a whole prompt into cache slot `slot`; token_ids: [seq] -> logits of its last position, [vocab]."""
        xp, c = self.xp, self.config
        ids = xp.asarray(np.asarray(token_ids, dtype=np.int64))
        seq = ids.shape[0]
        x = self.weights.embed[ids]  # [seq, hidden]
        cos, sin = self.cos[:seq], self.sin[:seq]
        for i, layer in enumerate(self.weights.layers):
            h = rms_norm(x, layer.attn_norm, c.rms_norm_eps)
            q, k, v = self._split_heads(linear(h, layer.wqkv))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            cache.k[i][slot, :, :seq] = k.transpose(1, 0, 2)
            cache.v[i][slot, :, :seq] = v.transpose(1, 0, 2)
            attention = prefill_attention(q, k, v, softmax_range=self.softmax_ranges[i])  # [seq, n_heads, head_dim]
            x = x + linear(attention.reshape(seq, -1), layer.wo)
            x = self._mlp(x, layer)
        return self._logits(x[-1:])[0]

    def decode(self, cache, token_ids, positions):
        """One step for every sequence of the batch.

        token_ids: [batch] (the newest token of each sequence), positions: [batch] (where it goes in the
        cache, i.e. the sequence's length so far) -> logits: [batch, vocab]
        """
        xp, c = self.xp, self.config
        ids = xp.asarray(token_ids)
        positions = xp.asarray(positions, dtype=xp.int32)
        batch = ids.shape[0]
        rows = xp.arange(batch)
        lengths = positions + 1
        x = self.weights.embed[ids]  # [batch, hidden]
        cos, sin = self.cos[positions], self.sin[positions]
        for i, layer in enumerate(self.weights.layers):
            h = rms_norm(x, layer.attn_norm, c.rms_norm_eps)
            q, k, v = self._split_heads(linear(h, layer.wqkv))
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            cache.k[i][rows, :, positions] = k
            cache.v[i][rows, :, positions] = v
            attention = decode_attention(q, cache.k[i], cache.v[i], lengths, softmax_range=self.softmax_ranges[i])
            x = x + linear(attention.reshape(batch, -1), layer.wo)
            x = self._mlp(x, layer)
        return self._logits(x)

