// rotary_cache.cuh: the last step of the QKV projection, shared by rope.cu (a kernel of its own) and
// the RoPE epilogues of gemv.cu and flat_gemm.cu: rotate q and k, write q out and k, v into the KV cache.
//
// Math (HF "rotate half": dimension i pairs with i + head_dim/2; angle = position * inv_freq[i]):
//     out[i]              = x[i] cos - x[i + head_dim/2] sin
//     out[i + head_dim/2] = x[i + head_dim/2] cos + x[i] sin          for i < head_dim/2
// with cos/sin read from the float32 tables [max_positions, head_dim/2] at the row's position.
//
// The paired layout (rope.py: pair_rotary_rows): within every q and k head of the QKV projection's
// output, the columns come in tiles of 2T (T = pair_tile = gcd(8, head_dim/2)): T first-half
// dimensions i, then their partners i + head_dim/2. So column p of a head holds dimension
// (p / 2T) T + p % 2T for p % 2T < T, and its partner sits T columns on. The weight rows are
// stacked that way at load (minifd/model/weights.py), which puts the two rows one rotation needs
// 8 rows apart in one 16-row tile: one warp of gemv.cu (or one row tile of a product) holds both.
// v heads keep their natural order and are read in the same tiles (columns p and p + T), so every
// tile of 2T columns is handled alike. Positions and slots are read on the device, so a launch
// needs no host data and is capturable in a CUDA graph. The products are rounded one by one
// (__fmul_rn, no fused multiply-add), which makes the result bit-identical to the NumPy path.
#pragma once
#include "portable.cuh"

struct RotaryCache {
    const float* cos_table;  // [max_positions, head_dim / 2]
    const float* sin_table;  // [max_positions, head_dim / 2]
    const int* positions;    // [rows]: where row r goes in its sequence
    const int* slots;        // [rows]: the cache slot (sequence) of row r
    half_t* q;               // [rows, n_heads, head_dim] out, natural order
    half_t* k_cache;         // [batch, n_kv_heads, max_seq, head_dim]
    half_t* v_cache;         // [batch, n_kv_heads, max_seq, head_dim]
    int n_heads, n_kv_heads, head_dim, max_seq;
};

// Row `row`'s W consecutive columns from column n (n % 2T + W <= T) and their partners T columns
// on, as floats -> rotated (q, k heads) or not (v heads), stored in q or the caches.
template <int W>
__device__ __forceinline__ void store_rotary_pairs(const RotaryCache& rc, int row, int n, int pair_tile,
                                                   float (&first)[W], float (&partner)[W]) {
    const int half = rc.head_dim / 2;
    const int head = n / rc.head_dim, p = n % rc.head_dim;
    const int position = rc.positions[row];
    int d_first, d_partner;  // the dimensions the two runs of W go to
    if (head < rc.n_heads + rc.n_kv_heads) {
        d_first = p / (2 * pair_tile) * pair_tile + p % (2 * pair_tile);
        d_partner = d_first + half;
        const float* cos_row = rc.cos_table + (size_t)position * half + d_first;
        const float* sin_row = rc.sin_table + (size_t)position * half + d_first;
#pragma unroll
        for (int i = 0; i < W; ++i) {
            const float c = cos_row[i], s = sin_row[i], x1 = first[i], x2 = partner[i];
            first[i] = __fmul_rn(x1, c) - __fmul_rn(x2, s);
            partner[i] = __fmul_rn(x2, c) + __fmul_rn(x1, s);
        }
    } else {
        d_first = p;
        d_partner = p + pair_tile;
    }
    half_t* dst;
    if (head < rc.n_heads) {
        dst = rc.q + ((size_t)row * rc.n_heads + head) * rc.head_dim;
    } else {
        half_t* cache = head < rc.n_heads + rc.n_kv_heads ? rc.k_cache : rc.v_cache;
        const int kv_head = (head - rc.n_heads) % rc.n_kv_heads;
        dst = cache + (((size_t)rc.slots[row] * rc.n_kv_heads + kv_head) * rc.max_seq + position) * rc.head_dim;
    }
    store_halves(dst + d_first, first);
    store_halves(dst + d_partner, partner);
}

// The entry point of a product kernel that ends in this epilogue (gemv.cu, flat_gemm.cu): x [M, K],
// W [N, K] (q, k rows paired) as (w, w_scales, w_mins), the norm's gain [K], then RotaryCache's
// fields. The last argument names the device function, called as MINIFD_PRODUCT_KERNEL's are with
// y = q and no residual, and the RotaryCache last.
#define MINIFD_ROTARY_PRODUCT_KERNEL(NAME, THREADS, MIN_BLOCKS, ...)                                              \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)                                             \
        NAME(const half_t* x, const void* w, const half_t* w_scales, const half_t* w_mins, const half_t* gain,     \
             int M, int N, int K, float eps, int vector_ok,                                                       \
             const float* cos_table, const float* sin_table, const int* positions, const int* slots, half_t* q,   \
             half_t* k_cache, half_t* v_cache, int n_heads, int n_kv_heads, int head_dim, int max_seq) {         \
        start_after_previous_kernel();                                                                            \
        const RotaryCache rotary{cos_table, sin_table, positions, slots, q, k_cache, v_cache,                    \
                                 n_heads, n_kv_heads, head_dim, max_seq};                                         \
        __VA_ARGS__(x, w, w_scales, w_mins, q, gain, nullptr, M, N, K, eps, vector_ok, rotary);                   \
    }
