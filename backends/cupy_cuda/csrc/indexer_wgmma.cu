// Lightning indexer over a paged fp8 key cache on Hopper's fp8 tensor cores (wgmma; QGMMA in SASS):
// the decode step's scores, as indexer_paged_mma in indexer.cu computes them,
//   scores[b n + j, t] = scale(s(b, t)) sum_h w[b n + j, h] ReLU(q[b n + j, h] . k[s(b, t)])
//                        for t <= context_lens[b] - n + j, -inf elsewhere,
// with s(b, t) slot t % block_size of block block_table[b, t / block_size] and n = next_n.
//
// Why a second kernel. indexer_paged_mma runs on mma.sync, which has no fp8 rate on Hopper (its keys
// are widened to f16 in registers), puts the heads on the product's rows (the sum over heads then
// crosses lanes), and at next_n 1 leaves half of its warps on an empty query slot. Here:
//
// * The product is [64 keys, 128] x [128, 64 QUERIES]: the keys of a step are its rows (A) and the
//   heads of the block's queries its columns (B), both e4m3 in shared memory, K-major with the
//   128-byte swizzle (fp8 wgmma reads K-major operands only; a key is exactly one 128-byte row).
//   In the accumulator a thread holds two key rows and, of each, columns 8 j + 2 (lane % 4) + {0, 1}:
//   a key's sum over the heads of one query is the thread's own 16 (or 32) terms, then two shuffles
//   inside its quad. The same layout took Triton's paged kernel from 0.92 to 0.39 ms on the H200
//   (backends/torch_triton/NOTES.md, version 9).
// * One warpgroup per block, every thread a copier: cp.async brings STAGES steps of keys (64 x 128
//   bytes) and their scales ahead of the tensor cores; a step's 64 positions lie in one page
//   (block_size a multiple of 64, DeepGEMM's and V3.2's layout), so the page is looked up once.
// * Steps wholly past a sequence's context are written -inf without a load.
//
// Grid: x = sequences, y = runs of STEPS steps of 64 positions of max_context_len, z = groups of
// QUERIES queries of a sequence (next_n > QUERIES). Taken by the host (CupyBackend.paged_indexer_wgmma)
// for e4m3 queries with h_i <= 64 and d_I = 128, blocks of a multiple of 64 keys, on sm_90a.
#include "hopper.cuh"

using namespace dsa;

namespace indexer_wgmma {
constexpr int THREADS = 128;  // one warpgroup
constexpr int KEYS = 64;      // key positions a step: the product's 64 rows
constexpr int ROW = 128;      // bytes of a key or query head row: d_I e4m3 values, one swizzled row
constexpr int STAGES = 4;     // steps of keys in flight
constexpr int STEPS = 16;     // steps a block: 1024 positions
constexpr int KEY_TILE = KEYS * ROW;           // 8 KiB, a multiple of the 1024-byte swizzle atom
constexpr int SCALE_TILE = KEYS * 4;           // the step's float32 scales
template <int QUERIES>
struct Layout {  // offsets from the 1024-byte-aligned start of dynamic shared memory
    static constexpr int Q = 0;                                // [64 QUERIES][ROW], swizzled
    static constexpr int K = Q + 64 * QUERIES * ROW;           // [STAGES][KEYS][ROW], swizzled
    static constexpr int SCALES = K + STAGES * KEY_TILE;       // [STAGES][KEYS] float
    static constexpr int USED = SCALES + STAGES * SCALE_TILE;
    static constexpr int TOTAL = USED + 1024;                  // what the launch asks for: room to align
};
}  // namespace indexer_wgmma

