"""The engine: load a model directory once, then generate text for batches of prompts."""

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minifd.backend import array_module, free_memory_text, is_gpu, out_of_memory_errors, to_numpy
from minifd.errors import MinifdError
from minifd.kernels.softmax_range import load_softmax_ranges
from minifd.model.config import LlamaConfig
from minifd.model.llama import KVCache, Llama
from minifd.model.loader import Checkpoint
from minifd.model.tokenizer import IncrementalDecoder, Tokenizer, without_incomplete_character
from minifd.model.weights import expected_shapes, load_weights
from minifd.decode_step import NON_FINITE, DecodeStep
from minifd.progress import ProgressBar
from minifd.sampling import SamplingParams, draw_seed, sample, uniform_source

PREFILL_CHUNK_TOKENS = 512  # prompt positions per prefill call: bounds the activations of a long prompt
PREFILL_PROGRESS_DELAY = 2.0  # seconds a prefill runs before its progress bar shows


@dataclass
class Completion:
    prompt_token_ids: list
    token_ids: list  # generated tokens, the EOS that ended it excluded
    text: str
    finish_reason: str  # "eos" or "length"


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0  # time to first token: every prompt prefilled and first tokens chosen
    decode_seconds: float = 0.0
    decode_steps: int = 0
    bytes_read: int = 0  # weights + KV cache read over all decode steps
    first_tokens: int = 0  # tokens chosen from the prefill logits (not decode steps)
    seed: int | None = None  # the sampling seed, which repeats the run (None when decoding greedily)

    @property
    def decode_tokens_per_second(self):
        decoded = self.generated_tokens - self.first_tokens
        return decoded / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def achieved_gb_per_second(self):
        return self.bytes_read / self.decode_seconds / 1e9 if self.decode_seconds > 0 else 0.0

    def summary(self):
        return (f"prompt tokens: {self.prompt_tokens}, generated tokens: {self.generated_tokens}, "
                f"time to first token: {self.prefill_seconds * 1000:.0f} ms, "
                f"decode: {self.decode_tokens_per_second:.1f} tokens/s, {self.achieved_gb_per_second:.1f} GB/s"
                + ("" if self.seed is None else f", seed: {self.seed}"))


@dataclass
class GenerationResult:
    completions: list
    stats: Stats = field(default_factory=Stats)


