// weight_formats.cuh: how the product kernels (gemv.cu, flat_gemm.cu) read W [N, K] in each of
// minifd's weight formats, picked at compile time by -DWEIGHT_FORMAT (one module per format):
//
// | WEIGHT_FORMAT | one weight w[n, k] =                 | codes                         | per 32 along K      | bits/weight |
// | ------------- | ------------------------------------ | ----------------------------- | ------------------- | ----------- |
// | 0 fp16        | the half itself                      | half [N, K]                   | -                   | 16          |
// | 1 int8        | s[n, k / 32] * q[n, k]               | int8 [N, K]                   | half s [N, K / 32]  | 8.5         |
// | 2 int4        | d[n, k / 32] * q[n, k] + m[n, k / 32] | 4-bit, byte j of a row holds  | half d, m           | 5           |
// |               |                                      | k = 2j (low nibble), 2j + 1   | [N, K / 32] each    |             |
//
// These are minifd/model/quantized.py's Int8Groups and Int4Groups as they are (row-major, so a row
// streams its codes in order); GGUF Q8_0, Q4_0 and Q4_1 load onto them unchanged. A kernel sees W
// as three pointers (codes, scales, mins; the last two unread where the format has none) and reads
// it in pieces of 8 consecutive weights of one row: load_weight_piece issues the loads (16 bytes of
// halves, 8 bytes of int8 codes, or 4 bytes of int4 codes, plus the piece's group scale and min),
// and only where the arithmetic needs the values does weight_piece_to_float / _to_halves turn them
// into weights, so the dequantization sits between the loads in flight and the FMAs / MMAs.
// Dequantizing in float32 is exact: q is an integer of at most 8 bits and s, d halves (11-bit
// significands), so s q and d q are exact and d q + m is one rounding, as NumPy's codes * d + m.
// Quantized formats need K % 32 == 0 (quantized.py guarantees it), so a piece never straddles a
// group or the end of a row.
#pragma once
#include "portable.cuh"

#define WEIGHT_FP16 0
#define WEIGHT_INT8 1
#define WEIGHT_INT4 2
#ifndef WEIGHT_FORMAT
#define WEIGHT_FORMAT WEIGHT_FP16
#endif
#define WEIGHT_GROUP 32  // weights per scale (and min) along K

// Eight halves of `row` from column k (k % 8 == 0); zeros past K. vector_ok: one 16-byte load.
__device__ __forceinline__ uint4 load_halves_piece(const half_t* row, int k, int K, int vector_ok) {
    if (vector_ok && k < K) return load16(row + k);
    uint4 piece = {0u, 0u, 0u, 0u};
    half_t* halves = reinterpret_cast<half_t*>(&piece);
    for (int i = 0; i < 8; ++i)
        if (k + i < K) halves[i] = row[k + i];
    return piece;
}

// A small unsigned integer (< 2^23) as a float, exactly: its bits under 2^23's exponent, less 2^23.
__device__ __forceinline__ float small_uint_to_float(unsigned value) {
    return __int_as_float(0x4B000000u | value) - 8388608.0f;
}

struct WeightRow {       // row n of W
    const void* codes;    // its K codes
    const half_t* scales;  // its K / 32 scales (quantized formats)
    const half_t* mins;    // its K / 32 mins (int4)
};

__device__ __forceinline__ WeightRow weight_row(const void* codes, const half_t* scales, const half_t* mins, int n,
                                                int K) {
#if WEIGHT_FORMAT == WEIGHT_FP16
    return {static_cast<const half_t*>(codes) + (size_t)n * K, scales, mins};
#else
    const size_t groups = (size_t)n * (K / WEIGHT_GROUP);  // the row's first scale (and min)
#if WEIGHT_FORMAT == WEIGHT_INT8
    return {static_cast<const signed char*>(codes) + (size_t)n * K, scales + groups, mins};
#else
    return {static_cast<const unsigned char*>(codes) + (size_t)n * K / 2, scales + groups, mins + groups};
#endif
#endif
}

#if WEIGHT_FORMAT == WEIGHT_FP16
typedef uint4 WeightPiece;  // the 8 halves
#elif WEIGHT_FORMAT == WEIGHT_INT8
struct WeightPiece {
    uint2 codes;  // byte i: q[k + i] (two's complement)
    half_t scale;
};
#else
struct WeightPiece {
    unsigned codes;  // nibble i: q[k + i]
    half_t scale, min;
};
#endif

__device__ __forceinline__ WeightPiece zero_weight_piece() {  // 8 weights 0
#if WEIGHT_FORMAT == WEIGHT_FP16
    return {0u, 0u, 0u, 0u};
#elif WEIGHT_FORMAT == WEIGHT_INT8
    return {{0u, 0u}, __float2half(0.0f)};
#else
    return {0u, __float2half(0.0f), __float2half(0.0f)};
#endif
}