namespace indexer_wgmma {
// The block's queries' heads into the B tile: row j * 64 + h holds head h of the block's query j
// (global row first_row + j); rows of absent heads or queries are zero. Part of the first cp.async group.
template <int QUERIES>
__device__ __forceinline__ void load_query_tile(u32 q_tile, const u8* __restrict__ q, int first_row, int rows_valid,
                                                int h_i) {
    for (int c = threadIdx.x; c < 64 * QUERIES * (ROW / 16); c += THREADS) {
        const int row = c / (ROW / 16), chunk = c % (ROW / 16);
        const int j = row / 64, head = row % 64;
        const bool valid = j < rows_valid && head < h_i;
        const u8* src = q + (valid ? ((u64)(first_row + j) * h_i + head) * ROW + chunk * 16 : 0);
        cp_async_16(q_tile + hopper::swizzle_128b(row, chunk), src, valid);
    }
}

// The head weights of this thread's accumulator columns 8 jj + 2 (lane % 4) + e (w[2 jj + e]); 0 for
// absent heads and queries.
template <int QUERIES>
__device__ __forceinline__ void load_head_weights(float (&w)[16 * QUERIES], const float* __restrict__ weights,
                                                  int first_row, int rows_valid, int h_i) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int jj = 0; jj < 8 * QUERIES; ++jj)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int column = 8 * jj + 2 * (lane & 3) + e, j = column / 64, head = column % 64;
            const bool valid = j < rows_valid && head < h_i;
            w[2 * jj + e] = valid ? weights[(u64)(first_row + j) * h_i + head] : 0.0f;
        }
}

// For this thread's two key rows (half 0, 1) and each query j: sum_h w ReLU(q . k), the thread's own
// terms then its quad's. Absent heads are skipped by a select (a NaN key times a zero query must not
// reach the sum), and every shuffle comes before any store so that no branch separates them.
template <int QUERIES>
__device__ __forceinline__ void quad_head_sums(float (&sums)[2][QUERIES], const float (&acc)[32 * QUERIES],
                                               const float (&w)[16 * QUERIES], int h_i) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int j = 0; j < QUERIES; ++j) {
            float sum = 0.0f;
#pragma unroll
            for (int jj = j * 8; jj < j * 8 + 8; ++jj)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int head = 8 * (jj - j * 8) + 2 * (lane & 3) + e;
                    const float term = w[2 * jj + e] * relu_keep_nan(acc[4 * jj + 2 * half + e]);
                    sum += head < h_i ? term : 0.0f;
                }
            sums[half][j] = sum;
        }
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int j = 0; j < QUERIES; ++j) {
            sums[half][j] += __shfl_xor_sync(0xffffffffu, sums[half][j], 1);
            sums[half][j] += __shfl_xor_sync(0xffffffffu, sums[half][j], 2);
        }
}

// 1024-byte-aligned start of dynamic shared memory (the swizzle atoms must be aligned).
__device__ __forceinline__ u32 aligned_smem_base(u8* dynamic_smem) {
    const u32 raw_base = smem_u32(dynamic_smem);
    return (raw_base + 1023u) & ~1023u;
}
}  // namespace indexer_wgmma

