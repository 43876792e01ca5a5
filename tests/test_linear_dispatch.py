"""The linear seam: each implementation forced in turn, and the dispatcher choosing what the tuned
table in the cache directory says (defaults without one), on CPU and on GPU."""

import json
import os
import tempfile
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minifd.kernels.linear as linear_module
from linear_oracle import assert_close_to_oracle, random_operands
from minifd.backend import cupy_or_none
from minifd.errors import MinifdError
from minifd.kernels import dispatch
from minifd.kernels.linear import linear

cupy = cupy_or_none()
gpu = pytest.mark.skipif(cupy is None, reason="needs a GPU through CuPy")
seeds = st.integers(0, 2**32 - 1)
implementations = st.sampled_from(dispatch.IMPLEMENTATIONS)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory of our own: -> a function that writes a table into it."""
    monkeypatch.setenv("MINIFD_CACHE", str(tmp_path))

    def write(devices):
        dispatch.write_table(dispatch.table_path(), devices)

    return write


def recording(monkeypatch, table_name):
    """Replace linear's implementations by wrappers that note which one ran -> the list of names."""
    ran = []
    originals = getattr(linear_module, table_name)
    wrapped = {name: (lambda x, w, name=name: ran.append(name) or originals[name](x, w)) for name in originals}
    monkeypatch.setattr(linear_module, table_name, wrapped)
    return ran


# ----------------------------------------------------------------------------------------------
# Forced implementations
# ----------------------------------------------------------------------------------------------

@given(m=st.integers(1, 300), n=st.integers(1, 300), k=st.integers(1, 600), impl=implementations, seed=seeds)
def test_each_implementation_on_cpu(m, n, k, impl, seed):
    x, w = random_operands(np.random.default_rng(seed), m, n, k, np.float32)
    y = linear(x, w, impl=impl)
    assert y.dtype == np.float32
    assert_close_to_oracle(y, x, w)


@gpu
@given(m=st.integers(1, 300), n=st.integers(1, 600), k=st.integers(1, 1000), impl=implementations, seed=seeds)
def test_each_implementation_on_gpu(m, n, k, impl, seed):
    x, w = random_operands(np.random.default_rng(seed), m, n, k, np.float16)
    y = linear(cupy.asarray(x), cupy.asarray(w), impl=impl)
    assert y.dtype == cupy.float16
    assert_close_to_oracle(y.get(), x, w)


@gpu
def test_non_contiguous_operands_on_gpu():
    rng = np.random.default_rng(5)
    x, _ = random_operands(rng, 9, 1, 144, np.float16)
    _, w_wide = random_operands(rng, 1, 130, 2 * 144, np.float16)
    w = np.ascontiguousarray(w_wide[:, ::2])
    x_column_major = cupy.asarray(np.ascontiguousarray(x.T)).T
    w_strided = cupy.asarray(w_wide)[:, ::2]
    for impl in dispatch.IMPLEMENTATIONS:
        assert_close_to_oracle(linear(x_column_major, w_strided, impl=impl).get(), x, w)


@gpu
def test_float32_on_gpu_takes_the_library_and_kernels_refuse_it():
    x, w = random_operands(np.random.default_rng(6), 3, 20, 16, np.float32)
    y = linear(cupy.asarray(x), cupy.asarray(w))
    assert y.dtype == cupy.float32
    assert_close_to_oracle(y.get(), x, w)
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

@contextmanager
def table_in_cache(devices):
    """A temporary cache directory holding `devices` as its dispatch table, for the duration."""
    previous = os.environ.get("MINIFD_CACHE")
    with tempfile.TemporaryDirectory() as directory:
        os.environ["MINIFD_CACHE"] = directory
        try:
            dispatch.write_table(dispatch.table_path(), devices)
            yield
        finally:
            if previous is None:
                del os.environ["MINIFD_CACHE"]
            else:
                os.environ["MINIFD_CACHE"] = previous


def expected_choice(m, m1, m2):
    return "gemv" if m < m1 else "flat_gemm" if m < m2 else "library"


@given(m=st.integers(1, 300), m1=st.integers(1, 40), span=st.integers(0, 100))
def test_choice_follows_the_table_and_defaults_elsewhere(m, m1, span):
    with table_in_cache({"Some GPU": {"96,64": {"m1": m1, "m2": m1 + span, "max_m": 256}}}):
        assert dispatch.choose_implementation(m, 96, 64, "Some GPU") == expected_choice(m, m1, m1 + span)
        default = expected_choice(m, *dispatch.DEFAULT_THRESHOLDS)
        assert dispatch.choose_implementation(m, 96, 65, "Some GPU") == default  # shape not tuned
        assert dispatch.choose_implementation(m, 96, 64, "Other GPU") == default  # device not tuned


def test_without_a_table_the_defaults_hold(cache):
    assert not dispatch.table_path().exists()
    chosen = [dispatch.choose_implementation(m, 4096, 4096, "Any GPU") for m in range(1, 300)]
    assert chosen == [expected_choice(m, *dispatch.DEFAULT_THRESHOLDS) for m in range(1, 300)]
    assert chosen[0] == "gemv" and chosen[-1] == "library"


@pytest.mark.parametrize("m", [1, 2, 3, 5, 6, 9, 40])
def test_linear_on_cpu_runs_what_the_table_says(cache, monkeypatch, m):
    cache({dispatch.CPU_DEVICE_NAME: {"33,72": {"m1": 3, "m2": 6, "max_m": 64}}})
    ran = recording(monkeypatch, "_CPU")
    x, w = random_operands(np.random.default_rng(m), m, 33, 72, np.float32)
    assert_close_to_oracle(linear(x, w), x, w)
    assert ran == [expected_choice(m, 3, 6)]


@gpu
@pytest.mark.parametrize("m", [1, 2, 3, 5, 6, 9, 40])
def test_linear_on_gpu_runs_what_the_table_says(cache, monkeypatch, m):
    cache({dispatch.gpu_properties().name: {"333,72": {"m1": 3, "m2": 6, "max_m": 64}}})
    ran = recording(monkeypatch, "_GPU")
    x, w = random_operands(np.random.default_rng(m), m, 333, 72, np.float16)
    assert_close_to_oracle(linear(cupy.asarray(x), cupy.asarray(w)).get(), x, w)
    assert ran == [expected_choice(m, 3, 6)]


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
