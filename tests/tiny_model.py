"""Tiny random Llama checkpoints written in each layout the loader must read.

The config and the random weights come from minifd.properties.random_model (the decoder-layer
property uses them too); this module writes them to disk with a byte-level tokenizer.
"""

import json

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from minifd.model.config import LlamaConfig
from minifd.properties.random_model import random_tensors, tiny_config_dict


def byte_tokenizer():
    """A byte-level tokenizer: 256 byte tokens, then <s> = 256 and </s> = 257."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<s>"], vocab["</s>"] = 256, 257
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    return tokenizer


def to_bf16_bits(array):
    """float32 -> bfloat16 bits (round to nearest even), as uint16."""
    bits = array.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def write_checkpoint(directory, raw_config, tensors, dtype="F32", shards=1):
    """Write a HF-style directory: config.json, tokenizer files, safetensors in `dtype` over `shards` files."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(raw_config))
    byte_tokenizer().save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"}))
    stored = {}
    for name, value in tensors.items():
        if dtype == "F16":
            stored[name] = value.astype(np.float16)
        elif dtype == "BF16":
            stored[name] = to_bf16_bits(value)
        else:
            stored[name] = value.astype(np.float32)
    names = sorted(stored)
    if shards == 1:
        _save(directory / "model.safetensors", {n: stored[n] for n in names}, dtype)
        return directory
    weight_map = {}
    for s in range(shards):
        shard_name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        _save(directory / shard_name, {n: stored[n] for n in part}, dtype)
        weight_map.update({n: shard_name for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def _save(path, tensors, dtype):
    save_file(tensors, str(path))
    if dtype == "BF16":  # safetensors.numpy writes uint16 as U16: relabel the header entries as BF16
        raw = path.read_bytes()
        length = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + length])
        for name, entry in header.items():
            if name != "__metadata__":
                entry["dtype"] = "BF16"
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length:])


def tiny_model(directory, dtype="F32", shards=1, tie=False, seed=0, **config_overrides):
    """-> (directory, LlamaConfig, float32 tensors) of a freshly written tiny random checkpoint."""
    raw = tiny_config_dict(tie=tie, **config_overrides)
    config = LlamaConfig.from_dict(raw)
    tensors = random_tensors(config, seed=seed, tie=tie)
    write_checkpoint(directory, raw, tensors, dtype=dtype, shards=shards)
    return directory, config, tensors