template <int QUERIES>
__device__ __forceinline__ void
indexer_paged_wgmma(const u8* __restrict__ q,              // [b * next_n, h_i, 128] e4m3
                    const float* __restrict__ weights,     // [b * next_n, h_i]
                    const u8* __restrict__ cache,          // [num_blocks, block_size * 132]
                    const int* __restrict__ block_table,   // [b, max_blocks]
                    const int* __restrict__ context_lens,  // [b], in [next_n, max_blocks * block_size]
                    float* __restrict__ scores,            // [b * next_n, max_context_len]
                    int num_blocks, int max_blocks, int block_size, int next_n, int max_context_len, int h_i) {
    using namespace indexer_wgmma;
    using namespace hopper;
    constexpr int N = 64 * QUERIES;  // the product's columns: QUERIES queries of 64 head slots
    using L = Layout<QUERIES>;
    extern __shared__ __align__(1024) u8 dynamic_smem[];
    const u32 base = aligned_smem_base(dynamic_smem);
    const float* scale_tiles = reinterpret_cast<const float*>(dynamic_smem + (base - smem_u32(dynamic_smem)) + L::SCALES);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int sequence = blockIdx.x;
    const int first_query = blockIdx.z * QUERIES;  // of the sequence's next_n
    const int first_position = blockIdx.y * STEPS * KEYS;
    const int length = context_lens[sequence];
    const u64 block_bytes = (u64)block_size * (ROW + 4);
    // Steps holding a position of the context, and steps holding a column of the result at all.
    const int live = max(0, min(STEPS, (length - first_position + KEYS - 1) / KEYS));
    const int columns = max(0, min(STEPS, (max_context_len - first_position + KEYS - 1) / KEYS));

    const int first_row = sequence * next_n + first_query, rows_valid = min(QUERIES, next_n - first_query);
    load_query_tile<QUERIES>(base + L::Q, q, first_row, rows_valid, h_i);
    float w[N / 4];
    load_head_weights<QUERIES>(w, weights, first_row, rows_valid, h_i);

    // The cache block holding the 64 positions of step `step` (one page holds them all), -1 for none.
    auto step_block = [&](int step) {
        const int logical = (first_position + step * KEYS) / block_size;
        const int block = logical < max_blocks ? block_table[(u64)sequence * max_blocks + logical] : -1;
        return block < num_blocks ? block : -1;
    };
    // Step `step`'s keys and scales into stage `stage`.
    auto load_step = [&](int step, int stage) {
        const int position = first_position + step * KEYS;
        const int block = step_block(step);
        const bool present = block >= 0;
        const u8* page = cache + (present ? (u64)block * block_bytes : 0);
        const int slot = position % block_size;  // of the step's first position, a multiple of 64
        for (int c = tid; c < KEYS * (ROW / 16); c += THREADS) {
            const int row = c / (ROW / 16), chunk = c % (ROW / 16);
            const bool valid = present && position + row < length;
            cp_async_16(base + L::K + stage * KEY_TILE + swizzle_128b(row, chunk),
                        page + (u64)(slot + row) * ROW + chunk * 16, valid);
        }
        if (tid < SCALE_TILE / 16)
            cp_async_16(base + L::SCALES + stage * SCALE_TILE + tid * 16,
                        page + (u64)block_size * ROW + (u64)(slot + 4 * tid) * 4, present);
    };

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < live) load_step(s, s);
        cp_async_commit();  // one group a step, empty or not, so that the waits below count steps
    }

    const int rows[2] = {warp * 16 + (lane >> 2), warp * 16 + (lane >> 2) + 8};  // this thread's key rows
    for (int step = 0; step < live; ++step) {
        const int stage = step % STAGES;
        cp_async_wait<STAGES - 2>();  // this thread's copies of step `step` (and the queries) landed
        fence_proxy_async_shared();   // ... and are visible to the tensor cores' (async) reads
        __syncthreads();              // everyone's; and the stage refilled below is no longer read
        if (step + STAGES - 1 < live) load_step(step + STAGES - 1, (step + STAGES - 1) % STAGES);
        cp_async_commit();

        float acc[N / 2];
        wgmma_e4m3_k128<N>(acc, base + L::K + stage * KEY_TILE, base + L::Q);

        const int position = first_position + step * KEYS;
        const bool present = step_block(step) >= 0;
        float sums[2][QUERIES];
        quad_head_sums<QUERIES>(sums, acc, w, h_i);
        if ((lane & 3) == 0) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int t = position + rows[half];
                const float scale = scale_tiles[stage * KEYS + rows[half]];
#pragma unroll
                for (int j = 0; j < QUERIES; ++j) {
                    const int query = first_query + j;
                    if (query < next_n && t < max_context_len) {
                        const bool visible = present && t < length && t <= length - next_n + query;
                        scores[(u64)(sequence * next_n + query) * max_context_len + t] =
                            visible ? sums[half][j] * scale : DSA_NEG_INF;
                    }
                }
            }
        }
    }
    cp_async_wait<0>();

    // Steps past the context: no key, nothing loaded.
    for (int step = live; step < columns; ++step) {
        const int position = first_position + step * KEYS;
        for (int i = tid; i < KEYS * QUERIES; i += THREADS) {
            const int t = position + i % KEYS, query = first_query + i / KEYS;
            if (query < next_n && t < max_context_len)
                scores[(u64)(sequence * next_n + query) * max_context_len + t] = DSA_NEG_INF;
        }
    }
}

