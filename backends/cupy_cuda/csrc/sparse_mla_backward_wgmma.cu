// Sparse MLA backward on Hopper's warpgroup tensor-core instructions (sm_90a only), default (atomic)
// mode: the same contract as sparse_mla_bwd_mma in sparse_mla_backward_mma.cu (bf16 q [s_q, h, 576],
// bf16 latent rows [s_kv, 576], d_v = 512; here h a multiple of 64), whose header gives the math:
//
//     P_t  = exp2(S_t scale_log2 - lse log2 e)          S_t = q . K_t  (0 at invalid slots, never read)
//     dl_t = P_t (f (dout . V_t - D) + d_lse)            D = sum(dout * out), f = sink share (host side)
//     dq   = sm_scale sum_t dl_t K_t
//     dkv[idx_t] += sm_scale dl_t q + [:512] f P_t dout  (summed over the heads of the block)
//
// An index < 0 or >= s_kv, or a slot past topk_length, is never read and its row never written;
// duplicates add twice; a row no valid slot reads is never touched (the host zeroes dkv).
//
// One block per (query, 64 heads), 384 threads = three warpgroups with fixed roles:
//
//   warpgroup 0, producer (setmaxnreg down to 24): gathers the 64 rows of a step with cp.async into a
//     128-byte-swizzled [64, 576] tile and writes each row's kv index (or -1) beside it, waits for its
//     own copies, fences them into the async proxy and arrives on the `full` mbarrier. Before refilling
//     the tile it waits on the `empty` mbarrier, which the consumers arrive on as soon as their last
//     product that reads the rows (dq) is done: the gather of step t + 1 travels while the consumers
//     compute step t's row contributions and issue its atomics.
//   warpgroups 1 and 2, consumers (setmaxnreg up to 240); consumer c:
//     1. S = Q K^T and dP = dout V^T for slots 32 c .. +32 of the step (M = the 64 heads, N = 32;
//        36 + 32 wgmma k-steps, both operands K-major from shared memory);
//     2. P = exp2(S scale_log2 - lse log2 e) at valid slots (0 elsewhere), dl = P (f (dP - D) + d_lse);
//        sm_scale dl and f P as bf16 into two swizzled [64 heads, 64 slots] tiles (DL, FP), its 32
//        slots of each; a named barrier joins the two halves;
//     3. dq[:, cols of c] += DL K (M = heads, K = the 64 slots; K read MN-major from the same rows
//        tile): consumer c owns value dims 256 c .. +256 (N = 256) and rope dims 512 + 32 c .. +32
//        (N = 32), 144 float32 accumulators a thread resident across the loop;
//     4. the rows' contributions, M = the 64 slots, K = the 64 heads: for each of its four value
//        column blocks b (64 dims: 4 c + b) DL^T Q[:, b] + FP^T dout[:, b], and (DL^T Q)[:, rope half c]
//        (DL and FP read as transposed A operands: MN-major, imm-trans-a = 1; Q and dout MN-major B).
//        Two accumulators alternate: the product of the next chunk runs on the tensor cores while the
//        finished one leaves as 16-byte float32 reductions (red.global.add.v4.f32) into dkv.
//
// Why the tile of rows has one stage: Q (72 KB), dout (64 KB), the rows (72 KB) and DL/FP (16 KB) fill
// 224 KB of the 227 KB a block can have; a second rows stage would need 72 KB more. The overlap comes
// from the order instead: the rows are free after step 3, and step 4 (40 % of the FLOPs, all the
// atomics) needs only Q, dout, DL and FP.
//
// Reductions: accumulator element d[4 j + 2 half + e] of thread (warp w, lane l) is (row
// 16 (w % 4) + l / 4 + 8 half, column 8 j + 2 (l % 4) + e). Lanes l and l ^ 1 swap one pair through a
// shuffle so that the even lane holds 4 consecutive columns of the row l / 4 and the odd lane 4 of the
// row l / 4 + 8: one red.v4 per thread per 8 columns instead of two red.v2. A thread's slot (row of the
// contribution) is fixed for the whole step: its kv index is read once, and an invalid slot's
// reductions are skipped by that predicate.
//
// Shared-memory descriptors: every operand is 128-byte swizzled in column blocks of 64 dims (64 rows x
// 128 bytes, 1024-byte atoms; hopper.cuh). The K-major operands advance 32 bytes a k-step along the
// row, the MN-major ones 16 rows (2048 bytes); the N = 32 halves of the rope block start 64 bytes into
// the row, which the address-based swizzle reads as the forward's k-steps read 32 bytes in. Every
// descriptor must be uniform across the warpgroup, so that the compiler builds it in uniform registers
// from the block's base next to its instruction: the base comes from __cvta_generic_to_shared (a
// known constant; the inline-PTX cvta of smem_u32 is opaque and left a hundred 64-bit descriptors in
// ordinary registers, hoisted out of the loop and spilled), and each consumer warpgroup runs its own
// instance of the loop (consume<CONSUMER>), so that no descriptor depends on the thread index.
//
// Rounding: dout, P and dl go to bf16 before their products; every product accumulates in float32.
//
// Deterministic mode (sparse_mla_bwd_wgmma_deterministic): the same body (ROW_STORES), except that a
// finished contribution chunk of a valid slot is stored (16 bytes, streaming: the buffer is read once,
// by another kernel, and must not push the gathered rows out of L2) to the float32 contribution buffer
// [queries of the chunk, head blocks, topk, 576] that sparse_mla_bwd_mma_row_sum (sparse_mla_backward_
// mma.cu) reads, entry (blockIdx.x * topk + slot): the layout of sparse_mla_bwd_mma_deterministic, so
// that the host plan (chunks, one sort per plan, the ordered row sums) is shared. A row gradient is
// then one store per (query, head block, slot), and the row sum adds them in the host's fixed order:
// no float atomic touches dkv, and dq is written per block as in default mode.
#include "hopper.cuh"

