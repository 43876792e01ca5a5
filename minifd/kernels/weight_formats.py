"""The weight formats the product kernels read (weight_formats.cuh), from the Python side.

A product's weight is a plain [N, K] array (float16 on the GPU, float32 on the CPU) or a quantized
one, minifd.model.quantized's Int8Groups or Int4Groups, whose arrays gemv.cu and flat_gemm.cu read
as they are: weight_formats.cuh has the table of layouts and bits per weight. This module names a
weight's format, gives the -D option that compiles a kernel for it and the three arrays the kernel
takes, and the float32 weights the NumPy emulations multiply by: the dequantization exactly as the
kernel computes it (the GEMV: s q, or d q + m, in float32; the tensor-core flat GEMM: the same
rounded once to float16 by fp16 arithmetic, the MMA's A operand).
"""

import numpy as np

from minifd.kernels.dispatch import PLAIN_FORMAT  # a plain array's format name (float32 ones on the CPU too)
from minifd.model.quantized import FORMATS

KERNEL_FORMATS = {PLAIN_FORMAT: "WEIGHT_FP16", "int8": "WEIGHT_INT8", "int4": "WEIGHT_INT4"}  # weight_formats.cuh
QUANTIZED_TYPES = tuple(FORMATS.values())
# A lane reads a row in 16-byte pieces of codes (weight_formats.cuh's RowPiece): this many weights.
ROW_PIECE_WEIGHTS = {PLAIN_FORMAT: 8, "int8": 16, "int4": 32}


def is_quantized(weight):
    return isinstance(weight, QUANTIZED_TYPES)


def format_name(weight):
    """-> "float16" for a plain array, else the quantized format's name ("int8", "int4")."""
    return weight.name if is_quantized(weight) else PLAIN_FORMAT


def format_option(weight_format):
    """A format name -> the compiler option that builds gemv.cu / flat_gemm.cu for it."""
    return f"-DWEIGHT_FORMAT={KERNEL_FORMATS[weight_format]}"


def kernel_operands(weight):
    """-> (codes, scales, mins): the kernel's three weight pointers (weight_formats.cuh), the
    arrays unread by the format repeating the codes."""
    if not is_quantized(weight):
        return weight, weight, weight
    if weight.name == "int8":
        return weight.codes, weight.scales, weight.scales
    return weight.packed, weight.scales, weight.mins


def weights_aligned(weight):
    """Whether every array the kernel reads starts on a 16-byte boundary."""
    return all(array.data.ptr % 16 == 0 for array in kernel_operands(weight))


def emulated_weight(weight, rounded_to_half=False):
    """-> [N, K] float32 (NumPy): the weights a kernel multiplies by. A plain array as it is; a
    quantized one dequantized as weight_formats.cuh does: in float32 (one rounding of d q + m), or
    rounded once to float16 for an MMA (rounded_to_half: float64 holds s q and d q + m exactly, so
    its one rounding to float16 is the fp16 FMA's)."""
    if not is_quantized(weight):
        return weight.astype(np.float32, copy=False)
    if rounded_to_half:
        return weight.dequantize(np.float64).astype(np.float16).astype(np.float32)
    return weight.dequantize()


def dequantized_half(weight):
    """A GPU weight -> [N, K] float16 CuPy array: the plain weight, or the quantized one dequantized
    (the library GEMM's operand)."""
    return weight.dequantize().astype(np.float16) if is_quantized(weight) else weight
