"""Float64 oracle for y = x @ W^T and the error bound every linear implementation must meet.

The bound, elementwise, for inputs exactly representable in their dtype (x64, w64 = their values):

    |y - y64| <= u_out |y64| + (1 + u_out) * 2 (K + 1) u32 * (|x64| @ |w64|^T) + tiny_out

- y64 = x64 @ w64^T in float64 (exact to ~1e-16, far below the rest);
- each product x_k w_k is exact in float32 for float16 inputs and off by <= u32 |x_k w_k| for float32
  inputs; summing K terms in float32 in any order (K tiles, lanes, split partials) adds at most
  K u32 sum |x_k w_k| (the classic gamma_K bound), u32 = 2^-24; the factor 2 covers tensor-core
  accumulators, which are not guaranteed to round to nearest;
- rounding the float32 result to the output dtype adds u_out |y| (u_out = 2^-11 for float16, 2^-24
  for float32) and, in float16's subnormal range, at most half its smallest step (tiny_out = 2^-25).
"""

import numpy as np

U32 = 2.0**-24


def random_operands(rng, m, n, k, dtype):
    """-> x: [m, k], w: [n, k] of `dtype` with values in [-1, 1)."""
    x = rng.uniform(-1, 1, (m, k)).astype(dtype)
    w = rng.uniform(-1, 1, (n, k)).astype(dtype)
    return x, w


def oracle(x, w):
    """x: [M, K], w: [N, K] (NumPy) -> [M, N] float64."""
    return x.astype(np.float64) @ w.astype(np.float64).T


def error_bound(x, w, out_dtype):
    """x: [M, K], w: [N, K] (NumPy) -> [M, N] float64: the largest error the implementations may make."""
    k = x.shape[1]
    u_out = 2.0**-11 if np.dtype(out_dtype) == np.float16 else U32
    tiny_out = 2.0**-25 if np.dtype(out_dtype) == np.float16 else 0.0
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    return u_out * np.abs(oracle(x, w)) + (1 + u_out) * 2 * (k + 1) * U32 * magnitude + tiny_out


def assert_close_to_oracle(y, x, w):
    """y: [M, N] (NumPy) from an implementation given x, w -> raises with the worst element if out of bound."""
    expected = oracle(x, w)
    assert y.shape == expected.shape
    excess = np.abs(y.astype(np.float64) - expected) - error_bound(x, w, y.dtype)
    worst = np.unravel_index(np.argmax(excess), excess.shape) if excess.size else None
    assert excess.size == 0 or excess[worst] <= 0, (
        f"y{list(worst)} = {y[worst]} but oracle {expected[worst]} (bound exceeded by {excess[worst]:.3g})"
    )
