"""The model's RoPE tables with scaling against the oracle. The decoder layers themselves are the
decoder_layer property (minifd/properties/decoder_layer.py, run by test_properties.py)."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from minifd import oracle
from minifd.kernels.rope import rope_and_cache
from minifd.model.config import LlamaConfig, rope_inverse_frequencies
from minifd.model.llama import rope_tables
from minifd.properties import PROPERTIES
from minifd.properties.fused import paired_columns
from tiny_model import tiny_config_dict

seeds = st.integers(0, 2**32 - 1)


def relative_error(actual, expected):
    return np.linalg.norm(np.asarray(actual, np.float64) - expected) / max(np.linalg.norm(expected), 1e-30)


@given(seq=st.integers(1, 40), heads=st.integers(1, 4), half_dim=st.integers(1, 64), seed=seeds,
       rope=st.sampled_from([None, {"rope_type": "linear", "factor": 4.0},
                             {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 64}]))
def test_rope_tables_with_scaling_match_oracle(seq, heads, half_dim, seed, rope):
    """The model's cos/sin tables (default, linear and llama3 scaling) rotate q like the oracle."""
    head_dim = 2 * half_dim
    config = LlamaConfig.from_dict(tiny_config_dict(hidden_size=head_dim * heads, n_heads=heads, n_kv_heads=heads,
                                                    rope_scaling=rope, rope_theta=500000.0))
    q = np.random.default_rng(seed).standard_normal((seq, heads, head_dim))
    qkv = np.concatenate([q, np.zeros((seq, 2 * heads, head_dim))], axis=1).reshape(seq, -1).astype(np.float32)
    qkv = paired_columns(qkv, heads, heads, head_dim)  # the layout the QKV product writes
    cache = np.zeros((1, heads, seq, head_dim), np.float32)
    cos, sin = rope_tables(config, seq, np)
    positions, slots = np.arange(seq, dtype=np.int32), np.zeros(seq, dtype=np.int32)
    got = rope_and_cache(qkv, cos, sin, positions, slots, cache, cache.copy())
    expected = oracle.rope(q, np.arange(seq, dtype=np.float64), rope_inverse_frequencies(config))
    assert relative_error(got, expected) < 1e-5


def test_a_long_prompt_then_decode_steps(xp):
    """A fixed decoder_layer case past the attention kernels' 64-row query tile: a 100-token prompt."""
    PROPERTIES["decoder_layer"].check(
        dict(vocab_size=50, hidden_size=48, intermediate_size=96, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64,
             tie=False, lengths=[100, 3], steps=2, seed=7), xp)
