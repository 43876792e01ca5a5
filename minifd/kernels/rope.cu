// rope.cu: rotary position embedding of q and k, fused with the KV-cache write, as a kernel of its
// own (for the products that do not run it in their epilogue). The math and the paired column
// layout of qkv are rotary_cache.cuh's.
//
// Launch geometry: a 1-D grid of blocks of 256 threads over rows x (qkv columns / 2T) tiles x (T / W)
// runs; one thread reads W columns of a tile and their W partners and stores them rotated.
// rope_and_cache_vec8: W = T = 8, 16-byte loads and stores (head_dim % 16 == 0, 16-byte aligned
// pointers); rope_and_cache_scalar: W = 1, any even head_dim.
#include "rotary_cache.cuh"

template <int W>
__device__ __forceinline__ void rope_and_cache_run(const half_t* qkv, int rows, int pair_tile, const RotaryCache& rc) {
    const int columns = (rc.n_heads + 2 * rc.n_kv_heads) * rc.head_dim;
    const int runs_per_row = columns / 2 / W;
    const long long item = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (item >= (long long)rows * runs_per_row) return;
    const int row = (int)(item / runs_per_row), run = (int)(item % runs_per_row);
    const int runs_per_tile = pair_tile / W;
    const int n = run / runs_per_tile * 2 * pair_tile + run % runs_per_tile * W;
    const half_t* src = qkv + (size_t)row * columns + n;
    float first[W], partner[W];
    load_halves(src, first);
    load_halves(src + pair_tile, partner);
    store_rotary_pairs<W>(rc, row, n, pair_tile, first, partner);
}

// qkv: [rows, (n_heads + 2 n_kv_heads) head_dim] in the paired layout; cos_table, sin_table:
// [max_positions, head_dim/2]; positions, slots: [rows]; q_out: [rows, n_heads, head_dim];
// k_cache, v_cache: [batch, n_kv_heads, max_seq, head_dim]
#define ROPE_KERNEL(NAME, W)                                                                                         \
    extern "C" __global__ void NAME(const half_t* qkv, int rows, int pair_tile, const float* cos_table,             \
                                    const float* sin_table, const int* positions, const int* slots, half_t* q_out,  \
                                    half_t* k_cache, half_t* v_cache, int n_heads, int n_kv_heads, int head_dim,    \
                                    int max_seq) {                                                                   \
        start_after_previous_kernel();                                                                               \
        const RotaryCache rc{cos_table, sin_table, positions, slots, q_out, k_cache, v_cache,                       \
                             n_heads, n_kv_heads, head_dim, max_seq};                                                \
        rope_and_cache_run<W>(qkv, rows, pair_tile, rc);                                                             \
    }

ROPE_KERNEL(rope_and_cache_vec8, 8)
ROPE_KERNEL(rope_and_cache_scalar, 1)