using namespace dsa;

namespace mla_bwd_wgmma {

constexpr int D_QK = 576;
constexpr int D_V = 512;
constexpr int BLOCK_H = 64;                     // heads of one query: wgmma's M for S, dP and dq
constexpr int BLOCK_T = 64;                     // gathered rows a step: wgmma's M for the contributions
constexpr int THREADS = 384;                    // three warpgroups
constexpr int CONSUMER_THREADS = 256;
constexpr int ROW_CHUNKS = D_QK * 2 / 16;       // 72 chunks of 16 bytes per bf16 row of q / kv
constexpr int DO_ROW_CHUNKS = D_V * 2 / 16;     // 64 per bf16 row of dout
constexpr int COLUMN_BLOCK_BYTES = 64 * 128;    // 64 rows x 64 dims: one swizzled column block
constexpr int Q_BYTES = (D_QK / 64) * COLUMN_BLOCK_BYTES;   // 73728
constexpr int DO_BYTES = (D_V / 64) * COLUMN_BLOCK_BYTES;   // 65536
constexpr int STAGED_BYTES = BLOCK_H * BLOCK_T * 2;         // bf16 [64 heads, 64 slots]: one column block

// Register budget: the launch gives every thread 168 (65536 / 384, rounded down to a multiple of 8), and
// setmaxnreg.inc can only take what setmaxnreg.dec gave back to the block's pool (it waits for them: a
// larger request would hang). The producer keeps 24 (its loop needs 22), each consumer thread gets 240
// (dq's 144 accumulators, two contribution chunks of 32, S and dP).
constexpr int LAUNCH_REGISTERS = 168;
constexpr int PRODUCER_REGISTERS = 24;
constexpr int CONSUMER_REGISTERS = 240;
static_assert(128 * PRODUCER_REGISTERS + CONSUMER_THREADS * CONSUMER_REGISTERS <= THREADS * LAUNCH_REGISTERS,
              "the consumers' registers must come from the producer's");

// Named barriers of the two consumer warpgroups (0 is __syncthreads).
constexpr u32 STAGED_FREE = 1;     // both consumers done reading the previous step's DL and FP
constexpr u32 STAGED_WRITTEN = 2;  // both halves of DL and FP written

// Offsets from the 1024-byte-aligned start of dynamic shared memory (swizzle atoms must be aligned).
struct Smem {
    static constexpr int Q_OFFSET = 0;
    static constexpr int DO_OFFSET = Q_OFFSET + Q_BYTES;
    static constexpr int KV_OFFSET = DO_OFFSET + DO_BYTES;
    static constexpr int DL_OFFSET = KV_OFFSET + Q_BYTES;              // bf16 sm_scale dl  [64 heads][64 slots]
    static constexpr int FP_OFFSET = DL_OFFSET + STAGED_BYTES;         // bf16 f P          [64 heads][64 slots]
    static constexpr int ROWS_OFFSET = FP_OFFSET + STAGED_BYTES;       // int [64]: kv row of each slot, or -1
    static constexpr int HEAD_OFFSET = ROWS_OFFSET + BLOCK_T * 4;      // float [4][64]: lse log2 e, D, f, d_lse
    static constexpr int BARRIER_OFFSET = HEAD_OFFSET + 4 * BLOCK_H * 4;  // u64 full, empty
    static constexpr int USED = BARRIER_OFFSET + 2 * 8;
    static constexpr int TOTAL = USED + 1024;  // what the launch asks for: room to align the start; 231696
};
static_assert(Smem::TOTAL <= 232448, "sm_90 gives a block at most 227 KB of shared memory");

// Byte offset of 16-byte chunk `chunk` of row `row` of a swizzled tile of 64-dim column blocks.
__device__ __forceinline__ u32 tile_offset(int row, int chunk) {
    return (chunk >> 3) * COLUMN_BLOCK_BYTES + hopper::swizzle_128b(row, chunk & 7);
}

// Descriptors from their two 32-bit words (hopper::matrix_descriptor's fields): the low word holds
// (address >> 4) and LBO >> 4, the high word SBO = 1024 (8-row groups of dense atoms) and the
// 128-byte swizzle, the same for every operand here. Shared addresses stay below 2^18, so moving an
// address by `bytes` adds bytes >> 4 to the low word.
constexpr u32 DESCRIPTOR_HIGH = (1024u >> 4) | (1u << 30);  // bit 62 of the descriptor: 128-byte swizzle
constexpr u32 K_MAJOR_LBO = 1u << 16;                       // unused (a k16 slice never leaves its row): 1
constexpr u32 MN_MAJOR_LBO = (u32)(COLUMN_BLOCK_BYTES >> 4) << 16;  // next 64 MN elements: the next block

__device__ __forceinline__ u64 descriptor(u32 base_word, u32 offset_bytes, u32 lbo_field) {
    return ((u64)DESCRIPTOR_HIGH << 32) | (base_word + (offset_bytes >> 4) + lbo_field);
}

// One value column block of the rows' contributions into `acc` ([64 slots, 64 dims], fresh):
// DL^T Q[:, block] + FP^T dout[:, block], 2 x 4 k-steps over the heads.
__device__ __forceinline__ void value_contribution(float (&acc)[32], u32 base_word, int block) {
    using namespace hopper;
#pragma unroll
    for (int k = 0; k < BLOCK_H / 16; ++k) {
        const u64 a = descriptor(base_word, Smem::DL_OFFSET + k * 2048, MN_MAJOR_LBO);
        const u64 b = descriptor(base_word, Smem::Q_OFFSET + block * COLUMN_BLOCK_BYTES + k * 2048, MN_MAJOR_LBO);
        if (k == 0) wgmma_m64n64k16_bf16_t<0, 1, 1>(acc, a, b);
        else wgmma_m64n64k16_bf16_t<1, 1, 1>(acc, a, b);
    }
#pragma unroll
    for (int k = 0; k < BLOCK_H / 16; ++k) {
        const u64 a = descriptor(base_word, Smem::FP_OFFSET + k * 2048, MN_MAJOR_LBO);
        const u64 b = descriptor(base_word, Smem::DO_OFFSET + block * COLUMN_BLOCK_BYTES + k * 2048, MN_MAJOR_LBO);
        wgmma_m64n64k16_bf16_t<1, 1, 1>(acc, a, b);
    }
}

// Consumer c's half of the rope columns of the contributions into acc[0..15] ([64 slots, 32 dims],
// fresh): DL^T Q[:, 512 + 32 c ..], 4 k-steps over the heads.
__device__ __forceinline__ void rope_contribution(float (&acc)[32], u32 base_word, int consumer) {
    using namespace hopper;
#pragma unroll
    for (int k = 0; k < BLOCK_H / 16; ++k) {
        const u64 a = descriptor(base_word, Smem::DL_OFFSET + k * 2048, MN_MAJOR_LBO);
        const u64 b = descriptor(base_word, Smem::Q_OFFSET + (D_V / 64) * COLUMN_BLOCK_BYTES + consumer * 64 + k * 2048,
                                 MN_MAJOR_LBO);
        if (k == 0) wgmma_m64n32k16_bf16_t<0, 1, 1>(acc, a, b);
        else wgmma_m64n32k16_bf16_t<1, 1, 1>(acc, a, b);
    }
}

// dst[0..3] = v, evict-first: the buffer is read once, by the row sum, after the whole chunk; the
// gathered rows should keep L2. Volatile with a memory clobber, as red_add_v4_f32.
__device__ __forceinline__ void store_v4_f32_streaming(float* dst, float a, float b, float c, float d) {
    asm volatile("st.global.cs.v4.f32 [%0], {%1, %2, %3, %4};\n" :: "l"(dst), "f"(a), "f"(b), "f"(c), "f"(d)
                 : "memory");
}

// target + offset; the default instance's null target (an invalid slot) stays null.
template <bool ROW_STORES>
__device__ __forceinline__ float* column_target(float* target, int offset) {
    if constexpr (ROW_STORES) return target + offset;
    else return target == nullptr ? nullptr : target + offset;
}

// Adds the first 8 GROUPS columns of a finished contribution (rows = slots, see the header) to dkv, or
// with ROW_STORES stores them to the slot's buffer entry: `target` is this thread's slot row of dkv (of
// the buffer) at the chunk's first column plus 4 (l % 4 >= 2), written only where `valid`. Every lane
// takes part in the shuffles. In the deterministic instance `valid` is a flag beside a pointer that is
// always computed (not a null pointer): with the null test, or with the two rows' own flags, ptxas
// spilled 512-644 bytes there and serialized its wgmmas. The default instance keeps a null target for
// an invalid slot (column_target): with the always-computed pointer nvcc's SASS rebuilt the addresses
// from the kernel's parameters every step (LEA 379 -> 523, LDC 26 -> 97). The runtime's NVRTC build ran
// both sources at the same speed on the H200 (within 0.5%, NOTES.md), so the form kept is the leaner SASS.
template <int GROUPS, bool ROW_STORES>
__device__ __forceinline__ void reduce_contribution(const float (&acc)[32], float* target, bool valid, bool odd_lane) {
#pragma unroll
    for (int j = 0; j < GROUPS; ++j) {
        const float low0 = acc[4 * j], low1 = acc[4 * j + 1];    // row l / 4
        const float high0 = acc[4 * j + 2], high1 = acc[4 * j + 3];  // row l / 4 + 8
        const float given0 = __shfl_xor_sync(0xffffffffu, odd_lane ? low0 : high0, 1);
        const float given1 = __shfl_xor_sync(0xffffffffu, odd_lane ? low1 : high1, 1);
        const float v0 = odd_lane ? given0 : low0, v1 = odd_lane ? given1 : low1;
        const float v2 = odd_lane ? high0 : given0, v3 = odd_lane ? high1 : given1;
        if (!valid) continue;
        if constexpr (ROW_STORES) store_v4_f32_streaming(target + 8 * j, v0, v1, v2, v3);
        else hopper::red_add_v4_f32(target + 8 * j, v0, v1, v2, v3);
    }
}

// The consumer warpgroup CONSUMER's whole loop and its dq epilogue (see the header). CONSUMER is a
// template parameter so that every shared-memory descriptor is uniform across the warpgroup (computed
// in uniform registers from the block's base, not per thread).
struct ConsumerArgs {
    u8* smem;
    u32 base;  // shared address of smem
    int n_steps, h, query, head0, topk;
    float* dq;
    float* dkv;  // dkv, or with ROW_STORES the contribution buffer
    float sm_scale, scale_log2;
};

template <int CONSUMER, bool ROW_STORES>
__device__ __forceinline__ void consume(const ConsumerArgs& args) {
    using namespace hopper;
    constexpr int consumer = CONSUMER;
    u8* const smem = args.smem;
    const u32 base = args.base;
    const int n_steps = args.n_steps, h = args.h, query = args.query, head0 = args.head0;
    float* const dq = args.dq;
    float* const dkv = args.dkv;
    const float sm_scale = args.sm_scale, scale_log2 = args.scale_log2;
    const int* step_rows = reinterpret_cast<const int*>(smem + Smem::ROWS_OFFSET);
    const float* head_values = reinterpret_cast<const float*>(smem + Smem::HEAD_OFFSET);
    const u32 full_barrier = base + Smem::BARRIER_OFFSET;
    const u32 empty_barrier = full_barrier + 8;
    const int tid = threadIdx.x, lane = tid & 31;
    const int row0 = ((tid >> 5) & 3) * 16 + (lane >> 2);  // this thread's accumulator rows: row0, row0 + 8
    const int quad_lane = lane & 3;
    const bool odd_lane = (lane & 1) != 0;

    // dq[row0 + 8 half, 256 c + 8 j + 2 quad_lane + e] = acc_dq[4 j + 2 half + e];
    // dq[row0 + 8 half, 512 + 32 c + 8 j + 2 quad_lane + e] = acc_dq_rope[4 j + 2 half + e].
    float acc_dq[128], acc_dq_rope[16];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc_dq[i] = 0.0f;
#pragma unroll
    for (int i = 0; i < 16; ++i) acc_dq_rope[i] = 0.0f;
    // The two alternating contribution accumulators (fresh at each chunk: scale-d = 0, written only).
    float acc_a[32], acc_b[32];

    const u32 base_word = (base & 0x3FFFF) >> 4;
    for (int step = 0; step < n_steps; ++step) {
        mbarrier_wait(full_barrier, (u32)step & 1u);

        // ---- 1. S = Q K^T and dP = dout V^T: 64 heads x slots 32 c .. +32.
        float acc_s[16], acc_dp[16];
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < D_QK / 16; ++k) {
            const u32 column = (k >> 2) * COLUMN_BLOCK_BYTES + (k & 3) * 32;
            const u64 a = descriptor(base_word, Smem::Q_OFFSET + column, K_MAJOR_LBO);
            const u64 b = descriptor(base_word, Smem::KV_OFFSET + consumer * 32 * 128 + column, K_MAJOR_LBO);
            if (k == 0) wgmma_m64n32k16_bf16_t<0, 0, 0>(acc_s, a, b);
            else wgmma_m64n32k16_bf16_t<1, 0, 0>(acc_s, a, b);
        }
#pragma unroll
        for (int k = 0; k < D_V / 16; ++k) {
            const u32 column = (k >> 2) * COLUMN_BLOCK_BYTES + (k & 3) * 32;
            const u64 a = descriptor(base_word, Smem::DO_OFFSET + column, K_MAJOR_LBO);
            const u64 b = descriptor(base_word, Smem::KV_OFFSET + consumer * 32 * 128 + column, K_MAJOR_LBO);
            if (k == 0) wgmma_m64n32k16_bf16_t<0, 0, 0>(acc_dp, a, b);
            else wgmma_m64n32k16_bf16_t<1, 0, 0>(acc_dp, a, b);
        }
        wgmma_commit();
        // While they run: the rows of this thread's S columns, and of its contribution slot (the
        // producer rewrites step_rows only after this thread's `empty` arrival below).
        int2 column_rows[4];
#pragma unroll
        for (int j = 0; j < 4; ++j)
            column_rows[j] = *reinterpret_cast<const int2*>(step_rows + consumer * 32 + 8 * j + 2 * quad_lane);
        const int slot_in_step = row0 + (odd_lane ? 8 : 0);
        const int slot_row = step_rows[slot_in_step];
        // The buffer entry of (this block, slot) has the stride of a dkv row: the chunks' column offsets
        // below serve both. Computed from the kernel's parameters each step (a pointer kept across the
        // loop costs two registers the consumer does not have).
        const bool slot_valid = slot_row >= 0;
        float* slot_target;  // see reduce_contribution for why the two instances differ here
        if constexpr (ROW_STORES) {
            const u64 target_row = (u64)blockIdx.x * args.topk + step * BLOCK_T + slot_in_step;
            slot_target = dkv + (slot_valid ? target_row : 0) * D_QK + consumer * 256 + 2 * (quad_lane & 2);
        } else {
            slot_target = slot_valid ? dkv + (u64)slot_row * D_QK + consumer * 256 + 2 * (quad_lane & 2) : nullptr;
        }
        wgmma_wait<0>();
        fence_registers(acc_s);
        fence_registers(acc_dp);

        // ---- 2. P, dl; sm_scale dl and f P as bf16 (element 4 j + 2 half + e: head row0 + 8 half,
        // slot 32 c + 8 j + 2 quad_lane + e).
        float head_lse_log2[2], head_delta[2], head_share[2], head_d_lse[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int row = row0 + 8 * half;
            head_lse_log2[half] = head_values[row];
            head_delta[half] = head_values[BLOCK_H + row];
            head_share[half] = head_values[2 * BLOCK_H + row];
            head_d_lse[half] = head_values[3 * BLOCK_H + row];
        }
        u32 packed_dl[8], packed_fp[8];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                float d_logit[2], value_weight[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int i = 4 * j + 2 * half + e;
                    const bool valid = (e == 0 ? column_rows[j].x : column_rows[j].y) >= 0;
                    const float p = valid ? fast_exp2(acc_s[i] * scale_log2 - head_lse_log2[half]) : 0.0f;
                    const float dl = p * (head_share[half] * (acc_dp[i] - head_delta[half]) + head_d_lse[half]);
                    d_logit[e] = dl * sm_scale;
                    value_weight[e] = head_share[half] * p;
                }
                packed_dl[2 * j + half] = pack_bf16x2(d_logit[0], d_logit[1]);
                packed_fp[2 * j + half] = pack_bf16x2(value_weight[0], value_weight[1]);
            }
        }
        named_barrier_sync(STAGED_FREE, CONSUMER_THREADS);  // the other consumer's last step is done with them
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const u32 at = swizzle_128b(row0 + 8 * half, consumer * 4 + j) + quad_lane * 4;
                *reinterpret_cast<u32*>(smem + Smem::DL_OFFSET + at) = packed_dl[2 * j + half];
                *reinterpret_cast<u32*>(smem + Smem::FP_OFFSET + at) = packed_fp[2 * j + half];
            }
        }
        fence_proxy_async_shared();  // this thread's stores, before either consumer's wgmma reads them
        named_barrier_sync(STAGED_WRITTEN, CONSUMER_THREADS);

        // ---- 3. dq += DL K: heads x (256 value dims + 32 rope dims) of this consumer, 4 k-steps of 16 slots.
        fence_registers(acc_dq);
        fence_registers(acc_dq_rope);
        fence_registers(acc_a);
        wgmma_fence();
