// Sparse MLA forward on Hopper's warpgroup tensor-core instructions (sm_90a only): the same contract
// as sparse_mla_fwd_mma<false> in sparse_mla.cu (DeepSeek-V3.2 eq. 2, MQA mode, bf16 q [s_q, h, 576]
// and bf16 latent rows [s_kv, 576], d_v = 512): an index < 0 or >= s_kv, or a slot past
// topk_length, is never read; duplicates count twice; no valid slot -> out 0 and lse -inf; with a
// sink, out *= 1 / (1 + exp(sink - lse)).
//
// One block per (query, 64 heads), three warpgroups with fixed roles:
//
//   warpgroup 0, producer: gathers the selected rows of one 64-slot tile with cp.async into a
//     128-byte-swizzled tile (two stages), then signals the stage's `full` barrier; it waits on the
//     stage's `empty` barrier before refilling it. It needs few registers and gives them away
//     (setmaxnreg) to the consumers, whose O accumulator is large.
//   warpgroups 1 and 2, consumers: consumer c owns value dims 256 c .. +256 of O (a [64, 256] fp32
//     accumulator, 128 registers per thread) and the S = Q K^T of slots 32 c .. +32 of each tile.
//
// Why S is split by slots: wgmma's M is 64 rows, exactly the 64 heads, so the only balanced split
// of S between two warpgroups is along the slots. Computing all of S in one consumer would leave
// the other idle for the larger half of the FLOPs (576 of 1088 per slot and head); computing it in
// both would do that half twice. The price of the split is two meetings per tile: the consumers
// exchange their row maxima (both halves of P must be exponentiated against the same running max)
// and then both halves of P, which each consumer writes to shared memory as bf16 because each
// needs all 64 slots of P for its P V.
//
// Q, the KV tiles and P all use the 128-byte swizzle the tensor cores read: a [64, 576] tile is
// nine column blocks of 64 dims, each 64 rows x 128 bytes. The same KV tile is read K-major for
// S = Q K^T (rows = slots, reduction over dims) and MN-major for O += P V (rows = slots are then the
// reduction dimension, each 128-byte row holding 64 output columns).
//
// Scores are kept in log2 units (scale_log2 = sm_scale * log2 e) so exp2 is one instruction.
#include "hopper.cuh"

using namespace dsa;

namespace mla_wgmma {

constexpr int D_QK = 576;                       // 512 latent + 64 RoPE dims per row
constexpr int D_V = 512;                        // V = the first 512 dims of the same row
constexpr int BLOCK_H = 64;                     // heads of one query: wgmma's M
constexpr int BLOCK_T = 64;                     // gathered rows (slots) per tile
constexpr int STAGES = 2;                       // KV tiles in flight
constexpr int THREADS = 384;                    // three warpgroups
constexpr int CONSUMER_THREADS = 256;
constexpr int ROW_CHUNKS = D_QK * 2 / 16;       // 72 chunks of 16 bytes per bf16 row
constexpr int COLUMN_BLOCK_BYTES = 64 * 128;    // 64 rows x 64 dims: one swizzled column block
constexpr int TILE_BYTES = (D_QK / 64) * COLUMN_BLOCK_BYTES;  // 73728
constexpr int P_BYTES = BLOCK_H * BLOCK_T * 2;  // bf16 [64 heads, 64 slots]: one column block

// Register budget of the 384 threads (65536): the producer keeps 40, each consumer thread gets 232.
constexpr int PRODUCER_REGISTERS = 40;
constexpr int CONSUMER_REGISTERS = 232;
static_assert(128 * PRODUCER_REGISTERS + CONSUMER_THREADS * CONSUMER_REGISTERS <= 65536, "register file");

// Named barriers of the two consumer warpgroups (0 is __syncthreads).
constexpr u32 MAX_EXCHANGED = 1;   // both row maxima of the tile written
constexpr u32 P_WRITTEN = 2;       // both halves of P in shared memory
constexpr u32 SUMS_EXCHANGED = 3;  // both partial denominators written

// Offsets from the 1024-byte-aligned start of dynamic shared memory (swizzle atoms must be aligned).
struct Smem {
    static constexpr int Q_OFFSET = 0;
    static constexpr int KV_OFFSET = Q_OFFSET + TILE_BYTES;
    static constexpr int P_OFFSET = KV_OFFSET + STAGES * TILE_BYTES;
    static constexpr int VALID_OFFSET = P_OFFSET + P_BYTES;                // int [STAGES][BLOCK_T]
    static constexpr int MAX_OFFSET = VALID_OFFSET + STAGES * BLOCK_T * 4;  // float [2][BLOCK_H]
    static constexpr int SUM_OFFSET = MAX_OFFSET + 2 * BLOCK_H * 4;        // float [2][BLOCK_H]
    static constexpr int BARRIER_OFFSET = SUM_OFFSET + 2 * BLOCK_H * 4;    // u64 full[STAGES], empty[STAGES]
    static constexpr int USED = BARRIER_OFFSET + 2 * STAGES * 8;
    static constexpr int TOTAL = USED + 1024;  // what the launch asks for: room to align the start; 231968
};
static_assert(Smem::TOTAL <= 232448, "sm_90 gives a block at most 227 KB of shared memory");

// Byte offset of 16-byte chunk `chunk` (0..71) of row `row` of a swizzled [64, 576] tile.
__device__ __forceinline__ u32 tile_offset(int row, int chunk) {
    return (chunk >> 3) * COLUMN_BLOCK_BYTES + hopper::swizzle_128b(row, chunk & 7);
}

}  // namespace mla_wgmma

