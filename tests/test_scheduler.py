"""The continuous-batching scheduler on the CPU: a request's tokens are the same whether it runs alone
through Engine.generate or joins and leaves a running batch of others."""

import os

import numpy as np
import pytest

import minifd
from minifd.errors import MinifdError
from minifd.fixture import fixture_dir, fixture_ready
from minifd.model.llama import KVCache
from minifd.sampling import SamplingParams
from minifd.scheduler import Request, Scheduler

PROMPTS = ["hello there", "a b c d e f g h i j", "x", "the quick brown fox jumps over", "zz top", "ok"]
SETTINGS = [SamplingParams(0.0), SamplingParams(0.8, top_k=20), SamplingParams(1.2, top_p=0.9),
            SamplingParams(0.0, repetition_penalty=1.3), SamplingParams(1.0, min_p=0.1), SamplingParams(0.7)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from tiny_model import tiny_model

    directory, _, _ = tiny_model(tmp_path_factory.mktemp("tiny") / "m")
    return minifd.load(directory, device="cpu")


def alone(engine, prompt, params, max_new_tokens, seed):
    result = engine.generate([prompt], max_new_tokens=max_new_tokens, temperature=params.temperature,
                             top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
                             repetition_penalty=params.repetition_penalty, seed=seed, ignore_eos=True)
    return result.completions[0].token_ids


def scheduler_of(engine, slots, max_seq, prefill_chunk, max_queue=None):
    cache = KVCache.allocate(engine.config, slots, max_seq, engine.xp, engine.model.dtype)
    return Scheduler(engine.model, cache, prefill_chunk, max_queue)


def request(engine, prompt, params, max_new_tokens, seed):
    ids = engine.tokenizer.encode(prompt)
    return Request(engine.sequence(ids, max_new_tokens, ignore_eos=True), params, seed)


@pytest.mark.parametrize("slots, prefill_chunk", [(2, 3), (4, 512), (6, 5)])
def test_requests_joining_and_leaving_a_batch_get_the_tokens_they_get_alone(engine, slots, prefill_chunk):
    lengths = [7, 3, 1, 12, 9, 5]  # requests of different lengths free their slots at different steps
    scheduler = scheduler_of(engine, slots, 64, prefill_chunk)
    requests = [request(engine, p, s, n, seed) for seed, (p, s, n) in enumerate(zip(PROMPTS, SETTINGS, lengths))]
    for r in requests[:3]:
        scheduler.submit(r)
    for _ in range(4):  # the rest join while the first ones decode
        scheduler.step()
    for r in requests[3:]:
        scheduler.submit(r)
    scheduler.run()
    for seed, (r, p, s, n) in enumerate(zip(requests, PROMPTS, SETTINGS, lengths)):
        assert r.sequence.finish_reason == "length"
        assert r.sequence.token_ids == alone(engine, p, s, n, seed), f"request {seed} ({s})"


def test_a_cancelled_request_frees_its_slot_and_the_others_run_on(engine):
    scheduler = scheduler_of(engine, 2, 64, 4)
    gone, waiting, stays = (request(engine, p, SamplingParams(0.9), 10, seed) for seed, p in enumerate(PROMPTS[:3]))
    for r in (gone, stays, waiting):
        scheduler.submit(r)
    for _ in range(5):
        scheduler.step()
    scheduler.cancel(gone)
    assert scheduler.slots.count(None) == 1 and gone.sequence.finish_reason == "cancelled"
    scheduler.run()
    assert stays.sequence.token_ids == alone(engine, PROMPTS[2], SamplingParams(0.9), 10, 2)
    assert waiting.sequence.token_ids == alone(engine, PROMPTS[1], SamplingParams(0.9), 10, 1)


def test_the_queue_and_the_slot_size_are_bounded(engine):
    scheduler = scheduler_of(engine, 1, 16, 8, max_queue=1)
    scheduler.submit(request(engine, "hello", SamplingParams(), 4, 0))  # takes the free slot at the next step
    scheduler.submit(request(engine, "hello", SamplingParams(), 4, 0))  # waits
    with pytest.raises(MinifdError, match="queue is full"):
        scheduler.submit(request(engine, "hello", SamplingParams(), 4, 0))
    with pytest.raises(MinifdError, match="over the 16"):
        scheduler_of(engine, 1, 16, 8).submit(request(engine, "hello", SamplingParams(), 16, 0))


@pytest.mark.skipif(not fixture_ready() and not os.environ.get("MINIFD_REQUIRE_FIXTURE"),
                    reason="SmolLM2 fixture not prepared (scripts/prepare_smollm2.py)")
def test_smollm2_greedy_text_is_the_same_alone_and_among_eight():
    """The issue's CPU promise on the real model: a request's greedy text served among 8 concurrent
    ones (joining at different steps) is its text alone."""
    engine = minifd.load(fixture_dir(), device="cpu", progress=False)
    prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Water boils at",
               "The quick brown fox", "In 1969, humans", "My favourite colour is", "A haiku about rain:"]
    greedy = SamplingParams()
    scheduler = scheduler_of(engine, 8, 128, 16)
    requests = [request(engine, prompt, greedy, 16, 0) for prompt in prompts]
    for r in requests:
        scheduler.submit(r)
        scheduler.step()  # each joins a step after the one before
    scheduler.run()
    assert [r.sequence.token_ids for r in requests] == [alone(engine, p, greedy, 16, 0) for p in prompts]


def test_a_request_whose_logits_are_not_finite_ends_alone_with_the_error(engine, monkeypatch):
    scheduler = scheduler_of(engine, 3, 64, 16)
    poisoned, *healthy = (request(engine, p, SamplingParams(), 6, seed) for seed, p in enumerate(PROMPTS[:3]))
    prefill_chunks = engine.model.prefill_chunks

    def poisoning(cache, chunks):  # the poisoned request's prompt ends in NaN logits
        logits = prefill_chunks(cache, chunks)
        for row, chunk in enumerate(chunks):
            if chunk.slot == 0:
                logits[row, 3] = np.nan
        return logits

    monkeypatch.setattr(engine.model, "prefill_chunks", poisoning)
    for r in (poisoned, *healthy):
        scheduler.submit(r)
    scheduler.run()
    assert poisoned.sequence.finish_reason == "error" and poisoned.sequence.token_ids == []
    assert "NaN or Inf logits at the prefill" in str(poisoned.error)
    monkeypatch.undo()
    for seed, r in enumerate(healthy, start=1):
        assert r.error is None and r.sequence.token_ids == alone(engine, PROMPTS[seed], SamplingParams(), 6, seed)
