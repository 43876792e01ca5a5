"""The flat GEMM against GEMV and cuBLAS at the Llama-2-7B and Llama-3-8B shapes, M = 1..64, inside
CUDA graphs, for several launch geometries; checks every fused variant against NumPy first.

Each measurement replays a graph of back-to-back products over copies of the weight that together
exceed the L2 cache, as in a captured decode step. cuBLAS is timed the same way through torch's
CUDA graphs (CuPy cannot record cuBLAS), when torch imports. Prints microseconds per product, % of
the measured copy bandwidth (bytes of W over time, against read + write copy bandwidth) and the
ratio to cuBLAS; --json writes every number. --quantize int8|int4 times GEMV and the flat GEMM on the
weights quantized on the GPU (cuBLAS keeps the fp16 ones) and counts the bytes of their format;
the quantized kernels' correctness is the properties' (minifd check), so the fp16 check alone runs.

    PYTHONPATH=. python3 scripts/sweep_flat_gemm.py [--geometries 8,1,4 4,1,4 ...] [--ms 1,8,64] [--quantize int4] [--json F]
"""

import argparse
import json

import cupy
import numpy as np
from sweep_gemv import graph_time

from minifd.bench import copy_bandwidth
from minifd.kernels.flat_gemm import FlatGemmGeometry, flat_gemm_emulated, flat_gemm_gpu
from minifd.kernels.gemv import gemv_gpu
from minifd.kernels.rms_norm import RMSNorm
from minifd.model.quantized import QUANTIZERS

SHAPES = {"7b qkv": (12288, 4096), "7b o": (4096, 4096), "7b gate_up": (22016, 4096), "7b down": (4096, 11008),
          "7b lm_head": (32000, 4096), "8b qkv": (6144, 4096), "8b gate_up": (28672, 4096),
          "8b down": (4096, 14336), "8b lm_head": (128256, 4096)}
L2_OVERFLOW_BYTES = 256 << 20  # the weight copies of one shape together exceed any L2 by far


def check_variants(geometry, rng):
    """Every fused kernel of flat_gemm.cu against its float32 emulation -> worst relative error."""
    worst = 0.0
    for m, n, k in ((1, 64, 512), (5, 96, 1000), (8, 320, 4096), (13, 48, 2056), (40, 160, 777), (64, 32, 4096),
                    (70, 48, 1024)):
        x = rng.standard_normal((m, k)).astype(np.float16)
        w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float16)
        gain = rng.uniform(0.5, 1.5, k).astype(np.float16)
        residual = rng.standard_normal((m, n)).astype(np.float16)
        variants = {"store": {}, "store_norm": dict(norm=True), "residual": dict(residual=residual),
                    "gated_norm": dict(norm=True, gated=True)}
        for name, fused in variants.items():
            if fused.get("gated") and n % 16:
                continue
            cpu_norm = RMSNorm(gain.astype(np.float32), 1e-5) if fused.get("norm") else None
            gpu_norm = RMSNorm(cupy.asarray(gain), 1e-5) if fused.get("norm") else None
            cpu_residual = fused.get("residual")
            expected = flat_gemm_emulated(x.astype(np.float32), w.astype(np.float32), norm=cpu_norm,
                                          residual=None if cpu_residual is None else cpu_residual.astype(np.float32),
                                          gated=fused.get("gated", False), geometry=geometry)
            got = flat_gemm_gpu(cupy.asarray(x), cupy.asarray(w), norm=gpu_norm,
                                residual=None if cpu_residual is None else cupy.asarray(cpu_residual),
                                gated=fused.get("gated", False), geometry=geometry).get().astype(np.float32)
            error = float(np.abs(got - expected).max() / (np.abs(expected).max() + 1e-30))
            worst = max(worst, error)
            if not np.isfinite(error) or error > 5e-3:
                raise SystemExit(f"flat_gemm {name} m={m} n={n} k={k} {geometry}: relative error {error:.2e}")
    return worst


