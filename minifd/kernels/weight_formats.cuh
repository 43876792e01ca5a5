// weight_formats.cuh: how the product kernels (gemv.cu, flat_gemm.cu) read W [N, K] in each of
// minifd's weight formats, picked at compile time by -DWEIGHT_FORMAT (one module per format):
//
// | WEIGHT_FORMAT | one weight w[n, k] =                 | codes                         | per 32 along K      | bits/weight |
// | ------------- | ------------------------------------ | ----------------------------- | ------------------- | ----------- |
// | 0 fp16        | the half itself                      | half [N, K]                   | -                   | 16          |
// | 1 int8        | s[n, k / 32] * q[n, k]               | int8 [N, K]                   | half s [N, K / 32]  | 8.5         |
// | 2 int4        | d[n, k / 32] * q[n, k] + m[n, k / 32] | 4-bit, 32-bit word i of a row | half d, m           | 5           |
// |               |                                      | holds k = 8i + 2p in nibble p | [N, K / 32] each    |             |
// |               |                                      | and 8i + 2p + 1 in p + 4      |                     |             |
//
// These are minifd/model/quantized.py's Int8Groups and Int4Groups as they are (row-major, so a row
// streams its codes in order); GGUF Q8_0, Q5_0, Q4_0, Q4_1 and Q4_K load onto them (minifd/model/repack.py). A kernel sees W
// as three pointers (codes, scales, mins; the last two unread where the format has none) and reads
// it in RowPieces, 16 bytes of codes of one row (8, 16 or 32 weights) with their group's scale and
// min: load_row_piece issues the loads, and only where the arithmetic needs the values does
// row_piece_to_float (the GEMV's FMAs) or row_piece_run_to_halves (the flat GEMM's MMAs) turn them into
// weights, so the dequantization sits between the loads in flight and the arithmetic.
// Both are exact up to their one rounding: q is an integer of at most 8 bits and s, d halves
// (11-bit significands), so s q and d q are exact; the float32 path rounds d q + m once to float32,
// the fp16 path rounds s q or d q + m once to fp16 (an fp16 FMA).
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

// 32 bits of codes -> the weights they hold (2 halves, 4 int8 or 8 int4 codes), in column order.
#if WEIGHT_FORMAT == WEIGHT_FP16
constexpr int kWeightsPerWord = 2;
#elif WEIGHT_FORMAT == WEIGHT_INT8
constexpr int kWeightsPerWord = 4;
#else
constexpr int kWeightsPerWord = 8;
#endif

// A lane's piece of a row: 16 bytes of codes in every format, ROW_PIECE_WEIGHTS consecutive weights
// (8 halves, 16 int8 or 32 int4 codes; a quantized piece lies in one group of 32, so one scale and
// min). Reading quantized rows 4 or 8 bytes at a time left the kernels bound by load instructions,
// not bytes (int4 at 24% of its roofline, BENCHMARKS.md).
#define ROW_PIECE_WEIGHTS (4 * kWeightsPerWord)
struct RowPiece {
    uint4 codes;
    unsigned scale_min;  // quantized formats: the group's scale (low half) and min (high half; int4)
};

// The ROW_PIECE_WEIGHTS weights of `row` from column k (k % ROW_PIECE_WEIGHTS == 0, k < K, rows aligned).
__device__ __forceinline__ RowPiece load_row_piece(WeightRow row, int k) {
    RowPiece piece;
    piece.codes = load16(static_cast<const char*>(row.codes) + (size_t)k * 16 / ROW_PIECE_WEIGHTS);
    piece.scale_min = 0u;
#if WEIGHT_FORMAT != WEIGHT_FP16
    piece.scale_min = __half_as_ushort(row.scales[k / WEIGHT_GROUP]);
#endif
#if WEIGHT_FORMAT == WEIGHT_INT4
    piece.scale_min |= (unsigned)__half_as_ushort(row.mins[k / WEIGHT_GROUP]) << 16;
#endif
    return piece;
}

// The same with bounds: zeros from column K on, and vector_ok == 0 (fp16 only: K % 8 != 0 or a
// misaligned row) loads the halves one by one.
__device__ __forceinline__ RowPiece load_row_piece_or_zeros(WeightRow row, int k, int K, int vector_ok) {
#if WEIGHT_FORMAT == WEIGHT_FP16
    return {load_halves_piece(static_cast<const half_t*>(row.codes), k, K, vector_ok), 0u};
#else
    if (k >= K) return {{0u, 0u, 0u, 0u}, 0u};  // scale and min 0: the weights are 0
    return load_row_piece(row, k);
#endif
}

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
    for (int i = 0; i < 8; ++i) {  // weight i sits in nibble i / 2 (i even) or 4 + i / 2 (i odd)
        const int nibble = i / 2 + 4 * (i % 2);
        out[i] = fmaf(scale, small_uint_to_float((word >> (4 * nibble)) & 0xFu), min);
    }
#endif
}

