"""`minifd bench`: prefill and decode speed at a Llama shape, against the bandwidth roofline.

Decode at small batch is memory-bound: each step must read every weight and the whole KV cache once,
so (bytes read per step) / (measured device-to-device copy bandwidth) is the fastest a step can be.
The benchmark reports each configuration as tokens/s and as a share of that roofline, and, where
torch and transformers import, runs Hugging Face `generate` on the same shapes in the same process
so the ratios compare like with like: eager and sdpa attention, and `hf-compiled`, HF's static KV
cache with its decode forward compiled by torch.compile (mode reduce-overhead: CUDA graphs), the
way PyTorch users make a decoder fast.
"""

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from minifd.backend import array_module
from minifd.decode_step import DecodeStep
from minifd.engine import PREFILL_CHUNK_TOKENS
from minifd.scheduler import prefill_prompts
from minifd.errors import MinifdError
from minifd.kernels.launch import overlap_supported, resolve_overlap
from minifd.kernels.weight_formats import format_name
from minifd.model.config import LlamaConfig
from minifd.model.llama import KVCache, Llama
from minifd.model.quantized import QUANTIZERS
from minifd.model.weights import LayerWeights, Weights

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2,
}
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "bos_token_id": 128000, "eos_token_id": 128001,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}
SHAPES = {"llama2-7b": LLAMA2_7B, "llama3-8b": LLAMA3_8B}


@dataclass
class BenchRow:
    engine: str  # "minifd", "hf-eager", "hf-sdpa", "hf-compiled"
    prompt_tokens: int
    batch: int
    prefill_ms: float
    decode_tokens_per_s: float
    step_ms: float
    roofline_step_ms: float  # bytes read per step / copy bandwidth
    roofline_percent: float


def random_weights(config, xp, dtype, seed=0, quantize=None):
    """Weights of the given shape drawn on the device: N(0, 1/fan_in) matrices, norms near 1;
    quantize: None, or "int8" / "int4" to round the projections (the LM head too, not the embedding)
    to that format on the device, as a checkpoint's are at load."""
    rng = xp.random.default_rng(seed)
    rounded = QUANTIZERS[quantize] if quantize is not None else (lambda w: w)

    def matrix(rows, cols):
        return (rng.standard_normal((rows, cols), dtype=xp.float32) / math.sqrt(cols)).astype(dtype)

    def projection(rows, cols):
        return rounded(matrix(rows, cols))

    def norm(size):
        return (1.0 + 0.05 * rng.standard_normal(size, dtype=xp.float32)).astype(dtype)

    c = config
    qkv_rows = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
    layers = [LayerWeights(norm(c.hidden_size), projection(qkv_rows, c.hidden_size),
                           projection(c.hidden_size, c.n_heads * c.head_dim), norm(c.hidden_size),
                           projection(2 * c.intermediate_size, c.hidden_size),
                           projection(c.hidden_size, c.intermediate_size))
              for _ in range(c.n_layers)]
    embed = matrix(c.vocab_size, c.hidden_size)
    lm_head = projection(c.vocab_size, c.hidden_size)
    return Weights(embed, layers, norm(c.hidden_size), lm_head)


def check_quantized_kernels(weights, quantize):
    """Every projection is held in `quantize`'s format, so the decode step's products read the codes
    (linear sends them to the quantized GEMV and flat GEMM) and the roofline's bytes are what they read."""
    held = {format_name(w) for layer in weights.layers for w in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down)}
    if held != {quantize}:
        raise MinifdError(f"--quantize {quantize}: the projections are held as {', '.join(sorted(held))} (a GGUF "
                          "file's Q8_0, Q5_0, Q4_0, Q4_1 and Q4_K ones keep their own format), so the bench would not measure "
                          f"the {quantize} kernels alone")


def copy_bandwidth(xp, nbytes=2 * 2**30, repeats=10):
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    source = xp.ones(nbytes // 4, dtype=xp.float32)
    target = xp.empty_like(source)
    target[...] = source
    start, stop = xp.cuda.Event(), xp.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record()
        target[...] = source
        stop.record()
        stop.synchronize()
        times.append(xp.cuda.get_elapsed_time(start, stop) / 1000)
    del source, target
    return 2 * nbytes / float(np.median(times))


def bench_minifd(model, config, prompt_tokens, batch, decode_steps, bandwidth, use_graph=True, overlap=None, seed=0):
    """-> BenchRow for one (prompt length, batch): prefill every sequence as the engine does (ragged passes of
    PREFILL_CHUNK_TOKENS positions), then `decode_steps` decode steps.
    overlap: DecodeStep's (None = wherever supported)."""
    xp = model.xp
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, config.vocab_size, (batch, prompt_tokens))
    cache = KVCache.allocate(config, batch, prompt_tokens + decode_steps + 2, xp, model.dtype)
    xp.cuda.Device().synchronize()
    start = time.perf_counter()
    logits = prefill_prompts(model, cache, [list(p) for p in prompts], [0] * batch, PREFILL_CHUNK_TOKENS)  # [batch, vocab]
    first = [int(row.argmax()) for row in logits]
    xp.cuda.Device().synchronize()
    prefill_seconds = time.perf_counter() - start

    step = DecodeStep(model, cache, use_graph=use_graph, overlap=overlap)
    tokens, draws = first, np.zeros(batch, dtype=np.float32)
    for i in range(2 + decode_steps):  # the first two (the eager step, the graph capture) stay out of the timing
        if i == 2:
            start = time.perf_counter()
        tokens = step(tokens, np.full(batch, prompt_tokens + i), draws)  # [batch]
    decode_seconds = time.perf_counter() - start

    mean_length = prompt_tokens + 2 + (decode_steps + 1) / 2
    step_bytes = model.weights.nbytes_streamed_per_step() + batch * mean_length * cache.nbytes_per_position()
    step_seconds = decode_seconds / decode_steps
    roofline = step_bytes / bandwidth
    del cache, step
    return BenchRow("minifd", prompt_tokens, batch, prefill_seconds * 1000, batch / step_seconds,
                    step_seconds * 1000, roofline * 1000, 100 * roofline / step_seconds)


