"""Continuous batching: requests join and leave a running batch between decode steps.

    submit(request) -> waiting queue -> a free slot of the KV pool -> prefilled in chunks
                    -> decoded with the other slots, one token per step -> finished, slot free

The scheduler owns a KV cache of `slots` rows (the pool) and, per step, does three things:
  1. admit: waiting requests take free slots, in the order they came (cancel() frees one at once);
  2. prefill: one pass of at most `prefill_chunk` prompt positions over the slots still prefilling
     (engine.prefill_pass), so a long prompt delays the running sequences by one chunk per step, not
     by its whole length; a prompt whose last chunk ran chooses its first token;
  3. decode: one step over every slot (Llama.decode runs every cache row), each running sequence's
     row sampled with its own settings and its own seeded draws (minifd.sampling takes one
     SamplingParams per row).
Rows that are not decoding still run in the step, so they are given a position that harms nothing:
a free slot writes position 0 (whoever takes the slot prefills it again), a slot still prefilling
writes the position its next chunk starts at (which that chunk overwrites); each attends over no
more than what it holds.

This version runs each step eagerly on the array module, the CPU path's reference; on the GPU the
decode step is to become a CUDA graph per batch bucket (minifd.decode_step), with the rows' tokens,
positions and settings in its device buffers.
"""

from collections import deque
from dataclasses import dataclass

import numpy as np

from minifd.backend import to_numpy
from minifd.decode_step import NON_FINITE
from minifd.engine import prefill_pass
from minifd.errors import MinifdError
from minifd.model.llama import KVCache
from minifd.sampling import SamplingParams, sample, tokens_seen, uniform_source

IDLE = SamplingParams()  # how rows without a running sequence are "sampled": greedily, and then ignored


@dataclass
class Request:
    """What to continue and how: a Sequence (minifd.sequence: prompt ids, stop rules, text sink), its
    sampling settings and its seed (its draws are its own, whatever runs beside it)."""

    sequence: object
    params: SamplingParams
    seed: int
    on_finish: object = None  # on_finish(request): called once the sequence has ended, whatever ended it


@dataclass
class _Slot:
    request: Request
    uniforms: np.random.Generator
    held: int = 0  # prompt positions its cache row holds
    token: int = -1  # the token the next decode step feeds (once the prompt is held whole)
    position: int = 0  # where that token goes

    @property
    def decoding(self):
        return self.token >= 0


class Scheduler:
    def __init__(self, model, slots, max_seq, prefill_chunk, max_queue=None):
        """model: a Llama; slots: the batch's most sequences (the KV pool's rows); max_seq: positions per
        row; prefill_chunk: prompt positions per prefill pass; max_queue: the most waiting requests
        (None: no limit)."""
        self.model, self.prefill_chunk, self.max_queue = model, prefill_chunk, max_queue
        self.cache = KVCache.allocate(model.config, slots, max_seq, model.xp, model.dtype)
        self.slots = [None] * slots  # _Slot or None
        self.seen = np.zeros((slots, model.config.vocab_size), dtype=bool)  # the tokens each row holds (penalty)
        self.waiting = deque()

    @property
    def busy(self):
        return bool(self.waiting) or any(slot is not None for slot in self.slots)

    @property
    def full(self):
        """Whether max_queue requests wait already beyond those the free slots take at the next step."""
        return self.max_queue is not None and len(self.waiting) >= self.max_queue + self.slots.count(None)

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
        self.waiting = deque(waiting for waiting in self.waiting if waiting is not request)
        self.slots = [None if slot is not None and slot.request is request else slot for slot in self.slots]
        if request.sequence.running:
            request.sequence.finish("cancelled")
            _finished(request)

    def run(self):
        """Step until every submitted request has finished."""
        while self.busy:
            self.step()

    def step(self):
        """Admit, run one prefill pass, then one decode step (the module docstring says how)."""
        self._admit()
        self._prefill_pass()
        if any(slot is not None and slot.decoding for slot in self.slots):
            self._decode()

    def _admit(self):
        for index, slot in enumerate(self.slots):
            if slot is None and self.waiting:
                request = self.waiting.popleft()
                self.slots[index] = _Slot(request, uniform_source(request.seed))
                self.seen[index] = tokens_seen([request.sequence.prompt_ids], self.seen.shape[1])[0]

    def _prefill_pass(self):
        prefilling = [i for i, slot in enumerate(self.slots) if slot is not None and not slot.decoding]
        prompts = [self.slots[i].request.sequence.prompt_ids for i in prefilling]
        chunks = prefill_pass(prompts, [self.slots[i].held for i in prefilling], self.prefill_chunk)
        chunks = [type(chunk)(prefilling[chunk.slot], chunk.token_ids, chunk.start) for chunk in chunks]  # pool rows
        if not chunks:
            return
        logits = self.model.prefill_chunks(self.cache, chunks)  # [chunks, vocab]
        for chunk, chunk_logits in zip(chunks, logits):
            slot = self.slots[chunk.slot]
            slot.held = chunk.end
            if slot.held == len(slot.request.sequence.prompt_ids):  # the prompt is in: its first token
                token = self._choose(chunk_logits[None], [chunk.slot])[0]
                slot.position = slot.held
                self._accept(chunk.slot, token)

    def _decode(self):
        rows = self.slots
        tokens = np.array([slot.token if slot is not None and slot.decoding else 0 for slot in rows], dtype=np.int64)
        positions = np.array([(slot.position if slot.decoding else slot.held) if slot is not None else 0
                              for slot in rows], dtype=np.int32)
        logits = self.model.decode(self.cache, self.model.xp.asarray(tokens), positions)  # [slots, vocab]
        decoding = [i for i, slot in enumerate(rows) if slot is not None and slot.decoding]
        chosen = self._choose(logits, range(len(rows)))
        for i in decoding:
            self.slots[i].position += 1
            self._accept(i, chosen[i])

    def _choose(self, logits, indices):
        """logits: [len(indices), vocab], a row for each of these pool rows -> one token per row, a
        sequence's drawn with its settings from its own generator (rows without one greedily, unused)."""
        xp = self.model.xp
        rows = [self.slots[i] for i in indices]
        live = [row is not None and (row.decoding or row.held == len(row.request.sequence.prompt_ids)) for row in rows]
        params = [row.request.params if ready else IDLE for row, ready in zip(rows, live)]
        uniforms = np.array([row.uniforms.random() if ready else 0.0 for row, ready in zip(rows, live)])
        seen = xp.asarray(self.seen[list(indices)])  # [rows, vocab]
        finite = xp.isfinite(logits).all(axis=-1)
        chosen = xp.where(finite, sample(logits, params, uniforms, seen), NON_FINITE)
        return [int(t) for t in to_numpy(chosen)]

    def _accept(self, index, token):
        slot = self.slots[index]
        sequence = slot.request.sequence
        if token == NON_FINITE:
            raise MinifdError(f"the model produced non-finite logits at position {slot.position} of a sequence")
        sequence.accept(token)
        self.seen[index, token] = True
        if sequence.running:
            slot.token = token
        else:
            self.slots[index] = None  # free for the next waiting request at the next step
            _finished(slot.request)


def _finished(request):
    if request.on_finish is not None:
        request.on_finish(request)
