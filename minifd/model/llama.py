"""The Llama decoder, written once against an array module `xp` (numpy on CPU, cupy on GPU).

    token ids -> embedding -> n_layers x [ x += Attention(RMSNorm(x)); x += SwiGLU(RMSNorm(x)) ]
              -> RMSNorm -> LM head -> logits

A prompt is prefilled in one pass (every position at once, causal attention); afterwards each
decode step feeds one token per sequence and attends over that sequence's KV cache. The two hot
spots go through the seams in minifd.kernels: `linear` for every projection and
`prefill_attention` / `decode_attention` for attention; the small steps between them (RMSNorm with
the residual add, RoPE with the KV-cache write, SiLU(gate) * up) are one fused kernel each.
"""

from dataclasses import dataclass

import numpy as np

from minifd.kernels.attention import decode_attention, prefill_attention
from minifd.kernels.linear import linear
from minifd.kernels.rms_norm import rms_norm
from minifd.kernels.rope import rope_and_cache
from minifd.kernels.silu_mul import silu_mul
from minifd.model.config import rope_inverse_frequencies


# ----------------------------------------------------------------------------------------------
# Building blocks (the small fused kernels live in minifd.kernels: rms_norm, rope, silu_mul)
# ----------------------------------------------------------------------------------------------

def rope_tables(config, max_seq, xp):
    # -> cos, sin: [max_seq, head_dim // 2] float32, angle = position * inv_freq
    angles = np.outer(np.arange(max_seq, dtype=np.float64), rope_inverse_frequencies(config))
    return xp.asarray(np.cos(angles), dtype=xp.float32), xp.asarray(np.sin(angles), dtype=xp.float32)


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

    @staticmethod
    def nbytes_needed(config, batch, max_seq, dtype):
        """Bytes allocate() would take."""
        return 2 * config.n_layers * batch * config.n_kv_heads * max_seq * config.head_dim * np.dtype(dtype).itemsize

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

    def _layers(self, x, cache, positions, slots, attend):
        """The decoder stack over a block of rows, each row a token at (slot, position) of the cache.

        x: [rows, hidden] embeddings; positions, slots: [rows] int32; attend(layer_index, q) -> attention
        output [rows, n_heads, head_dim] once rope_and_cache has stored the rows' keys and values.
        -> final-norm hidden states [rows, hidden]

        The residual stream is carried next to the normalised activations: each RMSNorm kernel also
        adds the sublayer output into the stream, so no separate add runs.
        """
        eps, layers = self.config.rms_norm_eps, self.weights.layers
        h = rms_norm(x, layers[0].attn_norm, eps)
        residual = x
        for i, layer in enumerate(layers):
            q = rope_and_cache(linear(h, layer.wqkv), self.cos, self.sin, positions, slots, cache.k[i], cache.v[i])
            attention = attend(i, q)  # [rows, n_heads, head_dim]
            h, residual = rms_norm(linear(attention.reshape(len(x), -1), layer.wo), layer.mlp_norm, eps, residual)
            mlp_out = linear(silu_mul(linear(h, layer.w_gate_up)), layer.w_down)
            next_norm = layers[i + 1].attn_norm if i + 1 < len(layers) else self.weights.norm
            h, residual = rms_norm(mlp_out, next_norm, eps, residual)
        return h

    def prefill(self, cache, slot, token_ids):
        """Run a whole prompt into cache slot `slot`; token_ids: [seq] -> logits of its last position, [vocab]."""
        xp = self.xp
        ids = xp.asarray(np.asarray(token_ids, dtype=np.int64))
        seq = ids.shape[0]
        positions = xp.arange(seq, dtype=xp.int32)
        slots = xp.full(seq, slot, dtype=xp.int32)

        def attend(i, q):
            k, v = cache.k[i][slot, :, :seq].transpose(1, 0, 2), cache.v[i][slot, :, :seq].transpose(1, 0, 2)
            return prefill_attention(q, k, v, softmax_range=self.softmax_ranges[i])

        h = self._layers(self.weights.embed[ids], cache, positions, slots, attend)  # [seq, hidden]
        return linear(h[-1:], self.weights.lm_head).astype(xp.float32)[0]

    def decode(self, cache, token_ids, positions):
        """One step for every sequence of the batch.

        token_ids: [batch] (the newest token of each sequence), positions: [batch] int32 (where it goes
        in the cache, i.e. the sequence's length so far) -> logits: [batch, vocab] float32
        """
        xp = self.xp
        ids = xp.asarray(token_ids)
        positions = xp.asarray(positions, dtype=xp.int32)
        slots = xp.arange(ids.shape[0], dtype=xp.int32)
        lengths = positions + 1

        def attend(i, q):
            return decode_attention(q, cache.k[i], cache.v[i], lengths, softmax_range=self.softmax_ranges[i])

        h = self._layers(self.weights.embed[ids], cache, positions, slots, attend)  # [batch, hidden]
        return linear(h, self.weights.lm_head).astype(xp.float32)
