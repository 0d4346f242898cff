// Sparse MLA backward on tensor cores (mma.sync, bf16 m16n8k16) for the V3.2 shape: bf16 q and
// latent rows, d_qk = 576, d_v = 512. The spec is dsa_ref.reference.sparse_mla_backward; the
// float32 kernels of sparse_mla_backward.cu compute the same function for every other input.
//
//     P_t  = exp2(S_t scale_log2 - lse log2 e)          S_t = q . K_t  (0 at invalid slots, never read)
//     dl_t = P_t (f (dout . V_t - D) + d_lse)            D = sum(dout * out), f = sink share (host side)
//     dq   = sm_scale sum_t dl_t K_t
//     dkv[idx_t] += sm_scale dl_t q + [:512] f P_t dout  (summed over the heads of the block)
//
// Grid: one block per (query, group of 64 heads; heads past h are zero rows, masked); 16 warps.
// The block keeps Q (bf16, cp.async) and dout (float32 in global memory, rounded once to bf16) of
// its 64 heads in shared memory and walks the query's slots in tiles of 32 gathered rows, double
// buffered with cp.async exactly as the forward (sparse_mla.cu) gathers them. Per tile:
//
//   1. S = Q K^T and dP = dout V^T (64 heads x 32 slots; reduction over 576 / 512 dims). Warp w
//      owns head rows 16 (w % 4) .. +16 and slot columns 8 (w / 4) .. +8. From its fragments it
//      forms sm_scale dl_t and f P_t and stages both as bf16 in shared memory ([heads][slots]).
//   2. dq += (sm_scale dl) K (64 x 576, reduction over the 32 slots). Warp w owns heads
//      16 (w % 4) .. +16 and dims 144 (w / 4) .. +144: 72 fp32 accumulators per thread that live
//      across the whole loop. (With 8 warps it would be 144 registers, more than a thread can hold
//      beside the rest: this is why the block has 16 warps and not the forward's 8.)
//   3. The row gradients of the tile, (sm_scale dl)^T Q + [:512] (f P)^T dout (32 x 576, reduction
//      over the 64 heads), from the same staged tiles read transposed (ldmatrix .trans). Warp w owns
//      slots 16 (w % 2) .. +16 and dims 72 (w / 2) .. +72, one 8-dim column at a time, and adds each
//      finished fragment to the float32 dkv with atomicAdd (a reduction: no value comes back).
//      Invalid slots are never added; a row that no valid slot reads is never touched.
//
// Rounding: dout, P and dl go to bf16 before their products (as FlashAttention's backward does);
// every product accumulates in float32.
//
// Deterministic mode (sparse_mla_bwd_mma_deterministic): the same kernel, except that phase 3
// stores each finished fragment of a valid slot to a float32 contribution buffer
// [queries of the chunk, head blocks, topk, 576] instead of adding it, and sparse_mla_bwd_mma_row_sum
// then sums, for each kv row, the contributions of the (query, slot) pairs that read it in the
// order the host fixed (one sort of unique keys for many chunks), and adds the sum to dkv with a plain
// read-modify-write. Exactly one block writes a row of dkv per launch and launches run in stream
// order, so two runs add the same numbers in the same order: no float atomic touches dkv. A buffer
// entry of an invalid slot is never written and never read. The buffer takes 2.3 KB per
// (query, head block, slot), so the host runs the queries in chunks bounded by a byte budget.
#include "common.cuh"

using namespace dsa;

