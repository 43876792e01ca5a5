"""The ragged prefill: one pass over the weights for a chunk of every prompt of a batch
(Llama.prefill_chunks, scheduled by scheduler.prefill_pass) gives each prompt the logits, the cache and
the greedy tokens that prefilling it alone gives, for prompts of different lengths, chunked under a
token budget, and after a cached prefix."""

import numpy as np
import pytest

from minifd.engine import Engine
from minifd.scheduler import prefill_pass, prefill_prompts
from minifd.model.config import LlamaConfig
from minifd.model.llama import KVCache, Llama
from minifd.model.loader import InMemoryCheckpoint
from minifd.model.weights import load_weights
from minifd.properties.random_model import random_tensors, tiny_config_dict
from minifd.model.tokenizer import Tokenizer
from tiny_model import byte_tokenizer

# The ragged pass does each row's arithmetic of the lone prefill, but its products have more rows and
# its chunks other boundaries, so BLAS (CPU) and the GEMM kernels (GPU) may sum in another order: the
# float32 logits agree to a few ulps of their accumulations, the float16 ones to fp16 rounding.
TOLERANCE = {"cpu": dict(rtol=1e-4, atol=1e-4), "gpu": dict(rtol=2e-2, atol=2e-2)}
MAX_SEQ = 400


def random_model(xp):
    config = LlamaConfig.from_dict(tiny_config_dict(vocab_size=300, hidden_size=128, intermediate_size=256,
                                                    n_heads=4, n_kv_heads=2, head_dim=64))
    dtype = np.float32 if xp is np else np.float16
    weights = load_weights(InMemoryCheckpoint(random_tensors(config, seed=3)), config, xp, dtype, progress=False)
    return Llama(config, weights, xp, max_seq=MAX_SEQ)


TOKENIZER = Tokenizer(byte_tokenizer(), bos_id=256, add_bos=True, eos_ids=frozenset({257}))


def engine_on(model, xp, prefill_chunk):
    return Engine("random", model.config, TOKENIZER, model, xp, use_graph=False, progress=False,
                  prefill_chunk=prefill_chunk)


def backend(xp):
    return "cpu" if xp is np else "gpu"


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, length).tolist() for length in lengths]


def prefilled_alone(model, xp, prompts, cached, chunk):
    """Each prompt in its own cache, `cached` positions prefilled first, then the rest chunk by chunk
    -> (last-position logits [batch, vocab] as numpy, the caches)."""
    logits, caches = [], []
    for ids, held in zip(prompts, cached):
        cache = KVCache.allocate(model.config, 1, MAX_SEQ, xp, model.dtype)
        if held:
            model.prefill(cache, 0, ids[:held])
        for start in range(held, len(ids), chunk):
            last = model.prefill(cache, 0, ids[start:start + chunk], start)  # [vocab]
        logits.append(np.asarray(last.get() if xp is not np else last, np.float32))
        caches.append(cache)
    return np.stack(logits), caches


@pytest.mark.parametrize("lengths, cached, chunk", [
    ([7], [0], 512),
    ([1, 9, 130, 40], [0, 0, 0, 0], 512),  # one pass of 180 rows, a prompt past the 128-row query tile
    ([300, 5, 70, 2, 33, 140, 9, 64], [0] * 8, 100),  # batch 8 in passes of 100 rows: prompts split across passes
    ([50, 200, 12], [20, 150, 0], 64),  # cached prefixes (engine.chat's), chunked past them
])
def test_the_ragged_pass_gives_each_prompt_what_prefilling_it_alone_gives(xp, lengths, cached, chunk):
    model = random_model(xp)
    prompts = prompts_of(lengths)
    expected, alone = prefilled_alone(model, xp, prompts, cached, chunk)
    cache = KVCache.allocate(model.config, len(prompts), MAX_SEQ, xp, model.dtype)
    for slot, (ids, held) in enumerate(zip(prompts, cached)):
        if held:
            model.prefill(cache, slot, ids[:held])
    logits = prefill_prompts(model, cache, prompts, cached, chunk)  # [batch, vocab]
    logits = np.asarray(logits.get() if xp is not np else logits, np.float32)
    tolerance = TOLERANCE[backend(xp)]
    np.testing.assert_allclose(logits, expected, **tolerance)
    top_two = np.sort(expected, axis=-1)[:, -2:]  # [batch, 2]
    decided = top_two[:, 1] - top_two[:, 0] > 2 * (tolerance["atol"] + tolerance["rtol"] * np.abs(top_two[:, 1]))
    assert decided.any() and (logits.argmax(axis=-1) == expected.argmax(axis=-1))[decided].all()
    for slot, (length, lone) in enumerate(zip(lengths, alone)):
        for ragged_layer, lone_layer in zip(cache.k + cache.v, lone.k + lone.v):
            got, want = (np.asarray(a.get() if xp is not np else a, np.float32)
                         for a in (ragged_layer[slot, :, :length], lone_layer[0, :, :length]))
            np.testing.assert_allclose(got, want, **TOLERANCE[backend(xp)])


# CPU only: on the GPU a batch's decode steps run other kernels than a lone prompt's (flat GEMM, GEMV),
# so their fp16 tokens may part at a near tie whatever the prefill; the test above covers its logits.
@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8])
def test_a_batch_generates_the_greedy_tokens_of_each_prompt_alone(batch):
    xp = np
    model = random_model(xp)
    prompts = prompts_of([3 + 37 * b % 150 for b in range(batch)], seed=batch)
    together = engine_on(model, xp, 64).generate(prompts, max_new_tokens=6, ignore_eos=True)
    for ids, completion in zip(prompts, together.completions):
        alone = engine_on(model, xp, 512).generate([ids], max_new_tokens=6, ignore_eos=True)
        assert completion.token_ids == alone.completions[0].token_ids


def test_a_pass_takes_every_prompt_with_positions_left_within_the_budget():
    prompts = prompts_of([10, 3, 30, 1])
    held = [4, 3, 0, 0]  # prompt 1 is held whole
    chunks = prefill_pass(prompts, held, 20)
    assert [(c.slot, c.start, c.end) for c in chunks] == [(0, 4, 10), (2, 0, 14)]
    assert chunks[1].token_ids == prompts[2][:14]
    assert [(c.slot, c.start, c.end) for c in prefill_pass(prompts, [10, 3, 14, 0], 20)] == [(2, 14, 30), (3, 0, 1)]
    assert prefill_pass(prompts, [10, 3, 30, 1], 20) == []


def test_the_engine_prefills_a_batch_in_passes_of_at_most_the_budget(xp, monkeypatch):
    model = random_model(xp)
    passes = []
    prefill_chunks = model.prefill_chunks
    monkeypatch.setattr(model, "prefill_chunks", lambda cache, chunks: passes.append(chunks)
                        or prefill_chunks(cache, chunks))
    engine_on(model, xp, 50).generate(prompts_of([16, 120, 1, 33]), max_new_tokens=1)
    assert [sum(len(c.token_ids) for c in chunks) for chunks in passes] == [50, 50, 50, 20]
    assert [len(chunks) for chunks in passes] == [2, 1, 3, 1]
