// Sparse MLA forward (DeepSeek-V3.2 eq. 2, MQA mode): each query attends over the latent rows
// its top-k indices select. Two kernels:
//
// * sparse_mla_fwd_mma<FP8_CACHE>: the fast path for d_qk = 576, d_v = 512, bf16 queries, with
//   either bf16 latent rows or the packed 656-byte FP8 cache. Tensor cores via mma.sync (sm_80+,
//   the shared-memory budget needs sm_90's 227 KB).
// * sparse_mla_fwd_simt: any shape, float32 everywhere (inputs of other dtypes are converted to
//   float32 first). It is the readable version of the same loop, one head per block.
//
// Both follow the spec of dsa_ref.reference.sparse_mla: an index < 0 or >= s_kv, or a slot past
// topk_length, is never read; duplicates count twice; no valid slot -> out 0 and lse -inf.
#include "common.cuh"

using namespace dsa;

namespace sparse_mla {

constexpr int D_QK = 576;                     // 512 latent + 64 RoPE dims per row
constexpr int D_V = 512;                      // V = the first 512 dims of the same row
constexpr int BLOCK_H = 64;                   // heads of one query handled by a block
constexpr int BLOCK_T = 64;                   // gathered rows per tile
constexpr int THREADS = 256;                  // 8 warps
constexpr int ROW_BYTES = D_QK * 2;           // one bf16 row in shared memory: 1152 bytes
constexpr int ROW_CHUNKS = ROW_BYTES / 16;    // 72 chunks of 16 bytes
constexpr int FP8_ROW_BYTES = 656;            // packed cache row: 512 e4m3 | 4 f32 scales | 64 bf16
constexpr int FP8_ROW_CHUNKS = FP8_ROW_BYTES / 16;  // 41
constexpr int P_STRIDE = BLOCK_T * 2 + 16;    // bf16 probabilities, padded by 16 bytes per row

constexpr int TILE_BYTES = BLOCK_T * ROW_BYTES;          // 73728, same for the Q tile (64 heads)
constexpr int RAW_BYTES = BLOCK_T * FP8_ROW_BYTES;       // 41984
constexpr int P_BYTES = BLOCK_H * P_STRIDE;              // 9216

// Shared memory of the fast kernel. bf16 rows: Q + two KV tiles (double buffer) = 216 KB.
// FP8 rows: Q + one bf16 KV tile + one raw 656-byte tile = 184 KB; the raw tile of the next
// step is gathered while the tensor cores work on the current, already converted, tile.
template <bool FP8_CACHE>
struct Smem {
    static constexpr int KV_BUFFERS = FP8_CACHE ? 1 : 2;
    static constexpr int Q_OFFSET = 0;
    static constexpr int KV_OFFSET = Q_OFFSET + TILE_BYTES;
    static constexpr int RAW_OFFSET = KV_OFFSET + KV_BUFFERS * TILE_BYTES;
    static constexpr int P_OFFSET = RAW_OFFSET + (FP8_CACHE ? RAW_BYTES : 0);
    static constexpr int VALID_OFFSET = P_OFFSET + P_BYTES;            // int [2][BLOCK_T]
    static constexpr int MAX_OFFSET = VALID_OFFSET + 2 * BLOCK_T * 4;  // float [2][BLOCK_H]
    static constexpr int SUM_OFFSET = MAX_OFFSET + 2 * BLOCK_H * 4;    // float [2][BLOCK_H]
    static constexpr int TOTAL = SUM_OFFSET + 2 * BLOCK_H * 4;
};

// Byte offset of 16-byte chunk `chunk` of row `row` in a 1152-byte-row tile. Rows are 9 x 128
// bytes, so without a swizzle the 8 rows one ldmatrix reads would all start in the same bank
// (an 8-way conflict). XOR-ing the chunk index with (row % 8) spreads the 8 rows over the 8
// 16-byte bank groups; the XOR stays inside each aligned group of 8 chunks (72 = 9 x 8).
__device__ __forceinline__ int swizzled(int row, int chunk) {
    return row * ROW_BYTES + ((chunk ^ (row & 7)) << 4);
}

// Number of index slots of query `query` that can count: topk, cut by topk_length.
__device__ __forceinline__ int slots_of(int query, int topk, const int* topk_length) {
    int n_slots = topk;
    if (topk_length != nullptr) n_slots = min(n_slots, max(topk_length[query], 0));
    return n_slots;
}

// Gather tile `tile` of the query's selected rows into shared memory, asynchronously. Thread
// `tid` copies chunks tid, tid + 256, ... of the tile; invalid slots are zero-filled without a
// read and flagged so the scores of that column become -inf.
template <int CHUNKS_PER_ROW, int ROW_GLOBAL_BYTES, bool SWIZZLE>
__device__ __forceinline__ void gather_tile(u32 dst, int* valid_flags, const u8* kv, const int* row_indices,
                                            int tile, int n_slots, int s_kv, int tid) {
    for (int c = tid; c < BLOCK_T * CHUNKS_PER_ROW; c += THREADS) {
        int row = c / CHUNKS_PER_ROW;
        int chunk = c - row * CHUNKS_PER_ROW;
        int slot = tile * BLOCK_T + row;
        int index = slot < n_slots ? row_indices[slot] : -1;
        bool valid = index >= 0 && index < s_kv;
        const u8* src = kv + (valid ? (u64)index * ROW_GLOBAL_BYTES + chunk * 16 : 0);
        int offset = SWIZZLE ? swizzled(row, chunk) : row * ROW_GLOBAL_BYTES + chunk * 16;
        cp_async_16(dst + offset, src, valid);
        if (chunk == 0) valid_flags[row] = valid;
    }
}

// Dequantize a raw FP8 tile (656-byte rows) into the bf16 tile. e4m3 times a power-of-two scale
// is exact in bf16 (3 mantissa bits fit in 7; the exponent range is float32's), so the tensor
// cores see exactly the values the spec's unpack_kv_cache_fp8 produces.
__device__ __forceinline__ void dequantize_tile(u8* bf16_tile, const u8* raw, int tid) {
    for (int c = tid; c < BLOCK_T * ROW_CHUNKS; c += THREADS) {
        int row = c / ROW_CHUNKS;
        int chunk = c - row * ROW_CHUNKS;   // output chunk: 8 bf16 values
        const u8* raw_row = raw + row * FP8_ROW_BYTES;
        uint4 packed;
        if (chunk < 64) {  // latent: 8 e4m3 values at bytes [8 chunk, 8 chunk + 8)
            uint2 bytes = *reinterpret_cast<const uint2*>(raw_row + chunk * 8);
            float scale = *reinterpret_cast<const float*>(raw_row + 512 + (chunk / 16) * 4);
            u32 words[2] = {bytes.x, bytes.y};
            u32 out[4];
#pragma unroll
            for (int w = 0; w < 2; ++w) {
                float v0, v1, v2, v3;
                e4m3x2_to_float2((u16)(words[w] & 0xFFFF), v0, v1);
                e4m3x2_to_float2((u16)(words[w] >> 16), v2, v3);
                out[2 * w] = pack_bf16x2(v0 * scale, v1 * scale);
                out[2 * w + 1] = pack_bf16x2(v2 * scale, v3 * scale);
            }
            packed = make_uint4(out[0], out[1], out[2], out[3]);
        } else {  // RoPE dims, stored as bf16 already
            packed = *reinterpret_cast<const uint4*>(raw_row + 528 + (chunk - 64) * 16);
        }
        *reinterpret_cast<uint4*>(bf16_tile + swizzled(row, chunk)) = packed;
    }
}

}  // namespace sparse_mla

