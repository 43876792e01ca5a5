"""The whole engine on a GPU: SmolLM2 agrees with the CPU float32 path, graphs change nothing."""

import numpy as np
import pytest

import minifd
from minifd.backend import cupy_or_none
from minifd.fixture import fixture_dir, fixture_ready
from minifd.model.llama import KVCache

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(cupy_or_none() is None, reason="needs a GPU visible to CuPy"),
    pytest.mark.skipif(not fixture_ready(), reason="SmolLM2 fixture not prepared"),
]

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a wooden press into a system that could produce books quickly. "
        "Within a few decades printing shops had spread across Europe, and the price of books fell sharply. "
        "Scholars could compare identical copies of a text, which changed how knowledge was checked and shared.")


@pytest.fixture(scope="module")
def engines():
    return (minifd.load(fixture_dir(), device="cpu", progress=False),
            minifd.load(fixture_dir(), device="cuda", progress=False))


def teacher_forced_argmax(engine, tokens):
    """Feed `tokens` one at a time through prefill + decode -> the argmax after each position."""
    xp = engine.xp
    cache = KVCache.allocate(engine.config, 1, len(tokens), xp, engine.model.dtype)
    choices = [int(engine.model.prefill(cache, 0, tokens[:1]).argmax())]
    for position in range(1, len(tokens)):
        logits = engine.model.decode(cache, np.array([tokens[position]]), np.array([position], dtype=np.int32))
        choices.append(int(logits[0].argmax()))
    return np.array(choices)


def test_teacher_forced_top1_agreement_with_the_cpu_path(engines):
    cpu, gpu = engines
    tokens = cpu.tokenizer.encode(TEXT)
    agreement = (teacher_forced_argmax(cpu, tokens) == teacher_forced_argmax(gpu, tokens)).mean()
    print(f"teacher-forced top-1 agreement over {len(tokens)} positions: {agreement:.4f}")
    assert agreement >= 0.99


def test_greedy_paris_on_gpu(engines):
    completion = engines[1].generate(["The capital of France is"], max_new_tokens=8).completions[0]
    assert completion.text.startswith(" Paris"), completion.text


def test_cuda_graph_replay_equals_eager_launches(engines):
    gpu = engines[1]
    prompts = ["Once upon a time", "The three primary colours are", "def fibonacci(n):"]
    gpu.use_graph = True
    with_graph = gpu.generate(prompts, max_new_tokens=24, ignore_eos=True)
    gpu.use_graph = False
    without_graph = gpu.generate(prompts, max_new_tokens=24, ignore_eos=True)
    gpu.use_graph = True
    assert [c.token_ids for c in with_graph.completions] == [c.token_ids for c in without_graph.completions]


def test_sampling_on_gpu_is_seeded(engines):
    gpu = engines[1]
    args = dict(max_new_tokens=16, temperature=0.8, top_k=40, top_p=0.95, ignore_eos=True)
    first = gpu.generate(["Tell me a story"], seed=3, **args).completions[0].token_ids
    assert first == gpu.generate(["Tell me a story"], seed=3, **args).completions[0].token_ids


def test_gpu_memory_is_flat_over_many_generate_calls(engines):
    import cupy

    gpu = engines[1]
    pool = cupy.get_default_memory_pool()
    for _ in range(5):
        gpu.generate(["warm up"], max_new_tokens=4, ignore_eos=True)
    before = pool.used_bytes()
    for i in range(200):
        gpu.generate([f"call {i}"], max_new_tokens=4, ignore_eos=True)
    growth = pool.used_bytes() - before
    print(f"GPU pool bytes in use grew by {growth} over 200 generate calls")
    assert growth < 16 * 2**20