#pragma unroll
        for (int k = 0; k < BLOCK_T / 16; ++k) {
            const u64 a = descriptor(base_word, Smem::DL_OFFSET + k * 32, K_MAJOR_LBO);
            const u64 b = descriptor(base_word, Smem::KV_OFFSET + consumer * 4 * COLUMN_BLOCK_BYTES + k * 2048, MN_MAJOR_LBO);
            wgmma_m64n256k16_bf16_b_mn_major(acc_dq, a, b);
            const u64 b_rope =
                descriptor(base_word, Smem::KV_OFFSET + (D_V / 64) * COLUMN_BLOCK_BYTES + consumer * 64 + k * 2048,
                           MN_MAJOR_LBO);
            wgmma_m64n32k16_bf16_t<1, 0, 1>(acc_dq_rope, a, b_rope);
        }
        wgmma_commit();

        // ---- 4. the rows' contributions, chunk by chunk; the next product runs while one is reduced.
        value_contribution(acc_a, base_word, consumer * 4 + 0);
        wgmma_commit();
        wgmma_wait<1>();  // dq's products are done: the rows tile is free for the next gather
        fence_registers(acc_dq);
        fence_registers(acc_dq_rope);
        mbarrier_arrive(empty_barrier);

        fence_registers(acc_b);
        wgmma_fence();
        value_contribution(acc_b, base_word, consumer * 4 + 1);
        wgmma_commit();
        wgmma_wait<1>();
        fence_registers(acc_a);
        reduce_contribution<8, ROW_STORES>(acc_a, slot_target, slot_valid, odd_lane);

        fence_registers(acc_a);
        wgmma_fence();
        value_contribution(acc_a, base_word, consumer * 4 + 2);
        wgmma_commit();
        wgmma_wait<1>();
        fence_registers(acc_b);
        reduce_contribution<8, ROW_STORES>(acc_b, column_target<ROW_STORES>(slot_target, 64), slot_valid, odd_lane);

        fence_registers(acc_b);
        wgmma_fence();
        value_contribution(acc_b, base_word, consumer * 4 + 3);
        wgmma_commit();
        wgmma_wait<1>();
        fence_registers(acc_a);
        reduce_contribution<8, ROW_STORES>(acc_a, column_target<ROW_STORES>(slot_target, 128), slot_valid, odd_lane);

        fence_registers(acc_a);
        wgmma_fence();
        rope_contribution(acc_a, base_word, consumer);
        wgmma_commit();
        wgmma_wait<1>();
        fence_registers(acc_b);
        reduce_contribution<8, ROW_STORES>(acc_b, column_target<ROW_STORES>(slot_target, 192), slot_valid, odd_lane);

        wgmma_wait<0>();  // this consumer is done reading DL and FP (the next step's STAGED_FREE)
        fence_registers(acc_a);
        // The rope half: columns 512 + 32 c + ..., 4 groups of 8 (slot_target points at 256 c + ...).
        reduce_contribution<4, ROW_STORES>(acc_a, column_target<ROW_STORES>(slot_target, D_V - 224 * consumer),
                                           slot_valid, odd_lane);
    }

    // ---- dq (already scaled by sm_scale through dl); a query without a valid slot gets 0.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int head = head0 + row0 + 8 * half;
        if (head >= h) continue;
        float* dq_row = dq + ((u64)query * h + head) * D_QK + 2 * quad_lane;