// Fast path. Grid: one block per (query, group of 64 heads); block: 8 warps.
//
// Every head of the block attends over the same gathered rows, so one gather (the expensive,
// random-access part) feeds 64 heads. Warp w owns head rows 16 (w % 4) .. +16 and:
//   * for the scores S = Q K^T of a tile, columns (gathered rows) 32 (w / 4) .. +32;
//   * for the output O += P V, value dims 256 (w / 4) .. +256 (its 16 x 256 float accumulator
//     is 128 registers per thread, which is why O is split across two warps).
// The two warps sharing a head group exchange their row maxima through shared memory so that
// both keep the same running max; each keeps a partial row sum, added at the end.
//
// Scores are kept in log2 units (scale_log2 = sm_scale * log2 e) so exp2 is one instruction.
template <bool FP8_CACHE>
__global__ void __launch_bounds__(sparse_mla::THREADS, 1)
sparse_mla_fwd_mma(const u16* __restrict__ q,            // [s_q, h, 576] bf16 bits
                   const u8* __restrict__ kv,            // [s_kv, 576] bf16 or [s_kv, 656] packed fp8
                   const int* __restrict__ indices,      // [s_q, topk]
                   const int* __restrict__ topk_length,  // [s_q] or null
                   const float* __restrict__ attn_sink,  // [h] or null
                   float* __restrict__ out,              // [s_q, h, 512]
                   float* __restrict__ lse,              // [s_q, h]
                   int h, int s_kv, int topk, float scale_log2) {
    using namespace sparse_mla;
    using Layout = Smem<FP8_CACHE>;
    extern __shared__ __align__(128) u8 smem[];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int head_blocks = (h + BLOCK_H - 1) / BLOCK_H;
    const int query = blockIdx.x / head_blocks;
    const int head0 = (blockIdx.x - query * head_blocks) * BLOCK_H;
    const int head_group = warp & 3;   // 16 heads
    const int half = warp >> 2;        // score columns / value dims half
    const int group_id = lane >> 2, lane_in_group = lane & 3;  // mma fragment coordinates

    const u32 q_tile = smem_u32(smem + Layout::Q_OFFSET);
    u8* kv_tiles = smem + Layout::KV_OFFSET;
    int* valid_flags = reinterpret_cast<int*>(smem + Layout::VALID_OFFSET);
    float* red_max = reinterpret_cast<float*>(smem + Layout::MAX_OFFSET);
    float* red_sum = reinterpret_cast<float*>(smem + Layout::SUM_OFFSET);
    u8* p_tile = smem + Layout::P_OFFSET;

    const int* row_indices = indices + (u64)query * topk;
    const int n_slots = slots_of(query, topk, topk_length);
    const int n_tiles = (n_slots + BLOCK_T - 1) / BLOCK_T;

    // Q tile: 64 heads x 576 dims; heads past h are zero rows (their results are not written).
    for (int c = tid; c < BLOCK_H * ROW_CHUNKS; c += THREADS) {
        int row = c / ROW_CHUNKS, chunk = c - row * ROW_CHUNKS;
        bool valid = head0 + row < h;
        const u16* src = q + (valid ? ((u64)query * h + head0 + row) * D_QK + chunk * 8 : 0);
        cp_async_16(q_tile + swizzled(row, chunk), src, valid);
    }
    if constexpr (FP8_CACHE) {
        gather_tile<FP8_ROW_CHUNKS, FP8_ROW_BYTES, false>(smem_u32(smem + Layout::RAW_OFFSET), valid_flags, kv,
                                                          row_indices, 0, n_slots, s_kv, tid);
    } else {
        gather_tile<ROW_CHUNKS, ROW_BYTES, true>(smem_u32(kv_tiles), valid_flags, kv, row_indices, 0, n_slots,
                                                 s_kv, tid);
    }
    cp_async_commit();

    float acc_o[32][4];  // [value-dim tiles of 8][fragment]: rows group_id and group_id + 8
#pragma unroll
    for (int j = 0; j < 32; ++j) acc_o[j][0] = acc_o[j][1] = acc_o[j][2] = acc_o[j][3] = 0.0f;
    float row_max[2] = {DSA_NEG_INF, DSA_NEG_INF};  // running max (log2 units) of rows gid, gid + 8
    float row_sum[2] = {0.0f, 0.0f};                // this thread's share of the softmax denominator

    // ldmatrix lane addressing (see common.cuh): A operands (Q, P) and B operands (K, V).
    const int a_row = head_group * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
    const int a_chunk = lane >> 4;
    const int k_row_base = half * 32 + (lane & 7) + ((lane >> 4) << 3);
    const int k_chunk = (lane >> 3) & 1;
    const int v_row_base = (lane & 7) + (((lane >> 3) & 1) << 3);
    const int v_chunk_base = half * 32 + (lane >> 4);

    for (int tile = 0; tile < n_tiles; ++tile) {
        const int buffer = tile & 1;
        u8* kv_tile;
        if constexpr (FP8_CACHE) {
            cp_async_wait<0>();
            __syncthreads();  // raw tile landed (every thread's copies)
            kv_tile = kv_tiles;
            dequantize_tile(kv_tile, smem + Layout::RAW_OFFSET, tid);
            __syncthreads();  // bf16 tile complete; the raw buffer is free again
            if (tile + 1 < n_tiles)
                gather_tile<FP8_ROW_CHUNKS, FP8_ROW_BYTES, false>(smem_u32(smem + Layout::RAW_OFFSET),
                                                                  valid_flags + ((tile + 1) & 1) * BLOCK_T, kv,
                                                                  row_indices, tile + 1, n_slots, s_kv, tid);
            cp_async_commit();
        } else {
            if (tile + 1 < n_tiles)
                gather_tile<ROW_CHUNKS, ROW_BYTES, true>(smem_u32(kv_tiles + (buffer ^ 1) * TILE_BYTES),
                                                         valid_flags + (buffer ^ 1) * BLOCK_T, kv, row_indices,
                                                         tile + 1, n_slots, s_kv, tid);
            cp_async_commit();
            cp_async_wait<1>();  // everything but the group just issued has landed
            __syncthreads();
            kv_tile = kv_tiles + buffer * TILE_BYTES;
        }
        const u32 kv_base = smem_u32(kv_tile);
        const int* tile_valid = valid_flags + buffer * BLOCK_T;

        // ---- S = Q K^T for 16 heads x 32 gathered rows, reduction over 576 dims.
        float acc_s[4][4];
#pragma unroll
        for (int n = 0; n < 4; ++n) acc_s[n][0] = acc_s[n][1] = acc_s[n][2] = acc_s[n][3] = 0.0f;
#pragma unroll 4
        for (int k = 0; k < D_QK / 16; ++k) {
            u32 a[4];
            ldmatrix_x4(a, q_tile + swizzled(a_row, 2 * k + a_chunk));
#pragma unroll
            for (int pair = 0; pair < 2; ++pair) {
                const int k_row = k_row_base + pair * 16;
                u32 b[4];
                ldmatrix_x4(b, kv_base + swizzled(k_row, 2 * k + k_chunk));
                const u32 b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
                mma_16x8x32bytes<ELEM_BF16>(acc_s[2 * pair], a, b0);
                mma_16x8x32bytes<ELEM_BF16>(acc_s[2 * pair + 1], a, b1);
            }
        }

        // ---- mask invalid slots, then the online-softmax update shared with the partner warp.
        float tile_max[2] = {DSA_NEG_INF, DSA_NEG_INF};
#pragma unroll
        for (int n = 0; n < 4; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int column = half * 32 + n * 8 + lane_in_group * 2 + (e & 1);
                acc_s[n][e] = tile_valid[column] ? acc_s[n][e] * scale_log2 : DSA_NEG_INF;
                tile_max[e >> 1] = fmaxf(tile_max[e >> 1], acc_s[n][e]);
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
            if (lane_in_group == 0) red_max[half * BLOCK_H + head_group * 16 + group_id + 8 * r] = tile_max[r];
        }
        __syncthreads();
        float alpha[2], exp_base[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float partner = red_max[(half ^ 1) * BLOCK_H + head_group * 16 + group_id + 8 * r];
            alpha[r] = rescale_softmax_row(row_max[r], row_sum[r], fmaxf(tile_max[r], partner), exp_base[r]);
        }
        // P = exp2(S - max) as bf16 into shared memory, where the O warps of both halves read it.
#pragma unroll
        for (int n = 0; n < 4; ++n) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float p0 = fast_exp2(acc_s[n][2 * r] - exp_base[r]);
                const float p1 = fast_exp2(acc_s[n][2 * r + 1] - exp_base[r]);
                row_sum[r] += p0 + p1;
                const int row = head_group * 16 + group_id + 8 * r;
                const int column = half * 32 + n * 8 + lane_in_group * 2;
                *reinterpret_cast<u32*>(p_tile + row * P_STRIDE + column * 2) = pack_bf16x2(p0, p1);
            }
        }
