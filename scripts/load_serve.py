"""`minifd serve` under load (GPU): aggregate tokens/s, time to first token and inter-token latency
(p50/p99) at 1, 2, 4, 8, 16 concurrent streams, each a streamed /v1/completions over HTTP.

The server is minifd.serve's app on uvicorn in this process (127.0.0.1, --max-batch 8); the clients
are httpx streams started together, one prompt each. Without --weights the model is the Llama-2-7B
shape with random fp16 weights drawn on the GPU (no hub) and the vocabulary of --tokenizer's directory
(a checkpoint's tokenizer.json; SmolLM2's has 49152 tokens, so the LM head has 49152 rows instead of
Llama-2's 32000); with --weights it is that checkpoint. Time to first token counts from the request
to its first text; inter-token latency is the gap between successive streamed pieces (one per
token, but where a token's text is held back, as a partial character or a possible stop string).
Greedy text served alone and among the others: each level's texts against those its prompts got at
one stream (how often they agree on the GPU, which is not batch-invariant).

    PYTHONPATH=. python3 scripts/load_serve.py --tokenizer DIR [--weights DIR] [--streams 1,2,4,8,16] [--max-tokens 128] [--json F]
"""

import argparse
import asyncio
import json
import threading
import time
from pathlib import Path

import numpy as np

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Water boils at",
           "The quick brown fox", "In 1969, humans", "My favourite colour is", "A haiku about rain:"]


def engine_of(args):
    import minifd
    from minifd.backend import array_module
    from minifd.bench import LLAMA2_7B, random_weights
    from minifd.engine import Engine
    from minifd.model.config import LlamaConfig
    from minifd.model.llama import Llama
    from minifd.model.tokenizer import Tokenizer

    if args.weights:
        return minifd.load(args.weights, device=args.device, progress=False), Path(args.weights).name
    xp = array_module(args.device)
    tokenizer_dir = Path(args.tokenizer)
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    config = LlamaConfig.from_dict(dict(LLAMA2_7B, vocab_size=vocab))
    tokenizer = Tokenizer.from_dir(tokenizer_dir, config)
    model = Llama(config, random_weights(config, xp, np.float16), xp, max_seq=config.max_position_embeddings)
    return Engine(tokenizer_dir, config, tokenizer, model, xp, progress=False), f"llama2-7b-shape (vocab {vocab})"


def start_server(engine, name, slots):
    import uvicorn

    from minifd.serve.app import Server

    server = Server(engine, name, slots=slots, max_queue=64)
    http = uvicorn.Server(uvicorn.Config(server.app(), host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=http.run, daemon=True).start()
    while not http.started:
        time.sleep(0.01)
    return http, f"http://127.0.0.1:{http.servers[0].sockets[0].getsockname()[1]}"


async def one_stream(client, url, name, prompt, max_tokens):
    """-> {"text", "tokens", "start", "pieces": [arrival times]} of one streamed greedy completion."""
    body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    pieces, text, tokens = [], [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice.get("text"):
                    pieces.append(time.perf_counter())
                    text.append(choice["text"])
    return {"text": "".join(text), "tokens": tokens, "start": start, "pieces": pieces}


async def one_by_one(url, name, prompts, max_tokens):
    """-> {prompt: its greedy text} served alone, one request after the other."""
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        return {prompt: (await one_stream(client, url, name, prompt, max_tokens))["text"] for prompt in prompts}


async def level(url, name, streams, max_tokens):
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=streams + 4)) as client:
        return await asyncio.gather(*(one_stream(client, url, name, PROMPTS[i % len(PROMPTS)], max_tokens)
                                      for i in range(streams)))


def summarize(streams, results):
    started = min(r["start"] for r in results)
    ended = max(r["pieces"][-1] for r in results if r["pieces"])
    tokens = sum(r["tokens"] for r in results)
    first = [1000 * (r["pieces"][0] - r["start"]) for r in results if r["pieces"]]
    gaps = [1000 * g for r in results for g in np.diff(r["pieces"])]
    return {"streams": streams, "tokens": tokens, "seconds": ended - started, "tokens_per_second": tokens / (ended - started),
            "ttft_p50_ms": float(np.percentile(first, 50)), "ttft_p99_ms": float(np.percentile(first, 99)),
            "itl_p50_ms": float(np.percentile(gaps, 50)), "itl_p99_ms": float(np.percentile(gaps, 99))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", help="a directory with tokenizer.json and config.json (random weights)")
    parser.add_argument("--weights", help="a checkpoint to serve instead of random weights")
    parser.add_argument("--streams", default="1,2,4,8,16")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not (args.tokenizer or args.weights):
        parser.error("give --tokenizer DIR (random 7B-shaped weights) or --weights DIR")
    engine, name = engine_of(args)
    http, url = start_server(engine, name, args.max_batch)
    print(f"serving {name} at {url}, --max-batch {args.max_batch}, {args.max_tokens} tokens per stream")
    from minifd.decode_step import buckets

    for streams in buckets(args.max_batch):  # captures the decode graph of every batch bucket
        asyncio.run(level(url, name, streams, 8))
    alone = asyncio.run(one_by_one(url, name, PROMPTS, args.max_tokens))
    rows, one = [], None
    print("| streams | tokens/s | x 1 stream | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | x 1 stream ITL p50 | texts as alone |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for streams in map(int, args.streams.split(",")):
        results = asyncio.run(level(url, name, streams, args.max_tokens))
        row = summarize(streams, results)
        one = one or row
        same = [r["text"] == alone[PROMPTS[i % len(PROMPTS)]] for i, r in enumerate(results)]
        row["same_text_as_alone"] = f"{sum(same)}/{len(same)}"
        rows.append(row)
        print(f"| {streams} | {row['tokens_per_second']:.1f} | {row['tokens_per_second'] / one['tokens_per_second']:.2f} "
              f"| {row['ttft_p50_ms']:.1f} | {row['ttft_p99_ms']:.1f} | {row['itl_p50_ms']:.2f} | {row['itl_p99_ms']:.2f} "
              f"| {row['itl_p50_ms'] / one['itl_p50_ms']:.2f} | {row['same_text_as_alone']} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": name, "max_tokens": args.max_tokens, "rows": rows}, indent=1))
    http.should_exit = True


if __name__ == "__main__":
    main()