def hf_model(attention, config_raw, weights_dir=None):
    """A Hugging Face Llama in float16 on the GPU: random weights of config_raw's shape, or those of
    weights_dir (a model directory, or a .gguf file, which transformers dequantizes)."""
    import torch
    import transformers

    if weights_dir is not None:
        weights_dir = Path(weights_dir)
        gguf = {"gguf_file": weights_dir.name} if weights_dir.suffix == ".gguf" else {}
        return transformers.AutoModelForCausalLM.from_pretrained(
            weights_dir.parent if gguf else weights_dir, dtype=torch.float16, attn_implementation=attention,
            **gguf).cuda().eval()
    hf_config = transformers.LlamaConfig(**{k: v for k, v in config_raw.items() if k != "architectures"})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM._from_config(hf_config, dtype=torch.float16,
                                                           attn_implementation=attention)
    return model.eval()


def bench_hf(model, engine, config, prompt_tokens, batch, decode_steps, bandwidth_row):
    """The same configuration through Hugging Face transformers `generate`; engine: "hf-eager", "hf-sdpa"
    or "hf-compiled" (sdpa attention, static cache, the decode forward compiled with CUDA graphs)."""
    import torch

    prompts = torch.randint(0, config.vocab_size, (batch, prompt_tokens), device="cuda")
    compiled = {}
    if engine == "hf-compiled":
        from transformers import CompileConfig

        compiled = {"cache_implementation": "static",
                    "compile_config": CompileConfig(fullgraph=True, mode="reduce-overhead")}

    def timed_generate(new_tokens):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **compiled)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    timed_generate(decode_steps + 1)  # compiles (hf-compiled) and warms up at the timed cache size
    prefill = timed_generate(1)
    total = timed_generate(decode_steps + 1)
    step_seconds = (total - prefill) / decode_steps
    return BenchRow(engine, prompt_tokens, batch, prefill * 1000, batch / step_seconds,
                    step_seconds * 1000, bandwidth_row.roofline_step_ms,
                    100 * bandwidth_row.roofline_step_ms / (step_seconds * 1000))


def hf_available():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except Exception:
        return False
    return True


