// Sparse MLA forward on Hopper's warpgroup tensor-core instructions (sm_90a only): the same contract
// as sparse_mla_fwd_mma<FP8_CACHE> in sparse_mla.cu (DeepSeek-V3.2 eq. 2, MQA mode, bf16 q [s_q, h, 576],
// d_v = 512): an index < 0 or >= s_kv, or a slot past topk_length, is never read; duplicates count
// twice; no valid slot -> out 0 and lse -inf; with a sink, out *= 1 / (1 + exp(sink - lse)).
// Two entry points share one body (sparse_mla_fwd_wgmma_body<FP8_CACHE>):
//
//   sparse_mla_fwd_wgmma      bf16 latent rows [s_kv, 576];
//   sparse_mla_fwd_wgmma_fp8  the packed FP8 cache uint8 [s_kv, 656] of the V3.2 decode (512 e4m3
//                             latent values, four float32 scales, one per 128 of them, 64 bf16 RoPE
//                             values; dsa_ref.pack_kv_cache_fp8).
//
// One block per (query, 64 heads), three warpgroups with fixed roles:
//
//   warpgroup 0, producer: fills one 64-slot tile of bf16 rows in a 128-byte-swizzled layout (two
//     stages), then signals the stage's `full` barrier; it waits on the stage's `empty` barrier
//     before refilling it. bf16 rows are gathered with cp.async. Packed FP8 rows are read into
//     registers with 16-byte loads and dequantized there (e4m3 x its block's scale, rounded to
//     bf16; RoPE as stored), so the consumers read the same bf16 tile either way, and the
//     dequantization of tile t + 1 runs while the consumers compute tile t. The producer gives
//     registers away (setmaxnreg) to the consumers, whose O accumulator is large; the FP8 producer
//     keeps more of them, for the rows it holds in flight.
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
#include "fp8_rows.cuh"

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

// Registers per thread: at launch every warp gets what __launch_bounds__(384, 1) allows, 168 (65536 /
// 384 rounded down to a multiple of 8); setmaxnreg then moves them from the producer to the consumers,
// and the consumers' increase can only take what the producer's decrease returned. The consumers
// compile without spills from 176 up (ptxas honours setmaxnreg in the code after it); the bf16
// producer (cp.async, no data in registers) fits in 40; the FP8 producer spills at 72 and fits in 88
// with two batches of rows in registers, which leaves the consumers 208.
constexpr int LAUNCH_REGISTERS = 168;
template <bool FP8_CACHE>
struct RegisterSplit {
    static constexpr int PRODUCER = FP8_CACHE ? 88 : 40;
    static constexpr int CONSUMER = FP8_CACHE ? 208 : 232;
    static_assert(128 * PRODUCER + CONSUMER_THREADS * CONSUMER <= 65536, "register file");
    static_assert(128 * PRODUCER + CONSUMER_THREADS * CONSUMER <= THREADS * LAUNCH_REGISTERS,
                  "the consumers' increase must fit in what the launch allocated");
    static_assert(PRODUCER % 8 == 0 && CONSUMER % 8 == 0, "setmaxnreg takes multiples of 8");
};

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

using mla_tile::tile_offset;  // the tile layout the kernels share (mla_tile.cuh)

// Producer, bf16 rows: a warp per row at a time, the 32 lanes copying consecutive 16-byte chunks of
// one row with cp.async (invalid slots zero-filled without a read), then the wait for this thread's
// own copies, so that it can fence them into the async proxy before releasing the stage; the
// consumers are busy with the other stage meanwhile.
__device__ __forceinline__ void fill_stage_bf16(u32 kv_tile, int* stage_valid, const u16* __restrict__ kv,
                                                const int* __restrict__ row_indices, int tile, int n_slots,
                                                int s_kv, int producer_warp, int lane) {
    for (int row = producer_warp; row < BLOCK_T; row += 4) {
        const int slot = tile * BLOCK_T + row;
        const int index = slot < n_slots ? row_indices[slot] : -1;
        const bool valid = index >= 0 && index < s_kv;
        const u16* src_row = kv + (valid ? (u64)index * D_QK : 0);
        for (int chunk = lane; chunk < ROW_CHUNKS; chunk += 32)
            cp_async_16(kv_tile + tile_offset(row, chunk), src_row + chunk * 8, valid);
        if (lane == 0) stage_valid[row] = valid;
    }
    cp_async_commit();
    cp_async_wait<0>();
}

