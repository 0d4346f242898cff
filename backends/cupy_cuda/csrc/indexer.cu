// Lightning indexer (DeepSeek-V3.2 eq. 1):
//   scores[i, j] = k_scale[j] * sum_h w[i, h] * ReLU(q[i, h] . k[j])   for key_start[i] <= j < key_end[i]
//   scores[i, j] = -inf                                                 elsewhere
//
// For one query this is a small matrix product (H_I heads x d_I) times (d_I x keys) followed by
// a weighted ReLU-sum over the heads, so the whole op is a GEMM with M = s_q * H_I whose epilogue
// reduces groups of H_I rows. Two kernels:
//
// * indexer_mma<ELEM, M_TILES>: tensor cores (mma.sync) for bf16, f16 and fp8 e4m3 (sm_89+), any
//   H_I <= 16 * M_TILES <= 64 and d_I a multiple of 16 (bf16, f16) or 32 (fp8).
//
// fp8: Hopper's mma.sync has no native fp8 path (fp8 tensor-core rate needs wgmma), so keys stay
// fp8 in shared memory (half the bytes) and each B fragment is widened to f16 in registers
// (exact). An fp8 B fragment of 32 dims holds dims 4t..4t+3 and 16+4t..16+4t+3 in thread t
// (t = lane % 4); widened, they feed two f16 m16n8k16 products whose "k slots" 2t, 2t+1, 2t+8,
// 2t+9 hold dims 4t, 4t+1, 4t+2, 4t+3. The queries are widened to f16 on the host with their
// dims permuted the same way (see QUERY_PERMUTATION in kernels.py), so that A and B agree on
// which dim sits in which slot: a dot product does not care about the order of its terms.
// * indexer_paged_mma<M_TILES>: the same tiles for a decode step over a paged fp8 key cache
//   (DeepGEMM's layout: per block, block_size keys of d_I e4m3 bytes, then their float32 scales),
//   one launch for the batch: block x = two queries of one sequence, the keys read out
//   of their pages in place, query j of sequence b seeing positions [0, context_lens[b] - next_n + j].
// * indexer_simt: float32, any shape (other dtypes are converted to float32 first).
//
// The two tensor-core kernels share one body (indexer_mma_tiles) and differ only in where a key
// row, its scale and a query's visible range come from: DenseKeys and PagedKeys below.
#include "common.cuh"

using namespace dsa;

namespace indexer {
constexpr int BLOCK_N = 128;   // keys per tile
constexpr int QUERIES = 2;     // queries per block
constexpr int THREADS = 256;   // 8 warps = 2 queries x 4 slices of 32 keys
}  // namespace indexer

// Grid: x = groups of 2 queries, y = runs of `tiles_per_block` key tiles of 128 keys.
//
// Warp w owns query (w / 4) of the block and keys 32 (w % 4) .. +32 of the current tile, for ALL
// heads of that query: its accumulator is M_TILES x 4 mma tiles (heads x keys), so the sum over
// heads never leaves the warp. In an m16n8 accumulator a thread holds rows (heads) lane/4 and
// lane/4 + 8 of each tile, for columns (keys) 2 (lane % 4) + {0, 1}; the head sum is the
// thread's own rows followed by a butterfly over the lanes that share lane % 4 (xor 4, 8, 16).
//
// Shared memory holds the block's queries (loaded once) and a double-buffered key tile; rows are
// padded by 16 bytes so that the 8 rows one ldmatrix reads fall in 8 different bank groups
// (row_bytes / 16 is even, so (row_bytes + 16) / 16 is odd).
//
// A key source answers, for the block's queries and for key positions: which query rows the block
// holds, how many score columns there are, each query's visible range, where a key's row starts
// (null: not a key, read as zeros), and the factor its score is multiplied by (0 marks no key: -inf).
struct DenseKeys {  // keys [s_kv, d_i], ranges per query, optional per-key scales
    const u8* k; const float* k_scale; const int* key_start; const int* key_end; int s_q, s_kv, row_bytes;
    __device__ int first_row() const { return blockIdx.x * indexer::QUERIES; }
    __device__ bool row_valid(int row) const { return row < s_q; }
    __device__ int columns() const { return s_kv; }
    __device__ int start(int row) const { return key_start[row]; }
    __device__ int end(int row) const { return key_end[row]; }
    __device__ const u8* key_row(int key) const { return key < s_kv ? k + (u64)key * row_bytes : nullptr; }
    __device__ bool present(int) const { return true; }
    __device__ float scale(int key) const { return k_scale != nullptr ? k_scale[key] : 1.0f; }
};

