// portable.cuh: the one place where CUDA and HIP differ.
//
// Every minifd kernel source includes this header and nothing else from the toolkit, so each .cu
// file compiles standalone with nvcc (sm_80, sm_90), with hipcc (gfx90a: wavefront 64; gfx1030:
// wave 32), and at run time through CuPy's NVRTC or HIPRTC. Kernels never write 32 for the warp
// width: they use MINIFD_WARP_SIZE and the reductions below.
#pragma once

#if defined(__HIPCC__) || defined(__HIPCC_RTC__) || defined(__HIP_PLATFORM_AMD__)
#define MINIFD_HIP 1
#ifndef __HIPCC_RTC__
#include <hip/hip_runtime.h>
#endif
#include <hip/hip_fp16.h>
// The wavefront width is a compile-time property of the target (64 on CDNA, 32 on RDNA).
#if defined(__AMDGCN_WAVEFRONT_SIZE)
#define MINIFD_WARP_SIZE __AMDGCN_WAVEFRONT_SIZE
#elif defined(__GFX10__) || defined(__GFX11__) || defined(__GFX12__)
#define MINIFD_WARP_SIZE 32
#else
#define MINIFD_WARP_SIZE 64
#endif
#else
#define MINIFD_CUDA 1
#include <cuda_fp16.h>
#define MINIFD_WARP_SIZE 32
#endif

// Async global->shared copies exist on NVIDIA sm_80 and newer; elsewhere they are plain copies.
#if defined(MINIFD_CUDA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define MINIFD_HAS_CP_ASYNC 1
#endif

typedef __half half_t;

// ---------------------------------------------------------------------------------------------
// Overlapping a kernel's start with the previous kernel's tail (minifd/kernels/launch.py)
// ---------------------------------------------------------------------------------------------
// Every kernel the decode step launches begins with start_after_previous_kernel() and touches no
// memory before it. On sm_90+ it lets the next kernel in the stream be scheduled on free SM slots
// (griddepcontrol.launch_dependents), then waits until the previous kernel has completed and its
// writes are visible (griddepcontrol.wait); launched without the attribute, both do nothing.
// Elsewhere it compiles to nothing.
__device__ __forceinline__ void start_after_previous_kernel() {
#if defined(MINIFD_CUDA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::);
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// ---------------------------------------------------------------------------------------------
// Warp-level reductions
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float shuffle_xor(float value, int lane_mask) {
#if defined(MINIFD_HIP)
    return __shfl_xor(value, lane_mask);
#else
    return __shfl_xor_sync(0xffffffffu, value, lane_mask);
#endif
}

// Sum / max over groups of `lanes` consecutive lanes (a power of two dividing the warp).
template <int lanes>
__device__ __forceinline__ float lane_group_sum(float value) {
    for (int offset = lanes / 2; offset > 0; offset /= 2) value += shuffle_xor(value, offset);
    return value;
}

template <int lanes>
__device__ __forceinline__ float lane_group_max(float value) {
    for (int offset = lanes / 2; offset > 0; offset /= 2) value = fmaxf(value, shuffle_xor(value, offset));
    return value;
}

// Lane `source` of this lane's group of `width` lanes -> its `value` (a 32-bit register's bits).
__device__ __forceinline__ unsigned shuffle_from(unsigned value, int source, int width) {
#if defined(MINIFD_HIP)
    return static_cast<unsigned>(__shfl(static_cast<int>(value), source, width));
#else
    return __shfl_sync(0xffffffffu, value, source, width);
#endif
}

__device__ __forceinline__ float warp_sum(float value) { return lane_group_sum<MINIFD_WARP_SIZE>(value); }

__device__ __forceinline__ float warp_max(float value) { return lane_group_max<MINIFD_WARP_SIZE>(value); }

// ---------------------------------------------------------------------------------------------
// 16-byte vector access: eight halves move as one uint4
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ uint4 load16(const void* global_ptr) {
    return *reinterpret_cast<const uint4*>(global_ptr);
}

__device__ __forceinline__ void store16(void* ptr, uint4 value) {
    *reinterpret_cast<uint4*>(ptr) = value;
}

// (bits & mask) | value in one instruction (lop3 on NVIDIA: the compiler splits it in two when both
// operands are constants), the bit-field step of the weight dequantizations (weight_formats.cuh).
__device__ __forceinline__ unsigned mask_or(unsigned bits, unsigned mask, unsigned value) {
#if defined(MINIFD_HIP)
    return (bits & mask) | value;
#else
    unsigned result;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(result) : "r"(bits), "r"(mask), "r"(value));  // 0xEA: (a & b) | c
    return result;
#endif
}