// Producer, packed FP8 rows (fp8_rows.cuh): the warp's 16 rows of the tile, read, dequantized and stored
// as bf16 into the swizzled stage, one batch of loads ahead of the stores: the loads of batch b + 1 are
// issued before batch b is dequantized and stored, so that the latency of the random row reads overlaps
// with that work. (Larger batches without that overlap do not help: in their SASS ptxas issues about
// ten loads of a thread and then starts using the first.) Two batches in registers: 48 a thread.
__device__ __forceinline__ void fill_stage_fp8(u8* kv_tile, int* stage_valid, const u8* __restrict__ kv,
                                               int warp_index, int producer_warp, int lane) {
    using namespace fp8_rows;
    if (lane < PRODUCER_WARP_ROWS) stage_valid[producer_warp + 4 * lane] = warp_index >= 0;
    Fp8Batch next = load_fp8_batch(kv, warp_index, 0, lane);
    for (int batch = 0; batch + 1 < FP8_BATCHES; ++batch) {
        const Fp8Batch current = next;
        next = load_fp8_batch(kv, warp_index, batch + 1, lane);
        store_fp8_batch(kv_tile, current, batch, producer_warp, lane);
    }
    store_fp8_batch(kv_tile, next, FP8_BATCHES - 1, producer_warp, lane);
}

}  // namespace mla_wgmma

namespace mla_wgmma {

// The kernel, for either row format (`kv`: bf16 rows [s_kv, 576] as bytes, or the packed FP8 cache
// [s_kv, 656]); only the producer's fill of a stage differs.
template <bool FP8_CACHE>
__device__ __forceinline__ void sparse_mla_fwd_wgmma_body(const u16* __restrict__ q, const u8* __restrict__ kv,
                                                          const int* __restrict__ indices,
                                                          const int* __restrict__ topk_length,
                                                          const float* __restrict__ attn_sink,
                                                          float* __restrict__ out, float* __restrict__ lse,
                                                          int h, int s_kv, int topk, float scale_log2) {
    using namespace hopper;
    using Registers = RegisterSplit<FP8_CACHE>;
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
        setmaxnreg_decrease<Registers::PRODUCER>();
        const int producer_warp = tid >> 5;
        for (int tile = 0; tile < n_tiles; ++tile) {
            const int stage = tile % STAGES;
            const u32 round = (u32)(tile / STAGES);
            int warp_index = -1;
            if constexpr (FP8_CACHE) warp_index = fp8_rows::fp8_row_index(row_indices, tile, n_slots, s_kv, producer_warp, lane);
            // A fresh barrier counts its (never run) previous phase as complete: round 0 passes.
            mbarrier_wait(empty_barriers + 8 * stage, (round & 1u) ^ 1u);
            int* stage_valid = valid_flags + stage * BLOCK_T;
            if constexpr (FP8_CACHE) {
                fill_stage_fp8(smem + Smem::KV_OFFSET + stage * TILE_BYTES, stage_valid, kv, warp_index,
                               producer_warp, lane);
            } else {
                fill_stage_bf16(kv_tiles + stage * TILE_BYTES, stage_valid, reinterpret_cast<const u16*>(kv),
                                row_indices, tile, n_slots, s_kv, producer_warp, lane);
            }
            // This thread's writes of the stage (cp.async or stores), into the async proxy that wgmma
            // reads through, before the release.
            fence_proxy_async_shared();
            mbarrier_arrive(full_barriers + 8 * stage);
        }
        return;
    }

    // -------------------------------------------------------------------- consumers
    setmaxnreg_increase<Registers::CONSUMER>();
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

}  // namespace mla_wgmma

// bf16 latent rows.
extern "C" __global__ void __launch_bounds__(mla_wgmma::THREADS, 1)
sparse_mla_fwd_wgmma(const u16* __restrict__ q,            // [s_q, h, 576] bf16 bits
                     const u16* __restrict__ kv,           // [s_kv, 576] bf16 bits
                     const int* __restrict__ indices,      // [s_q, topk]
                     const int* __restrict__ topk_length,  // [s_q] or null
                     const float* __restrict__ attn_sink,  // [h] or null
                     float* __restrict__ out,              // [s_q, h, 512]
                     float* __restrict__ lse,              // [s_q, h]
                     int h, int s_kv, int topk, float scale_log2) {
    mla_wgmma::sparse_mla_fwd_wgmma_body<false>(q, reinterpret_cast<const u8*>(kv), indices, topk_length, attn_sink,
                                                out, lse, h, s_kv, topk, scale_log2);
}

// The packed FP8 cache (16-byte aligned: the host copies a cache that is not).
extern "C" __global__ void __launch_bounds__(mla_wgmma::THREADS, 1)
sparse_mla_fwd_wgmma_fp8(const u16* __restrict__ q,            // [s_q, h, 576] bf16 bits
                         const u8* __restrict__ kv,            // [s_kv, 656] packed FP8 rows
                         const int* __restrict__ indices,      // [s_q, topk]
                         const int* __restrict__ topk_length,  // [s_q] or null
                         const float* __restrict__ attn_sink,  // [h] or null
                         float* __restrict__ out,              // [s_q, h, 512]
                         float* __restrict__ lse,              // [s_q, h]
                         int h, int s_kv, int topk, float scale_log2) {
    mla_wgmma::sparse_mla_fwd_wgmma_body<true>(q, kv, indices, topk_length, attn_sink, out, lse, h, s_kv, topk,
                                               scale_log2);
}
