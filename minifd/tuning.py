"""`minifd tune`: measure the three linear-layer implementations and write the dispatch table.

For each weight shape (N, K) of a model, the sweep times GEMV, flat GEMM and the library GEMM at
every M = 1..max_m on the current device and picks the thresholds of FlashDecoding++'s heuristic
dataflow (minifd/kernels/dispatch.py): M1 where the flat GEMM overtakes the GEMV, M2 where the
library overtakes the flat GEMM. With noisy timings "the first M where B beats A" can flip back and
forth, so (M1, M2) is the pair whose three-region policy has the least total slowdown against the
best implementation, summed over the sweep; when each pair of curves crosses once, that is the
paper's definition.

Each product is tuned in the weight format the engine holds it in, and its thresholds go to that
format's entry of the table: with --weights, a GGUF's Q8_0, Q5_0, Q4_0, Q4_1 and Q4_K projections in theirs
(int8, int4) and the rest in --quantize's or fp16 (a tied LM head stays fp16); with --shapes,
--quantize's or fp16. Quantized weights are random float16 ones quantized on the GPU (the kernels
read the codes; the library GEMM dequantizes first, and pays for it).

The table is the per-user one every run reads (minifd.kernels.dispatch.table_path), or --out FILE.
Tuning measures a GPU: on the CPU, where the products are NumPy emulations whose timings say nothing
about any GPU, the command only writes a table given as --out.

Timing on GPU: CUDA events between back-to-back calls, queued behind device copies that keep the GPU
busy while the host enqueues (so host launch cost never shows), with the weight rotated among copies
that together exceed the L2 cache (so every call streams W from memory, as in a real decode step).
"""

import math
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from minifd.backend import array_module, is_gpu
from minifd.errors import MinifdError
from minifd.kernels.dispatch import (
    CPU_DEVICE_NAME,
    IMPLEMENTATIONS,
    PLAIN_FORMAT,
    default_thresholds,
    gpu_properties,
    parse_shape_key,
    read_table,
    shape_key,
    table_path,
    write_table,
)
from minifd.kernels.linear import linear
from minifd.model.quantized import QUANTIZERS

REPEATS = 9             # timed calls per (implementation, M); the median counts
DROP_AFTER = 8          # an implementation this many M in a row at >= DROP_RATIO x the best stops being timed
DROP_RATIO = 2.0
ROTATION_L2_MULTIPLE = 3  # the rotated weight copies together span this many L2 caches
REPORT_MS = (1, 8, 64)  # M values whose timings the command prints


@dataclass(frozen=True)
class WeightShape:
    name: str
    n: int
    k: int


# ----------------------------------------------------------------------------------------------
# Shapes to tune
# ----------------------------------------------------------------------------------------------

PRODUCT_NAMES = {"wqkv": "qkv", "wo": "o", "w_gate_up": "gate_up", "w_down": "down", "lm_head": "lm_head"}


def model_products(weights, quantize=None):
    """A Hugging Face model directory or a .gguf file -> [(WeightShape, weight format)]: every product's
    [N, K] as the engine holds it on the GPU (the fused QKV and gate/up included) in the format it holds
    it in (minifd.model.weights.projection_formats): a GGUF's Q8_0, Q5_0, Q4_0, Q4_1 and Q4_K projections in
    their own kernel format, the others in `quantize`'s or fp16, a tied LM head fp16. A projection a
    GGUF stores in other types in some layers appears once per format."""
    from minifd.model.loader import open_checkpoint
    from minifd.model.weights import projection_formats

    return [(WeightShape(PRODUCT_NAMES[held.projection], *held.shape), held.format)
            for held in projection_formats(open_checkpoint(weights), quantize, np.float16)]


def parse_shape(text):
    """'N,K' -> WeightShape; anything else is a MinifdError."""
    parts = text.replace("x", ",").split(",")
    try:
        n, k = (int(part) for part in parts)
    except ValueError:
        raise MinifdError(f"--shapes: {text!r} is not N,K (two positive integers)") from None
    if n <= 0 or k <= 0:
        raise MinifdError(f"--shapes: {text!r} is not N,K (two positive integers)")
    return WeightShape("", n, k)


def _unique(products):
    """[(WeightShape, format)] -> the same without repeated (N, K, format), in order."""
    seen, unique = set(), []
    for shape, weight_format in products:
        if (shape.n, shape.k, weight_format) not in seen:
            seen.add((shape.n, shape.k, weight_format))
            unique.append((shape, weight_format))
    return unique


# ----------------------------------------------------------------------------------------------
# Timers: per_call_seconds(call, repeats) -> seconds of each of `repeats` calls call(0), call(1), ...
# ----------------------------------------------------------------------------------------------

class CpuTimer:
    def per_call_seconds(self, call, repeats):
        call(0)
        samples = []
        for i in range(repeats):
            start = time.perf_counter()
            call(i)
            samples.append(time.perf_counter() - start)
        return samples


