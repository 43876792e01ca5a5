import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from minifd.backend import cupy_or_none

sys.path.insert(0, str(Path(__file__).parent))

# CI runs on 2 cores: moderate example counts keep the whole suite within minutes. The kernel
# properties (tests/test_properties.py) take their example count from the loaded profile too.
# derandomize: the examples follow from each test alone, so a run never passes or fails on luck;
# `minifd check --seed` is the way to explore other examples.
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=200, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

GPU_REQUIRED = os.environ.get("MINIFD_REQUIRE_GPU") == "1"  # a GPU run: a skipped GPU test would hide a failure


def pytest_runtest_setup(item):
    """Tests marked `gpu` skip where CuPy sees no GPU, and fail there under MINIFD_REQUIRE_GPU=1."""
    if item.get_closest_marker("gpu") is not None and cupy_or_none() is None:
        if GPU_REQUIRED:
            pytest.fail("MINIFD_REQUIRE_GPU=1 but CuPy sees no GPU", pytrace=False)
        pytest.skip("needs a CUDA or ROCm GPU through CuPy")


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def xp(request):
    """The array module of each backend: numpy always, cupy on a GPU (the gpu marker skips it elsewhere)."""
    return np if request.param == "cpu" else cupy_or_none()