#pragma unroll
        for (int j = 0; j < 32; ++j)
            *reinterpret_cast<float2*>(dq_row + consumer * 256 + 8 * j) =
                make_float2(acc_dq[4 * j + 2 * half], acc_dq[4 * j + 2 * half + 1]);
#pragma unroll
        for (int j = 0; j < 4; ++j)
            *reinterpret_cast<float2*>(dq_row + D_V + consumer * 32 + 8 * j) =
                make_float2(acc_dq_rope[4 * j + 2 * half], acc_dq_rope[4 * j + 2 * half + 1]);
    }
}

// The whole block (see the header); ROW_STORES: rows_out is the contribution buffer, else dkv.
template <bool ROW_STORES>
__device__ __forceinline__ void backward_block(const u16* __restrict__ q, const u16* __restrict__ kv,
                                               const int* __restrict__ indices, const int* __restrict__ topk_length,
                                               const float* __restrict__ lse, const void* __restrict__ d_out,
                                               const float* __restrict__ delta, const float* __restrict__ share,
                                               const float* __restrict__ d_lse, float* __restrict__ dq,
                                               float* __restrict__ rows_out, int h, int s_kv, int topk, int d_out_bf16,
                                               float sm_scale, float scale_log2) {
    using namespace hopper;
    extern __shared__ __align__(1024) u8 dynamic_smem[];
    const u32 raw_base = (u32)__cvta_generic_to_shared(dynamic_smem);  // a known constant: uniform
    const u32 base = (raw_base + 1023u) & ~1023u;
    u8* smem = dynamic_smem + (base - raw_base);

    const int tid = threadIdx.x, warpgroup = tid >> 7, lane = tid & 31;
    const int head_blocks = (h + BLOCK_H - 1) / BLOCK_H;
    const int query = blockIdx.x / head_blocks;
    const int head0 = (blockIdx.x - query * head_blocks) * BLOCK_H;
    const int* row_indices = indices + (u64)query * topk;
    int n_slots = topk;
    if (topk_length != nullptr) n_slots = min(n_slots, max(topk_length[query], 0));
    const int n_steps = (n_slots + BLOCK_T - 1) / BLOCK_T;

    int* step_rows = reinterpret_cast<int*>(smem + Smem::ROWS_OFFSET);
    float* head_values = reinterpret_cast<float*>(smem + Smem::HEAD_OFFSET);  // [4][64]
    const u32 full_barrier = base + Smem::BARRIER_OFFSET;
    const u32 empty_barrier = full_barrier + 8;

    if (tid == 0) {
        mbarrier_init(full_barrier, 128);                // every producer thread
        mbarrier_init(empty_barrier, CONSUMER_THREADS);  // every consumer thread
    }
    // Q and dout of the 64 heads, by all threads, once; heads past h are zero rows.
    for (int c = tid; c < BLOCK_H * ROW_CHUNKS; c += THREADS) {
        const int row = c / ROW_CHUNKS, chunk = c - row * ROW_CHUNKS;
        const bool valid = head0 + row < h;
        const u16* src = q + (valid ? ((u64)query * h + head0 + row) * D_QK + chunk * 8 : 0);
        cp_async_16(base + Smem::Q_OFFSET + tile_offset(row, chunk), src, valid);
    }
    if (d_out_bf16) {
        const u16* d_out_bits = static_cast<const u16*>(d_out);
        for (int c = tid; c < BLOCK_H * DO_ROW_CHUNKS; c += THREADS) {
            const int row = c / DO_ROW_CHUNKS, chunk = c - row * DO_ROW_CHUNKS;
            const bool valid = head0 + row < h;
            const u16* src = d_out_bits + (valid ? ((u64)query * h + head0 + row) * D_V + chunk * 8 : 0);
            cp_async_16(base + Smem::DO_OFFSET + tile_offset(row, chunk), src, valid);
        }
    } else {  // float32, rounded once to bf16
        const float* d_out_values = static_cast<const float*>(d_out);
        for (int c = tid; c < BLOCK_H * DO_ROW_CHUNKS; c += THREADS) {
            const int row = c / DO_ROW_CHUNKS, chunk = c - row * DO_ROW_CHUNKS;
            uint4 packed = make_uint4(0u, 0u, 0u, 0u);
            if (head0 + row < h) {
                const float4* src =
                    reinterpret_cast<const float4*>(d_out_values + ((u64)query * h + head0 + row) * D_V + chunk * 8);
                const float4 low = src[0], high = src[1];
                packed = make_uint4(pack_bf16x2(low.x, low.y), pack_bf16x2(low.z, low.w),
                                    pack_bf16x2(high.x, high.y), pack_bf16x2(high.z, high.w));
            }
            *reinterpret_cast<uint4*>(smem + Smem::DO_OFFSET + tile_offset(row, chunk)) = packed;
        }
    }
    // Per-head values. A padded head gets lse +inf, so P = 0 there, and D = f = d_lse = 0: it
    // contributes nothing anywhere.
    if (tid < BLOCK_H) {
        const int head = head0 + tid;
        const bool real = head < h;
        const u64 at = (u64)query * h + head;
        head_values[tid] = real ? lse[at] * DSA_LOG2E : __int_as_float(0x7f800000);
        head_values[BLOCK_H + tid] = real ? delta[at] : 0.0f;
        head_values[2 * BLOCK_H + tid] = real ? share[at] : 0.0f;
        head_values[3 * BLOCK_H + tid] = real && d_lse != nullptr ? d_lse[at] : 0.0f;
    }
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async_shared();  // this thread's copies and stores, before any wgmma reads them
    __syncthreads();             // Q and dout in place for every thread; barriers initialized

    if (warpgroup == 0) {
        // ---------------------------------------------------------------- producer
        setmaxnreg_decrease<PRODUCER_REGISTERS>();
        const int producer_warp = tid >> 5;  // rows producer_warp + 4 r of each step
        // Lane l copies chunks l, l + 32 and (l < 8) l + 64 of each row: column blocks l / 8, + 4, + 8,
        // chunk l % 8 of the block, swizzled by the row.
        const u32 lane_tile = base + Smem::KV_OFFSET + (lane >> 3) * COLUMN_BLOCK_BYTES;
        const u16* lane_kv = kv + lane * 8;
        for (int step = 0; step < n_steps; ++step) {
            // Lane r (< 16) reads the index of row producer_warp + 4 r, before the wait: its latency
            // hides behind the consumers' work.
            const int slot = step * BLOCK_T + producer_warp + 4 * (lane & 15);
            int index = slot < n_slots ? row_indices[slot] : -1;
            index = index >= 0 && index < s_kv ? index : -1;
            // A fresh barrier counts its (never run) previous phase as complete: step 0 passes.
            mbarrier_wait(empty_barrier, ((u32)step & 1u) ^ 1u);
#pragma unroll 1
            for (int r = 0; r < BLOCK_T / 4; ++r) {
                const int row = producer_warp + 4 * r;
                const int row_index = __shfl_sync(0xffffffffu, index, r);
                if (lane == 0) step_rows[row] = row_index;
                const bool valid = row_index >= 0;
                const u16* src = lane_kv + (valid ? (u64)row_index * D_QK : 0);
                const u32 dst = lane_tile + row * 128 + (((lane & 7) ^ (row & 7)) << 4);
                cp_async_16(dst, src, valid);
                cp_async_16(dst + 4 * COLUMN_BLOCK_BYTES, src + 256, valid);
                if (lane < 8) cp_async_16(dst + 8 * COLUMN_BLOCK_BYTES, src + 512, valid);
            }
            cp_async_commit();
            // This thread's own copies, fenced into the async proxy, before it releases the tile.
            cp_async_wait<0>();
            fence_proxy_async_shared();
            mbarrier_arrive(full_barrier);
        }
        return;
    }

    // -------------------------------------------------------------------- consumers
    setmaxnreg_increase<CONSUMER_REGISTERS>();
    const ConsumerArgs consumer_args = {smem, base, n_steps, h, query, head0, topk, dq, rows_out, sm_scale, scale_log2};
    if (warpgroup == 1) consume<0, ROW_STORES>(consumer_args);
    else consume<1, ROW_STORES>(consumer_args);
}

}  // namespace mla_bwd_wgmma

