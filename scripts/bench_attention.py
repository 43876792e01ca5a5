"""Benchmark the attention kernels side by side on one GPU (a script, not a test).

Decode: Llama-2-7B shape (32 query heads = 32 KV heads, head_dim 128) and a GQA shape (32 query /
8 KV heads), batch 1 and 8, KV length 1K..128K. For each: the unified-max kernel the plan picks
("kernel": tensor cores, decode_attention_mma.cu, for GQA groups of 4 or more on sm_80+; else CUDA
cores), the unified-max kernel on CUDA cores ("cores us", the same kernel where the plan picks it),
the synchronised kernel, and torch's scaled_dot_product_attention on the same device memory, all
timed as CUDA graphs (the GPU time of a captured decode step, without Python launch overhead);
achieved bandwidth (K and V bytes read / time) as a percentage of the measured device-to-device copy
bandwidth; and the unified-max kernel with every row forced onto the recompute path.
Prefill: causal, 1K..8K tokens, at the Llama-2-7B shape (32 heads, head_dim 128), a GQA shape (32
query / 8 KV heads) and SmolLM2's (9 query / 3 KV heads, head_dim 64): the unified-max kernel, the
synchronised kernel and the unified-max kernel with every row recomputed, against torch SDPA with its
flash backend forced (GQA K and V repeated to the query heads beforehand, as Hugging Face does), all
timed as CUDA graphs; TFLOP/s counts the causal half of Q K^T and P V.
"vs sync" and "vs sdpa" are speedups of the unified-max kernel: the other's time / its time.

Usage: PYTHONPATH=. python3 scripts/bench_attention.py [--quick] [--prefill-only]
"""

import argparse
import sys

import numpy as np

from minifd.backend import cupy_or_none
from minifd.bench import copy_bandwidth
from minifd.kernels import attention
from minifd.kernels.decode_attention import UNIFIED_MAX_KERNEL, decode_attention_gpu
from minifd.kernels.decode_attention_mma import TENSOR_CORE_KERNEL
from minifd.kernels.decode_split_kv import plan_for
from minifd.kernels.softmax_range import DEFAULT_SOFTMAX_RANGE, SoftmaxRange

EVERY_ROW_UNSAFE = SoftmaxRange(phi=200.0)  # every exp(s - phi) underflows: the whole batch recomputes


def gpu_milliseconds(cupy, function, repeats):
    """Median GPU time of function() over `repeats` runs after two warm-up runs, in ms (events around
    each call: right for kernels much longer than the Python launch overhead)."""
    for _ in range(2):
        function()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record()
        function()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def graph_milliseconds(cupy, function, repeats, calls_per_graph=20):
    """GPU time of one function() call in ms, without the host: calls_per_graph calls are captured in
    a CUDA graph (as a decode step would be) and the median replay time is divided among them."""
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        function()  # compile, allocate the workspace: nothing may allocate fresh memory while capturing
        stream.synchronize()
        stream.begin_capture()
        for _ in range(calls_per_graph):
            function()
        graph = stream.end_capture()
        ms = gpu_milliseconds(cupy, lambda: graph.launch(stream), repeats)
    return ms / calls_per_graph


def torch_sdpa():
    """torch's scaled_dot_product_attention, or None when torch with CUDA is missing."""
    try:
        import torch
        import torch.nn.functional as functional
    except ImportError:
        return None
    return (torch, functional.scaled_dot_product_attention) if torch.cuda.is_available() else None


def torch_graph_milliseconds(torch, function, repeats, calls_per_graph=20):
    """graph_milliseconds for a torch function: one call's GPU time in ms from a captured CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            function()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            function()
    return torch_milliseconds(torch, graph.replay, repeats) / calls_per_graph


def torch_milliseconds(torch, function, repeats):
    """Like gpu_milliseconds, timed on torch's current stream."""
    for _ in range(2):
        function()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        function()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return float(np.median(times))


