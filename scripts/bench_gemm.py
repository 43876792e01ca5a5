"""Benchmark the linear-layer implementations on the Llama-2-7B shapes (run on a GPU).

For each weight shape (N, K) and M = 1, 2, 4, 8, 16, 32, 64, 128 it times, side by side in one run:
GEMV (ImplA), flat GEMM (ImplB), cuBLAS through cupy.matmul (ImplC), torch.matmul when torch
imports, and `linear` left to the dispatcher. Bandwidth is (bytes of W + x + y) / time as a % of the
device-to-device copy bandwidth measured here (minifd.bench.copy_bandwidth: bytes read + written).
Timing: CUDA events between back-to-back calls queued behind a busy GPU, the median of --repeats
calls, W rotated among copies that exceed the L2 cache (minifd.tuning.GpuTimer, make_operands).

Targets (issue 4): for M <= 8, the better of GEMV / flat GEMM at >= 90% of copy bandwidth and
>= 1.15x cuBLAS on average; the dispatcher's choice within 3% of the best of the three at every M.

--quantize int8|int4 (issue 13): GEMV, the flat GEMM and the dispatcher read the weights quantized
(on the GPU, from the same random fp16 weights), while cuBLAS and torch keep multiplying by the
fp16 weights: the speedup column is then what quantization buys, and each %bw counts the bytes its
own weight format streams.

    PYTHONPATH=. python3 scripts/bench_gemm.py [--quick] [--quantize int8|int4] [--json OUT.json]
"""

import argparse
import json

import numpy as np

from minifd.backend import cupy_or_none
from minifd.bench import copy_bandwidth
from minifd.kernels.dispatch import choose_implementation, gpu_properties
from minifd.kernels.linear import linear
from minifd.model.quantized import FORMATS, QUANTIZERS
from minifd.tuning import GpuTimer, WeightShape, make_operands

SHAPES = (
    WeightShape("qkv", 12288, 4096),
    WeightShape("o", 4096, 4096),
    WeightShape("gate_up", 22016, 4096),
    WeightShape("down", 4096, 11008),
)
MS = (1, 2, 4, 8, 16, 32, 64, 128)
OWN = ("gemv", "flat_gemm")
THREE = ("gemv", "flat_gemm", "library")


def bench_shape(cupy, torch, timer, shape, repeats, quantize=None):
    """-> one row per M: {"m", "<impl>": seconds, ..., "choice"}; quantize: the format GEMV, the flat
    GEMM and the dispatcher read (the library GEMM and torch keep fp16 weights)."""
    x, weights = make_operands(shape, max(MS), cupy)
    own_weights = make_operands(shape, max(MS), cupy, quantize)[1] if quantize else weights
    torch_weights = [torch.as_tensor(w, device="cuda") for w in weights] if torch is not None else None
    torch_x = torch.as_tensor(x, device="cuda") if torch is not None else None
    device = gpu_properties().name
    rows = []
    for m in MS:
        rows_of_x = x[:m]
        calls = {impl: (lambda i, impl=impl: linear(rows_of_x, own_weights[i % len(own_weights)], impl=impl))
                 for impl in OWN}
        calls["library"] = lambda i: linear(rows_of_x, weights[i % len(weights)], impl="library")
        calls["dispatch"] = lambda i: linear(rows_of_x, own_weights[i % len(own_weights)])
        if torch is not None:
            calls["torch"] = lambda i: torch.matmul(torch_x[:m], torch_weights[i % len(weights)].T)
        row = {"m": m, "choice": choose_implementation(m, shape.n, shape.k, device,
                                                       weight_format=quantize or "float16")}
        for name, call in calls.items():
            row[name] = float(np.median(timer.per_call_seconds(call, repeats)))
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the measurements here")
    parser.add_argument("--quantize", choices=sorted(QUANTIZERS), default=None,
                        help="GEMV and the flat GEMM read weights in this format (cuBLAS keeps fp16)")
    args = parser.parse_args()
    cupy = cupy_or_none()
    if cupy is None:
        raise SystemExit("bench_gemm.py needs a GPU (CuPy sees none)")
    try:
        import torch
    except ImportError:
        torch = None
    repeats = args.repeats or (11 if args.quick else 41)
    timer = GpuTimer(cupy)
    bandwidth = copy_bandwidth(cupy, repeats=repeats)
    print(f"device: {gpu_properties().name}; copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); "
          f"median of {repeats} calls; torch {'yes' if torch is not None else 'not importable'}; "
          f"GEMV / flat GEMM weights: {args.quantize or 'float16'}")
    own_bits = FORMATS[args.quantize].bits_per_weight if args.quantize else 16

    header = (f"{'shape':>8} {'M':>4} | {'gemv us':>8} {'%bw':>4} | {'flat us':>8} {'%bw':>4} | {'cuBLAS us':>9} {'%bw':>4}"
              f" | {'torch us':>8} | {'dispatch':>9} {'us':>8} {'chosen/best':>11} | {'own/cuBLAS':>10}")
    print(header)
    print("-" * len(header))
    results, decode_bandwidth, decode_speedup, dispatch_ratios = [], [], [], []
    for shape in SHAPES:
        for row in bench_shape(cupy, torch, timer, shape, repeats, args.quantize):
            m = row["m"]
            activations = 2 * (m * shape.k + m * shape.n)  # fp16 bytes of x and y
            moved = {"library": 2 * shape.n * shape.k + activations,
                     **dict.fromkeys(OWN, own_bits * shape.n * shape.k / 8 + activations)}  # bytes of W, x, y
            percent = {impl: 100 * moved[impl] / row[impl] / bandwidth for impl in THREE}
            own = min(row[impl] for impl in OWN)
            chosen_over_best = row[row["choice"]] / min(row[impl] for impl in THREE)
            dispatch_ratios.append(chosen_over_best)
            if m <= 8:
                decode_bandwidth.append(100 * moved["gemv"] / own / bandwidth)
                decode_speedup.append(row["library"] / own)
            torch_cell = f"{row['torch'] * 1e6:8.1f}" if "torch" in row else f"{'-':>8}"
            print(f"{shape.name:>8} {m:>4} | {row['gemv'] * 1e6:8.1f} {percent['gemv']:4.0f} | "
                  f"{row['flat_gemm'] * 1e6:8.1f} {percent['flat_gemm']:4.0f} | {row['library'] * 1e6:9.1f} "
                  f"{percent['library']:4.0f} | {torch_cell} | {row['choice']:>9} {row['dispatch'] * 1e6:8.1f} "
                  f"{chosen_over_best:11.3f} | {row['library'] / own:10.2f}")
            results.append({"shape": shape.name, "n": shape.n, "k": shape.k, **row})
        print()

    print(f"M <= 8, better of GEMV / flat GEMM: mean {np.mean(decode_bandwidth):.1f}% of copy bandwidth "
          f"(min {np.min(decode_bandwidth):.1f}%), mean {np.mean(decode_speedup):.3f}x cuBLAS "
          f"(min {np.min(decode_speedup):.3f}x)   [targets: >= 90%, >= 1.15x]")
    print(f"dispatcher: chosen implementation / best of three, worst {np.max(dispatch_ratios):.3f}, "
          f"mean {np.mean(dispatch_ratios):.3f}   [target: <= 1.03 at every M]")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"device": gpu_properties().name, "copy_bytes_per_second": bandwidth, "rows": results}, out, indent=1)


if __name__ == "__main__":
    main()
