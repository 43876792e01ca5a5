"""Checkpoint loading: safetensors files, memory-mapped, single-file or sharded.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and [begin, end) byte range, then the raw data. We map the file and hand out NumPy
views into it, so nothing is read until used and the weights are never held twice. bf16 has no
NumPy dtype: it is read as its raw 16 bits and widened to float32 by a shift.
"""

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minifd.errors import MinifdError

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


class Checkpoint:
    """Every tensor of a model directory, by name; tensors come back as memory-mapped NumPy views."""

    def __init__(self, weights_dir):
        self.dir = Path(weights_dir)
        self.entries = {}
        for path in _safetensors_files(self.dir):
            self.entries.update(read_header(path))
        self._maps = {}

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

    def release(self, name):
        """Unmap a tensor's pages from this process once it has been copied elsewhere (to the GPU), so
        streaming a checkpoint holds about one tensor in host memory; the file stays in the page cache."""
        entry = self.entries[name]
        mapping = self._maps.get(entry.path)
        if mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = entry.begin // mmap.PAGESIZE * mmap.PAGESIZE
        mapping._mmap.madvise(mmap.MADV_DONTNEED, start, entry.end - start)

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


def bf16_bits_to_float32(bits):
    """bits: uint16 array of bfloat16 values -> float32 array of the same shape (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)