// The dense indexer on the same tiles (what indexer_mma<ELEM_E4M3, .> computes for fp8 queries and
// keys): scores[i, t] for t in [key_start[i], key_end[i]), -inf elsewhere in the row, k's rows 128 bytes
// apart, k_scale [s_kv] or null (1). Grid: x = groups of QUERIES consecutive queries, y = runs of STEPS
// steps of 64 keys; a run's steps outside the union of its queries' ranges are written -inf unread.
// Scales are read from global memory before each product (the copies of the paged kernel's scale
// tiles need a 16-byte-aligned run of 64, which the end of k does not give).
template <int QUERIES>
__device__ __forceinline__ void
indexer_dense_wgmma(const u8* __restrict__ q,            // [s_q, h_i, 128] e4m3
                    const float* __restrict__ weights,   // [s_q, h_i]
                    const u8* __restrict__ k,            // [s_kv, 128] e4m3
                    const float* __restrict__ k_scale,   // [s_kv] or null
                    const int* __restrict__ key_start,   // [s_q]
                    const int* __restrict__ key_end,     // [s_q]
                    float* __restrict__ scores,          // [s_q, s_kv]
                    int s_q, int h_i, int s_kv) {
    using namespace indexer_wgmma;
    using namespace hopper;
    constexpr int N = 64 * QUERIES;
    using L = Layout<QUERIES>;
    extern __shared__ __align__(1024) u8 dynamic_smem[];
    const u32 base = aligned_smem_base(dynamic_smem);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int first_row = blockIdx.x * QUERIES, rows_valid = min(QUERIES, s_q - first_row);
    const int first_position = blockIdx.y * STEPS * KEYS;
    int start[QUERIES], end[QUERIES];
    int lo = 0x7fffffff, hi = 0;  // the union of the block's ranges
#pragma unroll
    for (int j = 0; j < QUERIES; ++j) {
        start[j] = j < rows_valid ? key_start[first_row + j] : 0;
        end[j] = j < rows_valid ? key_end[first_row + j] : 0;
        if (start[j] < end[j]) {
            lo = min(lo, start[j]);
            hi = max(hi, end[j]);
        }
    }
    // The run's steps that meet [lo, hi), and the steps that hold a column of the row at all.
    const int first_step = hi > lo ? min(STEPS, max(0, (lo - first_position) / KEYS)) : STEPS;
    const int last_step = hi > lo ? min(STEPS, max(0, (hi - first_position + KEYS - 1) / KEYS)) : 0;
    const int columns = max(0, min(STEPS, (s_kv - first_position + KEYS - 1) / KEYS));

    load_query_tile<QUERIES>(base + L::Q, q, first_row, rows_valid, h_i);
    float w[N / 4];
    load_head_weights<QUERIES>(w, weights, first_row, rows_valid, h_i);

    auto load_step = [&](int step, int stage) {
        const int position = first_position + step * KEYS;
        for (int c = tid; c < KEYS * (ROW / 16); c += THREADS) {
            const int row = c / (ROW / 16), chunk = c % (ROW / 16);
            const bool valid = position + row < s_kv;
            cp_async_16(base + L::K + stage * KEY_TILE + swizzle_128b(row, chunk),
                        k + (u64)(position + row) * ROW + chunk * 16, valid);
        }
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (first_step + s < last_step) load_step(first_step + s, s);
        cp_async_commit();  // one group a step, empty or not
    }

    const int rows[2] = {warp * 16 + (lane >> 2), warp * 16 + (lane >> 2) + 8};
    for (int step = first_step; step < last_step; ++step) {
        const int stage = (step - first_step) % STAGES;
        cp_async_wait<STAGES - 2>();
        fence_proxy_async_shared();
        __syncthreads();
        if (step + STAGES - 1 < last_step) load_step(step + STAGES - 1, (step - first_step + STAGES - 1) % STAGES);
        cp_async_commit();

        const int position = first_position + step * KEYS;
        float scale[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {  // issued before the product, so that it hides them
            const int t = position + rows[half];
            scale[half] = k_scale != nullptr && t < s_kv ? k_scale[t] : 1.0f;
        }
        float acc[N / 2];
        wgmma_e4m3_k128<N>(acc, base + L::K + stage * KEY_TILE, base + L::Q);
        float sums[2][QUERIES];
        quad_head_sums<QUERIES>(sums, acc, w, h_i);
        if ((lane & 3) == 0) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int t = position + rows[half];
#pragma unroll
                for (int j = 0; j < QUERIES; ++j)
                    if (j < rows_valid && t < s_kv)
                        scores[(u64)(first_row + j) * s_kv + t] =
                            t >= start[j] && t < end[j] ? sums[half][j] * scale[half] : DSA_NEG_INF;
            }
        }
    }
    cp_async_wait<0>();

    // The run's steps outside the union: -inf, nothing loaded.
    for (int step = 0; step < columns; ++step) {
        if (step >= first_step && step < last_step) continue;
        const int position = first_position + step * KEYS;
        for (int i = tid; i < KEYS * QUERIES; i += THREADS) {
            const int t = position + i % KEYS, j = i / KEYS;
            if (j < rows_valid && t < s_kv) scores[(u64)(first_row + j) * s_kv + t] = DSA_NEG_INF;
        }
    }
}