// The 8 weights k .. k + 7 of `row` (k % 8 == 0), as loaded; zeros past K. vector_ok == 0 (fp16
// only: K % 8 != 0 or a misaligned row) loads halves one by one.
__device__ __forceinline__ WeightPiece load_weight_piece(WeightRow row, int k, int K, int vector_ok) {
#if WEIGHT_FORMAT == WEIGHT_FP16
    return load_halves_piece(static_cast<const half_t*>(row.codes), k, K, vector_ok);
#else
    if (k >= K) return zero_weight_piece();
    WeightPiece piece;
#if WEIGHT_FORMAT == WEIGHT_INT8
    piece.codes = *reinterpret_cast<const uint2*>(static_cast<const signed char*>(row.codes) + k);
#else
    piece.codes = *reinterpret_cast<const unsigned*>(static_cast<const unsigned char*>(row.codes) + k / 2);
    piece.min = row.mins[k / WEIGHT_GROUP];
#endif
    piece.scale = row.scales[k / WEIGHT_GROUP];
    return piece;
#endif
}

// 32 bits of codes -> the weights they hold (2 halves, 4 int8 or 8 int4 codes), in column order.
#if WEIGHT_FORMAT == WEIGHT_FP16
constexpr int kWeightsPerWord = 2;
#elif WEIGHT_FORMAT == WEIGHT_INT8
constexpr int kWeightsPerWord = 4;
#else
constexpr int kWeightsPerWord = 8;
#endif
__device__ __forceinline__ void dequantize_word(unsigned word, float scale, float min, float out[kWeightsPerWord]) {
#if WEIGHT_FORMAT == WEIGHT_FP16
    const float2 pair = half2_bits_to_float2(word);
    out[0] = pair.x;
    out[1] = pair.y;
#elif WEIGHT_FORMAT == WEIGHT_INT8
#pragma unroll
    for (int i = 0; i < 4; ++i)  // q + 128 in [0, 255], then back: an exact signed q
        out[i] = scale * (small_uint_to_float(((word >> (8 * i)) & 0xFFu) ^ 0x80u) - 128.0f);
#else
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = fmaf(scale, small_uint_to_float((word >> (4 * i)) & 0xFu), min);
#endif
}

// The piece's 8 weights as floats, w[k + i] -> out[i].
__device__ __forceinline__ void weight_piece_to_float(WeightPiece piece, float out[8]) {
#if WEIGHT_FORMAT == WEIGHT_FP16
    halves8_to_float(piece, out);
#elif WEIGHT_FORMAT == WEIGHT_INT8
    const float scale = __half2float(piece.scale);
    dequantize_word(piece.codes.x, scale, 0.0f, out);
    dequantize_word(piece.codes.y, scale, 0.0f, out + 4);
#else
    dequantize_word(piece.codes, __half2float(piece.scale), __half2float(piece.min), out);
#endif
}

// The GEMV's wide pieces: 16 bytes of codes in every format, ROW_PIECE_WEIGHTS consecutive weights
// of one row (8 halves, 16 int8 or 32 int4 codes; a quantized piece lies in one group of 32, so one
// scale and min). The 8-weight pieces above keep the flat GEMM's MMA fragment layout; a GEMV lane
// may take any columns, and reading quantized rows 4 or 8 bytes at a time left the kernel bound by
// load instructions, not bytes (int4 at 24% of its roofline, BENCHMARKS.md).
#define ROW_PIECE_WEIGHTS (4 * kWeightsPerWord)
struct RowPiece {
    uint4 codes;
    float scale, min;  // of the piece's group (quantized formats)
};

// The ROW_PIECE_WEIGHTS weights of `row` from column k (k % ROW_PIECE_WEIGHTS == 0, k < K, rows aligned).
__device__ __forceinline__ RowPiece load_row_piece(WeightRow row, int k) {
    RowPiece piece;
    piece.codes = load16(static_cast<const char*>(row.codes) + (size_t)k * 16 / ROW_PIECE_WEIGHTS);
#if WEIGHT_FORMAT != WEIGHT_FP16
    piece.scale = __half2float(row.scales[k / WEIGHT_GROUP]);
#endif
#if WEIGHT_FORMAT == WEIGHT_INT4
    piece.min = __half2float(row.mins[k / WEIGHT_GROUP]);
#endif
    return piece;
}

__device__ __forceinline__ void row_piece_to_float(const RowPiece& piece, float out[ROW_PIECE_WEIGHTS]) {
    const unsigned words[4] = {piece.codes.x, piece.codes.y, piece.codes.z, piece.codes.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) dequantize_word(words[i], piece.scale, piece.min, out + i * kWeightsPerWord);
}

// The piece's 8 weights as the halves an MMA takes (quantized formats: the float weights rounded).
__device__ __forceinline__ uint4 weight_piece_to_halves(WeightPiece piece) {
#if WEIGHT_FORMAT == WEIGHT_FP16
    return piece;
#else
    float values[8];
    weight_piece_to_float(piece, values);
    return float_to_halves8(values);
#endif
}

// One weight, row[k] (the kernels' 2-byte path, fp16 only in practice: quantized rows are aligned).
__device__ __forceinline__ float load_weight(WeightRow row, int k) {
#if WEIGHT_FORMAT == WEIGHT_FP16
    return __half2float(static_cast<const half_t*>(row.codes)[k]);
#else
    WeightPiece piece = load_weight_piece(row, k - k % 8, k + 8, 1);
    float values[8];
    weight_piece_to_float(piece, values);
    return values[k % 8];
#endif
}
