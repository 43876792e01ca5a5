"""Benchmark the ragged prefill on one GPU (a script, not a test): the time to prefill a batch of
prompts of different lengths, all of them in passes over the weights that each take a chunk of every
prompt with positions left (scheduler.prefill_prompts, what minifd bench runs), against the former loop of
one call per (prompt, chunk), which streams the weights once per prompt and chunk.

Random fp16 weights at a Llama shape (minifd.bench's), 8 prompts of 16..1024 tokens spaced
geometrically by default; prefill_chunk as the engine's default (512 positions per pass). Each mode
is timed end to end (host included, as time to first token counts it), the median of --repeats runs
after a warm-up run that compiles the kernels. Also reports how far the two modes' last-position
logits are apart (fp16 rounding: the products see other row counts).

Usage: PYTHONPATH=. python3 scripts/bench_prefill.py [--shape llama3-8b] [--lengths 16,29,...]
                                                     [--chunk 512] [--repeats 5] [--layers N]
"""

import argparse
import sys
import time

import numpy as np

from minifd.backend import cupy_or_none
from minifd.bench import SHAPES, random_weights
from minifd.engine import PREFILL_CHUNK_TOKENS
from minifd.scheduler import prefill_prompts
from minifd.model.config import LlamaConfig
from minifd.model.llama import KVCache, Llama

DEFAULT_LENGTHS = tuple(int(round(length)) for length in np.geomspace(16, 1024, 8))  # 16 .. 1024


def prefill_one_by_one(model, cache, prompts, chunk):
    """The former loop: prompt i into slot i, chunk positions per call -> last logits, [batch, vocab]."""
    last_logits = []
    for slot, ids in enumerate(prompts):
        for start in range(0, len(ids), chunk):
            logits = model.prefill(cache, slot, ids[start:start + chunk], start)  # [vocab]
        last_logits.append(logits)
    return model.xp.stack(last_logits)


def milliseconds(cupy, prefill, repeats):
    """-> (median wall time of prefill() in ms over `repeats` runs after one warm-up, its last result)"""
    result = prefill()
    times = []
    for _ in range(repeats):
        cupy.cuda.Device().synchronize()
        start = time.perf_counter()
        result = prefill()
        cupy.cuda.Device().synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times)), result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)),
                        help="comma-separated prompt lengths, one prompt each")
    parser.add_argument("--chunk", type=int, default=PREFILL_CHUNK_TOKENS, help="positions per prefill pass")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's, to fit or to hurry")
    args = parser.parse_args()
    cupy = cupy_or_none()
    if cupy is None:
        print("bench_prefill: needs a CUDA or ROCm GPU through CuPy", file=sys.stderr)
        sys.exit(2)
    lengths = [int(length) for length in args.lengths.split(",")]
    if min(lengths) < 1 or args.chunk < 1:
        print("bench_prefill: prompt lengths and --chunk must be >= 1", file=sys.stderr)
        sys.exit(2)
    raw = dict(SHAPES[args.shape])
    if args.layers is not None:
        raw["num_hidden_layers"] = args.layers
    config = LlamaConfig.from_dict(raw)
    model = Llama(config, random_weights(config, cupy, np.float16), cupy, max_seq=max(lengths))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size, length).tolist() for length in lengths]
    cache = KVCache.allocate(config, len(prompts), max(lengths), cupy, model.dtype)

    ragged_ms, ragged = milliseconds(
        cupy, lambda: prefill_prompts(model, cache, prompts, [0] * len(prompts), args.chunk), args.repeats)
    alone_ms, alone = milliseconds(cupy, lambda: prefill_one_by_one(model, cache, prompts, args.chunk), args.repeats)
    difference = float(cupy.abs(ragged - alone).max())
    same_tokens = int((ragged.argmax(axis=-1) == alone.argmax(axis=-1)).sum())
    tokens = sum(lengths)
    print(f"{args.shape} ({config.n_layers} layers), {len(prompts)} prompts of {lengths} tokens ({tokens} in all), "
          f"prefill_chunk {args.chunk}")
    print(f"ragged passes:    {ragged_ms:9.1f} ms  {tokens / ragged_ms * 1000:9.0f} tokens/s")
    print(f"one by one:       {alone_ms:9.1f} ms  {tokens / alone_ms * 1000:9.0f} tokens/s")
    print(f"speedup: {alone_ms / ragged_ms:.2f}x; last logits differ by at most {difference:.3g}, "
          f"greedy first tokens agree for {same_tokens}/{len(prompts)}")


if __name__ == "__main__":
    main()