// The launched instances, extern "C" so that the cubin NVRTC builds for sm_90a names them plainly
// (kernels.compile_cubin takes no name expressions); each is one inlined instance of the bodies above.
#define DSA_PAGED_WGMMA_PARAMS                                                                   \
    const u8* __restrict__ q, const float* __restrict__ weights, const u8* __restrict__ cache,     \
        const int* __restrict__ block_table, const int* __restrict__ context_lens,                 \
        float* __restrict__ scores, int num_blocks, int max_blocks, int block_size, int next_n,    \
        int max_context_len, int h_i
#define DSA_PAGED_WGMMA_ARGS \
    q, weights, cache, block_table, context_lens, scores, num_blocks, max_blocks, block_size, next_n, max_context_len, h_i

extern "C" __global__ void __launch_bounds__(indexer_wgmma::THREADS)
indexer_paged_wgmma_q1(DSA_PAGED_WGMMA_PARAMS) { indexer_paged_wgmma<1>(DSA_PAGED_WGMMA_ARGS); }

extern "C" __global__ void __launch_bounds__(indexer_wgmma::THREADS)
indexer_paged_wgmma_q2(DSA_PAGED_WGMMA_PARAMS) { indexer_paged_wgmma<2>(DSA_PAGED_WGMMA_ARGS); }

extern "C" __global__ void __launch_bounds__(indexer_wgmma::THREADS)
indexer_dense_wgmma_q2(const u8* __restrict__ q, const float* __restrict__ weights, const u8* __restrict__ k,
                       const float* __restrict__ k_scale, const int* __restrict__ key_start,
                       const int* __restrict__ key_end, float* __restrict__ scores, int s_q, int h_i, int s_kv) {
    indexer_dense_wgmma<2>(q, weights, k, k_scale, key_start, key_end, scores, s_q, h_i, s_kv);
}