// Reading what other blocks of the same launch wrote: they store, __threadfence(), then count
// themselves with an atomic this block has observed. The data must then come from L2 (the point of
// coherence), never from a line this SM's L1 cached earlier: ld.global.cg on NVIDIA; on AMD a
// volatile load, which the compiler issues with the cache-bypassing glc bit.
__device__ __forceinline__ float4 load16_from_l2(const float* global_ptr) {
#if defined(MINIFD_HIP)
    const volatile float* v = global_ptr;
    return make_float4(v[0], v[1], v[2], v[3]);
#else
    float4 value;
    asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                 : "=f"(value.x), "=f"(value.y), "=f"(value.z), "=f"(value.w)
                 : "l"(global_ptr));
    return value;
#endif
}

__device__ __forceinline__ float load_from_l2(const float* global_ptr) {
#if defined(MINIFD_HIP)
    return *static_cast<const volatile float*>(global_ptr);
#else
    float value;
    asm volatile("ld.global.cg.f32 %0, [%1];\n" : "=f"(value) : "l"(global_ptr));
    return value;
#endif
}

__device__ __forceinline__ int load_from_l2(const int* global_ptr) {  // the same 32 bits, read as an int
    return __float_as_int(load_from_l2(reinterpret_cast<const float*>(global_ptr)));
}

// Unpack the eight halves of a uint4 into floats.
__device__ __forceinline__ void halves8_to_float(uint4 packed, float out[8]) {
    const __half2* pairs = reinterpret_cast<const __half2*>(&packed);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 f = __half22float2(pairs[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

// Pack eight floats into the eight halves of a uint4 (round to nearest): halves8_to_float's inverse.
__device__ __forceinline__ uint4 float_to_halves8(const float in[8]) {
    uint4 packed;
    __half2* pairs = reinterpret_cast<__half2*>(&packed);
#pragma unroll
    for (int i = 0; i < 4; ++i) pairs[i] = __floats2half2_rn(in[2 * i], in[2 * i + 1]);
    return packed;
}

// Width-generic access for elementwise kernels written once as template<int W>: W = 8 moves one
// 16-byte vector (the pointer must be 16-byte aligned), W = 1 moves a single half.
__device__ __forceinline__ void load_halves(const half_t* src, float (&out)[8]) { halves8_to_float(load16(src), out); }
__device__ __forceinline__ void load_halves(const half_t* src, float (&out)[1]) { out[0] = __half2float(*src); }
__device__ __forceinline__ void store_halves(half_t* dst, const float (&in)[8]) { store16(dst, float_to_halves8(in)); }
__device__ __forceinline__ void store_halves(half_t* dst, const float (&in)[1]) { *dst = __float2half(in[0]); }

// ---------------------------------------------------------------------------------------------
// Asynchronous global -> shared copies (double buffering)
// ---------------------------------------------------------------------------------------------
// Usage: issue async_copy16 for a tile, async_commit(); later async_wait<N>() leaves at most N
// committed groups in flight, then a __syncthreads() makes the tile visible to the block.

__device__ __forceinline__ void async_copy16(void* shared_ptr, const void* global_ptr) {
#if defined(MINIFD_HAS_CP_ASYNC)
    unsigned shared_addr = static_cast<unsigned>(__cvta_generic_to_shared(shared_ptr));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_addr), "l"(global_ptr));
#else
    store16(shared_ptr, load16(global_ptr));
#endif
}

__device__ __forceinline__ void async_commit() {
#if defined(MINIFD_HAS_CP_ASYNC)
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int groups_in_flight>
__device__ __forceinline__ void async_wait() {
#if defined(MINIFD_HAS_CP_ASYNC)
    asm volatile("cp.async.wait_group %0;\n" ::"n"(groups_in_flight));
#endif
}

// ---------------------------------------------------------------------------------------------
// Matrix-core primitives (flat GEMM, tensor-core decode attention)
// ---------------------------------------------------------------------------------------------
// A kernel tests MINIFD_HAS_MMA_16816 / MINIFD_HAS_MFMA_16X16X16 and keeps a CUDA-core path for
// targets with neither (older NVIDIA, RDNA).
//
// NVIDIA sm_80+: one warp computes C[16, 8] += A[16, 16] B[16, 8] (fp16 in, fp32 accumulate).
// With g = lane / 4 and t = lane % 4: A's four registers hold (row g, cols 2t..2t+1), (row g + 8,
// same cols), (row g, cols 2t+8..2t+9), (row g + 8, those cols); B's two hold (k 2t..2t+1, col g)
// and (k 2t+8..2t+9, col g); C's four floats are (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
// ldmatrix fills those registers from shared memory: lane i (of the first 8 per 8x8 matrix) gives
// the address of one 16-byte matrix row.
#if defined(MINIFD_CUDA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define MINIFD_HAS_MMA_16816 1

__device__ __forceinline__ void ldmatrix_x4(unsigned reg[4], const void* shared_ptr) {
    unsigned shared_addr = static_cast<unsigned>(__cvta_generic_to_shared(shared_ptr));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(reg[0]), "=r"(reg[1]), "=r"(reg[2]), "=r"(reg[3])
                 : "r"(shared_addr));
}

__device__ __forceinline__ void ldmatrix_x2(unsigned reg[2], const void* shared_ptr) {
    unsigned shared_addr = static_cast<unsigned>(__cvta_generic_to_shared(shared_ptr));
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(reg[0]), "=r"(reg[1])
                 : "r"(shared_addr));
}

