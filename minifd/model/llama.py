"""The Llama decoder, written once against an array module `xp` (numpy on CPU, cupy on GPU).

    token ids -> embedding -> n_layers x [ x = x + Attention(RMSNorm(x)); x = x + SwiGLU(RMSNorm(x)) ]
              -> RMSNorm -> LM head -> logits

A prompt is prefilled chunk by chunk (a chunk's positions at once, causal attention), the chunks of
several prompts in one pass over the weights (a ragged batch, Llama.prefill_chunks); afterwards each
decode step feeds one token per sequence and attends over that sequence's KV cache. The two hot
spots go through the seams in minifd.kernels: `linear` for every projection and
`prefill_attention_ragged` / `decode_attention` for attention. RMSNorm, the SwiGLU gate, the residual adds
and RoPE with the KV-cache write are arguments of `linear`, which folds them into the product's
prologue and epilogue where its kernel can (minifd/kernels/linear.py says where).
"""

from dataclasses import dataclass

import numpy as np

from minifd.kernels.attention import RaggedQueries, decode_attention, prefill_attention_ragged
from minifd.kernels.launch import PLAIN
from minifd.kernels.linear import linear
from minifd.kernels.rms_norm import RMSNorm
from minifd.kernels.rope import Rotary
from minifd.model.config import rope_inverse_frequencies


