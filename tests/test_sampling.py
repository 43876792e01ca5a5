"""Sampling: greedy, temperature, top-k, top-p, and seeds."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from minifd.sampling import SamplingParams, draw_seed, sample

seeds = st.integers(0, 2**32 - 1)


@given(batch=st.integers(1, 5), vocab=st.integers(2, 300), seed=seeds)
def test_greedy_is_argmax(batch, vocab, seed):
    logits = np.random.default_rng(seed).standard_normal((batch, vocab)).astype(np.float32)
    np.testing.assert_array_equal(sample(logits, SamplingParams(0.0), np.zeros(batch)), logits.argmax(-1))


@given(vocab=st.integers(2, 100), top_k=st.integers(1, 100), seed=seeds)
def test_top_k_only_picks_among_the_k_most_likely(vocab, top_k, seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((64, vocab)).astype(np.float32)
    picks = sample(logits, SamplingParams(1.0, top_k=top_k), rng.random(64))
    ranks = (logits > logits[np.arange(64), picks][:, None]).sum(-1)
    assert (ranks < min(top_k, vocab)).all()


@given(vocab=st.integers(2, 100), top_p=st.floats(0.01, 1.0), seed=seeds)
def test_top_p_picks_from_the_smallest_prefix_reaching_p(vocab, top_p, seed):
    rng = np.random.default_rng(seed)
    logits = (3 * rng.standard_normal((32, vocab))).astype(np.float32)
    picks = sample(logits, SamplingParams(1.0, top_p=top_p), rng.random(32))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for row, pick in enumerate(picks):
        mass_above = probs[row][probs[row] > probs[row, pick]].sum()
        assert mass_above < top_p + 1e-5


def test_temperature_sampling_follows_the_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.2]], dtype=np.float32))
    rng = np.random.default_rng(0)
    picks = [int(sample(logits, SamplingParams(1.0), rng.random(1))[0]) for _ in range(4000)]
    frequencies = np.bincount(picks, minlength=3) / len(picks)
    np.testing.assert_allclose(frequencies, [0.5, 0.3, 0.2], atol=0.03)


def test_a_missing_or_negative_seed_is_drawn_and_a_given_one_kept():
    assert draw_seed(7) == 7 and draw_seed(0) == 0
    drawn = {draw_seed(None) for _ in range(5)} | {draw_seed(-1) for _ in range(5)}
    assert all(isinstance(seed, int) and seed >= 0 for seed in drawn) and len(drawn) > 1
