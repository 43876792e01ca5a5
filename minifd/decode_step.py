"""One decode step of the whole batch as a function of fixed device buffers.

Everything a step reads (the newest token of each sequence, its position, the sampling draws, the
tokens each sequence holds where a repetition penalty needs them) and writes (the chosen tokens)
lives in buffers allocated once, and the step advances its own inputs on the device. So on a GPU the
step can be captured once as a CUDA graph and replayed per token: the host only uploads the draws
and fetches the chosen tokens to print.
"""

import sys

import numpy as np

from minifd.backend import is_gpu, to_numpy
from minifd.kernels.launch import Launch, resolve_overlap
from minifd.sampling import mark_seen, sample

NON_FINITE = -1  # the token a row reports when its logits hold NaN or Inf


class DecodeStep:
    def __init__(self, model, cache, params, first_tokens, positions, seen=None, use_graph=True, overlap=None):
        """first_tokens: [batch] the tokens chosen from the prefill; positions: [batch] where they go;
        seen: [batch, vocab] bool host array of the tokens each sequence holds, first tokens included
        (what sample() needs for a repetition penalty; None without one); overlap: launch each kernel
        so it overlaps the previous one's tail (minifd.kernels.launch); None = wherever the GPU and
        software support it."""
        xp = model.xp
        self.model, self.cache, self.params, self.xp = model, cache, params, xp
        self.tokens = xp.array(np.asarray(first_tokens, dtype=np.int64))  # [batch], a copy: the step advances it
        self.positions = xp.array(np.asarray(positions, dtype=np.int32))  # [batch], a copy likewise
        self.seen = None if seen is None else xp.array(seen)  # [batch, vocab], a copy likewise
        self.uniforms = xp.zeros(self.tokens.shape, dtype=xp.float32)  # [batch]
        self.chosen = None  # [batch] int64, written by each step
        self.use_graph = use_graph and is_gpu(xp)
        # Captured or not, the step runs the kernels a CUDA graph can record, so --no-graph changes
        # how the step is launched, not what it computes.
        self.launch = Launch(graph_captured=is_gpu(xp), overlap=is_gpu(xp) and resolve_overlap(overlap))
        self.stream = None
        if is_gpu(xp):
            # Steps run on their own stream (capture needs one); it starts after the prefill's work.
            self.stream = xp.cuda.Stream(non_blocking=True)
            self.stream.wait_event(xp.cuda.get_current_stream().record())
        self.graph = None
        self.steps = 0

    def _step(self):
        xp = self.xp
        logits = self.model.decode(self.cache, self.tokens, self.positions, self.launch)  # [batch, vocab]
        finite = xp.isfinite(logits).all(axis=-1)
        chosen = xp.where(finite, sample(logits, self.params, self.uniforms, self.seen), NON_FINITE)
        if self.seen is not None:
            mark_seen(self.seen, chosen)
        if self.chosen is None:
            self.chosen = chosen
        else:
            self.chosen[...] = chosen
        self.tokens[...] = xp.maximum(chosen, 0)
        self.positions += 1

    def __call__(self, uniforms):
        """uniforms: [batch] host floats in [0, 1) -> [batch] host token ids (NON_FINITE marks bad logits)."""
        self.steps += 1
        if self.stream is None:
            self.uniforms[...] = uniforms
            self._step()
            return self.chosen.copy()
        with self.stream:
            self.uniforms.set(np.asarray(uniforms, dtype=np.float32), stream=self.stream)
            if self.graph is not None:
                self.graph.launch(stream=self.stream)
            elif self.use_graph and self.steps >= 2 and self._capture():
                self.graph.launch(stream=self.stream)
            else:
                self._step()  # with a graph to come, this warm-up allocates what the captured step will use
            return to_numpy(self.chosen)

    def _capture(self):
        """Record one step into self.graph (nothing runs yet); -> False where capture is unsupported.

        The first step ran eagerly on this stream: kernels are compiled and the stream's memory pool
        holds a block of every size the step needs, so the captured step allocates nothing new.
        """
        try:
            self.stream.begin_capture()
            try:
                self._step()
            finally:
                graph = self.stream.end_capture()
        except Exception as error:  # the driver or the CuPy build cannot capture this step
            print(f"minifd: CUDA graph capture failed ({type(error).__name__}: {error}); "
                  "decoding with plain launches", file=sys.stderr)
            self.use_graph = False
            return False
        self.graph = graph
        return True
