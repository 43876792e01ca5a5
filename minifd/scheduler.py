"""Continuous batching: requests join and leave a running batch between decode steps.

    submit(request) -> waiting queue -> a free slot of the KV pool -> prefilled in chunks
                    -> decoded with the other slots, one token per step -> finished, slot free

The scheduler owns a KV cache of slots (the pool) and, per step, does three things:
  1. admit: waiting requests take free slots, lowest first, in the order they came (cancel() frees
     one at once);
  2. prefill: one pass of at most `prefill_chunk` prompt positions over the slots still prefilling
     (prefill_pass below), so a long prompt delays the running sequences by one chunk per step, not
     by its whole length; a prompt whose last chunk ran chooses its first token;
  3. decode: one step (minifd.decode_step: a CUDA graph per batch bucket on the GPU) over the slots up
     to the highest occupied one, each running sequence's row sampled with its own settings and its
     own seeded draws.
Rows that are not decoding still run in the step, so they are given a position that harms nothing:
a free slot writes position 0 (whoever takes the slot prefills it again), a slot still prefilling
writes the position its next chunk starts at (which that chunk overwrites); each attends over no
more than what it holds. Engine.generate and chat run through a scheduler too: their prompts are
requests submitted at once and drained.
"""

import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from minifd.decode_step import IDLE, NON_FINITE, DecodeStep
from minifd.errors import MinifdError
from minifd.model.llama import PrefillChunk
from minifd.sampling import SamplingParams, uniform_source


@dataclass
class Request:
    """What to continue and how: a Sequence (minifd.sequence: prompt ids, stop rules, text sink), its
    sampling settings and its seed (its draws are its own, whatever runs beside it)."""

    sequence: object
    params: SamplingParams
    seed: int
    on_finish: object = None  # on_finish(request): called once the sequence has ended, whatever ended it
    cancel: object = None  # an object whose is_set() (a threading.Event) ends the sequence after its current token
    name: str = "a request"  # what errors call it
    error: object = None  # the MinifdError (or other exception) that ended it, when one did


@dataclass
class _Slot:
    request: Request
    uniforms: np.random.Generator
    held: int = 0  # prompt positions its cache row holds
    token: int = IDLE  # the token the next decode step feeds (once the prompt is held whole)
    position: int = 0  # where that token goes

    @property
    def decoding(self):
        return self.token != IDLE


@dataclass
class SchedulerStats:
    """Where a scheduler's time went, over all its steps."""

    prefill_seconds: float = 0.0  # prefill passes, first tokens chosen included
    decode_seconds: float = 0.0
    decode_steps: int = 0
    first_tokens: int = 0  # tokens chosen from prefill logits
    bytes_read: int = 0  # weights and the decoding rows' KV cache, over all decode steps


