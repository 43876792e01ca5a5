"""Compare GEMV launch geometries at the Llama-2-7B shapes, M = 1, inside CUDA graphs.

Each measurement replays a graph of back-to-back GEMVs over several copies of the weight (more
bytes than L2 holds), so launch overhead and cache hits stay out of the numbers, as in a captured
decode step. Prints microseconds per GEMV and % of the measured copy bandwidth per shape (of the
bytes the weight's format streams). --quantize int8|int4 sweeps weights quantized on the GPU.
"""

import argparse
import itertools

import cupy
import numpy as np

from minifd.bench import copy_bandwidth
from minifd.kernels.gemv import GemvGeometry, gemv_gpu
from minifd.model.quantized import QUANTIZERS

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
          "lm_head": (32000, 4096)}


def graph_time(function, calls, repeats=5):
    """Median seconds per call of `function(i)` for i in range(calls), replayed as one CUDA graph."""
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        for i in range(calls):  # warm-up: compile, fill the memory pool
            function(i)
        stream.begin_capture()
        for i in range(calls):
            function(i)
        graph = stream.end_capture()
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        times = []
        for _ in range(repeats):
            start.record(stream)
            graph.launch(stream)
            stop.record(stream)
            stop.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, stop) / 1000 / calls)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--quantize", choices=sorted(QUANTIZERS), default=None)
    args = parser.parse_args()
    bandwidth = copy_bandwidth(cupy)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s, M = {args.m}, {args.quantize or 'float16'} weights")
    rng = cupy.random.default_rng(0)
    rounded = QUANTIZERS[args.quantize] if args.quantize else (lambda w: w)
    weights = {name: [rounded(rng.standard_normal((n, k), dtype=cupy.float32).astype(cupy.float16)) for _ in range(4)]
               for name, (n, k) in SHAPES.items()}
    xs = {name: rng.standard_normal((args.m, k), dtype=cupy.float32).astype(cupy.float16)
          for name, (n, k) in SHAPES.items()}
    print(f"{'threads rows unroll stage':26s} " + " ".join(f"{name:>14s}" for name in SHAPES) + "   total us")
    for (threads, rows, unroll), stage in itertools.product(
            ((128, 1, 8), (128, 1, 16), (128, 1, 32), (128, 2, 8), (128, 2, 16), (64, 1, 8)), (8192, 16384)):
        geometry = GemvGeometry(threads, rows, unroll, stage)
        cells, total = [], 0.0
        for name, (n, k) in SHAPES.items():
            copies, x = weights[name], xs[name]
            seconds = graph_time(lambda i: gemv_gpu(x, copies[i % len(copies)], geometry), calls=16)
            percent = 100 * copies[0].nbytes / bandwidth / seconds
            total += seconds * (1 if name == "lm_head" else 32)
            cells.append(f"{seconds * 1e6:6.1f} ({percent:3.0f}%)")
        print(f"{threads:7d} {rows:4d} {unroll:6d} {stage:5d}   " + " ".join(f"{c:>14s}" for c in cells) + f"   {total * 1e6:8.0f}")


if __name__ == "__main__":
    main()