namespace mla_bwd_mma {

constexpr int D_QK = 576;
constexpr int D_V = 512;
constexpr int BLOCK_H = 64;                     // heads of one query per block
constexpr int BLOCK_T = 32;                     // gathered rows per tile
constexpr int THREADS = 512;                    // 16 warps
constexpr int ROW_SUM_THREADS = D_QK / 4;       // sparse_mla_bwd_mma_row_sum: one float4 of a row each
constexpr int ROW_BYTES = D_QK * 2;             // bf16 row of Q / K: 1152 bytes
constexpr int ROW_CHUNKS = ROW_BYTES / 16;      // 72
constexpr int DO_ROW_BYTES = D_V * 2;           // bf16 row of dout: 1024 bytes
constexpr int DO_ROW_CHUNKS = DO_ROW_BYTES / 16;  // 64
constexpr int STAGE_STRIDE = BLOCK_T * 2 + 16;  // bf16 [heads][slots] rows, padded: conflict-free ldmatrix

constexpr int Q_BYTES = BLOCK_H * ROW_BYTES;          // 73728
constexpr int DO_BYTES = BLOCK_H * DO_ROW_BYTES;      // 65536
constexpr int KV_TILE_BYTES = BLOCK_T * ROW_BYTES;    // 36864
constexpr int STAGE_BYTES = BLOCK_H * STAGE_STRIDE;   // 5120

struct Smem {
    static constexpr int Q_OFFSET = 0;
    static constexpr int DO_OFFSET = Q_OFFSET + Q_BYTES;
    static constexpr int KV_OFFSET = DO_OFFSET + DO_BYTES;             // two tiles (double buffer)
    static constexpr int DL_OFFSET = KV_OFFSET + 2 * KV_TILE_BYTES;    // bf16 sm_scale dl  [64][32]
    static constexpr int FP_OFFSET = DL_OFFSET + STAGE_BYTES;          // bf16 f P          [64][32]
    static constexpr int ROWS_OFFSET = FP_OFFSET + STAGE_BYTES;        // int [2][32]: kv row or -1
    static constexpr int HEAD_OFFSET = ROWS_OFFSET + 2 * BLOCK_T * 4;  // float [4][64]: lse log2 e, D, f, d_lse
    static constexpr int TOTAL = HEAD_OFFSET + 4 * BLOCK_H * 4;        // 224512
};

// The forward's swizzle (sparse_mla.cu): chunk XOR (row % 8) inside each group of 8 chunks, so the
// 8 rows one ldmatrix reads land in 8 different bank groups. Used for Q, K (1152-byte rows) and
// dout (1024-byte rows).
template <int ROW_STRIDE>
__device__ __forceinline__ int swizzled(int row, int chunk) {
    return row * ROW_STRIDE + ((chunk ^ (row & 7)) << 4);
}

__device__ __forceinline__ int slots_of(int query, int topk, const int* topk_length) {
    int n_slots = topk;
    if (topk_length != nullptr) n_slots = min(n_slots, max(topk_length[query], 0));
    return n_slots;
}

// Gather tile `tile` of the query's rows into `dst` (asynchronous); invalid slots are zero-filled
// without a read, and `tile_rows[r]` is the kv row of tile row r, or -1.
__device__ __forceinline__ void gather_tile(u32 dst, int* tile_rows, const u16* kv, const int* row_indices,
                                            int tile, int n_slots, int s_kv, int tid) {
    for (int c = tid; c < BLOCK_T * ROW_CHUNKS; c += THREADS) {
        const int row = c / ROW_CHUNKS;
        const int chunk = c - row * ROW_CHUNKS;
        const int slot = tile * BLOCK_T + row;
        const int index = slot < n_slots ? row_indices[slot] : -1;
        const bool valid = index >= 0 && index < s_kv;
        const u16* src = kv + (valid ? (u64)index * D_QK + chunk * 8 : 0);
        cp_async_16(dst + swizzled<ROW_BYTES>(row, chunk), src, valid);
        if (chunk == 0) tile_rows[row] = valid ? index : -1;
    }
}

// The whole backward of one (query, head block); ROW_STORES selects what phase 3 does with the row
// gradients: add them to dkv (atomics) or store them to `contributions` (deterministic mode).
template <bool ROW_STORES>
__device__ __forceinline__ void backward_block(const u16* __restrict__ q, const u16* __restrict__ kv,
                                               const int* __restrict__ indices, const int* __restrict__ topk_length,
                                               const float* __restrict__ lse, const float* __restrict__ d_out,
                                               const float* __restrict__ delta, const float* __restrict__ share,
                                               const float* __restrict__ d_lse, float* __restrict__ dq,
                                               float* __restrict__ dkv, float* __restrict__ contributions, int h,
                                               int s_kv, int topk, float sm_scale, float scale_log2) {
    extern __shared__ __align__(128) u8 smem[];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int head_blocks = (h + BLOCK_H - 1) / BLOCK_H;
    const int query = blockIdx.x / head_blocks;
    const int head0 = (blockIdx.x - query * head_blocks) * BLOCK_H;
    const int group_id = lane >> 2, lane_in_group = lane & 3;  // mma fragment coordinates

    const u32 q_tile = smem_u32(smem + Smem::Q_OFFSET);
    const u32 do_tile = smem_u32(smem + Smem::DO_OFFSET);
    u8* kv_tiles = smem + Smem::KV_OFFSET;
    u8* dl_stage = smem + Smem::DL_OFFSET;
    u8* fp_stage = smem + Smem::FP_OFFSET;
    int* rows_of_tile = reinterpret_cast<int*>(smem + Smem::ROWS_OFFSET);
    float* head_lse_log2 = reinterpret_cast<float*>(smem + Smem::HEAD_OFFSET);
    float* head_delta = head_lse_log2 + BLOCK_H;
    float* head_share = head_delta + BLOCK_H;
    float* head_d_lse = head_share + BLOCK_H;

    const int* row_indices = indices + (u64)query * topk;
    const int n_slots = slots_of(query, topk, topk_length);
    const int n_tiles = (n_slots + BLOCK_T - 1) / BLOCK_T;

    // Q rows past h are zero; their lse is +inf so that P = exp2(-inf) = 0 there, and D = f = d_lse = 0:
    // a padded head contributes nothing anywhere.
    for (int c = tid; c < BLOCK_H * ROW_CHUNKS; c += THREADS) {
        const int row = c / ROW_CHUNKS, chunk = c - row * ROW_CHUNKS;
        const bool valid = head0 + row < h;
        const u16* src = q + (valid ? ((u64)query * h + head0 + row) * D_QK + chunk * 8 : 0);
        cp_async_16(q_tile + swizzled<ROW_BYTES>(row, chunk), src, valid);
    }
    if (n_tiles > 0) gather_tile(smem_u32(kv_tiles), rows_of_tile, kv, row_indices, 0, n_slots, s_kv, tid);
    cp_async_commit();
    for (int c = tid; c < BLOCK_H * DO_ROW_CHUNKS; c += THREADS) {
        const int row = c / DO_ROW_CHUNKS, chunk = c - row * DO_ROW_CHUNKS;
        uint4 packed = make_uint4(0u, 0u, 0u, 0u);
        if (head0 + row < h) {
            const float4* src = reinterpret_cast<const float4*>(d_out + ((u64)query * h + head0 + row) * D_V + chunk * 8);
            const float4 low = src[0], high = src[1];
            packed = make_uint4(pack_bf16x2(low.x, low.y), pack_bf16x2(low.z, low.w),
                                pack_bf16x2(high.x, high.y), pack_bf16x2(high.z, high.w));
        }
        *reinterpret_cast<uint4*>(smem + Smem::DO_OFFSET + swizzled<DO_ROW_BYTES>(row, chunk)) = packed;
    }
    if (tid < BLOCK_H) {
        const int head = head0 + tid;
        const bool real = head < h;
        const u64 at = (u64)query * h + head;
        head_lse_log2[tid] = real ? lse[at] * DSA_LOG2E : __int_as_float(0x7f800000);
        head_delta[tid] = real ? delta[at] : 0.0f;
        head_share[tid] = real ? share[at] : 0.0f;
        head_d_lse[tid] = real && d_lse != nullptr ? d_lse[at] : 0.0f;
    }

    // Warp roles (see the header): phase 1 (S, dP), phase 2 (dq), phase 3 (row gradients).
    const int score_heads = (warp & 3) * 16, score_slots = (warp >> 2) * 8;
    const int dq_heads = (warp & 3) * 16, dq_chunk0 = (warp >> 2) * 18;  // 18 chunks of 8 dims
    const int row_slots = (warp & 1) * 16, row_tile0 = (warp >> 1) * 9;  // 9 column tiles of 8 dims

    // ldmatrix lane addressing (common.cuh: lane l addresses row l % 8 of matrix l / 8).
    // A from a row-major [rows][k] tile: matrices (rows 0-7, k 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15).
    const int a_row = (lane & 7) + (((lane >> 3) & 1) << 3);
    const int a_chunk = lane >> 4;
    // B of S / dP from the K tile ([slots][dims]): one 8-slot column, four consecutive 8-dim chunks.
    const int k_row = score_slots + (lane & 7);
    const int k_chunk = lane >> 3;
    // B of dq from the K tile read transposed ([slots = k][dims = n]): as the forward's V operand.
    const int v_row = (lane & 7) + (((lane >> 3) & 1) << 3);
    const int v_chunk = lane >> 4;
    // A of the row gradients: the staged [heads][slots] tiles read transposed (slots = m, heads = k).
    const int t_head = (lane & 7) + ((lane >> 4) << 3);
    const int t_chunk = (row_slots >> 3) + ((lane >> 3) & 1);
    // B of the row gradients: Q / dout ([heads = k][dims = n]) transposed, one 8-dim column, 32 heads.
    const int b_head = lane;

    float acc_dq[18][4];
#pragma unroll
    for (int j = 0; j < 18; ++j) acc_dq[j][0] = acc_dq[j][1] = acc_dq[j][2] = acc_dq[j][3] = 0.0f;

    for (int tile = 0; tile < n_tiles; ++tile) {
        const int buffer = tile & 1;
        if (tile + 1 < n_tiles)
            gather_tile(smem_u32(kv_tiles + (buffer ^ 1) * KV_TILE_BYTES), rows_of_tile + (buffer ^ 1) * BLOCK_T, kv,
                        row_indices, tile + 1, n_slots, s_kv, tid);
        cp_async_commit();
        cp_async_wait<1>();  // everything but the group just issued has landed
        __syncthreads();     // ... for every thread's copies (and, on the first tile, dout and the head values)
        const u32 kv_base = smem_u32(kv_tiles + buffer * KV_TILE_BYTES);
        const int* tile_rows = rows_of_tile + buffer * BLOCK_T;

        // ---- 1. S = Q K^T and dP = dout V^T: 16 heads x 8 slots per warp.
        float acc_s[4] = {0.0f, 0.0f, 0.0f, 0.0f}, acc_dp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 2
        for (int pair = 0; pair < D_QK / 32; ++pair) {  // 32 dims: two k steps
            u32 b[4];
            ldmatrix_x4(b, kv_base + swizzled<ROW_BYTES>(k_row, 4 * pair + k_chunk));
            const u32 b_first[2] = {b[0], b[1]}, b_second[2] = {b[2], b[3]};
            u32 a[4];
            ldmatrix_x4(a, q_tile + swizzled<ROW_BYTES>(score_heads + a_row, 4 * pair + a_chunk));
            mma_16x8x32bytes<ELEM_BF16>(acc_s, a, b_first);
            ldmatrix_x4(a, q_tile + swizzled<ROW_BYTES>(score_heads + a_row, 4 * pair + 2 + a_chunk));
            mma_16x8x32bytes<ELEM_BF16>(acc_s, a, b_second);
            if (pair < D_V / 32) {
                ldmatrix_x4(a, do_tile + swizzled<DO_ROW_BYTES>(score_heads + a_row, 4 * pair + a_chunk));
                mma_16x8x32bytes<ELEM_BF16>(acc_dp, a, b_first);
                ldmatrix_x4(a, do_tile + swizzled<DO_ROW_BYTES>(score_heads + a_row, 4 * pair + 2 + a_chunk));
                mma_16x8x32bytes<ELEM_BF16>(acc_dp, a, b_second);
            }
        }
        // Fragment element e: head row score_heads + group_id + 8 (e / 2), slot column
        // score_slots + 2 lane_in_group + e % 2.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = score_heads + group_id + 8 * r;
            const int column = score_slots + 2 * lane_in_group;
            const float row_lse_log2 = head_lse_log2[row], row_delta = head_delta[row];
            const float row_share = head_share[row], row_d_lse = head_d_lse[row];
            float d_logit[2], value_weight[2];
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int e = 2 * r + c;
                float p = 0.0f, dl = 0.0f;
                if (tile_rows[column + c] >= 0) {
                    p = fast_exp2(acc_s[e] * scale_log2 - row_lse_log2);
                    dl = p * (row_share * (acc_dp[e] - row_delta) + row_d_lse);
                }
                d_logit[c] = dl * sm_scale;
                value_weight[c] = row_share * p;
            }
            *reinterpret_cast<u32*>(dl_stage + row * STAGE_STRIDE + column * 2) = pack_bf16x2(d_logit[0], d_logit[1]);
            *reinterpret_cast<u32*>(fp_stage + row * STAGE_STRIDE + column * 2) =
                pack_bf16x2(value_weight[0], value_weight[1]);
        }
        __syncthreads();  // the staged tiles are complete

