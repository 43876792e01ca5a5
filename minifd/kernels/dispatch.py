"""Heuristic dataflow: which implementation computes y[M, N] = x[M, K] @ W[N, K]^T.

FlashDecoding++ keeps three implementations of a linear layer and picks one from M alone, with
thresholds measured offline per GPU and per weight shape (N, K):

    M < M1        -> "gemv"       ImplA, CUDA-core GEMV (minifd/kernels/gemv.cu)
    M1 <= M < M2  -> "flat_gemm"  ImplB, tensor-core flat GEMM (minifd/kernels/flat_gemm.cu)
    M >= M2       -> "library"    ImplC, cuBLAS / hipBLAS through cupy.matmul (x @ W.T on CPU)

`minifd tune` writes the thresholds to <cache dir>/linear_dispatch.json:

    {"format": 1, "devices": {"<device name>": {"<N>,<K>[,<weight format>]": {"m1": int, "m2": int, "max_m": int}}}}

where <device name> is the GPU's name as the runtime reports it ("cpu" for the NumPy backend), the
weight format is left out for float16 weights and is "int8" or "int4" for quantized ones
(minifd.kernels.weight_formats), and max_m is the largest M the sweep measured. A float16 shape or
device missing from the table gets DEFAULT_THRESHOLDS: GEMV for M = 1 and the library from M = 2,
with no flat-GEMM range. That is
what the one GPU measured so far said (an H200 on the Llama-2-7B shapes, scripts/bench_gemm.py):
cuBLAS was within a few percent of the best from M = 2 on, and the flat GEMM won only M = 3..4 of
the 4096 x 4096 shape. The flat GEMM runs wherever `minifd tune` measured it faster.
A quantized weight missing from the table gets QUANTIZED_DEFAULT_THRESHOLDS instead: the flat GEMM
for every M up to its 64-row tile. The library GEMM would first dequantize the whole weight to
float16, and the flat GEMM, which dequantizes in fp16 arithmetic two weights per instruction, beat
the GEMV at M = 1 too on every Llama-2-7B shape in both formats (`minifd tune --quantize` on an
H200, 2026-12-03: int4 QKV 21.2 vs 25.8 us, gate/up 30.9 vs 40.8 us).
"""

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from minifd.errors import MinifdError
from minifd.files import cache_root, write_text_atomically

IMPLEMENTATIONS = ("gemv", "flat_gemm", "library")
DEFAULT_THRESHOLDS = (2, 2)  # (M1, M2) when the table has no entry
QUANTIZED_DEFAULT_THRESHOLDS = (1, 65)  # the same for a quantized weight
PLAIN_FORMAT = "float16"  # minifd.kernels.weight_formats' name of a plain weight's format
TABLE_FILE = "linear_dispatch.json"
TABLE_FORMAT = 1
CPU_DEVICE_NAME = "cpu"


# ----------------------------------------------------------------------------------------------
# Where the table lives
# ----------------------------------------------------------------------------------------------

def table_path():
    return cache_root() / TABLE_FILE


def shape_key(n, k, weight_format=PLAIN_FORMAT):
    return f"{n},{k}" if weight_format == PLAIN_FORMAT else f"{n},{k},{weight_format}"


def parse_shape_key(key):
    """shape_key's inverse: "N,K[,format]" -> (N, K, weight format)."""
    n, k, *weight_format = key.split(",")
    return int(n), int(k), weight_format[0] if weight_format else PLAIN_FORMAT


def default_thresholds(weight_format=PLAIN_FORMAT):
    return DEFAULT_THRESHOLDS if weight_format == PLAIN_FORMAT else QUANTIZED_DEFAULT_THRESHOLDS


def read_table(path):
    """path -> {device name: {"N,K": {"m1", "m2", "max_m"}}}; {} when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MinifdError(f"{path}: unreadable dispatch table ({error}); delete it or rerun `minifd tune`") from None
    if not isinstance(raw, dict) or raw.get("format") != TABLE_FORMAT or not isinstance(raw.get("devices"), dict):
        raise MinifdError(f"{path}: not a format-{TABLE_FORMAT} dispatch table; delete it or rerun `minifd tune`")
    return raw["devices"]


def write_table(path, devices):
    """Replace the table at `path` atomically (write a temporary file beside it, then rename)."""
    write_text_atomically(path, json.dumps({"format": TABLE_FORMAT, "devices": devices}, indent=2, sort_keys=True) + "\n")
    forget_tables()


@functools.lru_cache(maxsize=None)
def _table_at(path_string):
    return read_table(path_string)


def forget_tables():
    """Drop the tables read so far, so the next dispatch rereads the file."""
    _table_at.cache_clear()


# ----------------------------------------------------------------------------------------------
# The decision
# ----------------------------------------------------------------------------------------------

def thresholds(device, n, k, weight_format=PLAIN_FORMAT):
    """-> (M1, M2) for weight shape [n, k] in `weight_format` on `device` (a name as in the table)."""
    entry = _table_at(str(table_path())).get(device, {}).get(shape_key(n, k, weight_format))
    if entry is None:
        return default_thresholds(weight_format)
    return int(entry["m1"]), int(entry["m2"])


def choose_implementation(m, n, k, device, graph_captured=False, weight_format=PLAIN_FORMAT):
    """M rows of x against a weight [n, k] in `weight_format` on `device` -> "gemv" | "flat_gemm" | "library".

    graph_captured: the product is being recorded into a CUDA graph, where CuPy cannot launch
    cuBLAS, so where the table says library the flat GEMM runs instead."""
    m1, m2 = thresholds(device, n, k, weight_format)
    if m < m1:
        return "gemv"
    if m < m2 or (graph_captured and device != CPU_DEVICE_NAME):
        return "flat_gemm"
    return "library"


# ----------------------------------------------------------------------------------------------
# The GPU the kernels run on
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GpuProperties:
    name: str
    multiprocessors: int
    warp_size: int
    l2_bytes: int


def gpu_properties():
    """The current CuPy device's name and the sizes the launchers plan with."""
    import cupy

    return _gpu_properties(cupy.cuda.runtime.getDevice())


@functools.lru_cache(maxsize=None)
def _gpu_properties(device_id):
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"]
    return GpuProperties(
        name=name.decode() if isinstance(name, bytes) else str(name),
        multiprocessors=int(props["multiProcessorCount"]),
        warp_size=int(props["warpSize"]),
        l2_bytes=int(props["l2CacheSize"]),
    )
