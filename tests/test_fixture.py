"""The pieces of scripts/prepare_smollm2.py that need no GGUF: the tokenizer it builds from GGUF
metadata, the RoPE row un-permutation, and where minifd.fixture looks for the result."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minifd import fixture

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prepare_smollm2.py"


@pytest.fixture(scope="module")
def prepare():
    spec = importlib.util.spec_from_file_location("prepare_smollm2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------------
# Tokenizer from GGUF metadata (a tiny byte-level vocabulary in GGUF's layout)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ Ġ", "Ġ t", "h e", "Ġt he", "ĠĠ Ġ"]


def tiny_gguf_vocabulary():
    """-> (tokens, merges, token_types) as GGUF stores them: specials first, then bytes, then merges."""
    from tokenizers import pre_tokenizers

    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged = [merge.replace(" ", "") for merge in MERGES]
    tokens = SPECIALS + byte_symbols + merged
    token_types = [3] * len(SPECIALS) + [1] * (len(byte_symbols) + len(merged))
    return tokens, MERGES, token_types


@pytest.fixture(scope="module")
def tiny_tokenizer(prepare):
    return prepare.build_tokenizer(*tiny_gguf_vocabulary(), "smollm")


def test_digits_are_split_before_the_whitespace_regex(tiny_tokenizer):
    # SmolLM isolates each digit first, so the spaces before one stay a run the BPE can merge;
    # a plain GPT-2 split would have produced "Ġ", "Ġ", "Ġ1" pieces instead.
    assert tiny_tokenizer.encode("x   12").tokens == ["x", "ĠĠĠ", "1", "2"]


def test_no_prefix_space_and_merges_apply(tiny_tokenizer):
    assert tiny_tokenizer.encode("the the").tokens == ["t", "he", "Ġthe"]


def test_control_tokens_are_whole_special_tokens(tiny_tokenizer):
    encoding = tiny_tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert encoding.ids[0] == SPECIALS.index("<|im_start|>")
    assert encoding.ids[-1] == SPECIALS.index("<|im_end|>")
    assert tiny_tokenizer.decode(encoding.ids, skip_special_tokens=True) == "user\nhi"


@given(st.text(max_size=40).filter(lambda text: not any(special in text for special in SPECIALS)))
def test_any_text_round_trips(tiny_tokenizer, text):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text).ids) == text


def test_ids_follow_the_gguf_order(tiny_tokenizer):
    tokens, _, _ = tiny_gguf_vocabulary()
    assert tiny_tokenizer.get_vocab(with_added_tokens=True) == {token: index for index, token in enumerate(tokens)}


# ----------------------------------------------------------------------------------------------------
# RoPE rows: GGUF's interleaved pairs -> HF's rotate-half halves


def llama_cpp_permute(weight, num_heads):
    """What convert_hf_to_gguf does to HF q/k rows: view [head, half, i], swap to [head, i, half]."""
    half_head_dim = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, 2, half_head_dim, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@st.composite
def per_head_rows(draw):
    """-> weight rows grouped by head: [num_heads, head_dim, cols], head_dim even."""
    num_heads, half_head_dim, cols = draw(st.integers(1, 4)), draw(st.integers(1, 8)), draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.standard_normal((num_heads, 2 * half_head_dim, cols))


@given(per_head_rows())
def test_unpermute_inverts_llama_cpp_permute(prepare, rows):
    num_heads, head_dim, cols = rows.shape
    hf_weight = rows.reshape(num_heads * head_dim, cols)
    gguf_weight = llama_cpp_permute(hf_weight, num_heads)
    np.testing.assert_array_equal(prepare.unpermute_rope_rows(gguf_weight, num_heads), hf_weight)


@given(per_head_rows())
def test_unpermute_turns_adjacent_pairs_into_halves(prepare, rows):
    # GGUF rotates rows (2i, 2i+1) of a head together; HF rotates (i, i + head_dim/2).
    num_heads, head_dim, cols = rows.shape
    gguf_weight = rows.reshape(num_heads * head_dim, cols)
    hf_weight = prepare.unpermute_rope_rows(gguf_weight, num_heads).reshape(num_heads, head_dim, cols)
    half = head_dim // 2
    np.testing.assert_array_equal(hf_weight[:, :half], rows[:, 0::2])
    np.testing.assert_array_equal(hf_weight[:, half:], rows[:, 1::2])


def test_unpermute_rejects_odd_heads(prepare):
    with pytest.raises(ValueError):
        prepare.unpermute_rope_rows(np.zeros((6, 2)), 2)


# ----------------------------------------------------------------------------------------------------
# Where the fixture lives


def test_fixture_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIFD_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fixture.fixture_dir() == tmp_path / "explicit" / fixture.FIXTURE_NAME
    monkeypatch.delenv("MINIFD_CACHE")
    assert fixture.fixture_dir() == tmp_path / "xdg" / "minifd" / fixture.FIXTURE_NAME
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fixture.fixture_dir() == tmp_path / "home" / ".cache" / "minifd" / fixture.FIXTURE_NAME


def test_fixture_ready_needs_the_marker(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert not fixture.fixture_ready(tmp_path)
    (tmp_path / fixture.MARKER_NAME).write_text("{}")
    assert fixture.fixture_ready(tmp_path)