struct PagedKeys {  // up to QUERIES queries of one sequence of a paged fp8 cache [num_blocks, block_size * (d_i + 4)]
    const u8* cache; const int* block_table; const int* context_lens;
    int num_blocks, max_blocks, block_size, next_n, max_context_len, d_i;
    // Block x = (sequence, part): the sequence's next_n queries in parts of QUERIES.
    __device__ int parts() const { return (next_n + indexer::QUERIES - 1) / indexer::QUERIES; }
    __device__ int sequence() const { return blockIdx.x / parts(); }
    __device__ int first_row() const { return sequence() * next_n + (blockIdx.x % parts()) * indexer::QUERIES; }
    __device__ bool row_valid(int row) const { return row - sequence() * next_n < next_n; }
    __device__ int columns() const { return max_context_len; }
    __device__ int length() const { return context_lens[sequence()]; }
    __device__ int start(int) const { return 0; }
    __device__ int end(int row) const { return length() - next_n + (row - sequence() * next_n) + 1; }
    __device__ const u8* page(int key) const {  // null where the position holds no key of the cache
        const int logical = key / block_size;
        if (key >= length() || logical >= max_blocks) return nullptr;
        const int block = block_table[(u64)sequence() * max_blocks + logical];
        return block >= 0 && block < num_blocks ? cache + (u64)block * block_size * (d_i + 4) : nullptr;
    }
    __device__ const u8* key_row(int key) const {
        const u8* p = page(key);
        return p != nullptr ? p + (u64)(key % block_size) * d_i : nullptr;
    }
    __device__ bool present(int key) const { return page(key) != nullptr; }
    __device__ float scale(int key) const {
        return reinterpret_cast<const float*>(page(key) + (u64)block_size * d_i)[key % block_size];
    }
};

