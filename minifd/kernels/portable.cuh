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
// Warp-level reductions
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float shuffle_xor(float value, int lane_mask) {
#if defined(MINIFD_HIP)
    return __shfl_xor(value, lane_mask);
#else
    return __shfl_xor_sync(0xffffffffu, value, lane_mask);
#endif
}

__device__ __forceinline__ float warp_sum(float value) {
    for (int offset = MINIFD_WARP_SIZE / 2; offset > 0; offset /= 2) value += shuffle_xor(value, offset);
    return value;
}

__device__ __forceinline__ float warp_max(float value) {
    for (int offset = MINIFD_WARP_SIZE / 2; offset > 0; offset /= 2) value = fmaxf(value, shuffle_xor(value, offset));
    return value;
}

// ---------------------------------------------------------------------------------------------
// 16-byte vector access: eight halves move as one uint4
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ uint4 load16(const void* global_ptr) {
    return *reinterpret_cast<const uint4*>(global_ptr);
}

__device__ __forceinline__ void store16(void* ptr, uint4 value) {
    *reinterpret_cast<uint4*>(ptr) = value;
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
