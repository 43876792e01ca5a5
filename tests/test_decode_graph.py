"""The CUDA-graph decode step on a random model: replaying the graph gives the tokens that launching
the same step kernel by kernel gives (no checkpoint needed)."""

import numpy as np
import pytest

from minifd.backend import cupy_or_none
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


def two_decoders(batch, first, second):
    """A random tiny model prefilled twice with the same prompts -> two DecodeSteps built with the
    keyword arguments `first` and `second`, and the batch's draws."""
    import cupy

    config = LlamaConfig.from_dict(tiny_config_dict(vocab_size=512, hidden_size=256, intermediate_size=512,
                                                    n_heads=4, n_kv_heads=2, head_dim=64))
    weights = load_weights(InMemoryCheckpoint(random_tensors(config, seed=batch)), config, cupy, np.float16,
                           progress=False)
    model = Llama(config, weights, cupy, max_seq=64)
    rng = np.random.default_rng(batch)
    prompts = [rng.integers(0, config.vocab_size, rng.integers(3, 12)) for _ in range(batch)]
    caches = [KVCache.allocate(config, batch, 12 + STEPS + 1, cupy, np.float16) for _ in range(2)]
    first_tokens = [int(model.prefill(caches[0], b, ids).argmax()) for b, ids in enumerate(prompts)]
    for layer in range(config.n_layers):
        caches[1].k[layer][...] = caches[0].k[layer]
        caches[1].v[layer][...] = caches[0].v[layer]
    lengths = np.array([len(ids) for ids in prompts], dtype=np.int32)
    return (DecodeStep(model, caches[0], SamplingParams(), first_tokens, lengths, **first),
            DecodeStep(model, caches[1], SamplingParams(), first_tokens, lengths, **second))


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
    replayed, launched = two_decoders(batch, {"use_graph": True}, {"use_graph": False})
    draws = np.zeros(batch, dtype=np.float32)
    for _ in range(STEPS):
        expected = launched(draws)
        np.testing.assert_array_equal(replayed(draws), expected)
    assert replayed.graph is not None
    if batch >= 2:
        assert True in flat_calls, "no flat GEMM was recorded into the graph"


@pytest.mark.parametrize("batch", [1, 8])
def test_overlapping_launches_give_the_same_tokens(batch, monkeypatch, tmp_path):
    """Programmatic dependent launch changes when kernels start, never what they compute; where the
    GPU or software cannot overlap, the step falls back to plain launches."""
    monkeypatch.setenv("MINIFD_CACHE", str(tmp_path))
    overlapped, plain = two_decoders(batch, {"use_graph": True, "overlap": True},
                                     {"use_graph": True, "overlap": False})
    assert overlapped.launch.overlap == overlap_supported()[0] and not plain.launch.overlap
    draws = np.zeros(batch, dtype=np.float32)
    for _ in range(STEPS):
        np.testing.assert_array_equal(overlapped(draws), plain(draws))
    assert overlapped.graph is not None
