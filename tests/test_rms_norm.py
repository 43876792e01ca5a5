"""rms_norm beyond its property (minifd/properties/fused.py, run by test_properties.py): shape errors."""

import numpy as np
import pytest

from minifd.kernels.rms_norm import rms_norm

EPS = 1e-5


def test_rms_norm_rejects_mismatched_shapes():
    x = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError):
        rms_norm(x, np.ones(7, np.float32), EPS)