// The transposing form: lane i's address still names a 16-byte row of matrix i / 8, but each lane
// receives (column g, rows 2t..2t+1): a row-major [k][n] tile in shared memory becomes B fragments.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned reg[4], const void* shared_ptr) {
    unsigned shared_addr = static_cast<unsigned>(__cvta_generic_to_shared(shared_ptr));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(reg[0]), "=r"(reg[1]), "=r"(reg[2]), "=r"(reg[3])
                 : "r"(shared_addr));
}

// tf32 in, fp32 accumulate: C[16, 8] += A[16, 8] B[8, 8], each operand register one fp32 value
// whose low 13 mantissa bits the tensor core ignores. A's four hold (row g, col t), (row g + 8,
// col t), (row g, col t + 4), (row g + 8, col t + 4); B's two (k t, col g) and (k t + 4, col g);
// C as above.
__device__ __forceinline__ void mma_1688_tf32(float acc[4], const unsigned a[4], const unsigned b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_16816(float acc[4], const unsigned a[4], const unsigned b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// AMD CDNA (wavefront 64): one wavefront computes D[16, 16] = A[16, 16] B[16, 16] + C. With
// r = lane % 16 and q = lane / 16: lane holds A[r, 4q..4q+3], B[4q..4q+3, r] and D[4q..4q+3, r].
#if defined(MINIFD_HIP) && (defined(__gfx908__) || defined(__gfx90a__) || defined(__gfx940__) || \
                            defined(__gfx941__) || defined(__gfx942__))
#define MINIFD_HAS_MFMA_16X16X16 1
typedef _Float16 mfma_half4 __attribute__((ext_vector_type(4)));
typedef float mfma_float4 __attribute__((ext_vector_type(4)));

__device__ __forceinline__ mfma_float4 mfma_16x16x16(mfma_half4 a, mfma_half4 b, mfma_float4 acc) {
    return __builtin_amdgcn_mfma_f32_16x16x16f16(a, b, acc, 0, 0, 0);
}
#endif

// SiLU(v) = v sigmoid(v), the SwiGLU gate (silu_mul.cu, and the gated epilogues of gemv.cu and flat_gemm.cu).
__device__ __forceinline__ float silu(float v) { return v / (1.0f + expf(-v)); }

// ---------------------------------------------------------------------------------------------
// The entry point of every product kernel (gemv.cu, flat_gemm.cu)
// ---------------------------------------------------------------------------------------------
// x [M, K], W [N, K] as (w, w_scales, w_mins) in the WEIGHT_FORMAT the kernel was compiled for
// (weight_formats.cuh) -> y; the norm's gain [K] and the residual [M, N] are read only by the variants
// that fuse them. The last argument names the device function (a template instance) that does the
// work; it starts once the previous kernel has finished (launch.py). MIN_BLOCKS: blocks per SM the
// compiler must leave registers for (__launch_bounds__' second argument; 1 leaves it free).
#define MINIFD_PRODUCT_KERNEL(NAME, THREADS, MIN_BLOCKS, ...)                                              \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)                                       \
        NAME(const half_t* x, const void* w, const half_t* w_scales, const half_t* w_mins, half_t* y,          \
             const half_t* gain, const half_t* residual, int M, int N, int K, float eps, int vector_ok) {        \
        start_after_previous_kernel();                                                                      \
        __VA_ARGS__(x, w, w_scales, w_mins, y, gain, residual, M, N, K, eps, vector_ok);                   \
    }

#if !defined(MINIFD_HAS_MMA_16816)
// The CUDA-core MMAs below: rows[h][c] holds this lane's share of C[g + 8h, c] over its own k; the four
// lanes of a group (t = 0..3) sum their shares, and lane t keeps columns 2t and 2t + 1, as the MMA's
// C fragment does.
__device__ __forceinline__ void add_lane_partials(float acc[4], float (&rows)[2][8], int t) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int c = 0; c < 8; ++c) rows[h][c] = lane_group_sum<4>(rows[h][c]);
#pragma unroll
    for (int c = 0; c < 8; ++c) {  // constant indices keep rows[][] in registers
        if (c == 2 * t) {
            acc[0] += rows[0][c];
            acc[2] += rows[1][c];
        } else if (c == 2 * t + 1) {
            acc[1] += rows[0][c];
            acc[3] += rows[1][c];
        }
    }
}
#endif