class Engine:
    def __init__(self, weights_dir, config, tokenizer, model, xp, use_graph=True, progress=None,
                 prefill_chunk=PREFILL_CHUNK_TOKENS):
        self.weights_dir, self.config, self.tokenizer, self.model, self.xp = weights_dir, config, tokenizer, model, xp
        self.use_graph = use_graph  # capture the GPU decode step as a CUDA graph
        self.progress = progress  # progress bars on stderr: True, False, or None for "when it is a terminal"
        self.prefill_chunk = prefill_chunk

    @classmethod
    def load(cls, weights_dir, device="auto", max_context=None, progress=None, use_graph=True,
             prefill_chunk=PREFILL_CHUNK_TOKENS):
        """weights_dir: a Hugging Face Llama directory (config.json, tokenizer.json, *.safetensors).

        max_context: the most positions (prompt + new tokens) a sequence may take, at most the model's
        window; progress: progress bars on stderr (None: when stderr is a terminal); prefill_chunk:
        prompt positions per prefill call.
        """
        weights_dir = check_weights_dir(weights_dir)
        if max_context is not None and max_context < 1:
            raise MinifdError(f"max_context must be >= 1, not {max_context}", parameter="max_context")
        if prefill_chunk < 1:
            raise MinifdError(f"prefill_chunk must be >= 1, not {prefill_chunk}", parameter="prefill_chunk")
        xp = array_module(device)
        config = LlamaConfig.from_dir(weights_dir)
        tokenizer = Tokenizer.from_dir(weights_dir, config)
        dtype = np.float16 if is_gpu(xp) else np.float32
        checkpoint = Checkpoint(weights_dir)
        try:
            weights = load_weights(checkpoint, config, xp, dtype, progress=progress)
        except out_of_memory_errors(xp):
            needed = sum(np.prod(shape) for shape in expected_shapes(config).values()) * np.dtype(dtype).itemsize
            raise MinifdError(f"out of memory loading the weights: they need {needed / 2**30:.1f} GiB as "
                              f"{np.dtype(dtype).name} ({free_memory_text(xp) or 'host memory'}); "
                              "use a smaller model or another device") from None
        max_seq = min(max_context or config.max_position_embeddings, config.max_position_embeddings)
        model = Llama(config, weights, xp, load_softmax_ranges(weights_dir, config.n_layers), max_seq)
        return cls(weights_dir, config, tokenizer, model, xp, use_graph, progress, prefill_chunk)

    @property
    def device(self):
        return "cuda" if is_gpu(self.xp) else "cpu"

    def generate(self, prompts, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, seed=None,
                 ignore_eos=False, on_text=None, on_finish=None):
        """Generate continuations of several prompts together.

        prompts: list of str; seed: the sampling seed, same seed same text (None or negative: a fresh
        one, reported in the result's stats); on_text(prompt_index, text): called with each new piece
        of text as it is produced; on_finish(prompt_index): called once a prompt's continuation is
        complete. -> GenerationResult with one Completion per prompt, in order.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        params = check_sampling(max_new_tokens, temperature, top_k, top_p)
        seed = draw_seed(seed)
        prompt_ids = [self._encode(i, p, max_new_tokens) for i, p in enumerate(prompts)]
        batch = len(prompt_ids)
        max_seq = max(len(ids) for ids in prompt_ids) + max_new_tokens
        try:
            cache = KVCache.allocate(self.config, batch, max_seq, self.xp, self.model.dtype)
        except out_of_memory_errors(self.xp):
            needed = KVCache.nbytes_needed(self.config, batch, max_seq, self.model.dtype)
            raise MinifdError(f"out of memory for the KV cache: {batch} sequence(s) x {max_seq} positions need "
                              f"{needed / 2**30:.2f} GiB ({free_memory_text(self.xp) or 'host memory'}); "
                              "lower max_new_tokens, the prompt count or the prompt lengths",
                              parameter="max_new_tokens") from None
        uniforms = uniform_source(seed)
        decoders = [IncrementalDecoder(self.tokenizer, ids) for ids in prompt_ids]
        generated = [[] for _ in range(batch)]
        finish = ["length"] * batch
        stats = Stats(prompt_tokens=sum(len(ids) for ids in prompt_ids), seed=seed if params.temperature > 0 else None)

        running = [True] * batch

        def emit(b, text):
            if text and on_text is not None:
                on_text(b, text)

        def accept(tokens):
            """Record one token per unfinished sequence; -> whether any sequence still runs."""
            for b, token in enumerate(tokens):
                if not running[b]:
                    continue
                if token in self.tokenizer.eos_ids and not ignore_eos:
                    finish[b] = "eos"
                else:
                    generated[b].append(token)
                    stats.generated_tokens += 1
                    emit(b, decoders[b].push(token))
                if finish[b] == "eos" or len(generated[b]) >= max_new_tokens:
                    running[b] = False
                    emit(b, decoders[b].flush())
                    if on_finish is not None:
                        on_finish(b)
            return any(running)

        start = time.perf_counter()
        if max_new_tokens == 0:
            any_running = False
            for b in range(batch):
                if on_finish is not None:
                    on_finish(b)
        else:
            logits = self._prefill(cache, prompt_ids)  # [batch, vocab]
            tokens = self._choose(logits, params, uniforms)
            if NON_FINITE in tokens:
                raise_non_finite(tokens, 0)
            any_running = accept(tokens)
            stats.first_tokens = stats.generated_tokens
        stats.prefill_seconds = time.perf_counter() - start

        lengths = np.array([len(ids) for ids in prompt_ids], dtype=np.int32)
        weight_bytes = self.model.weights.nbytes_streamed_per_step()
        start = time.perf_counter()
        if any_running:
            step = DecodeStep(self.model, cache, params, tokens, lengths, use_graph=self.use_graph)
        while any_running:
            tokens = [int(t) for t in step(uniforms.random(batch))]
            stats.bytes_read += weight_bytes + int((lengths + 1).sum()) * cache.nbytes_per_position()
            lengths += 1
            stats.decode_steps += 1
            if NON_FINITE in tokens:
                raise_non_finite(tokens, stats.decode_steps)
            any_running = accept(tokens)
        stats.decode_seconds = time.perf_counter() - start

        completions = [Completion(ids, gen, without_incomplete_character(self.tokenizer.decode(gen)), reason)
                       for ids, gen, reason in zip(prompt_ids, generated, finish)]
        return GenerationResult(completions, stats)

    def _prefill(self, cache, prompt_ids):
        """Each prompt into its cache slot, prefill_chunk positions per call, with a progress bar once
        that takes a while -> logits of each prompt's last position, [batch, vocab]."""
        bar = ProgressBar("Prefill", sum(len(ids) for ids in prompt_ids), unit="tokens", enabled=self.progress,
                          delay=PREFILL_PROGRESS_DELAY)
        last_logits = []
        for slot, ids in enumerate(prompt_ids):
            for start in range(0, len(ids), self.prefill_chunk):
                chunk = ids[start:start + self.prefill_chunk]
                logits = self.model.prefill(cache, slot, chunk, start)  # [vocab]
                bar.advance(len(chunk))
            last_logits.append(logits)
        bar.close()
        return self.xp.stack(last_logits)

    def _encode(self, index, prompt, max_new_tokens):
        if not prompt:
            raise MinifdError(f"prompt {index + 1} is empty")
        ids = self.tokenizer.encode(prompt)
        limit = self.model.max_seq
        if len(ids) + max_new_tokens > limit:
            raise MinifdError(
                f"prompt {index + 1} has {len(ids)} tokens; with max_new_tokens {max_new_tokens} that is "
                f"{len(ids) + max_new_tokens}, over the context of {limit} tokens", parameter="max_new_tokens"
            )
        return ids

    def _choose(self, logits, params, uniforms):
        # logits: [batch, vocab] -> list of batch token ids (NON_FINITE where a row's logits are not finite)
        finite = self.xp.isfinite(logits).all(axis=-1)
        chosen = self.xp.where(finite, sample(logits, params, uniforms.random(logits.shape[0])), NON_FINITE)
        return [int(t) for t in to_numpy(chosen)]


