"""One decode step over the first rows of a KV pool, as a function of fixed device buffers.

Everything a step reads lives in buffers allocated once for the pool's rows: the newest token of each
row (IDLE for a row with no sequence decoding: it runs on token 0 and what it yields is ignored), its
position, its sampling draw, its sampling settings and the tokens it holds (what a repetition penalty
reads), and the chosen tokens are written into one more. A step also advances its own inputs (each
decoding row feeds its choice at the next position), so the host fetches the chosen tokens and
uploads only what changed: tokens and positions when rows join or leave, draws when some row samples,
settings and held tokens when a sequence takes a row.

So on a GPU a step can be captured once as a CUDA graph and replayed, one graph per key:
  - the bucket: a step over the first n rows runs the smallest of 1, 2, 4, ... (and the pool's size)
    that holds them, so a batch of 3 costs a batch of 4, not of the whole pool;
  - the sampling steps some decoding row turns on (repetition penalty, temperature, top-k, top-p,
    min-p): the others are skipped, so a greedy batch samples by argmax alone, and the rows' values
    of the ones on are read from the buffers, so one graph serves any mix of settings.
A key's first step runs eagerly (it compiles kernels and sizes the memory the capture takes), its
second is captured, then it replays. Each key's work allocates from a memory pool of its own, which
the graph keeps: the scratch memory a graph was captured with is never handed to anything else.
"""

import contextlib
import sys
from collections import Counter

import numpy as np

from minifd.backend import is_gpu, to_numpy
from minifd.kernels.launch import Launch, resolve_overlap
from minifd.sampling import SETTING_DTYPES, RowSettings, SamplingParams, mark_seen, sample

NON_FINITE = -1  # the token a row reports when its logits hold NaN or Inf
IDLE = -1  # the token given for a row that is not decoding
NEUTRAL = SamplingParams()  # every sampling step off


def buckets(rows):
    """The row counts a step over a pool of `rows` rows runs: powers of two below it, and itself."""
    sizes = [1 << i for i in range(rows.bit_length()) if 1 << i < rows]
    return sizes + [rows]


