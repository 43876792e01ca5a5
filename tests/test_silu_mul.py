"""silu_mul beyond its property (minifd/properties/fused.py, run by test_properties.py): shape errors."""

import numpy as np
import pytest

from minifd.kernels.silu_mul import silu_mul


def test_silu_mul_rejects_odd_width():
    with pytest.raises(ValueError):
        silu_mul(np.ones((2, 7), np.float32))