// ---------------------------------------------------------------------------------------------
// One fragment product on every target: C[16, 8] += A[16, 16] B[16, 8] in NVIDIA's m16n8k16 layout
// ---------------------------------------------------------------------------------------------
// A group of 32 lanes holds the fragments exactly as mma_16816 expects them (see above). On sm_80+
// it is that instruction; elsewhere the same sums run on CUDA cores with width-32 shuffles, so a
// kernel written against this layout compiles and computes the same on RDNA (wave 32) and CDNA
// (each half of a 64-lane wavefront is one group): lane (g, t) first forms, for both of its rows
// and all 8 columns c, the partial dot product over its own four k, with column c's B values taken
// from lane (c, t); the four lanes t of a row then add their partials (xor 1, 2) and each keeps
// its columns 2t, 2t + 1. Slow, but exact in fp32 and portable.
__device__ __forceinline__ float2 half2_bits_to_float2(unsigned bits) {
    __half2 pair;
    *reinterpret_cast<unsigned*>(&pair) = bits;
    return __half22float2(pair);
}

__device__ __forceinline__ void mma_16x8x16(float acc[4], const unsigned a[4], const unsigned b[2]) {
#if defined(MINIFD_HAS_MMA_16816)
    mma_16816(acc, a, b);
#else
    const int lane = threadIdx.x % 32, t = lane % 4;
    float rows[2][8];  // partial C over this lane's k: [row g, row g + 8][column]
#pragma unroll
    for (int c = 0; c < 8; ++c) {
        const float2 b_low = half2_bits_to_float2(shuffle_from(b[0], 4 * c + t, 32));
        const float2 b_high = half2_bits_to_float2(shuffle_from(b[1], 4 * c + t, 32));
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const float2 a_low = half2_bits_to_float2(a[h]), a_high = half2_bits_to_float2(a[h + 2]);
            rows[h][c] = a_low.x * b_low.x + a_low.y * b_low.y + a_high.x * b_high.x + a_high.y * b_high.y;
        }
    }
    add_lane_partials(acc, rows, t);
#endif
}

// The same for tf32 operands, C[16, 8] += A[16, 8] B[8, 8] in NVIDIA's m16n8k8 layout (see
// mma_1688_tf32): the instruction on sm_80+, elsewhere the same sums on CUDA cores, as above. The
// operands must already be tf32 values (low 13 mantissa bits zero), so both give the exact products.
__device__ __forceinline__ void mma_16x8x8_tf32(float acc[4], const unsigned a[4], const unsigned b[2]) {
#if defined(MINIFD_HAS_MMA_16816)
    mma_1688_tf32(acc, a, b);
#else
    const int lane = threadIdx.x % 32, t = lane % 4;
    float rows[2][8];  // partial C over this lane's k (t and t + 4): [row g, row g + 8][column]
#pragma unroll
    for (int c = 0; c < 8; ++c) {
        const float b_low = __uint_as_float(shuffle_from(b[0], 4 * c + t, 32));
        const float b_high = __uint_as_float(shuffle_from(b[1], 4 * c + t, 32));
#pragma unroll
        for (int h = 0; h < 2; ++h) rows[h][c] = __uint_as_float(a[h]) * b_low + __uint_as_float(a[h + 2]) * b_high;
    }
    add_lane_partials(acc, rows, t);
#endif
}
