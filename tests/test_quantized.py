"""Quantized weight formats (minifd/model/quantized.py) and --quantize: the round trip stays within
half a step, the bits per weight are the formats' own, and the fixture keeps its top-1 choices."""

from functools import partial

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import minifd
from minifd.cli import main
from minifd.engine import weight_dtype
from minifd.fixture import fixture_dir, fixture_ready
from minifd.model.loader import open_checkpoint
from minifd.kernels.rope import pair_rotary_rows
from minifd.kernels.silu_mul import interleave_gate_up, padded_features
from minifd.model.gguf import unpermute_rope_rows
from minifd.model.quantized import (GROUP, FORMATS, QUANTIZERS, pack_nibbles, quantize_int4, quantize_int8, rowwise,
                                    stack_rows)
from minifd.model.weights import pad_down_columns, projection_formats, streamed_bytes_per_step
from agreement import TEXT, teacher_forced_argmax
from tiny_model import tiny_model

weight_matrices = st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(-9, 3)).flatmap(
    lambda shape: arrays(np.float32, (shape[0], shape[1] * GROUP),
                         elements=st.floats(-1, 1, width=32)).map(lambda w: w * np.float32(10.0 ** shape[2])))


@given(weight_matrices, st.sampled_from(sorted(QUANTIZERS)))
def test_round_trip_moves_each_weight_at_most_half_its_groups_step(w, name):
    quantized = QUANTIZERS[name](w)
    n, k = w.shape
    moved = np.abs(quantized.dequantize() - w).reshape(n, k // GROUP, GROUP)
    largest = np.abs(w).reshape(n, k // GROUP, GROUP).max(axis=-1, keepdims=True)
    bound = quantized.max_error()[:, :, None] * (1 + 2**-16) + largest * 2**-20  # + float32 rounding
    assert (moved <= bound).all()


@given(weight_matrices)
def test_int8_step_is_the_groups_largest_magnitude_over_127_and_int4_spans_min_to_max(w):
    groups = w.reshape(w.shape[0], -1, GROUP)
    int8, int4 = quantize_int8(w), quantize_int4(w)
    step8 = int8.scales.astype(np.float64)
    assert (step8 * 127 >= np.abs(groups).max(axis=-1)).all()
    assert (step8 <= np.abs(groups).max(axis=-1) / 127 * (1 + 2**-10) + 2**-24).all()  # one fp16 rounding
    low, step4 = int4.mins.astype(np.float64), int4.scales.astype(np.float64)
    assert (low <= groups.min(axis=-1)).all() and (low + 15 * step4 >= groups.max(axis=-1)).all()
    assert int8.codes.min() >= -127 and int4.codes().max() <= 15


def test_bits_per_weight_and_bytes():
    w = np.random.default_rng(0).standard_normal((96, 8 * GROUP)).astype(np.float32)
    assert (FORMATS["int8"].bits_per_weight, FORMATS["int4"].bits_per_weight) == (8.5, 5.0)
    for name, quantize in QUANTIZERS.items():
        quantized = quantize(w)
        assert quantized.shape == w.shape
        assert quantized.nbytes * 8 == w.size * quantized.bits_per_weight, name


def test_int4_grid_reaches_a_group_maximum_tiny_beside_its_minimum():
    """max - min in float32 drops a max of 1e-13 beside a min of -7.5, and the rounded-up scale would
    stop the grid at 0 (hypothesis found it)."""
    w = np.array([[1.0506466e-13] + [-7.5] * 31], dtype=np.float32)  # [1, 32]
    int4 = quantize_int4(w)
    assert int4.mins.astype(np.float64)[0, 0] + 15 * int4.scales.astype(np.float64)[0, 0] >= w.max()


def test_int4_packs_the_even_weights_of_a_word_in_its_low_nibbles_and_the_odd_ones_in_its_high():
    w = np.tile(np.arange(16, dtype=np.float32), 2)[None, :]  # [1, 32]: codes 0..15 with d = 1, m = 0
    quantized = quantize_int4(w)
    # word 0: weights 0, 2, 4, 6 in nibbles 0-3, 1, 3, 5, 7 in nibbles 4-7 (little-endian bytes); word 1 likewise
    assert quantized.packed[0, :8].tolist() == [0x20, 0x64, 0x31, 0x75, 0xA8, 0xEC, 0xB9, 0xFD]
    assert quantized.codes()[0].tolist() == w[0].tolist()


def test_int4_words_give_consecutive_pairs_the_way_the_flat_gemm_lifts_them():
    """weight_formats.cuh's row_piece_run_to_halves in NumPy: the 32-bit words of a row, shifted by 0 and
    8 bits, masked with 0x000F000F (and 0x00F000F0) under the fp16 exponent bits 0x64006400, read as
    halves 1024 + q (1024 + 16 q), give weights (8j + 4i, 8j + 4i + 1) and (8j + 4i + 2, 8j + 4i + 3)."""
    codes = np.random.default_rng(0).integers(0, 16, (3, 64)).astype(np.uint8)  # [N, K]
    words = np.ascontiguousarray(pack_nibbles(codes)).view("<u4")  # [N, K / 8]: 8 weights each
    lifted = np.empty((3, 8, 4, 2))  # [N, word, pair, weight of the pair]
    for i in range(2):
        shifted = words >> np.uint32(8 * i)
        low = ((shifted & 0x000F000F) | 0x64006400).astype("<u4").view(np.float16).reshape(3, 8, 2)
        high = ((shifted & 0x00F000F0) | 0x64006400).astype("<u4").view(np.float16).reshape(3, 8, 2)
        lifted[:, :, 2 * i] = low.astype(np.float64) - 1024
        lifted[:, :, 2 * i + 1] = high.astype(np.float64) / 16 - 64
    np.testing.assert_array_equal(lifted.reshape(3, 64), codes)


ROW_OPERATIONS = {  # name -> (number of weights it takes, operation on [N, X] arrays); N = 24 rows each
    "pair_rotary_rows": (1, partial(pair_rotary_rows, head_dim=24)),  # 3 tiles of 4 pairs: rows move
    "unpermute_rope_rows": (1, partial(unpermute_rope_rows, num_heads=3)),
    "interleave_gate_up": (2, lambda gate, up: interleave_gate_up(gate[:20], up[:20])),  # 20 -> 24: zero rows
    "stack_rows": (3, lambda *arrays: np.concatenate(arrays)),
}


@pytest.mark.parametrize("operation_name", ROW_OPERATIONS)
@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_row_operations_on_quantized_matrices_equal_them_on_the_dequantized_weights(operation_name, name):
    count, operation = ROW_OPERATIONS[operation_name]
    rng = np.random.default_rng(7)
    matrices = [QUANTIZERS[name](rng.standard_normal((24, 3 * GROUP)).astype(np.float32)) for _ in range(count)]
    if count == 1:  # a permutation that moves rows, or the test would not see them stay behind
        assert not np.array_equal(operation(matrices[0].dequantize()), matrices[0].dequantize())
    moved = stack_rows(*matrices) if operation_name == "stack_rows" else rowwise(operation, *matrices)
    assert type(moved) is type(matrices[0])
    np.testing.assert_array_equal(moved.dequantize(), operation(*(m.dequantize() for m in matrices)))
    assert np.array_equal(rowwise(operation, *(m.dequantize() for m in matrices)),
                          operation(*(m.dequantize() for m in matrices)))  # plain arrays: the operation itself


def test_rowwise_refuses_to_mix_formats():
    w = np.ones((4, GROUP), dtype=np.float32)
    with pytest.raises(ValueError, match="mix formats"):
        stack_rows(quantize_int8(w), quantize_int4(w))


def test_a_quantized_down_projection_needs_no_column_padding():
    """Its K is whole groups, and whole groups are whole gate/up tiles: pad_down_columns leaves it as it is."""
    assert all(padded_features(k) == k for k in range(GROUP, 64 * GROUP, GROUP))
    down = quantize_int4(np.ones((4, 3 * GROUP), dtype=np.float32))
    assert pad_down_columns(down) is down


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory, _, _ = tiny_model(tmp_path_factory.mktemp("quantized") / "m", dtype="F16")
    return directory


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_loading_quantized_holds_the_dequantized_projections_and_info_counts_their_bytes(model_dir, name):
    engine = minifd.load(model_dir, device="cpu", progress=False, quantize=name)
    weights, layer = engine.model.weights, engine.model.weights.layers[1]
    assert sorted(weights.quantized) == sorted([f"layers.{i}.{p}" for i in range(2)
                                                for p in ("wqkv", "wo", "w_gate_up", "w_down")] + ["lm_head"])
    for projection in ("wqkv", "wo", "w_gate_up", "w_down"):
        held = getattr(layer, projection)
        assert held.dtype == np.float32
        assert np.array_equal(held, weights.quantized[f"layers.1.{projection}"].dequantize())
    plain = minifd.load(model_dir, device="cpu", progress=False)
    assert np.array_equal(layer.attn_norm, plain.model.weights.layers[1].attn_norm)
    assert np.array_equal(weights.embed, plain.model.weights.embed)

    checkpoint, dtype = open_checkpoint(model_dir), weight_dtype(np)
    norms = sum(w.nbytes for w in [weights.norm] + [l.attn_norm for l in weights.layers] + [l.mlp_norm for l in weights.layers])
    assert streamed_bytes_per_step(checkpoint, name, dtype) == sum(q.nbytes for q in weights.quantized.values()) + norms
    assert streamed_bytes_per_step(checkpoint, None, dtype) == plain.model.weights.nbytes_streamed_per_step()
    assert {f.format for f in projection_formats(checkpoint, name, dtype)} == {name}


def test_a_tied_lm_head_stays_the_embedding(tmp_path):
    directory, _, _ = tiny_model(tmp_path / "m", tie=True)
    weights = minifd.load(directory, device="cpu", progress=False, quantize="int4").model.weights
    assert "lm_head" not in weights.quantized and weights.lm_head is weights.embed


def test_info_reports_formats_and_bytes_per_step(model_dir, capsys):
    main(["info", "--weights", str(model_dir), "--quantize", "int4"])
    out = capsys.readouterr().out
    assert "  w_gate_up [192, 64] x 2 layers: int4, 5 bits/weight" in out
    assert "bytes per decode step:" in out


def one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_quantize_errors_are_one_line_exit_2(model_dir, tmp_path, capsys):
    assert "'int3' is not one of 'int8', 'int4'" in one_line_error(
        capsys, ["run", "--weights", str(model_dir), "--quantize", "int3", "hi"])
    odd, _, _ = tiny_model(tmp_path / "odd", hidden_size=48, n_heads=4, n_kv_heads=2)
    assert "multiple of 32" in one_line_error(capsys, ["run", "--weights", str(odd), "--quantize", "int8", "hi"])
    assert "give --weights" in one_line_error(capsys, ["info", "--quantize", "int8"])
    with pytest.raises(minifd.errors.MinifdError, match="quantize must be one of int8, int4"):
        minifd.load(model_dir, device="cpu", quantize="fp8")


@pytest.fixture(scope="module")
def float32_choices():
    """-> (the fixture's tokens of TEXT, its float32 engine's teacher-forced top-1 choices)."""
    engine = minifd.load(fixture_dir(), device="cpu", progress=False)
    tokens = engine.tokenizer.encode(TEXT)
    return tokens, teacher_forced_argmax(engine, tokens)


@pytest.mark.slow
@pytest.mark.skipif(not fixture_ready(), reason="SmolLM2 fixture not prepared")
@pytest.mark.parametrize("name, target", [("int8", 0.98), ("int4", 0.95)])
def test_quantized_smollm2_keeps_its_teacher_forced_top1_choices(float32_choices, name, target):
    tokens, reference = float32_choices
    quantized = minifd.load(fixture_dir(), device="cpu", progress=False, quantize=name)
    agreement = (teacher_forced_argmax(quantized, tokens) == reference).mean()
    print(f"--quantize {name}: teacher-forced top-1 agreement with float32 over {len(tokens)} positions: {agreement:.4f}")
    assert agreement >= target


# ----------------------------------------------------------------------------------------------
# The kernels that read the codes (minifd.kernels.weight_formats, gemv.cu, flat_gemm.cu)
# ----------------------------------------------------------------------------------------------

def quantized_operands(name, m=3, n=48, k=4 * GROUP, seed=0):
    """-> x [m, k] float32, and a random [n, k] weight quantized to `name`."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (m, k)).astype(np.float32), QUANTIZERS[name](rng.uniform(-1, 1, (n, k)).astype(np.float32))


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_emulations_multiply_by_the_weights_as_the_kernels_rebuild_them(name):
    from minifd.kernels.flat_gemm import flat_gemm_emulated
    from minifd.kernels.gemv import gemv_emulated

    x, weight = quantized_operands(name)
    dequantized = weight.dequantize()  # float32 s q or d q + m: what gemv.cu computes
    assert np.array_equal(gemv_emulated(x, weight), gemv_emulated(x, dequantized))
    # flat_gemm.cu's fp16 FMA rounds the exact s q or d q + m once to float16 for the MMA; the
    # K = 128 columns lie in one warp's run of a quantized chunk, so the emulation is one product
    # (float32, up to BLAS's summation order: far below one weight's float16 step times |x|)
    as_mma_operand = weight.dequantize(np.float64).astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(flat_gemm_emulated(x, weight), x @ as_mma_operand.T, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_float64_dequantization_is_the_float32_one_widened_where_that_is_exact(name):
    _, weight = quantized_operands(name)
    if name == "int8":  # s q: an 11-bit significand times an 8-bit integer, exact in float32
        assert np.array_equal(weight.dequantize(np.float64), weight.dequantize().astype(np.float64))
    else:  # d q + m: one float32 rounding
        assert np.allclose(weight.dequantize(np.float64), weight.dequantize(), rtol=2**-23, atol=0)


def test_placed_moves_every_array_and_keeps_the_format():
    from minifd.model.quantized import placed

    for name in QUANTIZERS:
        _, weight = quantized_operands(name)
        moved = placed(weight, np)
        assert type(moved) is type(weight) and np.array_equal(moved.dequantize(), weight.dequantize())


def test_linear_dispatches_a_quantized_weight_to_the_kernels_that_read_codes(monkeypatch):
    """Untuned, a quantized weight takes the flat GEMM from M = 1 up to its 64-row tile, and the
    library (on the dequantized weight) beyond; each agrees with the product of the dequantized weight."""
    import minifd.kernels.linear as seam
    from minifd.kernels import dispatch

    monkeypatch.setattr(dispatch, "table_path", lambda: dispatch.Path("/nonexistent/linear_dispatch.json"))
    dispatch.forget_tables()
    ran = []
    for impl, product in list(seam._CPU.items()):
        monkeypatch.setitem(seam._CPU, impl, lambda *args, impl=impl, product=product, **kw: ran.append(impl) or product(*args, **kw))
    for name in QUANTIZERS:
        for m, expected in ((1, "flat_gemm"), (2, "flat_gemm"), (64, "flat_gemm"), (65, "library")):
            x, weight = quantized_operands(name, m=m)
            ran.clear()
            y = seam.linear(x, weight)
            assert ran == [expected]
            reference = x.astype(np.float64) @ weight.dequantize(np.float64).T
            assert np.allclose(y, reference, rtol=0, atol=2e-3 * np.abs(reference).max())
    dispatch.forget_tables()


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("m", [1, 2, 8, 33])
def test_gpu_kernels_read_the_codes_as_their_emulations_do(name, m):
    """gemv.cu and flat_gemm.cu on int8 / int4 weights (CuPy arrays) against their NumPy emulations
    on the same codes, every fused step the model uses."""
    import cupy

    from minifd.kernels.flat_gemm import flat_gemm_emulated, flat_gemm_gpu
    from minifd.kernels.gemv import gemv_emulated, gemv_gpu
    from minifd.kernels.rms_norm import RMSNorm
    from minifd.model.quantized import placed

    x, weight = quantized_operands(name, m=m, n=96, k=40 * GROUP)  # K crosses an M_TILE = 8 chunk
    x16 = x.astype(np.float16)
    gain = np.random.default_rng(1).uniform(0.5, 1.5, x.shape[1]).astype(np.float16)
    residual = np.random.default_rng(2).uniform(-1, 1, (m, 96)).astype(np.float16)
    steps = {"store": {}, "norm": {"norm": (gain, 1e-5)}, "residual": {"residual": residual},
             "gated_norm": {"norm": (gain, 1e-5), "gated": True}}
    on_gpu = placed(weight, cupy)
    for emulated, kernel in ((gemv_emulated, gemv_gpu), (flat_gemm_emulated, flat_gemm_gpu)):
        for step, arguments in steps.items():
            def built(xp, arguments=arguments):
                return {key: RMSNorm(xp.asarray(value[0]), value[1]) if key == "norm" else
                        value if key == "gated" else xp.asarray(value) for key, value in arguments.items()}
            expected = emulated(x16.astype(np.float32), weight, **built(np))
            got = cupy.asnumpy(kernel(cupy.asarray(x16), on_gpu, **built(cupy))).astype(np.float32)
            scale = np.abs(expected).max()
            assert np.allclose(got, expected, rtol=2e-3, atol=2e-3 * scale), (kernel.__name__, step)