        // ---- 2. dq += (sm_scale dl) K: 16 heads x 144 dims per warp, reduction over the 32 slots.
        const u32 dl_base = smem_u32(dl_stage), fp_base = smem_u32(fp_stage);
#pragma unroll
        for (int k = 0; k < BLOCK_T / 16; ++k) {
            u32 a[4];
            ldmatrix_x4(a, dl_base + (dq_heads + a_row) * STAGE_STRIDE + ((2 * k + a_chunk) << 4));
#pragma unroll
            for (int pair = 0; pair < 9; ++pair) {
                u32 b[4];
                ldmatrix_x4_trans(b, kv_base + swizzled<ROW_BYTES>(16 * k + v_row, dq_chunk0 + 2 * pair + v_chunk));
                const u32 b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
                mma_16x8x32bytes<ELEM_BF16>(acc_dq[2 * pair], a, b0);
                mma_16x8x32bytes<ELEM_BF16>(acc_dq[2 * pair + 1], a, b1);
            }
        }

        // ---- 3. row gradients: 16 slots x 8 dims at a time, reduction over the 64 heads.
        // Fragment element e: slot row_slots + group_id + 8 (e / 2), dim 8 n + 2 lane_in_group + e % 2.
        const int row_low = tile_rows[row_slots + group_id], row_high = tile_rows[row_slots + group_id + 8];
#pragma unroll 1
        for (int n = row_tile0; n < row_tile0 + 9; ++n) {
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int half = 0; half < 2; ++half) {  // heads 32 half .. +32: two k steps
                u32 b[4];
                ldmatrix_x4_trans(b, q_tile + swizzled<ROW_BYTES>(32 * half + b_head, n));
                const u32 b_first[2] = {b[0], b[1]}, b_second[2] = {b[2], b[3]};
                u32 a[4];
                ldmatrix_x4_trans(a, dl_base + (32 * half + t_head) * STAGE_STRIDE + (t_chunk << 4));
                mma_16x8x32bytes<ELEM_BF16>(acc, a, b_first);
                ldmatrix_x4_trans(a, dl_base + (32 * half + 16 + t_head) * STAGE_STRIDE + (t_chunk << 4));
                mma_16x8x32bytes<ELEM_BF16>(acc, a, b_second);
            }
            if (n < D_V / 8) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    u32 b[4];
                    ldmatrix_x4_trans(b, do_tile + swizzled<DO_ROW_BYTES>(32 * half + b_head, n));
                    const u32 b_first[2] = {b[0], b[1]}, b_second[2] = {b[2], b[3]};
                    u32 a[4];
                    ldmatrix_x4_trans(a, fp_base + (32 * half + t_head) * STAGE_STRIDE + (t_chunk << 4));
                    mma_16x8x32bytes<ELEM_BF16>(acc, a, b_first);
                    ldmatrix_x4_trans(a, fp_base + (32 * half + 16 + t_head) * STAGE_STRIDE + (t_chunk << 4));
                    mma_16x8x32bytes<ELEM_BF16>(acc, a, b_second);
                }
            }
            const int dim = 8 * n + 2 * lane_in_group;
            if constexpr (ROW_STORES) {
                // Entry (block, slot) of the buffer: blockIdx.x is (query of the chunk, head block).
                const int slot = tile * BLOCK_T + row_slots + group_id;
                float* target = contributions + ((u64)blockIdx.x * topk + slot) * D_QK + dim;
                if (row_low >= 0) *reinterpret_cast<float2*>(target) = make_float2(acc[0], acc[1]);
                if (row_high >= 0) *reinterpret_cast<float2*>(target + 8 * D_QK) = make_float2(acc[2], acc[3]);
            } else {
                if (row_low >= 0) {
                    float* target = dkv + (u64)row_low * D_QK + dim;
                    atomicAdd(target, acc[0]);
                    atomicAdd(target + 1, acc[1]);
                }
                if (row_high >= 0) {
                    float* target = dkv + (u64)row_high * D_QK + dim;
                    atomicAdd(target, acc[2]);
                    atomicAdd(target + 1, acc[3]);
                }
            }
        }
        __syncthreads();  // the tile and the staged tiles may be overwritten from here on
    }
    cp_async_wait<0>();

    // ---- dq (already scaled by sm_scale through dl); a query without a valid slot gets 0.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int head = head0 + dq_heads + group_id + 8 * r;
        if (head >= h) continue;
        float* dq_row = dq + ((u64)query * h + head) * D_QK + dq_chunk0 * 8 + 2 * lane_in_group;
