"""Checkpoint loading: the one way in for a model's config, tokenizer, chat template and tensors.

open_checkpoint takes a Hugging Face directory (here) or a .gguf file (minifd/model/gguf.py); both
give the same interface, which the engine, `minifd calibrate` and `minifd info` read everything from.

A directory's tensors come from safetensors files, single-file or sharded. A safetensors file is an
8-byte little-endian header length, a JSON header naming each tensor's dtype, shape and [begin, end)
byte range, then the raw data. We map the file and hand out NumPy views into it, so nothing is read
until used and the weights are never held twice. bf16 has no NumPy dtype: it is read as its raw 16
bits and widened to float32 by a shift.
"""

import json
import mmap
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from minifd.errors import MinifdError
from minifd.kernels.softmax_range import softmax_ranges_path
from minifd.model.chat_template import ChatTemplate
from minifd.model.config import LlamaConfig
from minifd.model.tokenizer import Tokenizer

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


@dataclass(frozen=True)
class TensorEntry:
    path: Path
    dtype: str  # safetensors dtype name: F32, F16 or BF16
    shape: tuple
    begin: int  # absolute byte offset in the file
    end: int


def read_header(path):
    """-> {tensor name: TensorEntry} for one safetensors file, validated against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise MinifdError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_length,) = struct.unpack("<Q", prefix)
        if 8 + header_length > size:
            raise MinifdError(f"{path}: header length {header_length} runs past the end of the file ({size} bytes)")
        try:
            header = json.loads(file.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MinifdError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise MinifdError(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + header_length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise MinifdError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise MinifdError(
                f"{path}: tensor {name!r} has dtype {dtype}; minifd reads {', '.join(SAFETENSORS_DTYPES)}"
            )
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        if not (0 <= begin <= end) or end - begin != expected:
            raise MinifdError(f"{path}: tensor {name!r} has offsets [{begin}, {end}) that do not fit its shape {shape}")
        if data_start + end > size:
            raise MinifdError(f"{path}: tensor {name!r} lies past the end of the file (truncated download?)")
        entries[name] = TensorEntry(path, dtype, shape, data_start + begin, data_start + end)
    _check_no_overlap(path, entries)
    return entries


def _check_no_overlap(path, entries):
    spans = sorted((e.begin, e.end, name) for name, e in entries.items() if e.end > e.begin)
    for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise MinifdError(f"{path}: tensors {name_a!r} and {name_b!r} overlap")


def open_checkpoint(weights):
    """weights: a Hugging Face model directory or a .gguf file -> its Checkpoint or GGUFCheckpoint."""
    weights = Path(weights)
    if weights.is_dir():
        return Checkpoint(weights)
    if weights.is_file() and weights.suffix == ".gguf":
        from minifd.model.gguf import GGUFCheckpoint

        return GGUFCheckpoint(weights)
    if not weights.exists():
        raise MinifdError(f"weights_dir {weights}: no such directory or .gguf file", parameter="weights_dir")
    raise MinifdError(f"weights_dir {weights}: not a directory or a .gguf file", parameter="weights_dir")


class Checkpoint:
    """A Hugging Face model directory: config.json, the tokenizer files, the chat template, and every
    tensor by name; tensors come back as memory-mapped NumPy views."""

    def __init__(self, weights_dir):
        self.dir = Path(weights_dir)
        self.entries = {}
        for path in _safetensors_files(self.dir):
            self.entries.update(read_header(path))
        self._maps = {}

    @cached_property
    def config(self):
        return LlamaConfig.from_dir(self.dir)

    def tokenizer(self):
        return Tokenizer.from_dir(self.dir, self.config)

    def chat_template(self, special_tokens):
        """-> the directory's ChatTemplate, or None when it ships none."""
        return ChatTemplate.from_dir(self.dir, special_tokens)

    @property
    def softmax_ranges_path(self):
        """Where `minifd calibrate` writes this model's phi values and the engine reads them."""
        return softmax_ranges_path(self.dir)

    def __contains__(self, name):
        return name in self.entries

    def __getitem__(self, name):
        """-> the tensor as stored (float32 or float16), bf16 widened to float32."""
        raw = self.raw(name)
        if self.entries[name].dtype == "BF16":
            return bf16_bits_to_float32(raw)
        return raw

    def raw(self, name):
        """-> a read-only view into the mapped file, bf16 as uint16 bits."""
        if name not in self.entries:
            raise MinifdError(f"{self.dir}: no safetensors file has the tensor {name!r}")
        entry = self.entries[name]
        if entry.path not in self._maps:
            self._maps[entry.path] = np.memmap(entry.path, dtype=np.uint8, mode="r")
        data = self._maps[entry.path][entry.begin : entry.end]
        return data.view(SAFETENSORS_DTYPES[entry.dtype]).reshape(entry.shape)

    def nbytes(self, name):
        entry = self.entries[name]
        return entry.end - entry.begin

    def shape(self, name):
        return self.entries[name].shape

    def type_name(self, name):
        """The tensor's safetensors dtype: F32, F16 or BF16."""
        return self.entries[name].dtype

    def release(self, name):
        """Unmap a tensor's pages from this process once it has been copied elsewhere (to the GPU), so
        streaming a checkpoint holds about one tensor in host memory; the file stays in the page cache."""
        entry = self.entries[name]
        if entry.path in self._maps:
            release_pages(self._maps[entry.path], entry.begin, entry.end)

    def location(self, name):
        """Where a tensor lives, for error messages."""
        return str(self.entries[name].path) if name in self.entries else str(self.dir)


class InMemoryCheckpoint:
    """The Checkpoint interface over a dict of arrays: random models in tests and benchmarks."""

    def __init__(self, tensors, label="<in-memory>"):
        self.tensors, self.dir = tensors, label

    def __contains__(self, name):
        return name in self.tensors

    def __getitem__(self, name):
        if name not in self.tensors:
            raise MinifdError(f"{self.dir}: no tensor {name!r}")
        return self.tensors[name]

    def nbytes(self, name):
        return self.tensors[name].nbytes

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def type_name(self, name):
        """The array's dtype name (float32, float16)."""
        return self.tensors[name].dtype.name

    def release(self, name):
        """Nothing to unmap: the arrays belong to the caller."""

    def location(self, name):
        return str(self.dir)


def _safetensors_files(weights_dir):
    """The shard list from model.safetensors.index.json, else every *.safetensors in the directory."""
    index_path = weights_dir / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            shard_names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise MinifdError(f"{index_path}: not a valid index (expected JSON with a weight_map)") from None
        paths = [weights_dir / name for name in shard_names]
        for path in paths:
            if not path.is_file():
                raise MinifdError(f"{index_path}: names shard {path.name}, which does not exist")
        return paths
    paths = sorted(weights_dir.glob("*.safetensors"))
    if not paths:
        raise MinifdError(f"{weights_dir}: no *.safetensors files (minifd reads safetensors checkpoints)")
    return paths


def release_pages(mapping, begin, end):
    """Drop the pages of bytes [begin, end) of a np.memmap from this process (where the OS allows)."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = begin // mmap.PAGESIZE * mmap.PAGESIZE
    mapping._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)


def bf16_bits_to_float32(bits):
    """bits: uint16 array of bfloat16 values -> float32 array of the same shape (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)
