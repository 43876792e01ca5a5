"""The real small model: SmolLM2-135M-Instruct, prepared by scripts/prepare_smollm2.py."""

import os

import numpy as np
import pytest

import minifd
from minifd import oracle
from minifd.fixture import fixture_dir, fixture_ready
from minifd.model.llama import KVCache
from minifd.model.loader import Checkpoint

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