template <int ELEM, int M_TILES, typename Keys>
__device__ __forceinline__ void
indexer_mma_tiles(const Keys& keys,
                  const u8* __restrict__ q,             // [rows, h_i, d_i] elements of 1 or 2 bytes
                  const float* __restrict__ weights,    // [rows, h_i]
                  float* __restrict__ scores,           // [rows, keys.columns()]
                  int h_i, int d_i, int tiles_per_block) {
    using namespace indexer;
    constexpr int HEAD_ROWS = M_TILES * 16;
    constexpr int K_BYTES = ELEM == ELEM_E4M3 ? 1 : 2;   // queries are always 2 bytes (fp8 ones widened)
    extern __shared__ __align__(128) u8 smem[];
    const int row_bytes = d_i * K_BYTES;                  // one key row
    const int q_row_bytes = d_i * 2;                      // one query head row
    const int stride = row_bytes + 16, q_stride = q_row_bytes + 16;
    const int chunks = row_bytes / 16, q_chunks = q_row_bytes / 16;
    u8* q_tile = smem;                                            // [QUERIES * HEAD_ROWS][q_stride]
    u8* k_tiles = q_tile + QUERIES * HEAD_ROWS * q_stride;        // [2][BLOCK_N][stride]
    float* w_tile = reinterpret_cast<float*>(k_tiles + 2 * BLOCK_N * stride);  // [QUERIES][HEAD_ROWS]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int group_id = lane >> 2, lane_in_group = lane & 3;
    const int query_in_block = warp >> 2, key_slice = warp & 3;
    const int query0 = keys.first_row();
    const int query = query0 + query_in_block;
    const int s_kv = keys.columns();

    // Keys any query of the block can see; tiles outside get -inf without any loads.
    int block_start = 0x7fffffff, block_end = 0;
    for (int i = 0; i < QUERIES; ++i) {
        if (keys.row_valid(query0 + i)) {
            block_start = min(block_start, keys.start(query0 + i));
            block_end = max(block_end, keys.end(query0 + i));
        }
    }
    const int n_tiles = (s_kv + BLOCK_N - 1) / BLOCK_N;
    const int first_tile = blockIdx.y * tiles_per_block;
    const int last_tile = min(first_tile + tiles_per_block, n_tiles);
    auto tile_active = [&](int tile) { return tile * BLOCK_N < block_end && (tile + 1) * BLOCK_N > block_start; };
    auto load_keys = [&](int tile, int buffer) {
        const u32 dst = smem_u32(k_tiles + buffer * BLOCK_N * stride);
        for (int c = tid; c < BLOCK_N * chunks; c += THREADS) {
            const int row = c / chunks, chunk = c - row * chunks;
            const u8* key_row = keys.key_row(tile * BLOCK_N + row);
            const bool valid = key_row != nullptr;
            cp_async_16(dst + row * stride + chunk * 16, valid ? key_row + chunk * 16 : q, valid);
        }
    };

    // Queries (rows past h_i or past s_q are zero) and their head weights.
    for (int c = tid; c < QUERIES * HEAD_ROWS * q_chunks; c += THREADS) {
        const int row = c / q_chunks, chunk = c - row * q_chunks;
        const int i = row / HEAD_ROWS, head = row - i * HEAD_ROWS;
        const bool valid = keys.row_valid(query0 + i) && head < h_i;
        const u8* src = q + (valid ? ((u64)(query0 + i) * h_i + head) * q_row_bytes + chunk * 16 : 0);
        cp_async_16(smem_u32(q_tile + row * q_stride + chunk * 16), src, valid);
    }
    for (int r = tid; r < QUERIES * HEAD_ROWS; r += THREADS) {
        const int i = r / HEAD_ROWS, head = r - i * HEAD_ROWS;
        w_tile[r] = (keys.row_valid(query0 + i) && head < h_i) ? weights[(u64)(query0 + i) * h_i + head] : 0.0f;
    }
    if (first_tile < last_tile && tile_active(first_tile)) load_keys(first_tile, 0);
    cp_async_commit();

    const bool my_row_valid = keys.row_valid(query);
    const int my_start = my_row_valid ? keys.start(query) : 0;
    const int my_end = my_row_valid ? keys.end(query) : 0;
    // ldmatrix lane addressing: A = this warp's query rows, B = this warp's 32 keys.
    const int a_row = query_in_block * HEAD_ROWS + (lane & 7) + (((lane >> 3) & 1) << 3);
    const int a_chunk = lane >> 4;
    const int b_row = key_slice * 32 + (lane & 7) + ((lane >> 4) << 3);
    const int b_chunk = (lane >> 3) & 1;

    for (int tile = first_tile; tile < last_tile; ++tile) {
        const int buffer = (tile - first_tile) & 1;
        if (tile + 1 < last_tile && tile_active(tile + 1)) load_keys(tile + 1, buffer ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();

        const int key_base = tile * BLOCK_N + key_slice * 32;
        float my_score = DSA_NEG_INF;  // lane writes key key_base + 8 (g / 2) + 2 (lane % 4) + g % 2, g = lane / 4
        if (tile_active(tile)) {
            float acc[M_TILES][4][4];
#pragma unroll
            for (int m = 0; m < M_TILES; ++m)
#pragma unroll
                for (int n = 0; n < 4; ++n) acc[m][n][0] = acc[m][n][1] = acc[m][n][2] = acc[m][n][3] = 0.0f;
            const u32 q_base = smem_u32(q_tile);
            const u32 k_base = smem_u32(k_tiles + buffer * BLOCK_N * stride);
            // One step = 32 bytes of key row: 16 dims of bf16/f16 keys, 32 dims of fp8 keys.
#pragma unroll 1
            for (int step = 0; step < row_bytes / 32; ++step) {
                u32 b[2][4];
#pragma unroll
                for (int pair = 0; pair < 2; ++pair)
                    ldmatrix_x4(b[pair], k_base + (b_row + pair * 16) * stride + ((2 * step + b_chunk) << 4));
                if constexpr (ELEM != ELEM_E4M3) {
#pragma unroll
                    for (int m = 0; m < M_TILES; ++m) {
                        u32 a[4];
                        ldmatrix_x4(a, q_base + (a_row + m * 16) * q_stride + ((2 * step + a_chunk) << 4));
#pragma unroll
                        for (int pair = 0; pair < 2; ++pair) {
                            const u32 b0[2] = {b[pair][0], b[pair][1]}, b1[2] = {b[pair][2], b[pair][3]};
                            mma_16x8x32bytes<ELEM>(acc[m][2 * pair], a, b0);
                            mma_16x8x32bytes<ELEM>(acc[m][2 * pair + 1], a, b1);
                        }
                    }
                } else {
                    // b[pair][0 | 1] = key tile 2 pair, dims 0-15 | 16-31; b[pair][2 | 3] = key tile 2 pair + 1.
                    u32 wide[2][4][2];  // [pair][register][dims half of the 32]
#pragma unroll
                    for (int pair = 0; pair < 2; ++pair)
#pragma unroll
                        for (int r = 0; r < 4; ++r) e4m3x4_to_f16x2x2(b[pair][r], wide[pair][r][0], wide[pair][r][1]);
#pragma unroll
                    for (int m = 0; m < M_TILES; ++m) {
#pragma unroll
                        for (int dims = 0; dims < 2; ++dims) {  // the two f16 k16 products of this step
                            u32 a[4];
                            ldmatrix_x4(a, q_base + (a_row + m * 16) * q_stride + ((4 * step + 2 * dims + a_chunk) << 4));
#pragma unroll
                            for (int pair = 0; pair < 2; ++pair) {
                                const u32 b0[2] = {wide[pair][dims][0], wide[pair][dims][1]};
                                const u32 b1[2] = {wide[pair][2 + dims][0], wide[pair][2 + dims][1]};
                                mma_16x8x32bytes<ELEM_F16>(acc[m][2 * pair], a, b0);
                                mma_16x8x32bytes<ELEM_F16>(acc[m][2 * pair + 1], a, b1);
                            }
                        }
                    }
                }
            }
            // Weighted ReLU-sum over heads: own rows first, then across the 8 lanes with equal lane % 4.
            float head_sum[8];  // [n tile * 2 + column]
#pragma unroll
            for (int v = 0; v < 8; ++v) head_sum[v] = 0.0f;
#pragma unroll
            for (int m = 0; m < M_TILES; ++m) {
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int head = m * 16 + group_id + 8 * r;
                    if (head >= h_i) continue;  // padded rows add nothing, not even 0 * inf
                    const float w = w_tile[query_in_block * HEAD_ROWS + head];
#pragma unroll
                    for (int n = 0; n < 4; ++n) {
                        head_sum[2 * n] += w * relu_keep_nan(acc[m][n][2 * r]);
                        head_sum[2 * n + 1] += w * relu_keep_nan(acc[m][n][2 * r + 1]);
                    }
                }
            }
#pragma unroll
            for (int v = 0; v < 8; ++v) {
                head_sum[v] += __shfl_xor_sync(0xffffffffu, head_sum[v], 4);
                head_sum[v] += __shfl_xor_sync(0xffffffffu, head_sum[v], 8);
                head_sum[v] += __shfl_xor_sync(0xffffffffu, head_sum[v], 16);
            }
#pragma unroll
            for (int v = 0; v < 8; ++v)
                if (v == group_id) my_score = head_sum[v];  // a select chain, no dynamic register index
        }
        const int key = key_base + 8 * (group_id >> 1) + 2 * lane_in_group + (group_id & 1);
        if (my_row_valid && key < s_kv) {
            float value = DSA_NEG_INF;
            if (key >= my_start && key < my_end && keys.present(key)) value = my_score * keys.scale(key);
            scores[(u64)query * s_kv + key] = value;
        }
        __syncthreads();  // the key buffer just read is refilled next iteration
    }
    cp_async_wait<0>();
}

