"""What a property is: a hypothesis strategy of cases, a check of one case, and where it applies."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from minifd.backend import is_gpu

BACKENDS = ("cpu", "gpu")


@dataclass(frozen=True)
class Property:
    """name: what `minifd check --only` and the tests call it; summary: one line on what is compared.

    cases(backend) -> a hypothesis strategy of cases: dicts of plain Python values (sizes, a NumPy
    seed, ...) whose repr pastes back into Python. check(case, xp) builds the inputs from the case,
    runs the kernel on `xp` (numpy: the CPU emulation; cupy: the GPU kernel), compares it with the
    float64 reference and returns a tolerance.Outcome, or raises PropertyFailure.
    """

    name: str
    summary: str
    cases: Callable
    check: Callable
    backends: tuple = BACKENDS


def backend_name(xp):
    """numpy -> "cpu", cupy -> "gpu"."""
    return "gpu" if is_gpu(xp) else "cpu"


def storage_dtype(xp):
    """The dtype kernels take and return on this backend: float16 on GPU, float32 on CPU."""
    return np.float16 if is_gpu(xp) else np.float32


SEEDS = st.integers(0, 2**32 - 1)  # the NumPy seed of a case's random inputs
