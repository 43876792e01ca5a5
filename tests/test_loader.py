"""Checkpoint loading in every layout seen in the wild, checked against the tensors written."""

import json

import numpy as np
import pytest

import minifd
from minifd import oracle
from minifd.kernels.rope import pair_rotary_rows
from minifd.kernels.silu_mul import interleave_gate_up
from minifd.model.config import LlamaConfig
from minifd.model.loader import Checkpoint, bf16_bits_to_float32
from tiny_model import tiny_model, to_bf16_bits


def stored_as(array, dtype):
    """What a float32 array reads back as after being stored in `dtype`."""
    if dtype == "F16":
        return array.astype(np.float16).astype(np.float32)
    if dtype == "BF16":
        return bf16_bits_to_float32(to_bf16_bits(array))
    return array


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("tie", [False, True])
def test_every_layout_loads_the_written_tensors(tmp_path, dtype, shards, tie):
    directory, config, tensors = tiny_model(tmp_path / "m", dtype=dtype, shards=shards, tie=tie)
    checkpoint = Checkpoint(directory)
    assert set(checkpoint.entries) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(np.asarray(checkpoint[name], np.float32), stored_as(value, dtype))
    engine = minifd.load(directory, device="cpu", progress=False)
    weights = engine.model.weights
    if tie:
        assert weights.lm_head is weights.embed
    q = stored_as(tensors["model.layers.1.self_attn.q_proj.weight"], dtype)
    np.testing.assert_array_equal(weights.layers[1].wqkv[: q.shape[0]], pair_rotary_rows(q, config.head_dim))
    gate = stored_as(tensors["model.layers.0.mlp.gate_proj.weight"], dtype)
    up = stored_as(tensors["model.layers.0.mlp.up_proj.weight"], dtype)
    np.testing.assert_array_equal(weights.layers[0].w_gate_up, interleave_gate_up(gate, up))


def test_bf16_widening_is_exact():
    values = np.array([1.0, -2.5, 2.0**100, -(2.0**-120), 0.0, np.inf, 3.140625], dtype=np.float32)
    np.testing.assert_array_equal(bf16_bits_to_float32(to_bf16_bits(values)), values)


def test_tensors_are_memory_mapped_not_copied(tmp_path):
    directory, _, _ = tiny_model(tmp_path / "m")
    tensor = Checkpoint(directory)["model.layers.0.mlp.down_proj.weight"]
    assert isinstance(tensor.base, np.memmap) or isinstance(tensor, np.memmap) or not tensor.flags.owndata


def test_loaded_model_matches_oracle_on_a_sharded_bf16_checkpoint(tmp_path):
    directory, config, tensors = tiny_model(tmp_path / "m", dtype="BF16", shards=2)
    engine = minifd.load(directory, device="cpu", progress=False)
    tokens = [256, 72, 101, 108, 108, 111]
    from minifd.model.llama import KVCache

    cache = KVCache.allocate(config, 1, len(tokens), np, np.float32)
    got = engine.model.prefill(cache, 0, tokens)
    expected = oracle.forward(Checkpoint(directory), config, tokens)[-1]
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max() + 1e-5


def base_config(**overrides):
    raw = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2}
    raw.update(overrides)
    return raw


def test_config_both_rope_layouts_agree():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    old = LlamaConfig.from_dict(base_config(rope_theta=500000.0, rope_scaling=scaling))
    new = LlamaConfig.from_dict(base_config(rope_parameters=dict(scaling, rope_theta=500000.0)))
    assert old.rope_theta == new.rope_theta == 500000.0
    assert old.rope_scaling["factor"] == new.rope_scaling["factor"] == 8.0
    assert old.rope_scaling["rope_type"] == new.rope_scaling["rope_type"] == "llama3"


def test_config_explicit_head_dim_and_defaults():
    config = LlamaConfig.from_dict(base_config(head_dim=32))
    assert (config.head_dim, config.n_kv_heads, config.rope_theta) == (32, 2, 10000.0)
    assert LlamaConfig.from_dict(base_config()).head_dim == 8
    assert LlamaConfig.from_dict(base_config(rope_scaling={"type": "linear", "factor": 2.0})).rope_scaling["rope_type"] == "linear"


def test_generation_config_and_tokenizer_config_decide_bos_and_eos(tmp_path):
    directory, _, _ = tiny_model(tmp_path / "m")
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [257, 10]}))
    engine = minifd.load(directory, device="cpu", progress=False)
    assert engine.tokenizer.encode("hi")[0] == 256
    assert engine.tokenizer.eos_ids == {257, 10}
    (directory / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert minifd.load(directory, device="cpu", progress=False).tokenizer.encode("hi")[0] != 256