extern "C" __global__ void __launch_bounds__(mla_wgmma::THREADS, 1)
sparse_mla_fwd_wgmma(const u16* __restrict__ q,            // [s_q, h, 576] bf16 bits
                     const u16* __restrict__ kv,           // [s_kv, 576] bf16 bits
                     const int* __restrict__ indices,      // [s_q, topk]
                     const int* __restrict__ topk_length,  // [s_q] or null
                     const float* __restrict__ attn_sink,  // [h] or null
                     float* __restrict__ out,              // [s_q, h, 512]
                     float* __restrict__ lse,              // [s_q, h]
                     int h, int s_kv, int topk, float scale_log2) {
    using namespace mla_wgmma;
    using namespace hopper;
    extern __shared__ __align__(1024) u8 dynamic_smem[];
    const u32 raw_base = smem_u32(dynamic_smem);
    const u32 base = (raw_base + 1023u) & ~1023u;
    u8* smem = dynamic_smem + (base - raw_base);

    const int tid = threadIdx.x, warpgroup = tid >> 7, lane = tid & 31;
    const int head_blocks = (h + BLOCK_H - 1) / BLOCK_H;
    const int query = blockIdx.x / head_blocks;
    const int head0 = (blockIdx.x - query * head_blocks) * BLOCK_H;
    const int* row_indices = indices + (u64)query * topk;
    int n_slots = topk;
    if (topk_length != nullptr) n_slots = min(n_slots, max(topk_length[query], 0));
    const int n_tiles = (n_slots + BLOCK_T - 1) / BLOCK_T;

    const u32 q_tile = base + Smem::Q_OFFSET;
    const u32 kv_tiles = base + Smem::KV_OFFSET;
    const u32 p_tile = base + Smem::P_OFFSET;
    int* valid_flags = reinterpret_cast<int*>(smem + Smem::VALID_OFFSET);
    float* red_max = reinterpret_cast<float*>(smem + Smem::MAX_OFFSET);
    float* red_sum = reinterpret_cast<float*>(smem + Smem::SUM_OFFSET);
    const u32 full_barriers = base + Smem::BARRIER_OFFSET;   // + 8 stage
    const u32 empty_barriers = full_barriers + STAGES * 8;

    if (tid == 0) {
        for (int stage = 0; stage < STAGES; ++stage) {
            mbarrier_init(full_barriers + 8 * stage, 128);                // every producer thread
            mbarrier_init(empty_barriers + 8 * stage, CONSUMER_THREADS);  // every consumer thread
        }
    }
    // Q tile, by all threads, once: 64 heads x 576 dims; heads past h are zero rows (not written).
    for (int c = tid; c < BLOCK_H * ROW_CHUNKS; c += THREADS) {
        const int row = c / ROW_CHUNKS, chunk = c - row * ROW_CHUNKS;
        const bool valid = head0 + row < h;
        const u16* src = q + (valid ? ((u64)query * h + head0 + row) * D_QK + chunk * 8 : 0);
        cp_async_16(q_tile + tile_offset(row, chunk), src, valid);
    }
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async_shared();
    __syncthreads();  // Q landed and visible to wgmma; barriers initialized

    if (warpgroup == 0) {
        // ---------------------------------------------------------------- producer
        setmaxnreg_decrease<PRODUCER_REGISTERS>();
        const int producer_warp = tid >> 5;
        for (int tile = 0; tile < n_tiles; ++tile) {
            const int stage = tile % STAGES;
            const u32 round = (u32)(tile / STAGES);
            // A fresh barrier counts its (never run) previous phase as complete: round 0 passes.
            mbarrier_wait(empty_barriers + 8 * stage, (round & 1u) ^ 1u);
            const u32 kv_tile = kv_tiles + stage * TILE_BYTES;
            // A warp per row at a time: the 32 lanes read consecutive 16-byte chunks of one row.
            for (int row = producer_warp; row < BLOCK_T; row += 4) {
                const int slot = tile * BLOCK_T + row;
                const int index = slot < n_slots ? row_indices[slot] : -1;
                const bool valid = index >= 0 && index < s_kv;
                const u16* src_row = kv + (valid ? (u64)index * D_QK : 0);
                for (int chunk = lane; chunk < ROW_CHUNKS; chunk += 32)
                    cp_async_16(kv_tile + tile_offset(row, chunk), src_row + chunk * 8, valid);
                if (lane == 0) valid_flags[stage * BLOCK_T + row] = valid;
            }
            cp_async_commit();
            // Wait for this thread's own copies so that it can fence them into the async proxy
            // before releasing the stage; the consumers are busy with the other stage meanwhile.
            cp_async_wait<0>();
            fence_proxy_async_shared();
            mbarrier_arrive(full_barriers + 8 * stage);
        }
        return;
    }

    // -------------------------------------------------------------------- consumers
    setmaxnreg_increase<CONSUMER_REGISTERS>();
    const int consumer = warpgroup - 1;              // value dims 256 c .., slots 32 c .. of a tile
    const int row0 = ((tid >> 5) & 3) * 16 + (lane >> 2);  // this thread's rows: row0, row0 + 8
    const int quad_lane = lane & 3;

    float acc_o[128];  // O[row0 + 8 half, 256 c + 8 j + 2 quad_lane + e] = acc_o[4 j + 2 half + e]
#pragma unroll
    for (int i = 0; i < 128; ++i) acc_o[i] = 0.0f;
    float row_max[2] = {DSA_NEG_INF, DSA_NEG_INF};  // running max (log2 units) of rows row0, row0 + 8
    float row_sum[2] = {0.0f, 0.0f};                // this thread's share of the denominator

    for (int tile = 0; tile < n_tiles; ++tile) {
        const int stage = tile % STAGES;
        mbarrier_wait(full_barriers + 8 * stage, (u32)(tile / STAGES) & 1u);
        const u32 kv_tile = kv_tiles + stage * TILE_BYTES;
        const int* tile_valid = valid_flags + stage * BLOCK_T;

        // ---- S = Q K^T: 64 heads x 32 slots, 36 steps of 16 dims.
        float acc_s[16];
#pragma unroll
        for (int i = 0; i < 16; ++i) acc_s[i] = 0.0f;
        fence_registers(acc_s);
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < D_QK / 16; ++k) {
            const u32 column = (k >> 2) * COLUMN_BLOCK_BYTES + (k & 3) * 32;
            const u64 q_descriptor = matrix_descriptor(q_tile + column, 16, 1024);
            const u64 k_descriptor = matrix_descriptor(kv_tile + consumer * 32 * 128 + column, 16, 1024);
            wgmma_m64n32k16_bf16(acc_s, q_descriptor, k_descriptor);
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_registers(acc_s);

        // ---- mask invalid slots, then the online-softmax update agreed with the other consumer.
        float tile_max[2] = {DSA_NEG_INF, DSA_NEG_INF};
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const int column = consumer * 32 + (i >> 2) * 8 + quad_lane * 2 + (i & 1);
            acc_s[i] = tile_valid[column] ? acc_s[i] * scale_log2 : DSA_NEG_INF;
            tile_max[(i >> 1) & 1] = fmaxf(tile_max[(i >> 1) & 1], acc_s[i]);
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            tile_max[half] = fmaxf(tile_max[half], __shfl_xor_sync(0xffffffffu, tile_max[half], 1));
            tile_max[half] = fmaxf(tile_max[half], __shfl_xor_sync(0xffffffffu, tile_max[half], 2));
            if (quad_lane == 0) red_max[consumer * BLOCK_H + row0 + 8 * half] = tile_max[half];
        }
        named_barrier_sync(MAX_EXCHANGED, CONSUMER_THREADS);
        float alpha[2], exp_base[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const float partner = red_max[(consumer ^ 1) * BLOCK_H + row0 + 8 * half];
            alpha[half] = rescale_softmax_row(row_max[half], row_sum[half], fmaxf(tile_max[half], partner),
                                              exp_base[half]);
        }
        // P = exp2(S - max) as bf16 into the swizzled P tile (A operand of P V, K-major).
#pragma unroll
        for (int i = 0; i < 16; i += 2) {
            const int half = (i >> 1) & 1;
            const float p0 = fast_exp2(acc_s[i] - exp_base[half]);
            const float p1 = fast_exp2(acc_s[i + 1] - exp_base[half]);
            row_sum[half] += p0 + p1;
            const int row = row0 + 8 * half;
            const int chunk = consumer * 4 + (i >> 2);  // 8 slots per 16-byte chunk
            *reinterpret_cast<u32*>(smem + Smem::P_OFFSET + swizzle_128b(row, chunk) + quad_lane * 4) =
                pack_bf16x2(p0, p1);
        }
#pragma unroll
        for (int i = 0; i < 128; ++i) acc_o[i] *= alpha[(i >> 1) & 1];
        fence_proxy_async_shared();  // this thread's P stores, before the other consumer's wgmma reads them
        named_barrier_sync(P_WRITTEN, CONSUMER_THREADS);

        // ---- O += P V: 64 heads x 256 value dims, 4 steps of 16 slots.
        fence_registers(acc_o);
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < BLOCK_T / 16; ++k) {
            const u64 p_descriptor = matrix_descriptor(p_tile + k * 32, 16, 1024);
            const u64 v_descriptor = matrix_descriptor(kv_tile + consumer * 4 * COLUMN_BLOCK_BYTES + k * 16 * 128,
                                                       COLUMN_BLOCK_BYTES, 1024);
            wgmma_m64n256k16_bf16_b_mn_major(acc_o, p_descriptor, v_descriptor);
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_registers(acc_o);
        mbarrier_arrive(empty_barriers + 8 * stage);  // this thread is done with the stage
    }

    // ---- epilogue: denominators of both slot halves (added in a fixed order), lse, attention sink.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        row_sum[half] += __shfl_xor_sync(0xffffffffu, row_sum[half], 1);
        row_sum[half] += __shfl_xor_sync(0xffffffffu, row_sum[half], 2);
        if (quad_lane == 0) red_sum[consumer * BLOCK_H + row0 + 8 * half] = row_sum[half];
    }
    named_barrier_sync(SUMS_EXCHANGED, CONSUMER_THREADS);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = row0 + 8 * half;
        const int head = head0 + row;
        if (head >= h) continue;
        const float denominator = red_sum[row] + red_sum[BLOCK_H + row];
        float row_lse, factor;
        finish_softmax_row(row_max[half], denominator, attn_sink, head, row_lse, factor);
        float* out_row = out + ((u64)query * h + head) * D_V + consumer * 256 + quad_lane * 2;
#pragma unroll
        for (int j = 0; j < 32; ++j) {
            *reinterpret_cast<float2*>(out_row + j * 8) =
                make_float2(acc_o[4 * j + 2 * half] * factor, acc_o[4 * j + 2 * half + 1] * factor);
        }
        if (consumer == 0 && quad_lane == 0) lse[(u64)query * h + head] = row_lse;
    }
}