// Default mode: row gradients added to dkv with float32 reductions. Grid: s_q * (h / 64).
extern "C" __global__ void __launch_bounds__(mla_bwd_wgmma::THREADS, 1)
sparse_mla_bwd_wgmma(const u16* __restrict__ q,            // [s_q, h, 576] bf16 bits
                     const u16* __restrict__ kv,           // [s_kv, 576] bf16 bits
                     const int* __restrict__ indices,      // [s_q, topk]
                     const int* __restrict__ topk_length,  // [s_q] or null
                     const float* __restrict__ lse,        // [s_q, h]
                     const void* __restrict__ d_out,       // [s_q, h, 512] float32, or bf16 bits (d_out_bf16)
                     const float* __restrict__ delta,      // [s_q, h] D
                     const float* __restrict__ share,      // [s_q, h] f
                     const float* __restrict__ d_lse,      // [s_q, h] or null
                     float* __restrict__ dq,               // [s_q, h, 576]
                     float* __restrict__ dkv,              // [s_kv, 576], zeroed by the host, added to
                     int h, int s_kv, int topk, int d_out_bf16, float sm_scale, float scale_log2) {
    mla_bwd_wgmma::backward_block<false>(q, kv, indices, topk_length, lse, d_out, delta, share, d_lse, dq, dkv, h, s_kv,
                                         topk, d_out_bf16, sm_scale, scale_log2);
}