template <int ELEM, int M_TILES>
__global__ void __launch_bounds__(indexer::THREADS, 2)
indexer_mma(const u8* __restrict__ q,             // [s_q, h_i, d_i] elements of 1 or 2 bytes
            const float* __restrict__ weights,    // [s_q, h_i]
            const u8* __restrict__ k,             // [s_kv, d_i]
            const float* __restrict__ k_scale,    // [s_kv] or null
            const int* __restrict__ key_start,    // [s_q]
            const int* __restrict__ key_end,      // [s_q]
            float* __restrict__ scores,           // [s_q, s_kv]
            int s_q, int h_i, int s_kv, int d_i, int tiles_per_block) {
    const int row_bytes = d_i * (ELEM == ELEM_E4M3 ? 1 : 2);
    const DenseKeys keys{k, k_scale, key_start, key_end, s_q, s_kv, row_bytes};
    indexer_mma_tiles<ELEM, M_TILES>(keys, q, weights, scores, h_i, d_i, tiles_per_block);
}

// Grid: x = sequences x ceil(next_n / QUERIES) parts, y = runs of `tiles_per_block` tiles of 128
// positions of max_context_len. q: the f16-widened e4m3 queries, as for indexer_mma<ELEM_E4M3, .>.
template <int M_TILES>
__global__ void __launch_bounds__(indexer::THREADS, 2)
indexer_paged_mma(const u8* __restrict__ q,              // [b * next_n, h_i, d_i] f16 (widened e4m3)
                  const float* __restrict__ weights,     // [b * next_n, h_i]
                  const u8* __restrict__ cache,          // [num_blocks, block_size * (d_i + 4)]
                  const int* __restrict__ block_table,   // [b, max_blocks]
                  const int* __restrict__ context_lens,  // [b], in [next_n, max_blocks * block_size]
                  float* __restrict__ scores,            // [b * next_n, max_context_len]
                  int num_blocks, int max_blocks, int block_size, int next_n, int max_context_len,
                  int h_i, int d_i, int tiles_per_block) {
    const PagedKeys keys{cache, block_table, context_lens, num_blocks, max_blocks, block_size, next_n,
                         max_context_len, d_i};
    indexer_mma_tiles<ELEM_E4M3, M_TILES>(keys, q, weights, scores, h_i, d_i, tiles_per_block);
}