def run_bench(prompt_lengths=(16, 1024, 4096), batches=(1, 2, 4, 8), decode_steps=64, with_hf=True,
              use_graph=True, weights_dir=None, out_json=None, out_png=None, log=print, shape_config=LLAMA2_7B,
              attention_method="async", overlap=None, quantize=None):
    """Run the whole sweep on the GPU -> list of BenchRow (also written as JSON / PNG when asked).

    Without weights_dir the model has shape_config's shape (a config.json dict, SHAPES names two)
    with random float16 weights made on the GPU. attention_method: "async" (unified max) or "sync";
    overlap: launch decode kernels overlapping (minifd.kernels.launch; None = wherever supported);
    quantize: None, "int8" or "int4", the format the projections are rounded to (weights_dir's at
    load, or the random ones on the GPU); the roofline counts the bytes the formats held stream (a
    GGUF file's Q8_0, Q5_0, Q4_0, Q4_1 and Q4_K projections are int8 and int4 with or without quantize).
    """
    xp = array_module("cuda")
    max_seq = max(prompt_lengths) + decode_steps + 16
    bandwidth = copy_bandwidth(xp)
    log(f"device-to-device copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
    if weights_dir is None:
        config_raw = dict(shape_config, max_position_embeddings=max(max_seq, shape_config.get("max_position_embeddings", 0)))
        config = LlamaConfig.from_dict(config_raw)
        weights = random_weights(config, xp, np.float16, quantize=quantize)
        model = Llama(config, weights, xp, max_seq=max_seq, attention_method=attention_method)
    else:
        from minifd.engine import Engine

        model = Engine.load(weights_dir, device="cuda", max_context=max_seq, quantize=quantize).model
        config, weights, config_raw = model.config, model.weights, None
    log(f"weights: {weights.nbytes_streamed_per_step() / 1e9:.2f} GB read per decode step"
        f"{f' (projections {quantize})' if quantize else ''}")
    if quantize is not None:
        check_quantized_kernels(weights, quantize)
    overlapping = resolve_overlap(overlap)
    why_not = "" if overlapping else " (turned off)" if overlap is False else f" ({overlap_supported()[1]})"
    log(f"decode kernels overlap the previous kernel's tail: {'yes' if overlapping else 'no'}{why_not}")
    bench_minifd(model, config, 64, 2, 4, bandwidth, use_graph, overlapping)  # compiles every kernel before timing
    rows = []
    for prompt_tokens in prompt_lengths:
        for batch in batches:
            row = bench_minifd(model, config, prompt_tokens, batch, decode_steps, bandwidth, use_graph, overlapping)
            rows.append(row)
            log(format_row(row))
    if with_hf and hf_available():
        del model, weights
        xp.get_default_memory_pool().free_all_blocks()
        ours = {(r.prompt_tokens, r.batch): r for r in rows}
        for engine in ("hf-eager", "hf-sdpa", "hf-compiled"):
            reference = hf_model("eager" if engine == "hf-eager" else "sdpa", config_raw, weights_dir)
            for prompt_tokens in prompt_lengths:
                for batch in batches:
                    try:
                        row = bench_hf(reference, engine, config, prompt_tokens, batch, decode_steps,
                                       ours[(prompt_tokens, batch)])
                    except Exception as error:  # one comparison engine failing leaves the others' rows
                        log(f"{engine} prompt {prompt_tokens} batch {batch}: failed ({type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else ''})")
                        continue
                    rows.append(row)
                    log(format_row(row))
            del reference
            import torch

            torch.cuda.empty_cache()
    log(summary_table(rows))
    if out_json:
        with open(out_json, "w") as file:
            json.dump({"copy_bandwidth_gb_s": bandwidth / 1e9, "rows": [asdict(r) for r in rows]}, file, indent=1)
    if out_png:
        plot(rows, out_png)
    return rows


def format_row(row):
    return (f"{row.engine:9s} prompt {row.prompt_tokens:5d} batch {row.batch}: prefill {row.prefill_ms:8.1f} ms, "
            f"decode {row.decode_tokens_per_s:8.1f} tok/s ({row.step_ms:.2f} ms/step, roofline "
            f"{row.roofline_step_ms:.2f} ms = {row.roofline_percent:.0f}%)")


def summary_table(rows):
    """Markdown table: minifd per configuration, with the ratios to HF in the same run."""
    hf = {(r.engine, r.prompt_tokens, r.batch): r for r in rows if r.engine != "minifd"}
    lines = ["| prompt | batch | prefill ms | decode tok/s | % roofline | x HF eager | x HF sdpa | x HF compiled "
             "| prefill x sdpa |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in (r for r in rows if r.engine == "minifd"):
        eager, sdpa, compiled = (hf.get((engine, r.prompt_tokens, r.batch)) for engine in ("hf-eager", "hf-sdpa", "hf-compiled"))
        ratio = (lambda other: f"{r.decode_tokens_per_s / other.decode_tokens_per_s:.2f}" if other else "-")
        prefill_ratio = f"{sdpa.prefill_ms / r.prefill_ms:.2f}" if sdpa else "-"
        lines.append(f"| {r.prompt_tokens} | {r.batch} | {r.prefill_ms:.1f} | {r.decode_tokens_per_s:.1f} | "
                     f"{r.roofline_percent:.0f}% | {ratio(eager)} | {ratio(sdpa)} | {ratio(compiled)} | {prefill_ratio} |")
    return "\n".join(lines)


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("minifd bench: matplotlib is not installed; no plot written (pip install 'minifd[plot]')",
              file=sys.stderr)
        return
    engines = sorted({r.engine for r in rows}, key=lambda e: (e != "minifd", e))
    configs = sorted({(r.prompt_tokens, r.batch) for r in rows})
    labels = [f"{p}/{b}" for p, b in configs]
    figure, (speed, roof) = plt.subplots(2, 1, figsize=(12, 8), sharex=True)
    width = 0.8 / len(engines)
    for i, engine in enumerate(engines):
        by_config = {(r.prompt_tokens, r.batch): r for r in rows if r.engine == engine}
        xs = [j + i * width for j in range(len(configs))]
        speed.bar(xs, [by_config[c].decode_tokens_per_s if c in by_config else 0 for c in configs], width, label=engine)
        roof.bar(xs, [by_config[c].roofline_percent if c in by_config else 0 for c in configs], width, label=engine)
    speed.set_ylabel("decode tokens/s")
    speed.set_yscale("log")
    speed.legend()
    roof.set_ylabel("% of bandwidth roofline")
    roof.axhline(85, color="gray", linestyle="--", linewidth=1)
    roof.set_xticks([j + 0.4 - width / 2 for j in range(len(configs))], labels, rotation=45)
    roof.set_xlabel("prompt tokens / batch")
    figure.suptitle("minifd decode (random fp16 weights)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