def time_decode(cupy, sdpa, batch, n_heads, n_kv_heads, length, repeats):
    """-> (async, async on CUDA cores, sync, torch SDPA, all-rows-recomputed) ms per call and whether
    the plan runs the unified max on tensor cores, for one decode shape."""
    rng = np.random.default_rng(0)
    q = cupy.asarray(rng.standard_normal((batch, n_heads, 128)), cupy.float16)
    k_cache, v_cache = (cupy.random.standard_normal((batch, n_kv_heads, length, 128), dtype=cupy.float32)
                        .astype(cupy.float16) for _ in range(2))
    lengths = cupy.full((batch,), length, cupy.int32)
    cupy.cuda.Device().synchronize()  # the inputs come from the legacy stream; the graphs run on their own

    def call(method="async", softmax_range=None):
        return lambda: attention.decode_attention(q, k_cache, v_cache, lengths, softmax_range, method)

    counter = cupy.zeros(1, cupy.uint64)

    def on_cuda_cores():
        decode_attention_gpu(q, k_cache, v_cache, lengths, DEFAULT_SOFTMAX_RANGE, counter, tensor_cores=False)

    async_ms = graph_milliseconds(cupy, call(), repeats)
    cores_ms = graph_milliseconds(cupy, on_cuda_cores, repeats)
    tensor_cores = plan_for(UNIFIED_MAX_KERNEL, TENSOR_CORE_KERNEL, q, k_cache, v_cache, lengths)[0].tensor_cores
    sync_ms = graph_milliseconds(cupy, call("sync"), repeats)
    recompute_ms = graph_milliseconds(cupy, call(softmax_range=EVERY_ROW_UNSAFE), repeats)
    sdpa_ms = float("nan")
    if sdpa is not None:
        torch, function = sdpa
        tq, tk, tv = (torch.from_dlpack(a) for a in (q[:, :, None], k_cache, v_cache))
        gqa = dict(enable_gqa=True) if n_heads != n_kv_heads else {}
        sdpa_ms = torch_graph_milliseconds(torch, lambda: function(tq, tk, tv, **gqa), repeats)
    return async_ms, cores_ms, sync_ms, sdpa_ms, recompute_ms, tensor_cores


def bench_decode(cupy, sdpa, copy_gbs, lengths, repeats):
    print("\nDecode attention (fp16; GPU time per call from CUDA graphs; bandwidth = K+V bytes / time)")
    header = (f"{'shape':>10} {'batch':>5} {'KV':>7} {'kernel':>6} | {'async us':>9} {'cores us':>9} {'sync us':>9} "
              f"{'sdpa us':>9} {'recomp us':>9} | {'GB/s':>6} {'%copy':>6} | {'vs sync':>10} {'vs sdpa':>10}")
    print(header)
    print("-" * len(header))
    for name, n_heads, n_kv_heads in (("MHA 32/32", 32, 32), ("GQA 32/8", 32, 8)):
        for batch in (1, 8):
            for length in lengths:
                cache_bytes = 2 * batch * n_kv_heads * length * 128 * 2
                if 2 * cache_bytes > 0.6 * cupy.cuda.Device().mem_info[1]:
                    continue
                async_ms, cores_ms, sync_ms, sdpa_ms, recompute_ms, tensor_cores = time_decode(
                    cupy, sdpa, batch, n_heads, n_kv_heads, length, repeats)
                cupy.get_default_memory_pool().free_all_blocks()
                gbs = cache_bytes / async_ms / 1e6
                print(f"{name:>10} {batch:>5} {length:>7} {'mma' if tensor_cores else 'cores':>6} | "
                      f"{async_ms * 1e3:>9.1f} {cores_ms * 1e3:>9.1f} {sync_ms * 1e3:>9.1f} "
                      f"{sdpa_ms * 1e3:>9.1f} {recompute_ms * 1e3:>9.1f} | {gbs:>6.0f} {100 * gbs / copy_gbs:>5.1f}% | "
                      f"{sync_ms / async_ms:>10.2f} {sdpa_ms / async_ms:>10.2f}")


