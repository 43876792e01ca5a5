"""Sampling: greedy, temperature, top-k, top-p, min-p, the repetition penalty, and seeds."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from minifd.sampling import SamplingParams, draw_seed, mark_seen, penalize_repetition, sample, tokens_seen

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


# --- repetition penalty and min-p, against NumPy transcriptions of HF's logits processors -----------

def hf_repetition_penalty(scores, input_ids, penalty):
    """RepetitionPenaltyLogitsProcessor: gather the scores of input_ids, scale them, scatter them back."""
    score = np.take_along_axis(scores, input_ids, axis=1)
    score = np.where(score < 0, score * penalty, score / penalty)
    out = scores.copy()
    np.put_along_axis(out, input_ids, score, axis=1)
    return out


def hf_min_p_distribution(scores, temperature, min_p):
    """TemperatureLogitsWarper then MinPLogitsWarper, then the softmax generate() samples from."""
    scores = scores / temperature
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    scores = np.where(probs < min_p * probs.max(-1, keepdims=True), -np.inf, scores)
    kept = np.exp(scores - scores.max(-1, keepdims=True))
    return kept / kept.sum(-1, keepdims=True)


@given(batch=st.integers(1, 4), vocab=st.integers(2, 200), penalty=st.floats(0.5, 2.0), seed=seeds)
def test_repetition_penalty_is_hfs(batch, vocab, penalty, seed):
    rng = np.random.default_rng(seed)
    logits = (3 * rng.standard_normal((batch, vocab))).astype(np.float32)
    input_ids = rng.integers(0, vocab, (batch, 12))  # prompt and generated ids, repeats included
    expected = hf_repetition_penalty(logits, input_ids, np.float32(penalty))
    seen = tokens_seen(list(input_ids), vocab)
    np.testing.assert_array_equal(penalize_repetition(logits, seen, np.float32(penalty)), expected)
    greedy = sample(logits, SamplingParams(0.0, repetition_penalty=np.float32(penalty)), np.zeros(batch), seen)
    np.testing.assert_array_equal(greedy, expected.argmax(-1))


def test_marking_seen_tokens_adds_each_rows_new_token():
    seen = tokens_seen([[0, 2], [1]], 4)
    mark_seen(seen, np.array([3, -1]))  # a negative token (NON_FINITE) marks nothing
    np.testing.assert_array_equal(seen, [[True, False, True, True], [False, True, False, False]])


@given(vocab=st.integers(2, 40), temperature=st.floats(0.3, 2.0), min_p=st.floats(0.0, 1.0),
       penalty=st.sampled_from([1.0, 1.3]), seed=seeds)
def test_min_p_samples_from_hfs_distribution(vocab, temperature, min_p, penalty, seed):
    # Uniforms spread evenly over [0, 1) draw each token by inverse CDF in proportion to its probability,
    # so the pick counts follow the distribution to within one draw per token.
    rng = np.random.default_rng(seed)
    logits = (2 * rng.standard_normal((1, vocab))).astype(np.float32)
    seen = tokens_seen([rng.integers(0, vocab, 5)], vocab)
    expected = hf_min_p_distribution(hf_repetition_penalty(logits, np.flatnonzero(seen)[None], penalty),
                                     temperature, min_p)[0]
    draws = 1000
    params = SamplingParams(temperature, min_p=min_p, repetition_penalty=penalty)
    picks = sample(np.repeat(logits, draws, axis=0), params, (np.arange(draws) + 0.5) / draws,
                   np.repeat(seen, draws, axis=0))
    counts = np.bincount(picks, minlength=vocab)
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(expected))
    np.testing.assert_allclose(counts / draws, expected, atol=1.5 / draws + 1e-5)


def test_rows_of_different_settings_sample_as_each_would_alone():
    """One call over rows of different settings (what requests decoding together need) gives each row
    the very token a call with its settings alone gives: greedy, temperature, top-k, top-p, min-p and
    the repetition penalty mixed."""
    rng = np.random.default_rng(3)
    rows = [SamplingParams(0.0), SamplingParams(0.7), SamplingParams(1.3, top_k=5), SamplingParams(1.0, top_p=0.6),
            SamplingParams(0.9, min_p=0.2), SamplingParams(0.0, repetition_penalty=1.5),
            SamplingParams(1.1, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.2), SamplingParams(1.0)]
    draws = 50
    logits = rng.standard_normal((len(rows) * draws, 64)).astype(np.float32) * 3  # [rows x draws, vocab]
    seen = rng.random(logits.shape) < 0.2
    uniforms = rng.random(len(logits))
    params = [p for p in rows for _ in range(draws)]
    together = sample(logits, params, uniforms, seen)
    alone = np.concatenate([sample(logits[i:i + 1], params[i], uniforms[i:i + 1], seen[i:i + 1])
                            for i in range(len(logits))])
    np.testing.assert_array_equal(together, alone)
    greedy_rows = np.repeat([p.temperature == 0 for p in rows], draws)
    assert not np.array_equal(together[~greedy_rows], logits[~greedy_rows].argmax(-1)), "the test draws nothing"
