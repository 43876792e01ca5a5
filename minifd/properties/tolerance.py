"""How a property compares a kernel's result with its float64 reference, and what one example reports.

Every comparison is elementwise: element i passes when |actual_i - expected_i| <= allowed_i, where
each property module derives `allowed` from the dtypes involved and the length of the reduction that
produced the element (its docstring says how). For the report the error is made relative: both sides
are divided by a per-element magnitude `scale_i` that the module names (e.g. |x| @ |W|^T for a
product), so an example reports the relative error of its element closest to the bound, and that
element's relative bound. The example passes iff no element exceeds its bound (NaN never passes).

Unit roundoffs: u = 2^-11 for float16, 2^-24 for float32 (round to nearest: |fl(a) - a| <= u |a|).
That relative bound fails in the subnormal ranges, where numbers are spaced evenly: below 2^-14 a
float16 result rounds in absolute steps of 2^-24, and below 2^-126 every rounded float32 operation
may be off by up to a step of 2^-149. Every bound therefore adds an absolute floor (absolute_floor):
2^-24 for a float16 result, 2^-149 times the number of rounded operations that produced a float32
result (the reduction length where there is one). It matters only where values are that small:
silu_mul's gates of -100 give outputs near 1e-41, for instance.
"""

from dataclasses import dataclass

import numpy as np

U16 = 2.0**-11
U32 = 2.0**-24
FLOAT16_SUBNORMAL_STEP = 2.0**-24  # float16's spacing below 2^-14
FLOAT32_SUBNORMAL_STEP = 2.0**-149  # float32's spacing below 2^-126


def unit_roundoff(dtype):
    """float16 -> 2^-11, float32 -> 2^-24 (the dtypes kernels store results in)."""
    return U16 if np.dtype(dtype) == np.float16 else U32


def absolute_floor(dtype, operations=1):
    """The absolute error beyond u |value| a result of `dtype` may carry from the subnormal range:
    one float16 step (2^-24; the float32 arithmetic before the final rounding adds far less), or one
    float32 step (2^-149) per rounded operation that produced it: `operations` is the reduction
    length, or the count of rounded steps of an elementwise formula."""
    if np.dtype(dtype) == np.float16:
        return FLOAT16_SUBNORMAL_STEP
    return FLOAT32_SUBNORMAL_STEP * operations


def relative_scale(magnitude, relative_bound, dtype):
    """magnitude + floor_out / relative_bound: the scale of an error bounded by relative_bound *
    magnitude + floor_out. Far below float16's normal range the floor dominates, and the error reads
    against it like that of a normal element, not as 100% of a value float16 cannot hold."""
    return magnitude + absolute_floor(dtype) / relative_bound


class PropertyFailure(AssertionError):
    """A kernel result outside its bound, or a count that differs from the float64 reference."""


@dataclass(frozen=True)
class Outcome:
    """One example's result: the relative error of the element closest to its bound, that element's
    relative bound, and the attention rows the example recomputed with the synchronised method."""

    error: float
    bound: float
    recomputed: int = 0

    @property
    def closeness(self):
        """error / bound: 1 is the edge; 0 when the element is exact."""
        if self.error == 0.0:
            return 0.0
        return self.error / self.bound if self.bound > 0.0 else float("inf")

    def with_recomputed(self, recomputed):
        return Outcome(self.error, self.bound, recomputed)


def closest_to_bound(*outcomes):
    """Several comparisons of one example -> the one closest to its bound, recomputed rows summed."""
    worst = max(outcomes, key=lambda outcome: outcome.closeness)
    return worst.with_recomputed(sum(outcome.recomputed for outcome in outcomes))


def within_bound(what, actual, expected, allowed, scale):
    """actual: the kernel's result (NumPy); expected: float64 reference of the same shape; allowed,
    scale: float64 arrays broadcastable to it -> Outcome. Raises PropertyFailure naming the worst
    element (index, both values, error and bound) if any element is outside its bound."""
    actual = np.asarray(actual)
    if actual.shape != expected.shape:
        raise PropertyFailure(f"{what}: shape {actual.shape}, the reference has {expected.shape}")
    if actual.size == 0:
        return Outcome(0.0, 0.0)
    error = np.abs(actual.astype(np.float64) - expected)
    allowed = np.broadcast_to(allowed, expected.shape)
    scale = np.broadcast_to(np.maximum(scale, np.finfo(np.float64).tiny), expected.shape)
    outside = ~(error <= allowed)  # NaN compares false: it is outside
    closeness = np.where(outside, np.inf, error / np.where(allowed > 0, allowed, 1.0))
    worst = np.unravel_index(np.argmax(closeness), closeness.shape)
    if outside.any():
        raise PropertyFailure(
            f"{what}{list(map(int, worst))} = {actual[worst].item()!r} but the float64 reference is "
            f"{expected[worst].item()!r}: "
            f"error {error[worst]:.3g} > allowed {allowed[worst]:.3g} (relative {error[worst] / scale[worst]:.3g} "
            f"> bound {allowed[worst] / scale[worst]:.3g}); {int(outside.sum())} of {outside.size} elements outside")
    return Outcome(float(error[worst] / scale[worst]), float(allowed[worst] / scale[worst]))


def exactly_equal(what, actual, expected):
    """actual == expected bit for bit (NumPy arrays); raises PropertyFailure at the first difference."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise PropertyFailure(f"{what}: {actual.dtype} {actual.shape}, expected {expected.dtype} {expected.shape}")
    both_nan = np.isnan(actual) & np.isnan(expected) if actual.dtype.kind == "f" else False
    different = ~((actual == expected) | both_nan)
    if different.any():
        first = tuple(int(i) for i in np.argwhere(different)[0])
        raise PropertyFailure(f"{what}{list(first)} = {actual[first].item()!r}, "
                              f"expected exactly {expected[first].item()!r}; "
                              f"{int(different.sum())} of {different.size} elements differ")


def all_finite(what, actual):
    """Raises PropertyFailure at the first NaN or infinity in `actual` (NumPy)."""
    bad = ~np.isfinite(np.asarray(actual, np.float64))
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise PropertyFailure(f"{what}{list(first)} = {actual[first].item()!r}: {int(bad.sum())} non-finite elements")


def expect_layout(what, array, dtype, shape):
    """Raises PropertyFailure unless `array` (any array module) has this dtype and shape."""
    if np.dtype(array.dtype) != np.dtype(dtype) or tuple(array.shape) != tuple(shape):
        raise PropertyFailure(f"{what}: {array.dtype} {tuple(array.shape)}, expected {np.dtype(dtype)} {tuple(shape)}")


def norm_within_bound(what, actual, expected, bound):
    """Normwise: ||actual - expected||_2 <= bound ||expected||_2 for one vector (NumPy) -> Outcome
    (relative error, bound); raises PropertyFailure naming the element that differs most."""
    actual = np.asarray(actual, np.float64)
    if actual.shape != expected.shape:
        raise PropertyFailure(f"{what}: shape {actual.shape}, the reference has {expected.shape}")
    difference = actual - expected
    error = float(np.linalg.norm(difference) / max(np.linalg.norm(expected), np.finfo(np.float64).tiny))
    if not error <= bound:
        worst = int(np.nanargmax(np.where(np.isnan(difference), np.inf, np.abs(difference))))
        raise PropertyFailure(f"{what}: relative error {error:.3g} > bound {bound:.3g} (2-norm); element {worst} "
                              f"is {actual[worst].item()!r}, the float64 reference {expected[worst].item()!r}")
    return Outcome(error, bound)