class Scheduler:
    def __init__(self, model, cache, prefill_chunk, max_queue=None, use_graph=True, on_prefill=None):
        """model: a Llama; cache: the KV pool (KVCache.allocate(config, slots, positions per slot, ...));
        prefill_chunk: prompt positions per prefill pass; max_queue: the most waiting requests (None: no
        limit); use_graph: decode steps as CUDA graphs on the GPU; on_prefill(positions): called after
        each prefill pass."""
        self.model, self.cache, self.prefill_chunk, self.max_queue = model, cache, prefill_chunk, max_queue
        self.on_prefill = on_prefill
        self.decode_step = DecodeStep(model, cache, use_graph=use_graph)
        self.slots = [None] * cache.k[0].shape[0]  # _Slot or None
        self.waiting = deque()
        self.stats = SchedulerStats()
        self.weight_bytes = model.weights.nbytes_streamed_per_step()

    @property
    def busy(self):
        return bool(self.waiting) or any(slot is not None for slot in self.slots)

    @property
    def full(self):
        """Whether max_queue requests wait already beyond those the free slots take at the next step."""
        outstanding = len(self.waiting) + sum(slot is not None for slot in self.slots)
        return self.max_queue is not None and queue_is_full(outstanding, len(self.slots), self.max_queue)

    def submit(self, request):
        """Queue a request; a MinifdError when the queue is full or the request cannot fit a slot."""
        sequence = request.sequence
        needed = len(sequence.prompt_ids) + sequence.max_new_tokens
        if needed > self.cache.max_seq:
            raise MinifdError(f"the prompt's {len(sequence.prompt_ids)} tokens and max_new_tokens "
                              f"{sequence.max_new_tokens} need {needed} positions, over the {self.cache.max_seq} "
                              "of a slot", parameter="max_new_tokens")
        if self.full:
            raise MinifdError(f"the queue is full ({self.max_queue} requests waiting)")
        if sequence.max_new_tokens == 0:  # nothing to generate: done without a slot
            sequence.finish("length")
            _finished(request)
            return
        self.waiting.append(request)

    def cancel(self, request):
        """End a request where it stands (its client has gone): it leaves the queue, or its slot is free
        for the next step."""
        self._end(request, "cancelled")

    def fail(self, request, error):
        """End a request where it stands because of `error` (kept as request.error); the others go on."""
        request.error = error
        self._end(request, "error")

    def _end(self, request, reason):
        self.waiting = deque(waiting for waiting in self.waiting if waiting is not request)
        self.slots = [None if slot is not None and slot.request is request else slot for slot in self.slots]
        if request.sequence.running:
            request.sequence.finish(reason)
            _finished(request)

    def run(self):
        """Step until every submitted request has finished."""
        while self.busy:
            self.step()

    def step(self):
        """Admit, run one prefill pass, then one decode step (the module docstring says how)."""
        with self.decode_step.on_stream():
            self._admit()
            self._prefill_pass()
            if any(slot is not None and slot.decoding for slot in self.slots):
                self._decode()

    def _admit(self):
        for index, slot in enumerate(self.slots):
            if slot is None and self.waiting:
                request = self.waiting.popleft()
                self.slots[index] = _Slot(request, uniform_source(request.seed), held=request.sequence.cached)
                self.decode_step.assign(index, request.params, request.sequence.prompt_ids)

    def _prefill_pass(self):
        prefilling = [i for i, slot in enumerate(self.slots) if slot is not None and not slot.decoding]
        prompts = [self.slots[i].request.sequence.prompt_ids for i in prefilling]
        chunks = prefill_pass(prompts, [self.slots[i].held for i in prefilling], self.prefill_chunk)
        chunks = [PrefillChunk(prefilling[chunk.slot], chunk.token_ids, chunk.start) for chunk in chunks]  # pool rows
        if not chunks:
            return
        start = time.perf_counter()
        logits = self.model.prefill_chunks(self.cache, chunks)  # [chunks, vocab]
        complete = []  # (pool row, its logits row) of the prompts now held whole
        for row, chunk in enumerate(chunks):
            slot = self.slots[chunk.slot]
            slot.held = chunk.end
            if slot.held == len(slot.request.sequence.prompt_ids):
                complete.append((chunk.slot, row))
        if complete:  # each such prompt's first token
            rows = [slot for slot, _ in complete]
            uniforms = np.array([self.slots[slot].uniforms.random() for slot in rows])
            tokens = self.decode_step.choose(logits[np.array([row for _, row in complete])], rows, uniforms)
            for slot, token in zip(rows, tokens):
                self.slots[slot].position = self.slots[slot].held
                self._accept(slot, int(token))
            self.stats.first_tokens += len(rows)
        elif self.decode_step.stream is not None:
            self.decode_step.stream.synchronize()  # the pass's time is its own
        self.stats.prefill_seconds += time.perf_counter() - start
        if self.on_prefill is not None:
            self.on_prefill(sum(len(chunk.token_ids) for chunk in chunks))

    def _decode(self):
        rows = self.slots[:max(i for i, slot in enumerate(self.slots) if slot is not None) + 1]
        decoding = [slot is not None and slot.decoding for slot in rows]
        tokens = [slot.token if live else IDLE for slot, live in zip(rows, decoding)]
        positions = [(slot.position if live else slot.held) if slot is not None else 0
                     for slot, live in zip(rows, decoding)]
        uniforms = [slot.uniforms.random() if live else 0.0 for slot, live in zip(rows, decoding)]
        start = time.perf_counter()
        chosen = self.decode_step(tokens, positions, uniforms)  # [len(rows)]
        self.stats.decode_seconds += time.perf_counter() - start
        self.stats.decode_steps += 1
        self.stats.bytes_read += self.weight_bytes + sum(
            position + 1 for position, live in zip(positions, decoding) if live) * self.cache.nbytes_per_position()
        for index, live in enumerate(decoding):
            if live:
                self.slots[index].position += 1
                self._accept(index, int(chosen[index]))

    def _accept(self, index, token):
        slot = self.slots[index]
        sequence = slot.request.sequence
        if token == NON_FINITE:  # this request ends; the others go on
            steps = len(sequence.token_ids)  # the prefill chose its first token, decode step n its n+1-th
            where = "the prefill" if steps == 0 else f"decode step {steps}"
            self.fail(slot.request, MinifdError(f"NaN or Inf logits at {where} for {slot.request.name}; the weights "
                                                "may be corrupt or overflow float16"))
            return
        sequence.accept(token)
        if sequence.running and slot.request.cancel is not None and slot.request.cancel.is_set():
            sequence.finish("cancelled")
        if sequence.running:
            slot.token = token
        else:
            self.slots[index] = None  # free for the next waiting request at the next step
            _finished(slot.request)


def queue_is_full(outstanding, slots, max_queue):
    """Whether a scheduler of `slots` slots, with `outstanding` requests submitted and not finished,
    has max_queue of them waiting already (the free slots take the others at the next step)."""
    return outstanding >= slots + max_queue


def _finished(request):
    if request.on_finish is not None:
        request.on_finish(request)


def prefill_pass(prompts, held, budget):
    """The chunks of one prefill pass: prompt i (token ids) goes into slot i, whose first held[i]
    positions are cached. Prompts with positions left take, in order, what is left of them up to what
    remains of `budget` positions, so a pass has at most `budget` rows whatever the batch: the
    activations (the MLP's [rows, intermediate] above all) stay as bounded as one prompt's chunk.
    -> list of PrefillChunk, empty once every prompt is held whole."""
    chunks = []
    for slot, (ids, start) in enumerate(zip(prompts, held)):
        taken = min(len(ids) - start, budget)
        if taken > 0:
            chunks.append(PrefillChunk(slot, ids[start:start + taken], start))
            budget -= taken
    return chunks


def prefill_prompts(model, cache, prompts, held, budget):
    """Prompt i (token ids) into cache slot i past the first held[i] positions it holds already, in
    prefill passes of at most `budget` positions (prefill_pass), all before any decoding (what a
    benchmark of the prefill times) -> logits of each prompt's last position, [batch, vocab]."""
    held = list(held)
    last_logits = [None] * len(prompts)
    while chunks := prefill_pass(prompts, held, budget):
        logits = model.prefill_chunks(cache, chunks)  # [chunks, vocab]
        for chunk, chunk_logits in zip(chunks, logits):
            held[chunk.slot] = chunk.end
            if chunk.end == len(prompts[chunk.slot]):
                last_logits[chunk.slot] = chunk_logits  # [vocab]
    return model.xp.stack(last_logits)  # [batch, vocab]
