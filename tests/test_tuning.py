"""`minifd tune`: the threshold choice on known timing curves, the model's shapes, the table in
words, and the command end to end: refused on the CPU unless --out names a table, run on a GPU when
there is one."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minifd.backend import cupy_or_none
from minifd.errors import MinifdError
from minifd.kernels import dispatch
from minifd.kernels.silu_mul import padded_features
from minifd.tuning import choose_thresholds, implementation_ranges, model_products, parse_shape
from tiny_model import tiny_model

cupy = cupy_or_none()


def curves(max_m, m1, m2):
    """Timings where GEMV is best below m1, flat GEMM on [m1, m2), the library from m2 (one crossing each)."""
    m = np.arange(1, max_m + 1, dtype=np.float64)
    flat = 1.0 + 0.01 * m
    gemv = flat * np.exp(0.1 * (m - m1 + 0.5))  # crosses flat GEMM between m1 - 1 and m1
    library = flat * np.exp(-0.02 * (m - m2 + 0.5))  # crosses flat GEMM between m2 - 1 and m2
    return {"gemv": gemv, "flat_gemm": flat, "library": library}


@given(max_m=st.integers(1, 256), data=st.data())
def test_thresholds_are_the_crossings_of_single_crossing_curves(max_m, data):
    m1 = data.draw(st.integers(1, max_m + 1))
    m2 = data.draw(st.integers(m1, max_m + 1))
    assert choose_thresholds(curves(max_m, m1, m2)) == (m1, m2)


def test_thresholds_ignore_isolated_noisy_points():
    # "the first M where B beats A" would answer M1 = 3 and M2 = 12 here
    times = curves(64, 10, 40)
    times["flat_gemm"][3 - 1] *= 0.4  # a spurious flat GEMM win at M = 3
    times["library"][12 - 1] *= 0.5  # and a library win at M = 12
    times["gemv"][30 - 1] *= 0.3  # and a GEMV win at M = 30
    assert choose_thresholds(times) == (10, 40)


def test_thresholds_with_an_implementation_dropped_from_the_sweep():
    times = curves(64, 4, 40)
    times["gemv"][12:] = np.inf  # GEMV stopped being timed after losing for a while
    assert choose_thresholds(times) == (4, 40)


def test_model_products_are_the_fused_projections_in_the_format_they_are_held_in(tmp_path):
    directory, config, _ = tiny_model(tmp_path / "m", tie=True)
    rows = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
    features = padded_features(config.intermediate_size)
    shapes = {"qkv": (rows, config.hidden_size), "o": (config.hidden_size, config.n_heads * config.head_dim),
              "gate_up": (2 * features, config.hidden_size), "down": (config.hidden_size, features),
              "lm_head": (config.vocab_size, config.hidden_size)}
    for quantize in (None, "int4"):
        products = {shape.name: ((shape.n, shape.k), weight_format) for shape, weight_format in model_products(directory, quantize)}
        assert products == {name: (shape, "float16" if quantize is None or name == "lm_head" else quantize)
                            for name, shape in shapes.items()}  # the tied LM head is the embedding: fp16


def test_shapes_parse_or_fail_clearly():
    assert (parse_shape("12288,4096").n, parse_shape("12288,4096").k) == (12288, 4096)
    for bad in ("12288", "a,b", "0,5", "1,2,3"):
        with pytest.raises(MinifdError):
            parse_shape(bad)


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------

def minifd_tune(cache, *args):
    env = dict(os.environ, MINIFD_CACHE=str(cache), PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-m", "minifd", "tune", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_tune_on_the_cpu_ends_in_one_line_and_leaves_the_per_user_table_alone(tmp_path):
    result = minifd_tune(tmp_path, "--device", "cpu", "--max-m", "6", "--shapes", "40,24")
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "tuning measures a GPU" in result.stderr and "--out FILE" in result.stderr
    assert not (tmp_path / dispatch.TABLE_FILE).exists()


def test_tune_out_writes_that_table_and_show_prints_it(tmp_path):
    out = tmp_path / "elsewhere.json"
    assert "no dispatch table at " + str(out) in minifd_tune(tmp_path, "--show", "--out", str(out)).stdout
    result = minifd_tune(tmp_path, "--device", "cpu", "--max-m", "6", "--out", str(out), "--shapes", "40,24", "7,9")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / dispatch.TABLE_FILE).exists()
    devices = json.loads(out.read_text())["devices"]
    assert set(devices["cpu"]) == {"40,24", "7,9"}
    for entry in devices["cpu"].values():
        assert 1 <= entry["m1"] <= entry["m2"] <= 7 and entry["max_m"] == 6
    shown = minifd_tune(tmp_path, "--show", "--out", str(out)).stdout
    assert "cpu" in shown and "40 x 24: GEMV for " in shown and "7 x 9: GEMV for " in shown
    # a second shape set merges into the table rather than replacing it
    assert minifd_tune(tmp_path, "--device", "cpu", "--max-m", "2", "--out", str(out), "--shapes", "5,5").returncode == 0
    assert set(json.loads(out.read_text())["devices"]["cpu"]) == {"40,24", "7,9", "5,5"}


@pytest.mark.parametrize("m1, m2, words", [
    (2, 2, "GEMV for M = 1, flat GEMM for none, library for M >= 2"),
    (3, 9, "GEMV for M = 1..2, flat GEMM for M = 3..8, library for M >= 9"),
    (1, 2, "GEMV for none, flat GEMM for M = 1, library for M >= 2"),
    (1, 1, "GEMV for none, flat GEMM for none, library for every M"),
])
def test_thresholds_read_as_the_m_each_implementation_covers(m1, m2, words):
    assert implementation_ranges(m1, m2) == words


def test_tune_without_shapes_is_a_user_error(tmp_path):
    out = str(tmp_path / "table.json")
    result = minifd_tune(tmp_path, "--device", "cpu", "--out", out)
    assert result.returncode == 2 and "give --weights DIR|FILE.gguf or --shapes" in result.stderr
    result = minifd_tune(tmp_path, "--device", "cpu", "--out", out, "--shapes", "12,x")
    assert result.returncode == 2 and "not N,K" in result.stderr


@pytest.mark.gpu
def test_tune_on_gpu_writes_an_entry_for_this_gpu(tmp_path):
    result = minifd_tune(tmp_path, "--max-m", "12", "--shapes", "1024,512")
    assert result.returncode == 0, result.stderr
    entry = json.loads((tmp_path / dispatch.TABLE_FILE).read_text())["devices"][dispatch.gpu_properties().name]
    assert 1 <= entry["1024,512"]["m1"] <= entry["1024,512"]["m2"] <= 13
