"""Every kernel property in minifd.properties, the code `minifd check` runs: on the CPU always, on
the GPU where CuPy sees one. Examples per property follow the hypothesis profile (conftest.py)."""

import pytest
from hypothesis import settings

from minifd.properties import PROPERTIES
from minifd.properties.registry import backend_name
from minifd.properties.runner import run_property


@pytest.mark.parametrize("name", list(PROPERTIES))
def test_property(name, xp):
    prop = PROPERTIES[name]
    if backend_name(xp) not in prop.backends:
        pytest.skip(f"{name} does not apply to the {backend_name(xp)} backend")
    result = run_property(prop, xp, settings.default.max_examples)
    assert result.passed, result.failure
    assert result.examples > 0 and result.worst_error <= result.bound
