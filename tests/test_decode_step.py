"""DecodeStep on the CPU: the rows of a bucket and the idle rows beside them change no decoding row's
tokens, and a step advances its own inputs."""

import numpy as np

from minifd.decode_step import IDLE, DecodeStep, buckets
from minifd.model.config import LlamaConfig
from minifd.model.llama import KVCache, Llama
from minifd.model.loader import InMemoryCheckpoint
from minifd.model.weights import load_weights
from minifd.properties.random_model import random_tensors, tiny_config_dict
from minifd.sampling import SamplingParams
from minifd.scheduler import prefill_prompts

STEPS = 6


def test_buckets_are_powers_of_two_up_to_the_pool():
    assert buckets(1) == [1]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(6) == [1, 2, 4, 6]


def model_and_prompts(count):
    config = LlamaConfig.from_dict(tiny_config_dict(vocab_size=300, hidden_size=128, intermediate_size=256,
                                                    n_heads=4, n_kv_heads=2, head_dim=64))
    weights = load_weights(InMemoryCheckpoint(random_tensors(config, seed=5)), config, np, np.float32, progress=False)
    rng = np.random.default_rng(1)
    return Llama(config, weights, np, max_seq=64), [rng.integers(0, 300, 3 + 4 * i).tolist() for i in range(count)]


def decoded(model, prompts, pool, rows, settings):
    """Prompt i prefilled into row rows[i] of a pool of `pool` rows (the others idle), then STEPS steps
    over the first max(rows) + 1 rows -> each prompt's tokens."""
    cache = KVCache.allocate(model.config, pool, 64, np, np.float32)
    placed = [[0]] * pool
    for row, ids in zip(rows, prompts):
        placed[row] = ids
    logits = prefill_prompts(model, cache, placed, [0] * pool, 512)  # [pool, vocab]
    step = DecodeStep(model, cache, use_graph=False)
    span = max(rows) + 1
    tokens, positions = [IDLE] * span, [0] * span
    for row, ids, params in zip(rows, prompts, settings):
        step.assign(row, params, ids)
        tokens[row], positions[row] = int(logits[row].argmax()), len(ids)
    draws = np.random.default_rng(2).random((STEPS, len(prompts)))  # each prompt's own, wherever its row
    out = [[] for _ in prompts]
    for i in range(STEPS):
        uniforms = np.zeros(span)
        uniforms[rows] = draws[i]
        chosen = step(tokens, positions, uniforms)  # [span]
        for j, row in enumerate(rows):
            out[j].append(int(chosen[row]))
            tokens[row], positions[row] = int(chosen[row]), positions[row] + 1
    return out


def test_idle_rows_and_the_bucket_change_no_rows_tokens():
    """3 sequences at rows 0, 2, 5 of a pool of 8 (the bucket of 8, idle rows between) decode what
    they decode packed into a pool of 3, greedy and sampled rows alike."""
    model, prompts = model_and_prompts(3)
    settings = [SamplingParams(), SamplingParams(0.9, top_k=30), SamplingParams(1.2, top_p=0.8, repetition_penalty=1.2)]
    packed = decoded(model, prompts, 3, [0, 1, 2], settings)
    spread = decoded(model, prompts, 8, [0, 2, 5], settings)
    assert spread == packed


def test_a_step_advances_its_own_inputs():
    """Fed the tokens it chose, at the next positions, the step uploads nothing: its buffers already
    hold them."""
    model, prompts = model_and_prompts(2)
    cache = KVCache.allocate(model.config, 2, 64, np, np.float32)
    logits = prefill_prompts(model, cache, prompts, [0, 0], 512)
    step = DecodeStep(model, cache, use_graph=False)
    tokens, positions = [int(row.argmax()) for row in logits], [len(ids) for ids in prompts]
    chosen = step(tokens, positions, [0.0, 0.0])
    np.testing.assert_array_equal(step.tokens, chosen)
    np.testing.assert_array_equal(step.positions, np.array(positions) + 1)