class GpuTimer:
    FILLER_BYTES = 256 << 20

    def __init__(self, cupy):
        self.cupy = cupy
        self.filler_source = cupy.zeros(self.FILLER_BYTES, dtype=cupy.uint8)
        self.filler_target = cupy.empty_like(self.filler_source)
        self.fill_seconds = min(self._timed_once(lambda i: self._fill(), 4))

    def _fill(self):
        self.filler_target.data.copy_from_device_async(self.filler_source.data, self.FILLER_BYTES)

    def _timed_once(self, call, repeats):
        events = [self.cupy.cuda.Event() for _ in range(repeats + 1)]
        events[0].record()
        for i in range(repeats):
            call(i)
            events[i + 1].record()
        events[-1].synchronize()
        return [self.cupy.cuda.get_elapsed_time(events[i], events[i + 1]) * 1e-3 for i in range(repeats)]

    def per_call_seconds(self, call, repeats):
        call(0)  # compile, allocate workspaces
        call(1)
        self.cupy.cuda.runtime.deviceSynchronize()
        start = time.perf_counter()
        for i in range(3):
            call(i)
        host_seconds = (time.perf_counter() - start) / 3
        # Keep the GPU busy for twice as long as the host needs to enqueue the timed calls.
        for _ in range(math.ceil(2 * repeats * host_seconds / self.fill_seconds) + 1):
            self._fill()
        return self._timed_once(call, repeats)


# ----------------------------------------------------------------------------------------------
# The sweep and the thresholds
# ----------------------------------------------------------------------------------------------

def sweep(shape, max_m, xp, timer, repeats=REPEATS, quantize=None):
    """-> {implementation: [max_m] median seconds at M = 1..max_m; inf once it stopped being timed};
    quantize: None, or "int8" / "int4" to time weights in that format."""
    x, weights = make_operands(shape, max_m, xp, quantize)
    times = {impl: np.full(max_m, np.inf) for impl in IMPLEMENTATIONS}
    active = list(IMPLEMENTATIONS)
    losing_streak = dict.fromkeys(IMPLEMENTATIONS, 0)
    for m in range(1, max_m + 1):
        rows = x[:m]
        for impl in active:
            samples = timer.per_call_seconds(
                lambda i, impl=impl: linear(rows, weights[i % len(weights)], impl=impl), repeats
            )
            times[impl][m - 1] = float(np.median(samples))
        best = min(times[impl][m - 1] for impl in active)
        for impl in [impl for impl in active if impl != "library"]:
            losing = times[impl][m - 1] >= DROP_RATIO * best
            losing_streak[impl] = losing_streak[impl] + 1 if losing else 0
            if losing_streak[impl] >= DROP_AFTER:
                active.remove(impl)
    return times


def make_operands(shape, max_m, xp, quantize=None):
    """-> x: [max_m, K], and copies of a weight [N, K] (quantized when `quantize` names a format)
    enough to exceed the L2 cache on GPU."""
    rng = np.random.default_rng(0)
    rounded = QUANTIZERS[quantize] if quantize is not None else (lambda w: w)
    if not is_gpu(xp):
        x = rng.uniform(-1, 1, (max_m, shape.k)).astype(np.float32)
        return x, [rounded(rng.uniform(-1, 1, (shape.n, shape.k)).astype(np.float32))]
    weights = [rounded((xp.random.random((shape.n, shape.k), dtype=xp.float32) - 0.5).astype(xp.float16))]
    copies = max(2, math.ceil(ROTATION_L2_MULTIPLE * gpu_properties().l2_bytes / weights[0].nbytes))
    weights += [rounded((xp.random.random((shape.n, shape.k), dtype=xp.float32) - 0.5).astype(xp.float16))
                for _ in range(copies - 1)]
    x = xp.asarray(rng.uniform(-1, 1, (max_m, shape.k)), dtype=xp.float16)
    return x, weights


def choose_thresholds(times):
    """times: {implementation: [max_m] seconds at M = 1..max_m, inf where not measured} -> (M1, M2),
    1 <= M1 <= M2 <= max_m + 1, minimising sum over M of time(policy(M)) / best time at M."""
    columns = np.stack([np.asarray(times[impl], dtype=np.float64) for impl in IMPLEMENTATIONS])  # [3, max_m]
    slowdown = np.minimum(columns / columns.min(axis=0), 1e6)  # unmeasured -> a large finite penalty
    gemv, flat, library = (np.concatenate([[0.0], np.cumsum(row)]) for row in slowdown)  # prefix sums
    # cost[i, j]: GEMV for M <= i, flat GEMM for i < M <= j, library after (i = M1 - 1, j = M2 - 1).
    cost = gemv[:, None] + (flat[None, :] - flat[:, None]) + (library[-1] - library[None, :])
    cost[np.tril_indices_from(cost, k=-1)] = np.inf
    i, j = np.unravel_index(np.argmin(cost), cost.shape)
    return int(i) + 1, int(j) + 1


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------