# ----------------------------------------------------------------------------------------------
# Building blocks (the small kernels live in minifd.kernels: rms_norm, rope, silu_mul)
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

    def first_rows(self, rows):
        """The cache of the first `rows` sequences: views sharing this cache's memory."""
        return KVCache([k[:rows] for k in self.k], [v[:rows] for v in self.v])

    def nbytes_per_position(self):
        """Bytes of K and V one cached position holds across all layers."""
        batch, n_kv_heads, _, head_dim = self.k[0].shape
        return 2 * len(self.k) * n_kv_heads * head_dim * self.k[0].itemsize


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens of one sequence for a prefill pass: they go into cache slot `slot` at positions
    [start, end), the slot holding the sequence's positions before `start` already."""

    slot: int
    token_ids: list
    start: int = 0

    @property
    def end(self):
        return self.start + len(self.token_ids)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class Llama:
    def __init__(self, config, weights, xp, softmax_ranges=None, max_seq=None, attention_method="async"):
        """attention_method: "async" (the unified max value, with recompute) or "sync" (the
        synchronised running max, the baseline) for every attention call."""
        self.config, self.weights, self.xp = config, weights, xp
        self.attention_method = attention_method
        self.dtype = weights.embed.dtype
        self.softmax_ranges = softmax_ranges or [None] * config.n_layers
        self.max_seq = max_seq or config.max_position_embeddings
        self.cos, self.sin = rope_tables(config, self.max_seq, xp)

    def _layers(self, x, cache, positions, slots, attend, launch=PLAIN):
        """The decoder stack over a block of rows, each row a token at (slot, position) of the cache.

        x: [rows, hidden] the residual stream (the embeddings coming in); positions, slots: [rows]
        int32; attend(layer_index, q) -> attention output [rows, n_heads, head_dim] once the QKV
        projection has stored the rows' keys and values in the cache; launch: how the kernels are launched,
        graph-captured or not (minifd.kernels.launch).
        -> the residual stream after the last layer, [rows, hidden]

        Each line is one step of the math; the norms, the SwiGLU gate, the residual adds and RoPE
        run inside the products where their kernels fuse them (minifd/kernels/linear.py).
        """
        eps, rows = self.config.rms_norm_eps, len(x)
        for i, layer in enumerate(self.weights.layers):
            q = linear(x, layer.wqkv, norm=RMSNorm(layer.attn_norm, eps),
                       rotary=Rotary(self.cos, self.sin, positions, slots, cache.k[i], cache.v[i]),
                       launch=launch)  # [rows, n_heads, head_dim] rotated; k, v -> the cache
            attention = attend(i, q).reshape(rows, -1)  # [rows, n_heads head_dim]
            x = linear(attention, layer.wo, residual=x, launch=launch)  # [rows, hidden]
            mlp = linear(x, layer.w_gate_up, norm=RMSNorm(layer.mlp_norm, eps), gated=True,
                         launch=launch)  # [rows, intermediate]: SiLU(gate) * up
            x = linear(mlp, layer.w_down, residual=x, launch=launch)  # [rows, hidden]
        return x

    def _logits(self, x, launch=PLAIN):
        # x: [rows, hidden] residual stream -> [rows, vocab] float32
        head = linear(x, self.weights.lm_head, norm=RMSNorm(self.weights.norm, self.config.rms_norm_eps),
                      launch=launch)  # [rows, vocab]
        return head.astype(self.xp.float32)

    def prefill(self, cache, slot, token_ids, start=0):
        """Run prompt tokens into cache slot `slot` at positions [start, start + chunk): a whole prompt,
        or one chunk of it once the cache holds its positions before `start`.
        token_ids: [chunk] -> logits of the chunk's last position, [vocab]."""
        return self.prefill_chunks(cache, [PrefillChunk(slot, token_ids, start)])[0]

    def prefill_chunks(self, cache, chunks):
        """One pass over the weights for a chunk of each of several prompts (a ragged batch): chunk j's
        tokens go into cache slot chunks[j].slot at positions [start, end), its queries attending to
        that slot's positions [0, end) (the earlier ones already cached).
        chunks: list of PrefillChunk, one per slot -> logits of each chunk's last position, [chunks, vocab]."""
        xp = self.xp
        ids = xp.asarray(np.concatenate([np.asarray(c.token_ids, dtype=np.int64) for c in chunks]))  # [rows]
        positions = xp.asarray(np.concatenate([np.arange(c.start, c.end, dtype=np.int32) for c in chunks]))  # [rows]
        slots = xp.asarray(np.concatenate([np.full(len(c.token_ids), c.slot, dtype=np.int32) for c in chunks]))  # [rows]
        ragged = RaggedQueries(tuple(len(c.token_ids) for c in chunks), tuple(c.slot for c in chunks),
                               tuple(c.end for c in chunks))
        last_rows = xp.asarray(ragged.row_starts + np.asarray(ragged.lengths) - 1)  # [chunks]

        def attend(i, q):
            # q: [rows, n_heads, head_dim]; each chunk's rows attend to their slot's positions [0, end)
            return prefill_attention_ragged(q, cache.k[i], cache.v[i], ragged, softmax_range=self.softmax_ranges[i],
                                            method=self.attention_method)  # [rows, n_heads, head_dim]

        x = self._layers(self.weights.embed[ids], cache, positions, slots, attend)  # [rows, hidden]
        return self._logits(x[last_rows])  # [chunks, vocab]

    def decode(self, cache, token_ids, positions, launch=PLAIN):
        """One step for every sequence of the batch.

        token_ids: [batch] (the newest token of each sequence), positions: [batch] int32 (where it goes
        in the cache, i.e. the sequence's length so far); launch: how the kernels are launched,
        graph-captured or not (minifd.kernels.launch) -> logits: [batch, vocab] float32
        """
        xp = self.xp
        ids = xp.asarray(token_ids)
        positions = xp.asarray(positions, dtype=xp.int32)
        slots = xp.arange(ids.shape[0], dtype=xp.int32)
        lengths = positions + 1

        def attend(i, q):
            return decode_attention(q, cache.k[i], cache.v[i], lengths, softmax_range=self.softmax_ranges[i],
                                    method=self.attention_method, launch=launch)

        x = self._layers(self.weights.embed[ids], cache, positions, slots, attend, launch)  # [batch, hidden]
        return self._logits(x, launch)  # [batch, vocab]