#pragma unroll
        for (int j = 0; j < 32; ++j) {
            acc_o[j][0] *= alpha[0]; acc_o[j][1] *= alpha[0];
            acc_o[j][2] *= alpha[1]; acc_o[j][3] *= alpha[1];
        }
        __syncthreads();

        // ---- O += P V for 16 heads x 256 value dims, reduction over the 64 gathered rows.
        const u32 p_base = smem_u32(p_tile);
#pragma unroll
        for (int k = 0; k < BLOCK_T / 16; ++k) {
            u32 a[4];
            ldmatrix_x4(a, p_base + a_row * P_STRIDE + ((2 * k + a_chunk) << 4));
            const int v_row = k * 16 + v_row_base;
#pragma unroll
            for (int pair = 0; pair < 16; ++pair) {
                u32 b[4];
                ldmatrix_x4_trans(b, kv_base + swizzled(v_row, v_chunk_base + 2 * pair));
                const u32 b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
                mma_16x8x32bytes<ELEM_BF16>(acc_o[2 * pair], a, b0);
                mma_16x8x32bytes<ELEM_BF16>(acc_o[2 * pair + 1], a, b1);
            }
        }
        __syncthreads();  // the tile and P may be overwritten from here on
    }
    cp_async_wait<0>();

    // ---- epilogue: denominators of both halves (added in a fixed order), lse, attention sink.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
        row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
        if (lane_in_group == 0) red_sum[half * BLOCK_H + head_group * 16 + group_id + 8 * r] = row_sum[r];
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = head_group * 16 + group_id + 8 * r;
        const int head = head0 + row;
        if (head >= h) continue;
        const float denominator = red_sum[row] + red_sum[BLOCK_H + row];
        float row_lse, factor;
        finish_softmax_row(row_max[r], denominator, attn_sink, head, row_lse, factor);
        float* out_row = out + ((u64)query * h + head) * D_V + half * 256 + lane_in_group * 2;