#pragma unroll
        for (int j = 0; j < 18; ++j) {
            *reinterpret_cast<float2*>(dq_row + j * 8) = make_float2(acc_dq[j][2 * r], acc_dq[j][2 * r + 1]);
        }
    }
}

}  // namespace mla_bwd_mma

// Default mode: row gradients added to dkv with float32 atomics. Grid: s_q * head blocks.
extern "C" __global__ void __launch_bounds__(mla_bwd_mma::THREADS, 1)
sparse_mla_bwd_mma(const u16* __restrict__ q,            // [s_q, h, 576] bf16 bits
                   const u16* __restrict__ kv,           // [s_kv, 576] bf16 bits
                   const int* __restrict__ indices,      // [s_q, topk]
                   const int* __restrict__ topk_length,  // [s_q] or null
                   const float* __restrict__ lse,        // [s_q, h]
                   const float* __restrict__ d_out,      // [s_q, h, 512]
                   const float* __restrict__ delta,      // [s_q, h] D
                   const float* __restrict__ share,      // [s_q, h] f
                   const float* __restrict__ d_lse,      // [s_q, h] or null
                   float* __restrict__ dq,               // [s_q, h, 576]
                   float* __restrict__ dkv,              // [s_kv, 576], zeroed by the host, added to
                   int h, int s_kv, int topk, float sm_scale, float scale_log2) {
    mla_bwd_mma::backward_block<false>(q, kv, indices, topk_length, lse, d_out, delta, share, d_lse, dq, dkv, nullptr,
                                       h, s_kv, topk, sm_scale, scale_log2);
}