@click.command("tune")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="A Hugging Face model directory or a .gguf file: tune the shapes of its projections.")
@click.option("--shapes", "use_shapes", is_flag=True, help="Tune the weight shapes N,K given as arguments.")
@click.argument("shape_texts", nargs=-1, metavar="[N,K ...]")
@click.option("--max-m", type=click.IntRange(1, 4096), default=256, show_default=True, help="Sweep M = 1..this.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--quantize", type=click.Choice(sorted(QUANTIZERS)), default=None,
              help="Tune the products --quantize would round at load (with --shapes: all of them) in this "
                   "format (random weights quantized on the GPU).")
@click.option("--show", is_flag=True, help="Print the dispatch table and exit.")
@click.option("--out", "out_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write (with --show: read) this table instead of the per-user one every run reads.")
def tune_command(weights, use_shapes, shape_texts, max_m, device, quantize, show, out_path):
    """Find, per weight shape, where flat GEMM beats GEMV (M1) and the library beats flat GEMM (M2).

    minifd tune --weights DIR|FILE.gguf | --shapes N,K [N,K ...] [--quantize int8|int4] [--out FILE];
    minifd tune --show
    """
    path = table_path() if out_path is None else out_path
    if show:
        for line in dispatch_table_lines(path):
            click.echo(line)
        return
    xp = array_module(device)
    if not is_gpu(xp) and out_path is None:
        raise MinifdError("tuning measures a GPU, and this run has none (CuPy sees no GPU, or --device cpu): "
                          f"{path} is left as it is (--out FILE writes the CPU emulations' timings there)")
    if shape_texts and not use_shapes:
        raise MinifdError(f"unexpected argument {shape_texts[0]!r} (weight shapes follow --shapes)")
    products = model_products(weights, quantize) if weights is not None else []
    products += [(parse_shape(text), quantize or PLAIN_FORMAT) for text in shape_texts]
    if not products:
        raise MinifdError("nothing to tune: give --weights DIR|FILE.gguf or --shapes N,K [N,K ...]")
    device_name = gpu_properties().name if is_gpu(xp) else CPU_DEVICE_NAME
    timer = GpuTimer(xp) if is_gpu(xp) else CpuTimer()
    click.echo(f"tuning on {device_name}, M = 1..{max_m}")
    for shape, weight_format in _unique(products):
        times = sweep(shape, max_m, xp, timer, quantize=None if weight_format == PLAIN_FORMAT else weight_format)
        m1, m2 = choose_thresholds(times)
        devices = read_table(path)  # each shape is saved as soon as it is measured
        key = shape_key(shape.n, shape.k, weight_format)
        devices.setdefault(device_name, {})[key] = {"m1": m1, "m2": m2, "max_m": max_m}
        write_table(path, devices)
        click.echo(f"  {shape.name:>8} {shape.n} x {shape.k} {weight_format}: M1 = {m1}, M2 = {m2}   "
                   + _timings_line(times, max_m))
    click.echo(f"wrote {path}")


def _timings_line(times, max_m):
    parts = []
    for m in (m for m in REPORT_MS if m <= max_m):
        cells = ", ".join(f"{impl} {times[impl][m - 1] * 1e6:.1f}" for impl in IMPLEMENTATIONS if np.isfinite(times[impl][m - 1]))
        parts.append(f"M={m}: {cells} us")
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# The table as text (`minifd tune --show`, `minifd info`)
# ----------------------------------------------------------------------------------------------

def dispatch_table_lines(path, device_names=None):
    """The dispatch table at `path` -> lines of text: per device (those in device_names, or all) and
    weight shape, the M each implementation covers, and what every other shape uses."""
    devices = read_table(path)
    shown = sorted(name for name in devices if device_names is None or name in device_names)
    defaults = implementation_ranges(*default_thresholds())
    quantized_defaults = implementation_ranges(*default_thresholds("int4"))
    if not shown:
        where = f"no dispatch table at {path}" if not devices else f"{path} has no entry for {', '.join(device_names)}"
        return [f"dispatch: {where}; every shape uses the defaults: {defaults}; quantized weights: "
                f"{quantized_defaults} (`minifd tune` on a GPU measures it)"]
    lines = [f"dispatch table: {path} (shapes not listed: {defaults}; quantized: {quantized_defaults})"]
    for name in shown:
        lines.append(f"  {name}")
        for key, entry in sorted(devices[name].items(), key=lambda item: parse_shape_key(item[0])):
            n, k, weight_format = parse_shape_key(key)
            quantized = "" if weight_format == PLAIN_FORMAT else f" {weight_format}"
            lines.append(f"    {n} x {k}{quantized}: {implementation_ranges(entry['m1'], entry['m2'])} "
                         f"(swept M <= {entry['max_m']})")
    return lines


def implementation_ranges(m1, m2):
    """Thresholds -> the M each implementation covers, e.g. (2, 2) -> 'GEMV for M = 1, flat GEMM for
    none, library for M >= 2'."""
    return f"GEMV for {_m_range(1, m1 - 1)}, flat GEMM for {_m_range(m1, m2 - 1)}, library for {_m_range(m2, None)}"


def _m_range(first, last):
    """M = first..last in words; last None: no end."""
    if last is None:
        return "every M" if first == 1 else f"M >= {first}"
    if last < first:
        return "none"
    return f"M = {first}" if first == last else f"M = {first}..{last}"
