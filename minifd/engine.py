"""The engine: load a model (directory or .gguf file) once, then generate text for batches of prompts, or chat.

Both go through the server's loop (minifd.scheduler): a call's prompts are requests submitted at once
to a scheduler over a KV cache with a slot for each, prefilled from the first position their slot does
not hold yet in passes of at most prefill_chunk positions, decoded together step by step, each leaving
the batch when its stop rules end it."""

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from minifd.backend import array_module, free_memory_text, is_gpu, out_of_memory_errors
from minifd.errors import MinifdError
from minifd.kernels.softmax_range import load_softmax_ranges
from minifd.model.chat_template import ChatTemplate
from minifd.model.llama import KVCache, Llama
from minifd.model.loader import open_checkpoint
from minifd.model.quantized import QUANTIZERS
from minifd.model.weights import held_bytes, load_weights
from minifd.progress import ProgressBar
from minifd.sampling import SamplingParams, draw_seed
from minifd.scheduler import Request, Scheduler
from minifd.sequence import Sequence

PREFILL_CHUNK_TOKENS = 512  # prompt positions per prefill pass, all prompts together: bounds the activations
PREFILL_PROGRESS_DELAY = 2.0  # seconds a prefill runs before its progress bar shows


@dataclass
class Completion:
    prompt_token_ids: list
    token_ids: list  # generated tokens, the EOS that ended it excluded
    text: str  # as streamed, cut before a stop string
    finish_reason: str  # "eos", "stop" (a stop string), "length" or "cancelled"


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0  # in prefill passes, first tokens chosen included (one prompt: its time to first token)
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
                 prefill_chunk=PREFILL_CHUNK_TOKENS, chat_template=None):
        self.weights_dir, self.config, self.tokenizer, self.model, self.xp = weights_dir, config, tokenizer, model, xp
        self.use_graph = use_graph  # capture the GPU decode step as a CUDA graph
        self.progress = progress  # progress bars on stderr: True, False, or None for "when it is a terminal"
        self.prefill_chunk = prefill_chunk
        self.chat_template = chat_template  # a ChatTemplate, or None when the checkpoint has none
        self._chat_cache = None  # the KV cache chat() keeps between calls, and the tokens it holds
        self._chat_ids = []

    @classmethod
    def load(cls, weights_dir, device="auto", max_context=None, progress=None, use_graph=True,
             prefill_chunk=PREFILL_CHUNK_TOKENS, chat_template=None, quantize=None):
        """weights_dir: a Hugging Face Llama directory (config.json, tokenizer.json, *.safetensors) or a
        llama.cpp .gguf file (minifd/model/gguf.py).

        max_context: the most positions (prompt + new tokens) a sequence may take, at most the model's
        window; progress: progress bars on stderr (None: when stderr is a terminal); prefill_chunk:
        prompt positions per prefill pass, all prompts of a batch together; chat_template: a Jinja
        chat template file to use instead of the checkpoint's own; quantize: None, "int8" or "int4":
        round the projections to that format at load (minifd/model/quantized.py, minifd/model/weights.py),
        but for a GGUF file's Q8_0, Q5_0, Q4_0, Q4_1 and Q4_K ones, which keep their own blocks in any case.
        """
        if max_context is not None and max_context < 1:
            raise MinifdError(f"max_context must be >= 1, not {max_context}", parameter="max_context")
        if prefill_chunk < 1:
            raise MinifdError(f"prefill_chunk must be >= 1, not {prefill_chunk}", parameter="prefill_chunk")
        checkpoint = open_checkpoint(weights_dir)
        check_quantize(quantize)
        xp = array_module(device)
        config = checkpoint.config
        tokenizer = checkpoint.tokenizer()
        if chat_template is not None:
            chat_template = ChatTemplate.from_file(chat_template, tokenizer.special_tokens)
        else:
            chat_template = checkpoint.chat_template(tokenizer.special_tokens)
        # On the GPU the projections a GGUF stores in a kernel format (Q8_0, Q4_0, Q4_1) and those
        # `quantize` rounds stay codes and scales, read by the quantized kernels; the other tensors,
        # a GGUF's dequantized to float32, become float16 like any other checkpoint's.
        dtype = weight_dtype(xp)
        try:
            weights = load_weights(checkpoint, config, xp, dtype, progress=progress, quantize=quantize)
        except out_of_memory_errors(xp):
            needed = held_bytes(checkpoint, quantize, dtype)
            raise MinifdError(f"out of memory loading the weights: they need {needed / 2**30:.1f} GiB in the "
                              f"formats they are held in ({free_memory_text(xp) or 'host memory'}); "
                              "use a smaller model, --quantize, or another device") from None
        max_seq = min(max_context or config.max_position_embeddings, config.max_position_embeddings)
        softmax_ranges = load_softmax_ranges(checkpoint.softmax_ranges_path, config.n_layers)
        model = Llama(config, weights, xp, softmax_ranges, max_seq)
        return cls(Path(weights_dir), config, tokenizer, model, xp, use_graph, progress, prefill_chunk, chat_template)

    @property
    def device(self):
        return "cuda" if is_gpu(self.xp) else "cpu"

    def generate(self, prompts, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                 repetition_penalty=1.0, seed=None, ignore_eos=False, stop=(), on_text=None, on_finish=None,
                 cancel=None):
        """Generate continuations of several prompts together.

        prompts: list of str (encoded with BOS where the model wants one) or of token-id lists (used as
        they are, e.g. a rendered chat); seed: the sampling seed, same seed same text (None or negative:
        a fresh one, reported in the result's stats; prompt i draws from seed + i, so a prompt's text
        does not depend on the prompts beside it); stop: strings that end a continuation where they
        appear (its text is cut before them); on_text(prompt_index, text): called with each new piece
        of text as it is produced; on_finish(prompt_index): called once a prompt's continuation is
        complete; cancel: an object whose is_set() (a threading.Event) ends every continuation after
        its current token. -> GenerationResult with one Completion per prompt, in order.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        params = check_sampling(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty)
        prompt_ids = [self._prompt_ids(f"prompt {i + 1}", p, max_new_tokens) for i, p in enumerate(prompts)]
        cache = self._allocate_cache(len(prompt_ids), max(len(ids) for ids in prompt_ids) + max_new_tokens)
        sequences = [self.sequence(ids, max_new_tokens, ignore_eos, stop, on_text and partial(on_text, i))
                     for i, ids in enumerate(prompt_ids)]
        stats = self._run(cache, sequences, params, draw_seed(seed), on_finish, cancel)
        completions = [Completion(s.prompt_ids, s.token_ids, s.text, s.finish_reason) for s in sequences]
        return GenerationResult(completions, stats)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        """messages: [{"role": "system" | "user" | "assistant", "content": str}, ...] -> the prompt's token
        ids, as transformers' apply_chat_template gives them for this checkpoint. add_generation_prompt:
        end with the header that opens the assistant's reply."""
        rendered = self.require_chat_template().render(messages, add_generation_prompt)
        return self.tokenizer.encode(rendered, add_bos=False)

    def require_chat_template(self):
        """-> the ChatTemplate, compiled (so that a missing jinja2 or a broken template shows now);
        a MinifdError when the checkpoint ships none and none was given."""
        if self.chat_template is None:
            raise MinifdError(f"{self.weights_dir} ships no chat template; give one with chat_template=FILE "
                              "(a Jinja file)", parameter="chat_template")
        self.chat_template.compiled()
        return self.chat_template

    def chat(self, messages, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
             repetition_penalty=1.0, seed=None, ignore_eos=False, stop=(), on_text=None, cancel=None):
        """The assistant's reply to a conversation (messages as apply_chat_template takes them) -> str.

        Calls share one KV cache: the part of the prompt that agrees with the tokens the previous call
        left in it is not prefilled again, so a conversation continued message by message prefills
        only what is new. on_text(text): called with each new piece of the reply; the other settings
        are generate()'s.
        """
        params = check_sampling(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty)
        ids = self._prompt_ids("the conversation", self.apply_chat_template(messages), max_new_tokens)
        reused = common_prefix_length(self._chat_ids, ids[:-1])  # the last position is prefilled for its logits
        cache = self._chat_cache_for(len(ids) + max_new_tokens, reused)
        sequence = self.sequence(ids, max_new_tokens, ignore_eos, stop, on_text, cached=reused)
        self._chat_ids = ids[:reused]  # all the cache is sure to hold should the run not end normally
        self._run(cache, [sequence], params, draw_seed(seed), cancel=cancel)
        self._chat_ids = sequence.ids_in_cache()
        return sequence.text

    def _chat_cache_for(self, positions, held):
        """The chat's one-sequence KV cache with room for `positions`, doubled (its first `held`
        positions copied) when the conversation outgrows it."""
        cache = self._chat_cache
        if cache is None or cache.max_seq < positions:
            grown = self._allocate_cache(1, min(self.model.max_seq, max(positions, 2 * (cache.max_seq if cache else 0))))
            if cache is not None:
                for old, new in zip(cache.k + cache.v, grown.k + grown.v):
                    new[:, :, :held] = old[:, :, :held]
            self._chat_cache = grown
        return self._chat_cache

    def _run(self, cache, sequences, params, seed, on_finish=None, cancel=None):
        """Continue each sequence in its cache slot (sequence i in slot i) until all have finished: its
        requests (sequence i drawing from seed + i) submitted at once to a Scheduler over the cache and
        drained, so generate and chat run the one loop the server runs. -> Stats"""
        bar = ProgressBar("Prefill", sum(len(s.prompt_ids) - s.cached for s in sequences), unit="tokens",
                          enabled=self.progress, delay=PREFILL_PROGRESS_DELAY)
        scheduler = Scheduler(self.model, cache, self.prefill_chunk, use_graph=self.use_graph, on_prefill=bar.advance)

        def finished(request, i):
            if request.error is None and on_finish is not None:  # a failed prompt raises below instead
                on_finish(i)

        requests = [Request(sequence, params, (seed + i) % 2**31, partial(finished, i=i), cancel, f"prompt {i + 1}")
                    for i, sequence in enumerate(sequences)]
        for request in requests:
            scheduler.submit(request)
        scheduler.run()
        bar.close()
        failed = [request.error for request in requests if request.error is not None]
        if failed:
            raise failed[0]
        done = scheduler.stats
        return Stats(prompt_tokens=sum(len(s.prompt_ids) for s in sequences),
                     generated_tokens=sum(len(s.token_ids) for s in sequences),
                     prefill_seconds=done.prefill_seconds, decode_seconds=done.decode_seconds,
                     decode_steps=done.decode_steps, bytes_read=done.bytes_read, first_tokens=done.first_tokens,
                     seed=seed if params.temperature > 0 else None)

    def sequence(self, prompt_ids, max_new_tokens, ignore_eos=False, stop=(), on_text=None, cached=0):
        """A Sequence (minifd.sequence) continuing these token ids with this checkpoint's stop tokens: what
        a scheduler (minifd.scheduler) runs for a request."""
        if isinstance(stop, str):
            stop = [stop]
        stop_ids = frozenset() if ignore_eos else self.tokenizer.eos_ids
        return Sequence(prompt_ids, self.tokenizer, max_new_tokens, stop_ids, stop, cached, on_text)

    def scheduler(self, slots, max_seq, max_queue=None):
        """A Scheduler (minifd.scheduler) over a new KV pool of `slots` sequences of up to `max_seq`
        positions each, prefilling in this engine's chunks: what a server submits requests to."""
        return Scheduler(self.model, self._allocate_cache(slots, max_seq), self.prefill_chunk, max_queue,
                         use_graph=self.use_graph)

    def _allocate_cache(self, batch, max_seq):
        try:
            return KVCache.allocate(self.config, batch, max_seq, self.xp, self.model.dtype)
        except out_of_memory_errors(self.xp):
            needed = KVCache.nbytes_needed(self.config, batch, max_seq, self.model.dtype)
            raise MinifdError(f"out of memory for the KV cache: {batch} sequence(s) x {max_seq} positions need "
                              f"{needed / 2**30:.2f} GiB ({free_memory_text(self.xp) or 'host memory'}); "
                              "lower max_new_tokens, the prompt count or the prompt lengths",
                              parameter="max_new_tokens") from None

    def _prompt_ids(self, what, prompt, max_new_tokens):
        """A prompt as text or token ids -> its token ids, once they are known to fit the context."""
        if not prompt:
            raise MinifdError(f"{what} is empty")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(token) for token in prompt]
        limit = self.model.max_seq
        if len(ids) + max_new_tokens > limit:
            raise MinifdError(
                f"{what} has {len(ids)} tokens; with max_new_tokens {max_new_tokens} that is "
                f"{len(ids) + max_new_tokens}, over the context of {limit} tokens", parameter="max_new_tokens"
            )
        return ids


