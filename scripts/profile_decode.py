"""Where a decode step's time goes, at the Llama-2-7B shape with random fp16 weights (--quantize: int8/int4 projections).

Run it under Nsight Compute, which times each kernel of one eager decode step in isolation:

    ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
        python3 scripts/profile_decode.py --batch 1 --prompt 1024 > ncu.csv
    python3 scripts/profile_decode.py --summarize ncu.csv

The first command also prints the step time with and without a CUDA graph; the second groups the
kernel times by kernel, so their sum can be set against the graph-replayed step time: what is left
is launch gaps and tails between kernels.
"""

import argparse
import csv
import io
import sys
import time
from collections import defaultdict

import numpy as np


def profile(batch, prompt_tokens, steps, quantize=None):
    import cupy

    from minifd.bench import LLAMA2_7B, copy_bandwidth, random_weights
    from minifd.decode_step import DecodeStep
    from minifd.model.config import LlamaConfig
    from minifd.model.llama import KVCache, Llama

    config = LlamaConfig.from_dict(dict(LLAMA2_7B, max_position_embeddings=prompt_tokens + steps + 8))
    model = Llama(config, random_weights(config, cupy, np.float16, quantize=quantize), cupy, max_seq=config.max_position_embeddings)
    cache = KVCache.allocate(config, batch, prompt_tokens + steps + 8, cupy, np.float16)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (batch, prompt_tokens))
    first = [int(model.prefill(cache, b, tokens[b]).argmax()) for b in range(batch)]
    lengths = np.full(batch, prompt_tokens, dtype=np.int32)
    bandwidth = copy_bandwidth(cupy)
    step_bytes = model.weights.nbytes_streamed_per_step() + batch * (prompt_tokens + steps / 2) * cache.nbytes_per_position()
    draws = np.zeros(batch, dtype=np.float32)
    for use_graph in (True, False):
        step = DecodeStep(model, cache, use_graph=use_graph)
        for _ in range(3):
            step(first, lengths, draws)
        start = time.perf_counter()
        for _ in range(steps):
            step(first, lengths, draws)
        seconds = (time.perf_counter() - start) / steps
        print(f"{'graph' if use_graph else 'eager'} step: {seconds * 1000:.3f} ms; roofline "
              f"{step_bytes / bandwidth * 1000:.3f} ms ({100 * step_bytes / bandwidth / seconds:.0f}%)", file=sys.stderr)
    step = DecodeStep(model, cache, use_graph=False)
    step(first, lengths, draws)
    cupy.cuda.Device().synchronize()
    cupy.cuda.profiler.start()
    step(first, lengths, draws)
    cupy.cuda.Device().synchronize()
    cupy.cuda.profiler.stop()


def summarize(path):
    """ncu --csv output -> kernel time grouped by kernel name, largest first."""
    text = open(path).read()
    rows = list(csv.DictReader(io.StringIO(text[text.index('"ID"'):])))
    totals, counts = defaultdict(float), defaultdict(int)
    for row in rows:
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}.get(row.get("Metric Unit", "nsecond"), 1e-3)
        name = f'{row["Kernel Name"].split("(")[0]} {row.get("Grid Size", "")}'.strip()
        totals[name] += value * scale
        counts[name] += 1
    total = sum(totals.values())
    print(f"{'kernel grid':64s} {'launches':>8s} {'total us':>10s} {'share':>6s}")
    for name, micros in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"{name[:64]:64s} {counts[name]:8d} {micros:10.1f} {100 * micros / total:5.1f}%")
    print(f"{'all kernels':64s} {sum(counts.values()):8d} {total:10.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--quantize", choices=["int8", "int4"], help="the projections in that format")
    parser.add_argument("--summarize", metavar="NCU_CSV")
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize)
    else:
        profile(args.batch, args.prompt, args.steps, args.quantize)
