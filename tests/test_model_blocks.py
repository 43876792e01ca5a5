"""The decoder's building blocks and a whole layer against the float64 oracle, on random shapes."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from minifd import oracle
from minifd.model.config import LlamaConfig, rope_inverse_frequencies
from minifd.kernels.rope import rope_and_cache
from minifd.model.llama import KVCache, Llama, rope_tables
from minifd.model.loader import InMemoryCheckpoint
from minifd.model.weights import load_weights
from tiny_model import random_tensors, tiny_config_dict

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
    cache = np.zeros((1, heads, seq, head_dim), np.float32)
    cos, sin = rope_tables(config, seq, np)
    positions, slots = np.arange(seq, dtype=np.int32), np.zeros(seq, dtype=np.int32)
    got = rope_and_cache(qkv, cos, sin, positions, slots, cache, cache.copy())
    expected = oracle.rope(q, np.arange(seq, dtype=np.float64), rope_inverse_frequencies(config))
    assert relative_error(got, expected) < 1e-5


@st.composite
def tiny_configs(draw, n_layers=None):
    kv_heads = draw(st.integers(1, 3))
    heads = kv_heads * draw(st.integers(1, 3))
    head_dim = 2 * draw(st.integers(2, 24))
    raw = tiny_config_dict(vocab_size=draw(st.integers(8, 200)), hidden_size=draw(st.integers(4, 48)),
                           intermediate_size=draw(st.integers(4, 96)), n_layers=n_layers or draw(st.integers(1, 2)),
                           n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim, tie=draw(st.booleans()))
    return LlamaConfig.from_dict(raw)


def build_model(config, seed, max_seq=64):
    tensors = random_tensors(config, seed=seed, tie=config.tie_word_embeddings)
    weights = load_weights(InMemoryCheckpoint(tensors), config, np, np.float32, progress=False)
    return Llama(config, weights, np, max_seq=max_seq), tensors


@given(config=tiny_configs(n_layers=1), seq=st.integers(1, 24), seed=seeds)
def test_one_layer_prefill_matches_oracle(config, seq, seed):
    model, tensors = build_model(config, seed)
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, seq)
    cache = KVCache.allocate(config, 1, seq, np, np.float32)
    got = model.prefill(cache, 0, tokens)
    expected = oracle.forward(tensors, config, tokens)[-1]
    assert relative_error(got, expected) < 1e-4


@given(config=tiny_configs(), lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4),
       steps=st.integers(1, 8), seed=seeds)
def test_cached_decode_matches_uncached_oracle_at_every_position(config, lengths, steps, seed):
    """Ragged prompts prefilled into one cache, then decoded together: every step's logits equal the
    oracle's full recomputation of that sequence."""
    model, tensors = build_model(config, seed)
    rng = np.random.default_rng(seed)
    sequences = [list(rng.integers(0, config.vocab_size, n)) for n in lengths]
    cache = KVCache.allocate(config, len(lengths), max(lengths) + steps, np, np.float32)
    for slot, tokens in enumerate(sequences):
        assert relative_error(model.prefill(cache, slot, tokens), oracle.forward(tensors, config, tokens)[-1]) < 1e-4
    for _ in range(steps):
        new_tokens = rng.integers(0, config.vocab_size, len(lengths))
        positions = np.array([len(s) for s in sequences], dtype=np.int32)
        logits = model.decode(cache, new_tokens, positions)
        for b, token in enumerate(new_tokens):
            sequences[b].append(int(token))
            assert relative_error(logits[b], oracle.forward(tensors, config, sequences[b])[-1]) < 1e-4