def check_quantize(quantize):
    """quantize is None or a format's name. (A GGUF file's projections stored in a kernel format keep
    it whatever quantize says; it rounds the others, minifd.model.weights.)"""
    if quantize is not None and quantize not in QUANTIZERS:
        raise MinifdError(f"quantize must be one of {', '.join(QUANTIZERS)} or None, not {quantize!r}",
                          parameter="quantize")


def weight_dtype(xp):
    """The dtype the weights are held in: float16 on the GPU, float32 on the CPU."""
    return np.float16 if is_gpu(xp) else np.float32


def common_prefix_length(a, b):
    """How many leading tokens the lists a and b share."""
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def check_sampling(max_new_tokens, temperature, top_k, top_p, min_p=0.0, repetition_penalty=1.0):
    """Validate the generation settings -> SamplingParams."""
    if max_new_tokens < 0:
        raise MinifdError(f"max_new_tokens must be >= 0, not {max_new_tokens}", parameter="max_new_tokens")
    if temperature < 0:
        raise MinifdError(f"temperature must be >= 0, not {temperature}", parameter="temperature")
    if top_k < 0:
        raise MinifdError(f"top_k must be >= 0, not {top_k}", parameter="top_k")
    if not 0 < top_p <= 1:
        raise MinifdError(f"top_p must be in (0, 1], not {top_p}", parameter="top_p")
    if not 0 <= min_p <= 1:
        raise MinifdError(f"min_p must be in [0, 1], not {min_p}", parameter="min_p")
    if repetition_penalty <= 0:
        raise MinifdError(f"repetition_penalty must be > 0, not {repetition_penalty}", parameter="repetition_penalty")
    return SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