def raise_non_finite(tokens, step):
    bad = [b + 1 for b, token in enumerate(tokens) if token == NON_FINITE]
    where = "the prefill" if step == 0 else f"decode step {step}"
    raise MinifdError(f"NaN or Inf logits at {where} for prompt(s) {bad}; the weights may be corrupt "
                      "or overflow float16")


def check_weights_dir(weights_dir):
    """-> weights_dir as a Path, once it is known to be a directory."""
    weights_dir = Path(weights_dir)
    if not weights_dir.exists():
        raise MinifdError(f"weights_dir {weights_dir}: no such directory", parameter="weights_dir")
    if not weights_dir.is_dir():
        raise MinifdError(f"weights_dir {weights_dir}: not a directory", parameter="weights_dir")
    return weights_dir


def check_sampling(max_new_tokens, temperature, top_k, top_p):
    """Validate the generation settings -> SamplingParams."""
    if max_new_tokens < 0:
        raise MinifdError(f"max_new_tokens must be >= 0, not {max_new_tokens}", parameter="max_new_tokens")
    if temperature < 0:
        raise MinifdError(f"temperature must be >= 0, not {temperature}", parameter="temperature")
    if top_k < 0:
        raise MinifdError(f"top_k must be >= 0, not {top_k}", parameter="top_k")
    if not 0 < top_p <= 1:
        raise MinifdError(f"top_p must be in (0, 1], not {top_p}", parameter="top_p")
    return SamplingParams(temperature, top_k, top_p)
