"""The CUDA-graph decode step on a random model: replaying the graph gives the tokens that launching
the same step kernel by kernel gives (no checkpoint needed)."""

import numpy as np
import pytest

from minifd.decode_step import DecodeStep
from minifd.kernels import flat_gemm as flat_gemm_module
from minifd.kernels import linear as linear_module
from minifd.kernels.launch import overlap_supported
from minifd.model.config import LlamaConfig
from minifd.model.llama import KVCache, Llama
from minifd.model.loader import InMemoryCheckpoint
from minifd.model.weights import load_weights
from minifd.properties.random_model import random_tensors, tiny_config_dict
from minifd.sampling import SamplingParams

pytestmark = pytest.mark.gpu


def two_decoders(batch, first, second, pool=None):
    """A random tiny model prefilled twice with the same prompts into KV pools of `pool` rows (batch
    when None) -> two DecodeSteps built with the keyword arguments `first` and `second`, the first
    tokens and the prompts' lengths."""
    import cupy

    config = LlamaConfig.from_dict(tiny_config_dict(vocab_size=512, hidden_size=256, intermediate_size=512,
                                                    n_heads=4, n_kv_heads=2, head_dim=64))
    weights = load_weights(InMemoryCheckpoint(random_tensors(config, seed=batch)), config, cupy, np.float16,
                           progress=False)
    model = Llama(config, weights, cupy, max_seq=64)
    rng = np.random.default_rng(batch)
    prompts = [rng.integers(0, config.vocab_size, rng.integers(3, 12)) for _ in range(batch)]
    caches = [KVCache.allocate(config, pool or batch, 12 + STEPS + 1, cupy, np.float16) for _ in range(2)]
    first_tokens = [int(model.prefill(caches[0], b, ids).argmax()) for b, ids in enumerate(prompts)]
    for layer in range(config.n_layers):
        caches[1].k[layer][...] = caches[0].k[layer]
        caches[1].v[layer][...] = caches[0].v[layer]
    lengths = np.array([len(ids) for ids in prompts], dtype=np.int32)
    return (DecodeStep(model, caches[0], **first), DecodeStep(model, caches[1], **second), first_tokens, lengths)


def step_both(steps, one, other, tokens, lengths, uniforms=None):
    """Run two DecodeSteps side by side from the same tokens, each fed its own choices; assert they agree."""
    for i in range(steps):
        draws = np.zeros(len(tokens)) if uniforms is None else uniforms[i]
        expected = other(tokens, lengths + i, draws)
        got = one(tokens, lengths + i, draws)
        np.testing.assert_array_equal(got, expected)
        tokens = got


STEPS = 16


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_graph_replay_equals_launches(batch, monkeypatch, tmp_path):
    """Where the table says library (M >= 2 with the defaults), the captured step runs the flat GEMM."""
    import cupy

    monkeypatch.setenv("MINIFD_CACHE", str(tmp_path))  # no tuned table: the documented defaults apply
    flat_calls = []
    flat_gemm = flat_gemm_module.flat_gemm_gpu
    monkeypatch.setitem(linear_module._GPU, "flat_gemm",
                        lambda x, w, **fused: flat_calls.append(cupy.cuda.get_current_stream().is_capturing())
                        or flat_gemm(x, w, **fused))
    replayed, launched, tokens, lengths = two_decoders(batch, {"use_graph": True}, {"use_graph": False})
    step_both(STEPS, replayed, launched, tokens, lengths)
    assert replayed.graphs
    if batch >= 2:
        assert True in flat_calls, "no flat GEMM was recorded into the graph"


def test_a_graph_per_bucket_and_sampling_mix_equals_launches(monkeypatch, tmp_path):
    """3 sequences in a pool of 8 run the bucket of 4 (one idle row); rows of different sampling settings
    (greedy, top-k, top-p with a repetition penalty) read them from the step's buffers, so the replayed
    graph draws what launches draw; dropping to 1 row captures the bucket of 1."""
    monkeypatch.setenv("MINIFD_CACHE", str(tmp_path))
    replayed, launched, tokens, lengths = two_decoders(3, {"use_graph": True}, {"use_graph": False}, pool=8)
    settings = [SamplingParams(), SamplingParams(0.8, top_k=20), SamplingParams(1.1, top_p=0.9, repetition_penalty=1.3)]
    for step in (replayed, launched):
        for row, params in enumerate(settings):
            step.assign(row, params, [tokens[row]])
    uniforms = np.random.default_rng(0).random((STEPS, 3))
    step_both(STEPS, replayed, launched, tokens, lengths, uniforms)
    assert list(replayed.graphs) == [(4, frozenset({"temperature", "top_k", "top_p", "repetition_penalty"}))]
    step_both(4, replayed, launched, tokens[:1], lengths[:1] + STEPS)
    assert (1, frozenset()) in replayed.graphs


@pytest.mark.parametrize("batch", [1, 8])
def test_overlapping_launches_give_the_same_tokens(batch, monkeypatch, tmp_path):
    """Programmatic dependent launch changes when kernels start, never what they compute; where the
    GPU or software cannot overlap, the step falls back to plain launches."""
    monkeypatch.setenv("MINIFD_CACHE", str(tmp_path))
    overlapped, plain, tokens, lengths = two_decoders(batch, {"use_graph": True, "overlap": True},
                                                      {"use_graph": True, "overlap": False})
    assert overlapped.launch.overlap == overlap_supported()[0] and not plain.launch.overlap
    step_both(STEPS, overlapped, plain, tokens, lengths)
    assert overlapped.graphs
