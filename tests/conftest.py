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
settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def xp(request):
    """The array module of each backend: numpy always, cupy where it sees a GPU (else the test skips)."""
    if request.param == "cpu":
        return np
    cupy = cupy_or_none()
    if cupy is None:
        pytest.skip("needs a CUDA or ROCm GPU through CuPy")
    return cupy