// The piece's weights as floats (the GEMV's CUDA-core FMAs), w[k + i] -> out[i].
__device__ __forceinline__ void row_piece_to_float(const RowPiece& piece, float out[ROW_PIECE_WEIGHTS]) {
    const unsigned words[4] = {piece.codes.x, piece.codes.y, piece.codes.z, piece.codes.w};
    const float2 scale_min = half2_bits_to_float2(piece.scale_min);
#pragma unroll
    for (int i = 0; i < 4; ++i) dequantize_word(words[i], scale_min.x, scale_min.y, out + i * kWeightsPerWord);
}

__device__ __forceinline__ __half2 bits_to_half2(unsigned bits) {
    __half2 pair;
    *reinterpret_cast<unsigned*>(&pair) = bits;
    return pair;
}

__device__ __forceinline__ unsigned half2_to_bits(__half2 pair) { return *reinterpret_cast<unsigned*>(&pair); }

// Run `run` of the piece, its 8 weights from column 8 run on, as the fp16 pairs an MMA takes:
// out[i] = (w[8 run + 2i], w[8 run + 2i + 1]), each the exact s q or d q + m rounded once to fp16.
// The codes become halves in fp16 arithmetic, two per instruction, with the exponent trick: bits b
// under the exponent bits 0x64 read as the half 1024 + b (1024's step is 1). int8: a byte permute
// puts two bytes under 0x64 and one exact fp16 subtraction gives (q, q'). int4: the format's nibble
// order puts weights 2p and 2p + 1 of a word in nibbles p and p + 4, the two halves' low bits, so
// one mask-and-or (mask_or) lifts a pair straight out of the word, nibbles 0 and 4 as 1024 + q, or
// 1 and 5 as 1024 + 16 q, and a shift by 8 brings up the next two pairs: 5 instructions and 4 exact
// fp16 subtractions or FMAs per 8 codes, then one FMA per pair with the scale and min. Dequantizing
// on CUDA cores in float32 cost about 7 instructions per weight and bound the kernels by arithmetic
// (BENCHMARKS.md). One run at a time keeps 4 registers of halves per row live, not a whole piece's.
__device__ __forceinline__ void row_piece_run_to_halves(const RowPiece& piece, int run, unsigned out[4]) {
    const unsigned words[4] = {piece.codes.x, piece.codes.y, piece.codes.z, piece.codes.w};
#if WEIGHT_FORMAT == WEIGHT_FP16
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = words[i];
#else
    const __half2 scale = __half2half2(bits_to_half2(piece.scale_min).x);
#if WEIGHT_FORMAT == WEIGHT_INT8
    const __half2 bias = __floats2half2_rn(1152.0f, 1152.0f);  // 1024 + the 128 the xor adds
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const unsigned biased = words[2 * run + i] ^ 0x80808080u;  // bytes q + 128 in [0, 255]
        const unsigned low = __byte_perm(biased, 0x64646464u, 0x4140u), high = __byte_perm(biased, 0x64646464u, 0x4342u);
        out[2 * i] = half2_to_bits(__hmul2(__hsub2(bits_to_half2(low), bias), scale));
        out[2 * i + 1] = half2_to_bits(__hmul2(__hsub2(bits_to_half2(high), bias), scale));
    }
#else
    const __half2 min = __half2half2(bits_to_half2(piece.scale_min).y);
    const __half2 low_bias = __floats2half2_rn(1024.0f, 1024.0f);
    const __half2 sixteenth = __floats2half2_rn(1.0f / 16.0f, 1.0f / 16.0f), high_bias = __floats2half2_rn(-64.0f, -64.0f);
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // pairs 2i and 2i + 1 of the run: nibbles (2i, 2i + 4) and (2i + 1, 2i + 5)
        const unsigned word = words[run] >> (8 * i);
        const __half2 low = bits_to_half2(mask_or(word, 0x000F000Fu, 0x64006400u));   // 1024 + q, exact
        const __half2 high = bits_to_half2(mask_or(word, 0x00F000F0u, 0x64006400u));  // 1024 + 16 q, exact
        out[2 * i] = half2_to_bits(__hfma2(__hsub2(low, low_bias), scale, min));
        out[2 * i + 1] = half2_to_bits(__hfma2(__hfma2(high, sixteenth, high_bias), scale, min));
    }
#endif
#endif
}

// One weight, row[k] (the GEMV's 2-byte path, fp16 only in practice: quantized rows are aligned).
__device__ __forceinline__ float load_weight(WeightRow row, int k) {
#if WEIGHT_FORMAT == WEIGHT_FP16
    return __half2float(static_cast<const half_t*>(row.codes)[k]);
#else
    const RowPiece piece = load_row_piece(row, k - k % ROW_PIECE_WEIGHTS);
    float values[ROW_PIECE_WEIGHTS];
    row_piece_to_float(piece, values);
    return values[k % ROW_PIECE_WEIGHTS];
#endif
}