#pragma unroll
        for (int j = 0; j < 32; ++j) {
            *reinterpret_cast<float2*>(out_row + j * 8) = make_float2(acc_o[j][2 * r] * factor, acc_o[j][2 * r + 1] * factor);
        }
        if (half == 0 && lane_in_group == 0) lse[(u64)query * h + head] = row_lse;
    }
}

// General path, float32. Grid: one block per (query, head); block: 128 threads.
// The selected slots are processed in chunks of 128: thread t computes the logit of slot t of
// the chunk (a whole dot product), the block agrees on the running max, and then every thread
// accumulates its own value dims d = t, t + 128, ... over the chunk's slots, reading each
// gathered row coalesced across the block. The accumulator lives in shared memory because d_v
// is only known at run time.
constexpr int SIMT_THREADS = 128;

__device__ __forceinline__ float block_reduce(float value, float* scratch, bool take_max) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float other = __shfl_xor_sync(0xffffffffu, value, offset);
        value = take_max ? fmaxf(value, other) : value + other;
    }
    __syncthreads();  // scratch may still be read from the previous reduction
    if (lane == 0) scratch[warp] = value;
    __syncthreads();
    float result = scratch[0];
    for (int w = 1; w < SIMT_THREADS / 32; ++w) result = take_max ? fmaxf(result, scratch[w]) : result + scratch[w];
    return result;
}

