"""The oracle: a plain float64 NumPy forward pass that every test compares against.

No cache, no fused weights, no blocking, no kernels: it reads the checkpoint's tensors by their
Hugging Face names and follows the Llama equations literally, one layer after another.
"""

import numpy as np

from minifd.model.config import rope_inverse_frequencies


def rms_norm(x, weight, eps):
    # x: [seq, hidden], weight: [hidden] -> [seq, hidden]
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x, positions, inv_freq):
    # x: [seq, heads, head_dim], positions: [seq] -> [seq, heads, head_dim] (rotate-half pairs i, i + head_dim/2)
    angles = np.outer(positions, inv_freq)[:, None, :]  # [seq, 1, head_dim/2]
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * np.cos(angles) - second * np.sin(angles),
                           second * np.cos(angles) + first * np.sin(angles)], axis=-1)


def causal_attention(q, k, v, on_scores=None):
    # q: [seq, n_heads, head_dim], k, v: [seq, n_kv_heads, head_dim] -> [seq, n_heads, head_dim]
    seq, n_heads, head_dim = q.shape
    group = n_heads // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # [seq, n_heads, head_dim]
    scores = np.einsum("shd,thd->hst", q, k) / np.sqrt(head_dim)  # [n_heads, seq, seq]
    scores = np.where(np.tril(np.ones((seq, seq), dtype=bool)), scores, -np.inf)
    if on_scores is not None:
        on_scores(scores)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("hst,thd->shd", weights, v)


def silu(x):
    return x / (1.0 + np.exp(-x))


def forward(tensors, config, token_ids, on_scores=None, on_residual=None):
    """Logits of every position of one sequence.

    tensors: mapping HF tensor name -> array (e.g. minifd.model.loader.Checkpoint); token_ids: [seq]
    on_scores(layer, scores): optional, receives each layer's scaled, causally masked scores
    [n_heads, seq, seq] (masked entries -inf); on_residual(stream, update): optional, receives both
    terms [seq, hidden] of every residual add before it happens. -> logits: [seq, vocab] float64
    """
    def w(name):
        return np.asarray(tensors[name], dtype=np.float64)

    c = config
    positions = np.arange(len(token_ids), dtype=np.float64)
    inv_freq = rope_inverse_frequencies(c)
    x = w("model.embed_tokens.weight")[np.asarray(token_ids)]  # [seq, hidden]
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        h = rms_norm(x, w(p + "input_layernorm.weight"), c.rms_norm_eps)
        q = (h @ w(p + "self_attn.q_proj.weight").T).reshape(len(x), c.n_heads, c.head_dim)
        k = (h @ w(p + "self_attn.k_proj.weight").T).reshape(len(x), c.n_kv_heads, c.head_dim)
        v = (h @ w(p + "self_attn.v_proj.weight").T).reshape(len(x), c.n_kv_heads, c.head_dim)
        q, k = rope(q, positions, inv_freq), rope(k, positions, inv_freq)
        layer_scores = None if on_scores is None else (lambda scores, layer=i: on_scores(layer, scores))
        attention = causal_attention(q, k, v, layer_scores).reshape(len(x), -1)
        update = attention @ w(p + "self_attn.o_proj.weight").T  # [seq, hidden]
        if on_residual is not None:
            on_residual(x, update)
        x = x + update
        h = rms_norm(x, w(p + "post_attention_layernorm.weight"), c.rms_norm_eps)
        gate, up = h @ w(p + "mlp.gate_proj.weight").T, h @ w(p + "mlp.up_proj.weight").T
        update = (silu(gate) * up) @ w(p + "mlp.down_proj.weight").T  # [seq, hidden]
        if on_residual is not None:
            on_residual(x, update)
        x = x + update
    x = rms_norm(x, w("model.norm.weight"), c.rms_norm_eps)
    head = "lm_head.weight" if not c.tie_word_embeddings and "lm_head.weight" in tensors else "model.embed_tokens.weight"
    return x @ w(head).T