// float32 path. Grid: x = queries, y = blocks of 128 keys; one thread per key. The query's
// heads and weights sit in shared memory (every thread reads the same element: a broadcast).
constexpr int INDEXER_SIMT_THREADS = 128;

extern "C" __global__ void __launch_bounds__(INDEXER_SIMT_THREADS, 4)
indexer_simt(const float* __restrict__ q, const float* __restrict__ weights, const float* __restrict__ k,
             const float* __restrict__ k_scale, const int* __restrict__ key_start, const int* __restrict__ key_end,
             float* __restrict__ scores, int h_i, int s_kv, int d_i) {
    extern __shared__ float query_smem[];  // [h_i * d_i] query, then [h_i] weights
    float* w_smem = query_smem + h_i * d_i;
    const int query = blockIdx.x;
    for (int e = threadIdx.x; e < h_i * d_i; e += INDEXER_SIMT_THREADS) query_smem[e] = q[(u64)query * h_i * d_i + e];
    for (int e = threadIdx.x; e < h_i; e += INDEXER_SIMT_THREADS) w_smem[e] = weights[(u64)query * h_i + e];
    __syncthreads();
    const int key = blockIdx.y * INDEXER_SIMT_THREADS + threadIdx.x;
    if (key >= s_kv) return;
    float score = DSA_NEG_INF;
    if (key >= key_start[query] && key < key_end[query]) {
        const float* key_row = k + (u64)key * d_i;
        score = 0.0f;
        for (int head = 0; head < h_i; ++head) {
            float dot = 0.0f;
            for (int d = 0; d < d_i; ++d) dot = fmaf(query_smem[head * d_i + d], key_row[d], dot);
            score += w_smem[head] * relu_keep_nan(dot);
        }
        if (k_scale != nullptr) score *= k_scale[key];
    }
    scores[(u64)query * s_kv + key] = score;
}