extern "C" __global__ void __launch_bounds__(SIMT_THREADS, 4)
sparse_mla_fwd_simt(const float* __restrict__ q,            // [s_q, h, d_qk]
                    const float* __restrict__ kv,           // [s_kv, d_qk]
                    const int* __restrict__ indices,        // [s_q, topk]
                    const int* __restrict__ topk_length,    // [s_q] or null
                    const float* __restrict__ attn_sink,    // [h] or null
                    float* __restrict__ out,                // [s_q, h, d_v]
                    float* __restrict__ lse,                // [s_q, h]
                    int h, int s_kv, int topk, int d_qk, int d_v, float sm_scale) {
    extern __shared__ float dynamic_smem[];
    float* q_row = dynamic_smem;          // [d_qk]
    float* acc = dynamic_smem + d_qk;     // [d_v]
    __shared__ float probability[SIMT_THREADS];
    __shared__ int row_of_slot[SIMT_THREADS];
    __shared__ float scratch[SIMT_THREADS / 32];

    const int tid = threadIdx.x;
    const int query = blockIdx.x / h, head = blockIdx.x - query * h;
    const u64 query_head = (u64)query * h + head;
    for (int d = tid; d < d_qk; d += SIMT_THREADS) q_row[d] = q[query_head * d_qk + d];
    for (int d = tid; d < d_v; d += SIMT_THREADS) acc[d] = 0.0f;
    const int* row_indices = indices + (u64)query * topk;
    int n_slots = topk;
    if (topk_length != nullptr) n_slots = min(n_slots, max(topk_length[query], 0));
    float running_max = DSA_NEG_INF, denominator = 0.0f;
    __syncthreads();

    for (int chunk = 0; chunk < n_slots; chunk += SIMT_THREADS) {
        const int slot = chunk + tid;
        const int index = slot < n_slots ? row_indices[slot] : -1;
        const bool valid = index >= 0 && index < s_kv;
        float logit = DSA_NEG_INF;
        if (valid) {
            const float* kv_row = kv + (u64)index * d_qk;
            float dot = 0.0f;
            for (int d = 0; d < d_qk; ++d) dot = fmaf(q_row[d], kv_row[d], dot);
            logit = dot * sm_scale;
        }
        const float new_max = fmaxf(running_max, block_reduce(logit, scratch, true));
        const float base = new_max == DSA_NEG_INF ? 0.0f : new_max;
        const float alpha = expf(running_max - base);
        const float p = valid ? expf(logit - base) : 0.0f;
        denominator = denominator * alpha + block_reduce(p, scratch, false);
        running_max = new_max;
        probability[tid] = p;
        row_of_slot[tid] = valid ? index : -1;
        __syncthreads();
        const int chunk_slots = min(SIMT_THREADS, n_slots - chunk);
        for (int d = tid; d < d_v; d += SIMT_THREADS) {
            float value = acc[d] * alpha;
            for (int s = 0; s < chunk_slots; ++s) {
                if (row_of_slot[s] >= 0) value = fmaf(probability[s], kv[(u64)row_of_slot[s] * d_qk + d], value);
            }
            acc[d] = value;
        }
        __syncthreads();
    }

    float row_lse = DSA_NEG_INF, factor = 0.0f;
    if (denominator > 0.0f) {
        row_lse = running_max + logf(denominator);
        factor = 1.0f / denominator;
        if (attn_sink != nullptr) factor *= 1.0f / (1.0f + expf(attn_sink[head] - row_lse));
    }
    for (int d = tid; d < d_v; d += SIMT_THREADS) out[query_head * d_v + d] = acc[d] * factor;
    if (tid == 0) lse[query_head] = row_lse;
}