class DecodeStep:
    def __init__(self, model, cache, use_graph=True, overlap=None):
        """model: a Llama; cache: the KV pool (KVCache), one row per sequence; overlap: launch each kernel
        so it overlaps the previous one's tail (minifd.kernels.launch); None = wherever the GPU and
        software support it."""
        xp = model.xp
        self.model, self.xp = model, xp
        rows = cache.k[0].shape[0]
        self.buckets = buckets(rows)
        self.caches = {bucket: cache.first_rows(bucket) for bucket in self.buckets}
        self.tokens = xp.full(rows, IDLE, dtype=xp.int64)  # [rows]
        self.positions = xp.zeros(rows, dtype=xp.int32)  # [rows]
        self.uniforms = xp.zeros(rows, dtype=xp.float32)  # [rows]
        self.chosen = xp.zeros(rows, dtype=xp.int64)  # [rows], written by each step
        self.fed_tokens = np.full(rows, IDLE, dtype=np.int64)  # what self.tokens holds, as the host knows it
        self.fed_positions = np.zeros(rows, dtype=np.int32)  # what self.positions holds, likewise
        self.seen = xp.zeros((rows, model.config.vocab_size), dtype=bool)  # [rows, vocab]
        self.settings = {name: xp.full((rows, 1), getattr(NEUTRAL, name), dtype=dtype)  # [rows, 1] each
                         for name, dtype in SETTING_DTYPES.items()}
        self.params = [NEUTRAL] * rows  # each row's settings, as the host knows them
        self.sampling = [frozenset()] * rows  # each row's sampling steps on (its settings off neutral)
        self.use_graph = use_graph and is_gpu(xp)
        # Captured or not, the step runs the kernels a CUDA graph can record, so --no-graph changes
        # how the step is launched, not what it computes.
        self.launch = Launch(graph_captured=is_gpu(xp), overlap=is_gpu(xp) and resolve_overlap(overlap))
        self.stream = None
        if is_gpu(xp):  # steps run on their own stream (capture needs one), after the work queued so far
            self.stream = xp.cuda.Stream(non_blocking=True)
            self.stream.wait_event(xp.cuda.get_current_stream().record())
        self.graphs = {}  # key -> captured graph
        self.pools = {}  # key -> the memory pool its steps allocate from
        self.steps = Counter()  # key -> steps run

    def on_stream(self):
        """A context in which work runs on the step's stream: whatever touches the pool (prefill
        passes, assign) runs there too, in order with the steps."""
        return self.stream if self.stream is not None else contextlib.nullcontext()

    def assign(self, row, params, token_ids):
        """A sequence takes `row`: its SamplingParams and the token ids it holds (its prompt)."""
        self.params[row] = params
        self.sampling[row] = frozenset(name for name in SETTING_DTYPES if getattr(params, name) != getattr(NEUTRAL, name))
        with self.on_stream():
            for name in SETTING_DTYPES:
                self.settings[name][row, 0] = getattr(params, name)
            self.seen[row] = False
            self.seen[row, self.xp.asarray(np.asarray(token_ids, dtype=np.int64))] = True

    def choose(self, logits, rows, uniforms):
        """Tokens for `rows` from logits computed outside the step (a prompt's last position), each with
        its row's settings: logits [len(rows), vocab], uniforms [len(rows)] host floats -> host token ids,
        also marked as held by their rows."""
        xp = self.xp
        with self.on_stream():
            indices = xp.asarray(np.asarray(rows, dtype=np.int64))
            seen = self.seen[indices]  # [len(rows), vocab]
            finite = xp.isfinite(logits).all(axis=-1)
            chosen = xp.where(finite, sample(logits, [self.params[r] for r in rows], uniforms, seen), NON_FINITE)
            self.seen[indices, xp.maximum(chosen, 0)] |= chosen >= 0
            return to_numpy(chosen)

    def __call__(self, tokens, positions, uniforms):
        """One step over the first len(tokens) rows. tokens: host ints (IDLE for rows not decoding);
        positions: where each row's token goes (a row not decoding: any position its cache row may
        overwrite); uniforms: host floats in [0, 1) -> host token ids (NON_FINITE marks bad logits)."""
        rows = len(tokens)
        bucket = next(size for size in self.buckets if size >= rows)
        decoding = [row for row in range(rows) if tokens[row] != IDLE]
        sampling = frozenset().union(*(self.sampling[row] for row in decoding))
        key = (bucket, sampling)
        with self.on_stream():
            # A step advances its own inputs (each decoding row feeds its choice at the next position),
            # so in the steady state nothing is uploaded; the host keeps the same account.
            self._upload(self.tokens, self.fed_tokens, tokens, IDLE, bucket)
            self._upload(self.positions, self.fed_positions, positions, 0, bucket)
            if "temperature" in sampling:  # the only setting that reads the draws
                self._upload(self.uniforms, None, uniforms, 0.0, bucket)
            if key not in self.graphs and self.use_graph and self.steps[key] >= 1:
                self._capture(key)
            if key in self.graphs:
                self.graphs[key].launch(stream=self.stream)
            else:
                with self._memory_of(key):
                    self._step(*key)
            self.steps[key] += 1
            chosen = to_numpy(self.chosen[:bucket])  # [bucket]
        live = self.fed_tokens[:bucket] != IDLE
        self.fed_tokens[:bucket] = np.where(live, chosen, IDLE)
        self.fed_positions[:bucket] += live
        return chosen[:rows]

    def _upload(self, buffer, fed, values, padding, bucket):
        """values (padded to the bucket) into buffer[:bucket], unless `fed`, the host's account of what
        the buffer holds, says it holds them already."""
        host = np.full(bucket, padding, dtype=buffer.dtype)
        host[:len(values)] = values
        if fed is not None:
            if np.array_equal(fed[:bucket], host):
                return
            fed[:bucket] = host
        if self.stream is None:
            buffer[:bucket] = host
        else:
            buffer[:bucket].set(host, stream=self.stream)

    def _step(self, bucket, sampling):
        xp = self.xp
        tokens = self.tokens[:bucket]  # [bucket]
        logits = self.model.decode(self.caches[bucket], xp.maximum(tokens, 0), self.positions[:bucket],
                                   self.launch)  # [bucket, vocab]
        settings = RowSettings(**{name: self.settings[name][:bucket] if name in sampling else getattr(NEUTRAL, name)
                                  for name in SETTING_DTYPES})
        seen = self.seen[:bucket] if "repetition_penalty" in sampling else None  # [bucket, vocab]
        finite = xp.isfinite(logits).all(axis=-1)  # [bucket]
        chosen = xp.where(finite, sample(logits, settings, self.uniforms[:bucket], seen), NON_FINITE)  # [bucket]
        live = tokens >= 0  # [bucket]
        if seen is not None:
            mark_seen(seen, xp.where(live, chosen, IDLE))
        self.chosen[:bucket] = chosen
        tokens[...] = xp.where(live, chosen, IDLE)  # the next step's inputs
        self.positions[:bucket] += live

    def _memory_of(self, key):
        if self.stream is None:
            return contextlib.nullcontext()
        pool = self.pools.setdefault(key, self.xp.cuda.MemoryPool())
        return self.xp.cuda.using_allocator(pool.malloc)

    def _capture(self, key):
        """Record one step of this key into self.graphs (nothing runs yet); where capture is unsupported,
        say so once and launch plainly from then on.

        The key's first step ran eagerly from its memory pool: kernels are compiled and the pool holds
        a block of every size the step needs, so the captured step allocates nothing new."""
        try:
            with self._memory_of(key):
                self.stream.begin_capture()
                try:
                    self._step(*key)
                finally:
                    graph = self.stream.end_capture()
        except Exception as error:  # the driver or the CuPy build cannot capture this step
            print(f"minifd: CUDA graph capture failed ({type(error).__name__}: {error}); "
                  "decoding with plain launches", file=sys.stderr)
            self.use_graph = False
            return
        self.graphs[key] = graph