def flash_sdpa(torch, function):
    """function with torch's flash-attention backend forced (where torch can pin a backend)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return function

    def pinned(*args, **kwargs):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return function(*args, **kwargs)
    return pinned


PREFILL_SHAPES = (("MHA 32/32 d128", 32, 32, 128), ("GQA 32/8 d128", 32, 8, 128), ("SmolLM2 9/3 d64", 9, 3, 64))


def time_prefill(cupy, sdpa, seq, n_heads, n_kv_heads, head_dim, repeats):
    """-> (async, sync, all-rows-recomputed, torch SDPA) ms per call for one causal prefill shape."""
    q = cupy.random.standard_normal((seq, n_heads, head_dim), dtype=cupy.float32).astype(cupy.float16)
    k, v = (cupy.random.standard_normal((seq, n_kv_heads, head_dim), dtype=cupy.float32).astype(cupy.float16)
            for _ in range(2))
    cupy.cuda.Device().synchronize()  # the inputs come from the legacy stream; the graphs run on their own

    def call(method="async", softmax_range=None):
        return lambda: attention.prefill_attention(q, k, v, softmax_range, method)

    calls = max(2, 20 * 1024 // seq)  # graphs of about the same length at every seq
    async_ms = graph_milliseconds(cupy, call(), repeats, calls)
    sync_ms = graph_milliseconds(cupy, call("sync"), repeats, calls)
    recompute_ms = graph_milliseconds(cupy, call(softmax_range=EVERY_ROW_UNSAFE), repeats, calls)
    sdpa_ms = float("nan")
    if sdpa is not None:
        torch, function = sdpa
        group = n_heads // n_kv_heads
        tq, tk, tv = (torch.from_dlpack(a).transpose(0, 1)[None] for a in (q, k, v))  # [1, heads, seq, dim]
        tk, tv = (t.repeat_interleave(group, dim=1) for t in (tk, tv))
        pinned = flash_sdpa(torch, function)
        sdpa_ms = torch_graph_milliseconds(torch, lambda: pinned(tq, tk, tv, is_causal=True), repeats, calls)
    return async_ms, sync_ms, recompute_ms, sdpa_ms


def bench_prefill(cupy, sdpa, lengths, repeats):
    print("\nPrefill attention (causal, fp16; GPU time per call from CUDA graphs; SDPA = flash backend)")
    header = (f"{'shape':>15} {'tokens':>6} | {'async ms':>8} {'sync ms':>8} {'recomp ms':>9} {'sdpa ms':>8} | "
              f"{'TFLOP/s':>7} {'sdpa TF/s':>9} | {'vs sync':>7} {'vs sdpa':>7}")
    print(header)
    print("-" * len(header))
    for name, n_heads, n_kv_heads, head_dim in PREFILL_SHAPES:
        for seq in lengths:
            async_ms, sync_ms, recompute_ms, sdpa_ms = time_prefill(cupy, sdpa, seq, n_heads, n_kv_heads, head_dim,
                                                                    repeats)
            cupy.get_default_memory_pool().free_all_blocks()
            flops = 2 * 2 * n_heads * head_dim * seq * (seq + 1) / 2  # Q K^T and P V over the causal half
            print(f"{name:>15} {seq:>6} | {async_ms:>8.3f} {sync_ms:>8.3f} {recompute_ms:>9.3f} {sdpa_ms:>8.3f} | "
                  f"{flops / async_ms / 1e9:>7.1f} {flops / sdpa_ms / 1e9:>9.1f} | "
                  f"{sync_ms / async_ms:>7.2f} {sdpa_ms / async_ms:>7.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer lengths and repeats")
    parser.add_argument("--prefill-only", action="store_true", help="time prefill attention only")
    args = parser.parse_args()
    cupy = cupy_or_none()
    if cupy is None:
        sys.exit("bench_attention: needs a GPU through CuPy")
    repeats = 10 if args.quick else 30
    sdpa = torch_sdpa()
    properties = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    print(f"device: {properties['name'].decode()}, {properties['multiProcessorCount']} SMs; "
          f"torch SDPA: {'yes' if sdpa else 'not available'}")
    if not args.prefill_only:
        copy_gbs = copy_bandwidth(cupy, repeats=repeats) / 1e9
        print(f"copy bandwidth {copy_gbs:.0f} GB/s")
        decode_lengths = ([1024, 8192, 32768, 131072] if args.quick
                          else [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072])
        bench_decode(cupy, sdpa, copy_gbs, decode_lengths, repeats)
    bench_prefill(cupy, sdpa, [1024, 4096] if args.quick else [1024, 2048, 4096, 8192], repeats)
    attention.reset_recompute_count()


if __name__ == "__main__":
    main()
