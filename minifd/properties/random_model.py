"""Tiny random Llama models: a config.json dictionary and weights that keep activations O(1).

Used by the decoder-layer property, and by the tests that write such models to disk.
"""

import numpy as np

from minifd.model.weights import expected_shapes


def tiny_config_dict(vocab_size=300, hidden_size=64, intermediate_size=96, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=None, tie=False, **extra):
    """-> a Hugging Face config.json dictionary of a small Llama; `extra` keys are added as they are."""
    raw = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
        "hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": tie,
        "bos_token_id": 256, "eos_token_id": 257,
    }
    if head_dim is not None:
        raw["head_dim"] = head_dim
    raw.update(extra)
    return raw


def random_tensors(config, seed=0, tie=False):
    """-> {HF name: float32 array}: norm weights near 1, matrices scaled by 1 / sqrt(fan_in) so
    activations stay O(1)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in expected_shapes(config).items():
        if len(shape) == 1:
            tensors[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            tensors[name] = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    if not tie:
        tensors["lm_head.weight"] = (rng.standard_normal((config.vocab_size, config.hidden_size))
                                     / np.sqrt(config.hidden_size)).astype(np.float32)
    return tensors