def variant_arguments(variant, m, n, k):
    """The fused steps of one flat_gemm.cu kernel, as flat_gemm_gpu's keyword arguments."""
    norm = RMSNorm(cupy.ones(k, dtype=cupy.float16), 1e-5)
    return {"store": {}, "store_norm": dict(norm=norm), "gated_norm": dict(norm=norm, gated=True),
            "residual": dict(residual=cupy.zeros((m, n), dtype=cupy.float16))}[variant]


def cublas_graph_time(torch, x, weights, calls=16, repeats=5):
    """Median seconds per torch.matmul (cuBLAS) replayed from a torch CUDA graph."""
    tx = torch.as_tensor(x, device="cuda")
    tws = [torch.as_tensor(w, device="cuda") for w in weights]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for i in range(calls):
            torch.matmul(tx, tws[i % len(tws)].T)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            torch.matmul(tx, tws[i % len(tws)].T)
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1000 / calls)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometries", nargs="+", default=["8,1,2,4"], help="warps,row_tiles,pieces[,min_blocks[,stages]] per geometry")
    parser.add_argument("--ms", default="1,2,4,8,16,32,64")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--variant", default="store", choices=("store", "store_norm", "residual", "gated_norm"),
                        help="which fused kernel is timed (cuBLAS always runs the plain product)")
    parser.add_argument("--quantize", choices=sorted(QUANTIZERS), default=None,
                        help="GEMV and the flat GEMM read the weights in this format")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        torch = None
    ms = [int(m) for m in args.ms.split(",")]
    geometries = [FlatGemmGeometry(*(int(v) for v in text.split(","))) for text in args.geometries]
    bandwidth = copy_bandwidth(cupy)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    rng = np.random.default_rng(0)
    for geometry in geometries:
        print(f"{geometry}: fused variants match the emulation, worst relative error {check_variants(geometry, rng):.2e}")

    results = []
    header = f"{'shape':>12} {'M':>3} | {'cuBLAS us':>9} {'%bw':>4} | {'gemv us':>8} {'%bw':>4} | " + " | ".join(
        f"{'flat ' + ','.join(map(str, (g.warps, g.row_tiles, g.pieces, g.min_blocks, g.stages))):>14} {'%bw':>4} {'xcuB':>5}"
        for g in geometries)
    print(header)
    print("-" * len(header))
    device_rng = cupy.random.default_rng(0)
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        copies = max(1, -(-L2_OVERFLOW_BYTES // (2 * n * k)))
        weights = [device_rng.standard_normal((n, k), dtype=cupy.float32).astype(cupy.float16) for _ in range(copies)]
        own = [QUANTIZERS[args.quantize](w) for w in weights] if args.quantize else weights  # what GEMV and flat GEMM read
        for m in ms:
            x = device_rng.standard_normal((m, k), dtype=cupy.float32).astype(cupy.float16)
            row = {"shape": name, "n": n, "k": k, "m": m}
            row["cublas"] = cublas_graph_time(torch, x, weights) if torch is not None else float("nan")
            fused = variant_arguments(args.variant, m, n, k)
            row["gemv"] = (graph_time(lambda i: gemv_gpu(x, own[i % copies], **fused), calls=16)
                           if m <= 8 else float("nan"))
            for geometry in geometries:
                row[str(geometry)] = graph_time(
                    lambda i: flat_gemm_gpu(x, own[i % copies], geometry=geometry, **fused), calls=16)
            streamed = {key: own[0].nbytes for key in row if key not in ("shape", "n", "k", "m")}
            streamed["cublas"] = weights[0].nbytes
            percent = {key: 100 * streamed[key] / bandwidth / row[key] for key in streamed}
            cells = [f"{row[str(g)] * 1e6:14.1f} {percent[str(g)]:4.0f} {row['cublas'] / row[str(g)]:5.2f}"
                     for g in geometries]
            print(f"{name:>12} {m:3d} | {row['cublas'] * 1e6:9.1f} {percent['cublas']:4.0f} | {row['gemv'] * 1e6:8.1f} "
                  f"{percent['gemv']:4.0f} | " + " | ".join(cells), flush=True)
            results.append(row)
        del weights, own
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"copy_bytes_per_second": bandwidth, "rows": results}, out, indent=1)


if __name__ == "__main__":
    main()
