"""Linear-layer seam: y = residual + Gate(W · RMSNorm(x)), W stored as Hugging Face stores it
(row n = output n), each of RMSNorm, Gate and residual optional; for the QKV projection instead
q = RoPE(W · RMSNorm(x)) with k and v written to the KV cache.

Every projection of the model comes through `linear`, which runs the heuristic dataflow of
minifd/kernels/dispatch.py: GEMV for the smallest M, the flat GEMM for decode-sized M, the library
GEMM beyond. GEMV and the flat GEMM fold the norm, the SwiGLU gate and the residual add into the
product (gemv.cu, flat_gemm.cu) in the combinations the model uses (gemv.FUSED_KERNELS), RoPE with
the cache write too; the library GEMM, and any other combination, runs them around the
product as kernels of their own, and so does the flat GEMM the norm over quantized weights
(norm_in_prologue).
On GPU (CuPy) the kernels take float16 and accumulate in float32; on CPU (NumPy) the emulations of
the same kernels run in float32, and the library path is plain `x @ W.T`.

The weight is a plain array or a quantized one (minifd.kernels.weight_formats: int8 or int4 codes
with group scales): GEMV and the flat GEMM read the codes themselves, in the same fused variants,
and the dispatcher's table is kept per format; the library GEMM multiplies by the weight
dequantized to float16 (a GPU dequantization per call, never inside a captured step).
"""

import functools

import numpy as np

from minifd.kernels.dispatch import (CPU_DEVICE_NAME, IMPLEMENTATIONS, PLAIN_FORMAT, choose_implementation,
                                     gpu_properties)
from minifd.kernels.flat_gemm import flat_gemm_emulated, flat_gemm_gpu
from minifd.kernels.gemv import fusable, gemv_emulated, gemv_gpu
from minifd.kernels.launch import PLAIN
from minifd.kernels.rms_norm import rms_norm
from minifd.kernels.silu_mul import silu_mul
from minifd.kernels.weight_formats import dequantized_half, emulated_weight, format_name, is_quantized


def _library_cpu(x, weight):
    return x @ emulated_weight(weight).T


def _library_gpu(x, weight, launch=PLAIN):
    import cupy

    # cuBLAS through CuPy takes no launch attributes; the dispatcher keeps it out of captured steps.
    return cupy.matmul(x, dequantized_half(weight).T)


_CPU = {"gemv": gemv_emulated, "flat_gemm": flat_gemm_emulated, "library": _library_cpu}
_GPU = {"gemv": gemv_gpu, "flat_gemm": flat_gemm_gpu, "library": _library_gpu}


def norm_in_prologue(implementation, weight_format):
    """Whether `implementation` folds the RMSNorm into its product's prologue for weights of this
    format, rather than running it as a kernel of its own first. Not the flat GEMM over quantized
    weights: its prologue converts, squares and scales every 8-column run of x beside the
    dequantization, which cost the int4 products 28-38% at decode sizes, more than a norm kernel
    (BENCHMARKS.md, 2026-12-03 second session); over fp16 weights it costs 0-4%."""
    return not (implementation == "flat_gemm" and weight_format != PLAIN_FORMAT)


def linear(x, weight, *, norm=None, residual=None, gated=False, rotary=None, impl=None, launch=PLAIN):
    """x: [M, K]; weight: [N, K], plain or quantized -> y: [M, N] ([M, N / 2] when gated; q: [M, n_heads, head_dim]
    with rotary).

    norm: None or an RMSNorm (minifd.kernels.rms_norm) applied to x first; gated: the weight's rows
    are gate/up interleaved (minifd.kernels.silu_mul) and y is SiLU(gate) * up; residual: None or
    [M, N(/2)] added last; rotary: None or a minifd.kernels.rope.Rotary: the product is the fused
    QKV projection (q, k rows paired), and RoPE and the KV-cache write follow it. impl: None (the
    dispatcher picks from M and the tuned table) or one of "gemv", "flat_gemm", "library" to force
    an implementation. launch (minifd.kernels.launch): how the
    kernels are launched, and whether the call is being recorded into a CUDA graph (the dispatcher
    then never picks the library). GPU: float16 in and
    out for the kernels; other dtypes take the library path (forcing a kernel on them is a
    TypeError). CPU: float32 out. The GPU path never synchronises with the host, so a decode step
    that calls it can be graph-captured.
    """
    m, k = x.shape
    n, weight_k = weight.shape
    weight_format = format_name(weight)
    if weight_k != k:
        raise ValueError(f"linear: x is [{m}, {k}] but weight is [{n}, {weight_k}]")
    if impl is not None and impl not in IMPLEMENTATIONS:
        raise ValueError(f"linear: impl must be one of {IMPLEMENTATIONS} or None, not {impl!r}")

    if isinstance(x, np.ndarray):
        chosen = impl or choose_implementation(m, n, k, CPU_DEVICE_NAME, weight_format=weight_format)
        if m == 0 or n == 0:
            chosen = "library"
        product = _CPU[chosen]
    else:
        import cupy

        quantized = is_quantized(weight)
        half_precision = x.dtype == cupy.float16 and (quantized or weight.dtype == cupy.float16)
        if impl in ("gemv", "flat_gemm") and not half_precision:
            raise TypeError(f"linear: impl={impl!r} takes float16 arrays, not {x.dtype} and {weight_format}")
        if not half_precision or m == 0 or n == 0:
            chosen = "library"
        else:
            chosen = impl or choose_implementation(m, n, k, gpu_properties().name, launch.graph_captured,
                                                   weight_format)
            if chosen != "library":
                x = cupy.ascontiguousarray(x)
                weight = weight if quantized else cupy.ascontiguousarray(weight)  # quantized arrays are built so
        product = functools.partial(_GPU[chosen], launch=launch)

    if norm is not None and not (chosen != "library" and fusable(norm, residual, gated, rotary) and
                                 norm_in_prologue(chosen, weight_format)):
        x = rms_norm(x, norm.weight, norm.eps, launch=launch)  # [M, K]
        norm = None
    if chosen != "library" and rotary is not None and fusable(norm, residual, gated, rotary):
        return product(x, weight, norm=norm, rotary=rotary)  # [M, n_heads, head_dim]
    if chosen != "library" and fusable(norm, residual, gated):
        y = product(x, weight, norm=norm, residual=residual, gated=gated)  # [M, N] or [M, N / 2]
    else:
        y = product(x, weight)  # [M, N]
        if gated:
            y = silu_mul(y, launch=launch)  # [M, N / 2]
        if residual is not None:
            y = y + residual
    return y if rotary is None else rotary.apply(y, launch=launch)  # [M, n_heads, head_dim] with rotary