// Deterministic mode, one chunk of queries (every pointer starts at the chunk's first query): row
// gradients stored to `contributions`, entry ((query * head blocks + head block) * topk + slot), for
// valid slots only; sparse_mla_bwd_mma_row_sum adds them to dkv. Grid: queries * (h / 64).
extern "C" __global__ void __launch_bounds__(mla_bwd_wgmma::THREADS, 1)
sparse_mla_bwd_wgmma_deterministic(const u16* __restrict__ q,            // [c, h, 576] bf16 bits
                                   const u16* __restrict__ kv,           // [s_kv, 576] bf16 bits
                                   const int* __restrict__ indices,      // [c, topk]
                                   const int* __restrict__ topk_length,  // [c] or null
                                   const float* __restrict__ lse,        // [c, h]
                                   const void* __restrict__ d_out,       // [c, h, 512] float32, or bf16 bits
                                   const float* __restrict__ delta,      // [c, h] D
                                   const float* __restrict__ share,      // [c, h] f
                                   const float* __restrict__ d_lse,      // [c, h] or null
                                   float* __restrict__ dq,               // [c, h, 576]
                                   float* __restrict__ contributions,    // [c, h / 64, topk, 576]
                                   int h, int s_kv, int topk, int d_out_bf16, float sm_scale, float scale_log2) {
    mla_bwd_wgmma::backward_block<true>(q, kv, indices, topk_length, lse, d_out, delta, share, d_lse, dq, contributions,
                                        h, s_kv, topk, d_out_bf16, sm_scale, scale_log2);
}
