"""The linear seam and the dispatch table beyond the dispatch property (minifd/properties/linear.py,
run by test_properties.py, which forces each implementation and checks that the seam runs what a
temporary table says): operand layouts and dtypes, errors, and the table file itself."""

import json

import numpy as np
import pytest

from minifd.backend import cupy_or_none
from minifd.errors import MinifdError
from minifd.kernels import dispatch
from minifd.kernels.linear import linear
from minifd.properties import PROPERTIES
from minifd.properties.linear import check_product, expected_choice, random_operands

cupy = cupy_or_none()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory of our own: -> a function that writes a table into it."""
    monkeypatch.setenv("MINIFD_CACHE", str(tmp_path))

    def write(devices):
        dispatch.write_table(dispatch.table_path(), devices)

    return write


# ----------------------------------------------------------------------------------------------
# Operands
# ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_non_contiguous_operands_on_gpu():
    rng = np.random.default_rng(5)
    x, _ = random_operands(rng, 9, 1, 144, np.float16)
    _, w_wide = random_operands(rng, 1, 130, 2 * 144, np.float16)
    w = np.ascontiguousarray(w_wide[:, ::2])
    x_column_major = cupy.asarray(np.ascontiguousarray(x.T)).T
    w_strided = cupy.asarray(w_wide)[:, ::2]
    for impl in dispatch.IMPLEMENTATIONS:
        check_product(impl, linear(x_column_major, w_strided, impl=impl).get(), x, w, library=impl == "library")


@pytest.mark.gpu
def test_float32_on_gpu_takes_the_library_and_kernels_refuse_it():
    x, w = random_operands(np.random.default_rng(6), 3, 20, 16, np.float32)
    y = linear(cupy.asarray(x), cupy.asarray(w))
    assert y.dtype == cupy.float32
    check_product("y", y.get(), x, w, library=True)
    with pytest.raises(TypeError):
        linear(cupy.asarray(x), cupy.asarray(w), impl="gemv")


def test_shape_and_impl_errors():
    x, w = random_operands(np.random.default_rng(0), 2, 3, 4, np.float32)
    with pytest.raises(ValueError):
        linear(x, w[:, :3])
    with pytest.raises(ValueError):
        linear(x, w, impl="cublas")


# ----------------------------------------------------------------------------------------------
# The dispatcher
# ----------------------------------------------------------------------------------------------

def test_without_a_table_the_defaults_hold(cache):
    assert not dispatch.table_path().exists()
    chosen = [dispatch.choose_implementation(m, 4096, 4096, "Any GPU") for m in range(1, 300)]
    assert chosen == [expected_choice(m, *dispatch.DEFAULT_THRESHOLDS) for m in range(1, 300)]
    assert chosen[0] == "gemv" and chosen[-1] == "library"


@pytest.mark.parametrize("m", [1, 2, 3, 5, 6, 9, 40])
def test_linear_runs_what_the_table_says(xp, m):
    # a table of M1 = 3, M2 = 6 for the weight shape [333, 72] on this device
    PROPERTIES["dispatch"].check(dict(m=m, n=333, k=72, m1=3, span=3, impl=None, seed=m), xp)


def test_a_rewritten_table_takes_effect(cache):
    cache({"G": {"8,8": {"m1": 2, "m2": 3, "max_m": 8}}})
    assert dispatch.choose_implementation(2, 8, 8, "G") == "flat_gemm"
    cache({"G": {"8,8": {"m1": 5, "m2": 6, "max_m": 8}}})
    assert dispatch.choose_implementation(2, 8, 8, "G") == "gemv"


def test_the_table_is_written_whole_and_alone(cache, tmp_path):
    devices = {"G": {"8,8": {"m1": 2, "m2": 3, "max_m": 8}}}
    cache(devices)
    assert json.loads(dispatch.table_path().read_text()) == {"format": dispatch.TABLE_FORMAT, "devices": devices}
    assert sorted(p.name for p in tmp_path.iterdir()) == [dispatch.TABLE_FILE]  # no temporary left behind


def test_a_corrupt_table_is_a_user_error(cache):
    dispatch.table_path().write_text("{not json")
    dispatch.forget_tables()
    with pytest.raises(MinifdError, match="rerun `minifd tune`"):
        dispatch.choose_implementation(1, 8, 8, "G")
    dispatch.table_path().write_text(json.dumps({"format": 99, "devices": {}}))
    dispatch.forget_tables()
    with pytest.raises(MinifdError):
        dispatch.choose_implementation(1, 8, 8, "G")
    dispatch.forget_tables()


def test_cache_directory_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIFD_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert dispatch.table_path().parent == tmp_path / "a"
    monkeypatch.delenv("MINIFD_CACHE")
    assert dispatch.table_path().parent == tmp_path / "b" / "minifd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dispatch.table_path().parent == tmp_path / "home" / ".cache" / "minifd"