// Deterministic mode, one chunk of queries (every pointer starts at the chunk's first query):
// row gradients stored to `contributions`, entry ((query * head blocks + head block) * topk + slot),
// for valid slots only; sparse_mla_bwd_mma_row_sum adds them to dkv. Grid: queries * head blocks.
extern "C" __global__ void __launch_bounds__(mla_bwd_mma::THREADS, 1)
sparse_mla_bwd_mma_deterministic(const u16* __restrict__ q,            // [c, h, 576] bf16 bits
                                 const u16* __restrict__ kv,           // [s_kv, 576] bf16 bits
                                 const int* __restrict__ indices,      // [c, topk]
                                 const int* __restrict__ topk_length,  // [c] or null
                                 const float* __restrict__ lse,        // [c, h]
                                 const float* __restrict__ d_out,      // [c, h, 512]
                                 const float* __restrict__ delta,      // [c, h] D
                                 const float* __restrict__ share,      // [c, h] f
                                 const float* __restrict__ d_lse,      // [c, h] or null
                                 float* __restrict__ dq,               // [c, h, 576]
                                 float* __restrict__ contributions,    // [c, head blocks, topk, 576]
                                 int h, int s_kv, int topk, float sm_scale, float scale_log2) {
    mla_bwd_mma::backward_block<true>(q, kv, indices, topk_length, lse, d_out, delta, share, d_lse, dq, nullptr,
                                      contributions, h, s_kv, topk, sm_scale, scale_log2);
}

