// rope.cu: rotary position embedding of q and k, fused with the KV-cache write.
//
// Math (HF "rotate half": dimension i pairs with i + head_dim/2; angle = position * inv_freq[i]):
//     out[i]              = x[i] cos - x[i + head_dim/2] sin
//     out[i + head_dim/2] = x[i + head_dim/2] cos + x[i] sin          for i < head_dim/2
// applied to every q and k head of one row of the fused QKV projection, with cos/sin read from the
// float32 tables [max_positions, head_dim/2] at the row's position. Rotated q goes to q_out, rotated
// k and unrotated v go to the caches at [slot of the row, kv head, position of the row]. Positions
// and slots are read on the device, so the launch needs no host data and is capturable in a CUDA
// graph. The products are rounded one by one (__fmul_rn, no fused multiply-add), which makes the
// result bit-identical to the NumPy path in rope.py.
//
// Launch geometry: a 1-D grid of blocks of 256 threads over rows x (n_heads + 2 n_kv_heads) heads x
// (head_dim/2 / W) chunks; one thread rotates W pairs (dims d..d+W-1 with d+half..d+half+W-1).
// rope_and_cache_vec8: W = 8, 16-byte loads and stores (head_dim % 16 == 0, 16-byte aligned
// pointers); rope_and_cache_scalar: W = 1, any even head_dim.
#include "portable.cuh"

template <int W>
__device__ __forceinline__ void rope_and_cache_chunk(const half_t* qkv, const float* cos_table, const float* sin_table,
                                                     const int* positions, const int* slots, int rows, int n_heads,
                                                     int n_kv_heads, int head_dim, int max_seq, half_t* q_out,
                                                     half_t* k_cache, half_t* v_cache) {
    const int half = head_dim / 2;
    const int chunks_per_head = half / W;
    const int heads_per_row = n_heads + 2 * n_kv_heads;
    const long long item = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (item >= (long long)rows * heads_per_row * chunks_per_head) return;
    const int d = (int)(item % chunks_per_head) * W;
    const int head = (int)((item / chunks_per_head) % heads_per_row);
    const int row = (int)(item / ((long long)chunks_per_head * heads_per_row));
    const int position = positions[row];

    const half_t* src = qkv + ((size_t)row * heads_per_row + head) * head_dim + d;
    float first[W], second[W];
    load_halves(src, first);
    load_halves(src + half, second);
    if (head < n_heads + n_kv_heads) {
        const float* cos_row = cos_table + (size_t)position * half + d;
        const float* sin_row = sin_table + (size_t)position * half + d;
#pragma unroll
        for (int i = 0; i < W; ++i) {
            const float c = cos_row[i], s = sin_row[i], x1 = first[i], x2 = second[i];
            first[i] = __fmul_rn(x1, c) - __fmul_rn(x2, s);
            second[i] = __fmul_rn(x2, c) + __fmul_rn(x1, s);
        }
    }

    half_t* dst;
    if (head < n_heads) {
        dst = q_out + ((size_t)row * n_heads + head) * head_dim + d;
    } else {
        half_t* cache = head < n_heads + n_kv_heads ? k_cache : v_cache;
        const int kv_head = (head - n_heads) % n_kv_heads;
        dst = cache + (((size_t)slots[row] * n_kv_heads + kv_head) * max_seq + position) * head_dim + d;
    }
    store_halves(dst, first);
    store_halves(dst + half, second);
}

// qkv: [rows, (n_heads + 2 n_kv_heads) head_dim]; cos_table, sin_table: [max_positions, head_dim/2];
// positions, slots: [rows]; q_out: [rows, n_heads, head_dim]; k_cache, v_cache: [batch, n_kv_heads, max_seq, head_dim]
extern "C" __global__ void rope_and_cache_vec8(const half_t* qkv, const float* cos_table, const float* sin_table,
                                               const int* positions, const int* slots, int rows, int n_heads,
                                               int n_kv_heads, int head_dim, int max_seq, half_t* q_out,
                                               half_t* k_cache, half_t* v_cache) {
    start_after_previous_kernel();
    rope_and_cache_chunk<8>(qkv, cos_table, sin_table, positions, slots, rows, n_heads, n_kv_heads, head_dim, max_seq,
                            q_out, k_cache, v_cache);
}

extern "C" __global__ void rope_and_cache_scalar(const half_t* qkv, const float* cos_table, const float* sin_table,
                                                 const int* positions, const int* slots, int rows, int n_heads,
                                                 int n_kv_heads, int head_dim, int max_seq, half_t* q_out,
                                                 half_t* k_cache, half_t* v_cache) {
    start_after_previous_kernel();
    rope_and_cache_chunk<1>(qkv, cos_table, sin_table, positions, slots, rows, n_heads, n_kv_heads, head_dim, max_seq,
                            q_out, k_cache, v_cache);
}