// The ordered sum of deterministic mode, one chunk of queries. Grid: one block per kv row r; block:
// 144 threads, thread t owning dims 4 t .. 4 t + 3. sorted_keys holds the unique keys
// row * pairs + p of the host's plan (pair p = query p / topk, slot p % topk, counted from the
// plan's first query; every key of a valid slot, in increasing order); the pairs of this chunk
// that read r are the keys at positions row_begin[r] .. row_end[r], in increasing p. For each of
// them in that order, then each head block in order, the block adds the pair's buffer entry to a
// register sum, and adds the sum to dkv[r] (no other block writes the row in this launch). A row
// without pairs is not touched.
extern "C" __global__ void __launch_bounds__(mla_bwd_mma::ROW_SUM_THREADS)
sparse_mla_bwd_mma_row_sum(const float* __restrict__ contributions,  // [c, head blocks, topk, 576]
                           const i64* __restrict__ sorted_keys,      // [pairs of the plan]
                           const i64* __restrict__ row_begin,        // [s_kv]
                           const i64* __restrict__ row_end,          // [s_kv]
                           float* __restrict__ dkv,                  // [s_kv, 576]
                           i64 pairs,                                // pairs of the plan
                           i64 first_pair,                           // the chunk's first pair in the plan
                           int head_blocks, int topk) {
    using namespace mla_bwd_mma;
    const int row = blockIdx.x, tid = threadIdx.x;
    const i64 begin = row_begin[row], end = row_end[row];
    if (begin == end) return;
    const i64 row_key = (i64)row * pairs + first_pair;
    float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const int items = (int)(end - begin) * head_blocks;  // at most the chunk's buffer entries
    // Unrolled so that several independent loads are in flight; the additions stay in item order.
#pragma unroll 4
    for (int item = 0; item < items; ++item) {
        const int in_row = item / head_blocks, head_block = item - in_row * head_blocks;
        const i64 position = begin + in_row;
        const int pair = (int)(sorted_keys[position] - row_key);  // within the chunk: < c * topk
        const int query = pair / topk, slot = pair - query * topk;
        const u64 entry = ((u64)query * head_blocks + head_block) * topk + slot;
        const float4 value = reinterpret_cast<const float4*>(contributions + entry * D_QK)[tid];
        sum.x += value.x;
        sum.y += value.y;
        sum.z += value.z;
        sum.w += value.w;
    }
    float4* target = reinterpret_cast<float4*>(dkv + (u64)row * D_QK) + tid;
    float4 total = *target;
    total.x += sum.x;
    total.y += sum.y;
    total.z += sum.z;
    total.w += sum.w;
    *target = total;
}
