// Sparse MLA forward on Hopper's warpgroup tensor-core instructions, second schedule (sm_90a only):
// the contracts of the kernels of sparse_mla_wgmma.cu (bf16 q [s_q, h, 576], d_v = 512, h a multiple of
// 64): an index < 0 or >= s_kv, or a slot past topk_length, is never read; duplicates count twice; no
// valid slot -> out 0 and lse -inf; with a sink, out *= 1 / (1 + exp(sink - lse)). Two entry points on
// one body (sparse_mla_fwd_wgmma_v2_body<FP8_CACHE>), as there:
//
//   sparse_mla_fwd_wgmma_v2      bf16 latent rows [s_kv, 576] (sparse_mla_fwd_wgmma's contract);
//   sparse_mla_fwd_wgmma_fp8_v2  the packed FP8 decode cache uint8 [s_kv, 656] (sparse_mla_fwd_wgmma_fp8's).
//
// Same block, warpgroups, shared-memory layout and consumer loop as those kernels (their header explains
// them); what differs is the producers' schedule.
//
// Why: in sparse_mla_fwd_wgmma a producer warp takes a tile's rows one at a time, and each row's
// cp.async waits for that row's index load (a dependent global load, L2 latency: the SASS has LDG ->
// LDGSTS per row), so a warp's 16 rows cost 16 L2 round trips in series, ~5 us a tile at the ncu run's
// clocks: the ~5.9 us per tile the H200 measured, against ~1.2 us of tensor-core work. Here:
//
//   - the indices of a tile are loaded one tile ahead, before the producer waits for the stage: the
//     loads of tile t + 1 travel while tile t's copies are issued and land, so no copy waits for one;
//   - a thread copies chunk `part` (16 bytes) of each of the nine 64-dim column blocks of 4 rows:
//     8 threads per row, 16 rows at a time (FlashMLA's SM90 sparse prefill splits its gather the same
//     way), so every lane issues 36 copies a tile with no idle lanes (one warp per row left a row's
//     72 chunks on 32 lanes: three rounds, the last with 8 lanes), and the copy addresses are
//     row base + constants;
//   - a warp's 4 rows of one column block are 512 contiguous bytes of the swizzled tile: no bank
//     conflicts in the copies' shared-memory writes; each 8-thread group reads 128 contiguous bytes
//     of its row.
//
// The FP8 producer (fp8_rows.cuh's loads and dequantizing stores) in sparse_mla_fwd_wgmma_fp8 waits for a
// stage to be free before it loads the stage's first batches of rows, so every fill starts with a round
// trip to HBM: at b 64, s_q 2, T 32K a tile took ~4.6 us there, while the consumers need ~2.5 on bf16
// rows (~4.1 us here: backends/cupy_cuda/NOTES.md has the measurements). Here the first FP8_DEPTH batches of a tile are
// loaded right after the previous tile's release, so that they travel during the wait for `empty` (loads
// only fill registers; nothing touches the stage before the wait), the later ones FP8_DEPTH batches ahead
// of the stores; a tile's row indices are loaded two tiles ahead and the first tile's rows requested
// before the block's Q copy and barrier.
//
// Consumer: unchanged but for the O rescale, which a warp skips when every factor it would apply is
// exactly 1 (no row maximum of the warp moved: bit for bit the same O).
//
// Scores are kept in log2 units (scale_log2 = sm_scale * log2 e) so exp2 is one instruction.
#include "fp8_rows.cuh"

using namespace dsa;

namespace mla_wgmma_v2 {

constexpr int D_QK = 576;                       // 512 latent + 64 RoPE dims per row
constexpr int D_V = 512;                        // V = the first 512 dims of the same row
constexpr int BLOCK_H = 64;                     // heads of one query: wgmma's M
constexpr int BLOCK_T = 64;                     // gathered rows (slots) per tile
constexpr int STAGES = 2;                       // KV tiles in flight
constexpr int THREADS = 384;                    // three warpgroups
constexpr int CONSUMER_THREADS = 256;
constexpr int ROW_CHUNKS = D_QK * 2 / 16;       // 72 chunks of 16 bytes per bf16 row
constexpr int COLUMN_BLOCKS = D_QK / 64;        // 9 swizzled column blocks of 64 dims
constexpr int COLUMN_BLOCK_BYTES = 64 * 128;    // 64 rows x 64 dims: one swizzled column block
constexpr int TILE_BYTES = COLUMN_BLOCKS * COLUMN_BLOCK_BYTES;  // 73728
constexpr int P_BYTES = BLOCK_H * BLOCK_T * 2;  // bf16 [64 heads, 64 slots]: one column block

// The producer's split of a tile: thread p of the warpgroup copies chunk p % 8 of every column block of
// rows p / 8 + 16 r, r < ROWS_PER_THREAD.
constexpr int THREADS_PER_ROW = 8;                                // a 128-byte row of a column block
constexpr int ROWS_AT_ONCE = 128 / THREADS_PER_ROW;               // 16
constexpr int ROWS_PER_THREAD = BLOCK_T / ROWS_AT_ONCE;           // 4
static_assert(ROWS_PER_THREAD * ROWS_AT_ONCE == BLOCK_T && THREADS_PER_ROW * COLUMN_BLOCKS == ROW_CHUNKS,
              "the producer's threads cover every chunk of a tile once");

// Registers per thread: the launch gives every warp what __launch_bounds__(384, 1) allows, 168 (65536 /
// 384 rounded down to a multiple of 8); setmaxnreg moves them from the producer to the consumers, whose
// increase can only take what the producer's decrease returned (it waits for them otherwise). The
// producer holds two tiles' indices (8 registers) and its row addresses; the consumers need 176 or more
// (O is 128 of them).
constexpr int LAUNCH_REGISTERS = 168;
constexpr int PRODUCER_REGISTERS = 56;
constexpr int CONSUMER_REGISTERS = 224;
static_assert(128 * PRODUCER_REGISTERS + CONSUMER_THREADS * CONSUMER_REGISTERS <= THREADS * LAUNCH_REGISTERS,
              "the consumers' increase must fit in what the launch allocated");
static_assert(PRODUCER_REGISTERS % 8 == 0 && CONSUMER_REGISTERS % 8 == 0, "setmaxnreg takes multiples of 8");

// The FP8 producer keeps FP8_DEPTH batches of rows in flight (fp8_rows::Fp8Batch, 24 registers each at
// 4 rows) beside the three tiles' indices, its addresses and the batch it dequantizes. ptxas (nvcc 13.0)
// fits two batches without spilling from 120 registers (it spills at 112; four batches spill even at
// 152), but at 120 it sinks the last batch's loads among that batch's own stores, so their latency is
// not hidden; at 152 every load of a batch is issued before the stores of the batch before it end.
// The consumers get 176, where they compile without spills.
constexpr int FP8_DEPTH = 2;
constexpr int FP8_PRODUCER_REGISTERS = 152;
constexpr int FP8_CONSUMER_REGISTERS = 176;
static_assert(fp8_rows::FP8_BATCHES % FP8_DEPTH == 0, "a whole number of rings a tile: slots repeat every tile");
static_assert(128 * FP8_PRODUCER_REGISTERS + CONSUMER_THREADS * FP8_CONSUMER_REGISTERS <= THREADS * LAUNCH_REGISTERS,
              "the consumers' increase must fit in what the launch allocated");
// A cluster pair (sparse_mla_fwd_wgmma_fp8_pair) stores half of each warp's batches a block, all of them in
// flight at once; the peer receives that half: 32 rows of 576 bf16 values a tile.
constexpr int PAIR_BATCHES = fp8_rows::FP8_BATCHES / 2;
constexpr u32 PAIR_PEER_BYTES = 4u * PAIR_BATCHES * fp8_rows::FP8_BATCH_PEER_BYTES;
// A stage's `empty` barrier in a pair: every consumer thread of the block and a lane of every consumer warp of
// the peer (release_stage).
constexpr u32 PAIR_EMPTY_ARRIVALS = CONSUMER_THREADS + CONSUMER_THREADS / 32;
static_assert(PAIR_BATCHES == FP8_DEPTH && PAIR_PEER_BYTES == BLOCK_T / 2 * D_QK * 2, "the pair's schedule");
static_assert(FP8_PRODUCER_REGISTERS % 8 == 0 && FP8_CONSUMER_REGISTERS % 8 == 0, "setmaxnreg takes multiples of 8");

// Named barriers of the two consumer warpgroups (0 is __syncthreads).
constexpr u32 MAX_EXCHANGED = 1;   // both row maxima of the tile written
constexpr u32 P_WRITTEN = 2;       // both halves of P in shared memory
constexpr u32 SUMS_EXCHANGED = 3;  // both partial denominators written
// ... of the split-V consumers (consume_split_v): the first consumer hands the second P and the rescale
// factors of a tile at P_READY, where both wait (compute-sanitizer's racecheck does not follow a one-sided
// named barrier, barrier.arrive on one side: tools/named_barrier_check.py). The second hands the P tile back
// through an mbarrier (Smem::P_FREE_BARRIER_OFFSET), which racecheck follows: it arrives and goes on, and only
// the first waits. As fast as both meeting there; the one-sided named barrier was 3.5% faster, but racecheck
// cannot follow it (backends/cupy_cuda/NOTES.md).
constexpr u32 P_READY = 4;

// Registers of the split-V consumers: the first holds O's first half (128), S (32) and P as bf16 (16), the
// second only O's second half. With the bf16 rows' producer (56) or the FP8 rows' (152, as in v2), at most
// what the launch allocated (FlashMLA's FP8 decode gives its three warpgroups 192 / 160 / 152).
constexpr int SPLIT_V_FIRST_REGISTERS = 240;
constexpr int SPLIT_V_SECOND_REGISTERS = 208;
constexpr int FP8_SPLIT_V_PRODUCER_REGISTERS = 152;
constexpr int FP8_SPLIT_V_FIRST_REGISTERS = 192;
constexpr int FP8_SPLIT_V_SECOND_REGISTERS = 160;
// The pair's split: its producer does half a tile's batches, and at 152 / 192 / 160 NVRTC's build of the pair
// kept 16 bytes on the stack (a store in the producer's loop: 5.5% of ncu's samples); at 144 / 200 / 160 it
// keeps none (0.305 -> 0.251 ms at b 64, s_q 2, T 32K, one run; backends/cupy_cuda/NOTES.md).
constexpr int FP8_PAIR_SPLIT_V_PRODUCER_REGISTERS = 144;
constexpr int FP8_PAIR_SPLIT_V_FIRST_REGISTERS = 200;
static_assert(128 * (PRODUCER_REGISTERS + SPLIT_V_FIRST_REGISTERS + SPLIT_V_SECOND_REGISTERS) <= THREADS * LAUNCH_REGISTERS &&
              128 * (FP8_PAIR_SPLIT_V_PRODUCER_REGISTERS + FP8_PAIR_SPLIT_V_FIRST_REGISTERS +
                     FP8_SPLIT_V_SECOND_REGISTERS) <= THREADS * LAUNCH_REGISTERS &&
              128 * (FP8_SPLIT_V_PRODUCER_REGISTERS + FP8_SPLIT_V_FIRST_REGISTERS + FP8_SPLIT_V_SECOND_REGISTERS) <=
                  THREADS * LAUNCH_REGISTERS,
              "the consumers' increases must fit in what the launch allocated");
static_assert(SPLIT_V_FIRST_REGISTERS >= LAUNCH_REGISTERS && FP8_SPLIT_V_FIRST_REGISTERS >= LAUNCH_REGISTERS,
              "the first consumer's registers only grow");

// Offsets from the 1024-byte-aligned start of dynamic shared memory (swizzle atoms must be aligned).
struct Smem {
    static constexpr int Q_OFFSET = 0;
    static constexpr int KV_OFFSET = Q_OFFSET + TILE_BYTES;
    static constexpr int P_OFFSET = KV_OFFSET + STAGES * TILE_BYTES;
    static constexpr int VALID_OFFSET = P_OFFSET + P_BYTES;                // int [STAGES][BLOCK_T]
    static constexpr int MAX_OFFSET = VALID_OFFSET + STAGES * BLOCK_T * 4;  // float [2][BLOCK_H]
    static constexpr int SUM_OFFSET = MAX_OFFSET + 2 * BLOCK_H * 4;        // float [2][BLOCK_H]
    // The split-V consumers' P_FREE mbarrier, in the maxima's second row (they keep one row of factors there).
    static constexpr int P_FREE_BARRIER_OFFSET = MAX_OFFSET + BLOCK_H * 4;
    static constexpr int BARRIER_OFFSET = SUM_OFFSET + 2 * BLOCK_H * 4;    // u64 full[STAGES], empty[STAGES]
    static constexpr int USED = BARRIER_OFFSET + 2 * STAGES * 8;
    static constexpr int TOTAL = USED + 1024;  // what the launch asks for: room to align the start; 231968
};
static_assert(Smem::TOTAL <= 232448, "sm_90 gives a block at most 227 KB of shared memory");
static_assert(Smem::P_FREE_BARRIER_OFFSET % 8 == 0, "an mbarrier is 8-byte aligned");

using mla_tile::tile_offset;  // the tile layout the kernels share (mla_tile.cuh)

// The kv rows of this producer thread's ROWS_PER_THREAD slots of tile `tile` (rows `group` + 16 r), or -1
// where the slot is past n_slots or its index outside [0, s_kv). Independent loads, issued together.
__device__ __forceinline__ void load_tile_rows(int (&rows)[ROWS_PER_THREAD], const int* __restrict__ row_indices,
                                               int tile, int n_slots, int s_kv, int group) {
#pragma unroll
    for (int r = 0; r < ROWS_PER_THREAD; ++r) {
        const int slot = tile * BLOCK_T + group + ROWS_AT_ONCE * r;
        rows[r] = slot < n_slots ? __ldg(row_indices + slot) : -1;
    }
#pragma unroll
    for (int r = 0; r < ROWS_PER_THREAD; ++r) rows[r] = rows[r] >= 0 && rows[r] < s_kv ? rows[r] : -1;
}

// This thread's 36 copies of a stage (invalid slots zero-filled without a read), its rows' validity
// flags, then the wait for its own copies, so that it can fence them into the async proxy before
// releasing the stage; the consumers are busy with the other stage meanwhile.
__device__ __forceinline__ void fill_stage(u32 kv_tile, int* stage_valid, const u16* __restrict__ kv,
                                           const int (&rows)[ROWS_PER_THREAD], int group, int part) {
#pragma unroll
    for (int r = 0; r < ROWS_PER_THREAD; ++r) {
        const int row = group + ROWS_AT_ONCE * r;
        const bool valid = rows[r] >= 0;
        const u16* src = kv + (valid ? (u64)rows[r] * D_QK : 0) + part * 8;
        const u32 dst = kv_tile + hopper::swizzle_128b(row, part);
#pragma unroll
        for (int block = 0; block < COLUMN_BLOCKS; ++block)
            cp_async_16(dst + block * COLUMN_BLOCK_BYTES, src + block * 64, valid);
        if (part == 0) stage_valid[row] = valid;
    }
    cp_async_commit();
    cp_async_wait<0>();
}

// The FP8 producer's state carried across tiles: the indices of the warp's 16 rows (lane j < 16: row
// producer_warp + 4 j, fp8_rows::fp8_row_index) of the tile being stored (`now`) and of the next
// (`next`), and FP8_DEPTH batches of loaded rows; ring slot b % FP8_DEPTH holds batch b of its tile.
struct Fp8Ahead {
    int now, next;
    fp8_rows::Fp8Batch ring[FP8_DEPTH];
};

// The first tile's indices and rows, requested before the block's Q copy and barrier.
// `first_batch`: the first batch of the warp's rows this block stores (0; in a cluster pair, the block's
// half of them: PAIR_BATCHES times its rank).
__device__ __forceinline__ void start_fp8_rows(Fp8Ahead& ahead, const u8* __restrict__ kv,
                                               const int* __restrict__ row_indices, int n_slots, int s_kv,
                                               int producer_warp, int lane, int first_batch = 0) {
    using namespace fp8_rows;
    ahead.now = fp8_row_index(row_indices, 0, n_slots, s_kv, producer_warp, lane);
    ahead.next = fp8_row_index(row_indices, 1, n_slots, s_kv, producer_warp, lane);
#pragma unroll
    for (int batch = 0; batch < FP8_DEPTH; ++batch)
        ahead.ring[batch] = load_fp8_batch(kv, ahead.now, first_batch + batch, lane);
}

// Producer, packed FP8 rows: per tile, the indices of tile + 2 requested, the wait for the stage, the
// validity flags, then each batch stored (dequantized) and its ring slot refilled with the batch
// FP8_DEPTH later in the same tile; then the fence into the async proxy and the release. The next tile's
// first FP8_DEPTH batches are loaded after the fence, before that tile's wait for its stage, during which
// they travel. Not before the fence: fence.proxy.async is MEMBAR.ALL.CTA + FENCE.VIEW.ASYNC.S in SASS, and
// the MEMBAR waits for every load of the thread still in flight (the first version of this loop, which
// refilled the slots with the next tile's batches before it, measured no faster than the first FP8 kernel).
// Past the last tile every slot is past n_slots: no row is read there (the loads come back as zeros,
// never stored).
__device__ __forceinline__ void produce_fp8_tiles(Fp8Ahead& ahead, u8* smem, u32 full_barriers, u32 empty_barriers,
                                                  const u8* __restrict__ kv, const int* __restrict__ row_indices,
                                                  int n_tiles, int n_slots, int s_kv, int producer_warp, int lane) {
    using namespace hopper;
    using namespace fp8_rows;
    int* valid_flags = reinterpret_cast<int*>(smem + Smem::VALID_OFFSET);
    for (int tile = 0; tile < n_tiles; ++tile) {
        const int stage = tile % STAGES;
        const u32 round = (u32)(tile / STAGES);
        // The tile's first batches (tile 0's came with start_fp8_rows), requested at the top of the loop,
        // after the previous tile's fence in program order and across the loop's back edge, where ptxas
        // leaves them; its scheduler moved them above the fence when they followed it in the same block.
        if (tile > 0) {
#pragma unroll
            for (int batch = 0; batch < FP8_DEPTH; ++batch) ahead.ring[batch] = load_fp8_batch(kv, ahead.now, batch, lane);
        }
        const int after = fp8_row_index(row_indices, tile + 2, n_slots, s_kv, producer_warp, lane);
        // A fresh barrier counts its (never run) previous phase as complete: round 0 passes.
        mbarrier_wait(empty_barriers + 8 * stage, (round & 1u) ^ 1u);
        u8* kv_tile = smem + Smem::KV_OFFSET + stage * TILE_BYTES;
        if (lane < PRODUCER_WARP_ROWS) valid_flags[stage * BLOCK_T + producer_warp + 4 * lane] = ahead.now >= 0;
#pragma unroll
        for (int batch = 0; batch < FP8_BATCHES; ++batch) {
            store_fp8_batch(kv_tile, ahead.ring[batch % FP8_DEPTH], batch, producer_warp, lane);
            if (batch + FP8_DEPTH < FP8_BATCHES)
                ahead.ring[batch % FP8_DEPTH] = load_fp8_batch(kv, ahead.now, batch + FP8_DEPTH, lane);
        }
        // This thread's stores of the stage, into the async proxy that wgmma reads through, before the release.
        fence_proxy_async_shared();
        mbarrier_arrive(full_barriers + 8 * stage);
        ahead.now = ahead.next;
        ahead.next = after;
    }
}

// Producer of a cluster pair (sparse_mla_fwd_wgmma_fp8_pair): the two blocks of a query's two head blocks
// share every tile. Each dequantizes half of its rows (batches PAIR_BATCHES * rank .. of every warp's 16)
// and stores them into its own stage and, through st.async, the peer's; so a tile costs a producer half
// the loads and dequantization of produce_fp8_tiles and one round trip (both its batches are loaded at
// the top of the loop, FP8_DEPTH == PAIR_BATCHES). The stage's `full` barrier completes when this block's
// 128 producer threads have arrived (after their own stores and the proxy fence) and the peer's
// PAIR_PEER_BYTES have landed (thread 0's arrival expects them); `empty` when all 16 consumer warps of the
// pair have released the stage, since this producer writes into both blocks' copies of it.
__device__ __forceinline__ void produce_fp8_pair_tiles(Fp8Ahead& ahead, u8* smem, u32 full_barriers,
                                                       u32 empty_barriers, u32 peer_kv_tiles, u32 peer_full_barriers,
                                                       const u8* __restrict__ kv, const int* __restrict__ row_indices,
                                                       int n_tiles, int n_slots, int s_kv, int producer_warp, int lane,
                                                       int first_batch) {
    using namespace hopper;
    using namespace fp8_rows;
    int* valid_flags = reinterpret_cast<int*>(smem + Smem::VALID_OFFSET);
    for (int tile = 0; tile < n_tiles; ++tile) {
        const int stage = tile % STAGES;
        const u32 round = (u32)(tile / STAGES);
        if (tile > 0) {
#pragma unroll
            for (int batch = 0; batch < PAIR_BATCHES; ++batch)
                ahead.ring[batch] = load_fp8_batch(kv, ahead.now, first_batch + batch, lane);
        }
        const int after = fp8_row_index(row_indices, tile + 2, n_slots, s_kv, producer_warp, lane);
        // Released by the consumers of both blocks (hopper::mbarrier_arrive_cluster says why a CTA-scope wait).
        mbarrier_wait(empty_barriers + 8 * stage, (round & 1u) ^ 1u);
        u8* kv_tile = smem + Smem::KV_OFFSET + stage * TILE_BYTES;
        // Every block flags all 64 slots itself (the warp's lanes hold all 16 of its rows' indices).
        if (lane < PRODUCER_WARP_ROWS) valid_flags[stage * BLOCK_T + producer_warp + 4 * lane] = ahead.now >= 0;
#pragma unroll
        for (int batch = 0; batch < PAIR_BATCHES; ++batch)
            store_fp8_batch<true>(kv_tile, ahead.ring[batch], first_batch + batch, producer_warp, lane,
                                  peer_kv_tiles + stage * TILE_BYTES, peer_full_barriers + 8 * stage);
        fence_proxy_async_shared();
        if ((threadIdx.x & 127) == 0) mbarrier_arrive_expect_tx(full_barriers + 8 * stage, PAIR_PEER_BYTES);
        else mbarrier_arrive(full_barriers + 8 * stage);
        ahead.now = ahead.next;
        ahead.next = after;
    }
}

// A consumer thread's share of one row of its O half, scaled by the row's final factor: `out_row` points at
// its first column (256 consumer + 2 quad_lane), `half` picks the row (row0 + 8 half) in the accumulator layout.
__device__ __forceinline__ void store_o_row(float* out_row, const float (&acc_o)[128], int half, float factor) {
#pragma unroll
    for (int j = 0; j < 32; ++j) {
        *reinterpret_cast<float2*>(out_row + j * 8) =
            make_float2(acc_o[4 * j + 2 * half] * factor, acc_o[4 * j + 2 * half + 1] * factor);
    }
}

// A consumer thread is done with a stage: it arrives on `empty`; in a cluster pair, lane 0 of each warp also
// arrives for the warp on the peer's barrier (both producers of the pair write the stage). Every thread
// arrives on its own block's barrier, rather than a lane for its warp: the stage's validity flags are read
// by the threads and written by this block's producer only, and racecheck follows a thread's own arrival,
// not the __syncwarp before a lane's (the pair's one racecheck report while one lane arrived for each warp).
template <bool PAIR>
__device__ __forceinline__ void release_stage(u32 empty_barrier, u32 peer, int lane) {
    using namespace hopper;
    mbarrier_arrive(empty_barrier);
    if constexpr (PAIR) {
        __syncwarp();
        if (lane == 0) mbarrier_arrive_cluster(peer_shared_address(empty_barrier, peer));
    }
}

// The two consumer warpgroups meet at named barrier `id`, each from its own code: barrier.sync without
// .aligned (bar.sync is barrier.sync.aligned, which requires every thread to execute the same instruction;
// compute-sanitizer's synccheck reports the two warpgroups' different ones as divergent threads).
__device__ __forceinline__ void consumers_meet(u32 id) {
    hopper::named_barrier_sync_unaligned(id, CONSUMER_THREADS);
}

// The split-V consumers (sparse_mla_fwd_wgmma_v3 and its FP8 twins), FlashMLA's Hopper decode schedule (its
// csrc/sm90/decode/sparse_fp8/splitkv_mla.cuh, read for the design): the first consumer warpgroup takes
// S = Q K^T over all 64 slots of a tile (N = 64), the whole online softmax (no exchange of row maxima) and
// O[:, :256] += P V from P in registers (the RS form); it hands P and the rescale factors to the second
// through shared memory, which only rescales O[:, 256:] and adds its P V. The second's product overlaps the
// first's softmax and next S; in v2 both consumers stopped at two barriers a tile. Summation order: a row's
// denominator is one thread's running sum over all 64 slots (v2 adds two 32-slot halves), so outputs agree
// with v2's to rounding, not bit for bit.
template <bool FP8_CACHE, bool PAIR>
__device__ __forceinline__ void consume_split_v(u8* smem, u32 q_tile, u32 kv_tiles, u32 p_tile, u32 full_barriers,
                                                u32 empty_barriers, u32 peer, int n_tiles, float scale_log2,
                                                const float* __restrict__ attn_sink, float* __restrict__ out,
                                                float* __restrict__ lse, int query, int head0, int h, int tid) {
    using namespace hopper;
    const int warpgroup = tid >> 7, lane = tid & 31;
    const int consumer = warpgroup - 1;                    // 0: S, softmax, O[:, :256]; 1: O[:, 256:]
    const int row0 = ((tid >> 5) & 3) * 16 + (lane >> 2);  // this thread's rows: row0, row0 + 8
    const int quad_lane = lane & 3;
    const int* valid_flags = reinterpret_cast<const int*>(smem + Smem::VALID_OFFSET);
    float* factors = reinterpret_cast<float*>(smem + Smem::MAX_OFFSET);  // a tile's rescale factors, [64]
    float* finals = reinterpret_cast<float*>(smem + Smem::SUM_OFFSET);   // the rows' final factors, [64]
    // Phase t completes when the second consumer has read tile t's P and factors.
    const u32 p_free_barrier = smem_u32(smem) + Smem::P_FREE_BARRIER_OFFSET;

    // O[row0 + 8 half, 256 consumer + 8 j + 2 quad_lane + e] = acc_o[4 j + 2 half + e]; zeroed once the
    // warpgroup has its registers.
    float acc_o[128];
    float final_factor[2];  // the rows' final factors: the first computes them, the second reads them
    if (consumer == 0) {
        setmaxnreg_increase<PAIR ? FP8_PAIR_SPLIT_V_FIRST_REGISTERS
                                 : FP8_CACHE ? FP8_SPLIT_V_FIRST_REGISTERS : SPLIT_V_FIRST_REGISTERS>();
#pragma unroll
        for (int i = 0; i < 128; ++i) acc_o[i] = 0.0f;
        float row_max[2] = {DSA_NEG_INF, DSA_NEG_INF};  // running max (log2 units) of rows row0, row0 + 8
        float row_sum[2] = {0.0f, 0.0f};                // this thread's share of the denominator
        for (int tile = 0; tile < n_tiles; ++tile) {
            const int stage = tile % STAGES;
            mbarrier_wait(full_barriers + 8 * stage, (u32)(tile / STAGES) & 1u);
            const u32 kv_tile = kv_tiles + stage * TILE_BYTES;
            const int* tile_valid = valid_flags + stage * BLOCK_T;

            // ---- S = Q K^T: 64 heads x 64 slots, 36 steps of 16 dims (the first overwrites S).
            float acc_s[32];
            wgmma_fence();
#pragma unroll
            for (int k = 0; k < D_QK / 16; ++k) {
                const u32 column = (k >> 2) * COLUMN_BLOCK_BYTES + (k & 3) * 32;
                const u64 q_descriptor = matrix_descriptor(q_tile + column, 16, 1024);
                const u64 k_descriptor = matrix_descriptor(kv_tile + column, 16, 1024);
                if (k == 0) wgmma_m64n64k16_bf16_t<0, 0, 0>(acc_s, q_descriptor, k_descriptor);
                else wgmma_m64n64k16_bf16_t<1, 0, 0>(acc_s, q_descriptor, k_descriptor);
            }
            wgmma_commit();
            wgmma_wait<0>();
            fence_registers(acc_s);

            // ---- mask invalid slots, the tile's row maxima over the quad, the online-softmax update.
            float tile_max[2] = {DSA_NEG_INF, DSA_NEG_INF};
#pragma unroll
            for (int i = 0; i < 32; ++i) {
                const int column = (i >> 2) * 8 + quad_lane * 2 + (i & 1);
                acc_s[i] = tile_valid[column] ? acc_s[i] * scale_log2 : DSA_NEG_INF;
                tile_max[(i >> 1) & 1] = fmaxf(tile_max[(i >> 1) & 1], acc_s[i]);
            }
            float alpha[2], exp_base[2];
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                tile_max[half] = fmaxf(tile_max[half], __shfl_xor_sync(0xffffffffu, tile_max[half], 1));
                tile_max[half] = fmaxf(tile_max[half], __shfl_xor_sync(0xffffffffu, tile_max[half], 2));
                alpha[half] = rescale_softmax_row(row_max[half], row_sum[half], tile_max[half], exp_base[half]);
            }
            // P = exp2(S - max) as bf16 pairs: p[i / 2] holds columns (i, i + 1) of the accumulator layout,
            // which is the RS form's A layout (hopper::wgmma_m64n256k16_bf16_rs_b_mn_major).
            u32 p[16];
#pragma unroll
            for (int i = 0; i < 32; i += 2) {
                const int half = (i >> 1) & 1;
                const float p0 = fast_exp2(acc_s[i] - exp_base[half]);
                const float p1 = fast_exp2(acc_s[i + 1] - exp_base[half]);
                row_sum[half] += p0 + p1;
                p[i / 2] = pack_bf16x2(p0, p1);
            }
            // ---- hand P and the factors to the second consumer, once it is done with the last ones.
            if (tile > 0) mbarrier_wait(p_free_barrier, (u32)(tile - 1) & 1u);
#pragma unroll
            for (int i = 0; i < 32; i += 2) {
                const int row = row0 + 8 * ((i >> 1) & 1);
                *reinterpret_cast<u32*>(smem + Smem::P_OFFSET + swizzle_128b(row, i >> 2) + quad_lane * 4) = p[i / 2];
            }
            if (quad_lane == 0) {
                factors[row0] = alpha[0];
                factors[row0 + 8] = alpha[1];
            }
            fence_proxy_async_shared();  // the P stores, before the second consumer's wgmma reads them
            consumers_meet(P_READY);

            // ---- O[:, :256] = alpha O + P V[:, :256], P from registers: 4 steps of 16 slots.
            if (!__all_sync(0xffffffffu, alpha[0] == 1.0f && alpha[1] == 1.0f)) {
#pragma unroll
                for (int i = 0; i < 128; ++i) acc_o[i] *= alpha[(i >> 1) & 1];
            }
            fence_registers(acc_o);
            wgmma_fence();
#pragma unroll
            for (int k = 0; k < BLOCK_T / 16; ++k) {
                const u32 a[4] = {p[4 * k], p[4 * k + 1], p[4 * k + 2], p[4 * k + 3]};
                const u64 v_descriptor = matrix_descriptor(kv_tile + k * 16 * 128, COLUMN_BLOCK_BYTES, 1024);
                wgmma_m64n256k16_bf16_rs_b_mn_major(acc_o, a, v_descriptor);
            }
            wgmma_commit();
            wgmma_wait<0>();
            fence_registers(acc_o);
            release_stage<PAIR>(empty_barriers + 8 * stage, peer, lane);
        }
        // ---- the rows' lse and final factors; the second consumer scales its half with them.
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            row_sum[half] += __shfl_xor_sync(0xffffffffu, row_sum[half], 1);
            row_sum[half] += __shfl_xor_sync(0xffffffffu, row_sum[half], 2);
            const int row = row0 + 8 * half;
            const int head = head0 + row;
            float row_lse, factor;
            finish_softmax_row(row_max[half], row_sum[half], attn_sink, head < h ? head : 0, row_lse, factor);
            final_factor[half] = factor;  // every lane of the quad has the row's sums
            if (quad_lane == 0) {
                finals[row] = factor;
                if (head < h) lse[(u64)query * h + head] = row_lse;
            }
        }
        consumers_meet(SUMS_EXCHANGED);
    } else {
        // From the launch's 168: more with the bf16 rows' small producer, fewer beside the FP8 producer.
        constexpr int SECOND = FP8_CACHE ? FP8_SPLIT_V_SECOND_REGISTERS : SPLIT_V_SECOND_REGISTERS;
        if constexpr (SECOND > LAUNCH_REGISTERS) setmaxnreg_increase<SECOND>();
        else setmaxnreg_decrease<SECOND>();
#pragma unroll
        for (int i = 0; i < 128; ++i) acc_o[i] = 0.0f;
        for (int tile = 0; tile < n_tiles; ++tile) {
            const int stage = tile % STAGES;
            mbarrier_wait(full_barriers + 8 * stage, (u32)(tile / STAGES) & 1u);  // the rows: acquire them
            const u32 kv_tile = kv_tiles + stage * TILE_BYTES;
            consumers_meet(P_READY);
            const float alpha0 = factors[row0], alpha1 = factors[row0 + 8];
            if (!__all_sync(0xffffffffu, alpha0 == 1.0f && alpha1 == 1.0f)) {
#pragma unroll
                for (int i = 0; i < 128; ++i) acc_o[i] *= ((i >> 1) & 1) ? alpha1 : alpha0;
            }
            // ---- O[:, 256:] += P V[:, 256:], P from shared memory.
            fence_registers(acc_o);
            wgmma_fence();
#pragma unroll
            for (int k = 0; k < BLOCK_T / 16; ++k) {
                const u64 p_descriptor = matrix_descriptor(p_tile + k * 32, 16, 1024);
                const u64 v_descriptor = matrix_descriptor(kv_tile + 4 * COLUMN_BLOCK_BYTES + k * 16 * 128,
                                                           COLUMN_BLOCK_BYTES, 1024);
                wgmma_m64n256k16_bf16_b_mn_major(acc_o, p_descriptor, v_descriptor);
            }
            wgmma_commit();
            wgmma_wait<0>();
            fence_registers(acc_o);
            mbarrier_arrive(p_free_barrier);  // P and the factors read: the first may write the next ones
            release_stage<PAIR>(empty_barriers + 8 * stage, peer, lane);
        }
        consumers_meet(SUMS_EXCHANGED);
        final_factor[0] = finals[row0];
        final_factor[1] = finals[row0 + 8];
    }
    // No block of a pair leaves while the other may still arrive on its barriers or store into its stages.
    if constexpr (PAIR) cluster_sync();

    // ---- epilogue: O scaled by its row's final factor.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = row0 + 8 * half;
        const int head = head0 + row;
        if (head >= h) continue;
        store_o_row(out + ((u64)query * h + head) * D_V + consumer * 256 + quad_lane * 2, acc_o, half,
                    final_factor[half]);
    }
}

// PAIR (FP8_CACHE only): the block is one of a cluster pair sharing its tiles (produce_fp8_pair_tiles);
// SPLIT_V: the consumers are consume_split_v's.
template <bool FP8_CACHE, bool PAIR = false, bool SPLIT_V = false>
__device__ __forceinline__ void sparse_mla_fwd_wgmma_v2_body(const u16* __restrict__ q, const u8* __restrict__ kv,
                                                             const int* __restrict__ indices,
                                                             const int* __restrict__ topk_length,
                                                             const float* __restrict__ attn_sink,
                                                             float* __restrict__ out, float* __restrict__ lse,
                                                             int h, int s_kv, int topk, float scale_log2) {
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

    // The producer's first tile of indices (and, for FP8 rows, the rows), requested before the Q copy and
    // the block's barrier.
    const int group = (tid & 127) / THREADS_PER_ROW, part = tid % THREADS_PER_ROW;
    const int producer_warp = tid >> 5;
    int rows[ROWS_PER_THREAD];
    Fp8Ahead fp8_ahead;
    static_assert(FP8_CACHE || !PAIR, "cluster pairs share dequantized FP8 tiles only");
    // In a pair, rank r stores batches PAIR_BATCHES r .. of every producer warp; both blocks hold the same
    // query (consecutive head blocks), so the same slots and tiles.
    [[maybe_unused]] const int first_batch = PAIR ? PAIR_BATCHES * (int)cluster_rank() : 0;
    if (warpgroup == 0) {
        if constexpr (FP8_CACHE)
            start_fp8_rows(fp8_ahead, kv, row_indices, n_slots, s_kv, producer_warp, lane, first_batch);
        else load_tile_rows(rows, row_indices, 0, n_slots, s_kv, group);
    }

    if (tid == 0) {
        for (int stage = 0; stage < STAGES; ++stage) {
            mbarrier_init(full_barriers + 8 * stage, 128);  // every producer thread (and, in a pair, the peer's bytes)
            // every consumer thread, and in a pair one lane of every consumer warp of the peer
            mbarrier_init(empty_barriers + 8 * stage, PAIR ? PAIR_EMPTY_ARRIVALS : CONSUMER_THREADS);
        }
        if constexpr (SPLIT_V) mbarrier_init(base + Smem::P_FREE_BARRIER_OFFSET, 128);  // the second consumer
        if constexpr (PAIR) fence_mbarrier_init_cluster();
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
    // The peer's barriers initialized before this block stores into its stages or arrives on them.
    if constexpr (PAIR) cluster_sync();
    [[maybe_unused]] const u32 peer = PAIR ? cluster_rank() ^ 1u : 0u;

    if (warpgroup == 0) {
        // ---------------------------------------------------------------- producer
        constexpr int FP8_PRODUCER = !SPLIT_V ? FP8_PRODUCER_REGISTERS
                                     : PAIR ? FP8_PAIR_SPLIT_V_PRODUCER_REGISTERS : FP8_SPLIT_V_PRODUCER_REGISTERS;
        if constexpr (PAIR) {
            setmaxnreg_decrease<FP8_PRODUCER>();
            produce_fp8_pair_tiles(fp8_ahead, smem, full_barriers, empty_barriers, peer_shared_address(kv_tiles, peer),
                                   peer_shared_address(full_barriers, peer), kv, row_indices, n_tiles, n_slots, s_kv,
                                   producer_warp, lane, first_batch);
            // Every thread of the pair meets the consumers' last barrier below, rather than leave early.
            cluster_sync();
            return;
        } else if constexpr (FP8_CACHE) {
            setmaxnreg_decrease<FP8_PRODUCER>();
            produce_fp8_tiles(fp8_ahead, smem, full_barriers, empty_barriers, kv, row_indices, n_tiles, n_slots, s_kv,
                              producer_warp, lane);
            return;
        }
        setmaxnreg_decrease<PRODUCER_REGISTERS>();
        const u16* kv_rows = reinterpret_cast<const u16*>(kv);
        for (int tile = 0; tile < n_tiles; ++tile) {
            const int stage = tile % STAGES;
            const u32 round = (u32)(tile / STAGES);
            // Past the last tile every slot is past n_slots: no load is issued.
            int next_rows[ROWS_PER_THREAD];
            load_tile_rows(next_rows, row_indices, tile + 1, n_slots, s_kv, group);
            // A fresh barrier counts its (never run) previous phase as complete: round 0 passes.
            mbarrier_wait(empty_barriers + 8 * stage, (round & 1u) ^ 1u);
            fill_stage(kv_tiles + stage * TILE_BYTES, valid_flags + stage * BLOCK_T, kv_rows, rows, group, part);
            // This thread's cp.async writes of the stage, into the async proxy that wgmma reads through,
            // before the release.
            fence_proxy_async_shared();
            mbarrier_arrive(full_barriers + 8 * stage);
#pragma unroll
            for (int r = 0; r < ROWS_PER_THREAD; ++r) rows[r] = next_rows[r];
        }
        return;
    }

    // -------------------------------------------------------------------- consumers
    if constexpr (SPLIT_V) {
        consume_split_v<FP8_CACHE, PAIR>(smem, q_tile, kv_tiles, p_tile, full_barriers, empty_barriers, peer, n_tiles,
                                         scale_log2, attn_sink, out, lse, query, head0, h, tid);
        return;
    }
    setmaxnreg_increase<FP8_CACHE ? FP8_CONSUMER_REGISTERS : CONSUMER_REGISTERS>();
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
        // A factor of exactly 1 leaves O as it is: the warp skips the 128 multiplications when none of its
        // rows' maxima moved (most tiles once the maxima settle), with the same result bit for bit.
        if (!__all_sync(0xffffffffu, alpha[0] == 1.0f && alpha[1] == 1.0f)) {
#pragma unroll
            for (int i = 0; i < 128; ++i) acc_o[i] *= alpha[(i >> 1) & 1];
        }
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
        release_stage<PAIR>(empty_barriers + 8 * stage, peer, lane);  // this thread (warp) is done with the stage
    }
    // No block of a pair leaves while the other may still arrive on its barriers (its consumers' last
    // releases) or store into its stages; the producers meet here too.
    if constexpr (PAIR) cluster_sync();

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
        store_o_row(out + ((u64)query * h + head) * D_V + consumer * 256 + quad_lane * 2, acc_o, half, factor);
        if (consumer == 0 && quad_lane == 0) lse[(u64)query * h + head] = row_lse;
    }
}

}  // namespace mla_wgmma_v2

extern "C" __global__ void __launch_bounds__(mla_wgmma_v2::THREADS, 1)
sparse_mla_fwd_wgmma_v2(const u16* __restrict__ q,            // [s_q, h, 576] bf16 bits
                        const u16* __restrict__ kv,           // [s_kv, 576] bf16 bits
                        const int* __restrict__ indices,      // [s_q, topk]
                        const int* __restrict__ topk_length,  // [s_q] or null
                        const float* __restrict__ attn_sink,  // [h] or null
                        float* __restrict__ out,              // [s_q, h, 512]
                        float* __restrict__ lse,              // [s_q, h]
                        int h, int s_kv, int topk, float scale_log2) {
    mla_wgmma_v2::sparse_mla_fwd_wgmma_v2_body<false>(q, reinterpret_cast<const u8*>(kv), indices, topk_length,
                                                      attn_sink, out, lse, h, s_kv, topk, scale_log2);
}

// The packed FP8 cache (16-byte aligned: the host copies a cache that is not).
extern "C" __global__ void __launch_bounds__(mla_wgmma_v2::THREADS, 1)
sparse_mla_fwd_wgmma_fp8_v2(const u16* __restrict__ q,            // [s_q, h, 576] bf16 bits
                            const u8* __restrict__ kv,            // [s_kv, 656] packed FP8 rows
                            const int* __restrict__ indices,      // [s_q, topk]
                            const int* __restrict__ topk_length,  // [s_q] or null
                            const float* __restrict__ attn_sink,  // [h] or null
                            float* __restrict__ out,              // [s_q, h, 512]
                            float* __restrict__ lse,              // [s_q, h]
                            int h, int s_kv, int topk, float scale_log2) {
    mla_wgmma_v2::sparse_mla_fwd_wgmma_v2_body<true>(q, kv, indices, topk_length, attn_sink, out, lse, h, s_kv, topk,
                                                     scale_log2);
}

// The packed FP8 cache, the two head blocks of a query (h a multiple of 128: blocks 2 i, 2 i + 1) in a
// cluster sharing their dequantized tiles (produce_fp8_pair_tiles); the same arguments and launch.
extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(mla_wgmma_v2::THREADS, 1)
sparse_mla_fwd_wgmma_fp8_pair(const u16* __restrict__ q,            // [s_q, h, 576] bf16 bits
                              const u8* __restrict__ kv,            // [s_kv, 656] packed FP8 rows
                              const int* __restrict__ indices,      // [s_q, topk]
                              const int* __restrict__ topk_length,  // [s_q] or null
                              const float* __restrict__ attn_sink,  // [h] or null
                              float* __restrict__ out,              // [s_q, h, 512]
                              float* __restrict__ lse,              // [s_q, h]
                              int h, int s_kv, int topk, float scale_log2) {
    mla_wgmma_v2::sparse_mla_fwd_wgmma_v2_body<true, true>(q, kv, indices, topk_length, attn_sink, out, lse, h, s_kv,
                                                           topk, scale_log2);
}

// The split-V consumers (consume_split_v) over bf16 rows, the packed FP8 cache, and the FP8 cluster pair: the
// contracts and launches of sparse_mla_fwd_wgmma_v2, sparse_mla_fwd_wgmma_fp8_v2 and sparse_mla_fwd_wgmma_fp8_pair.
extern "C" __global__ void __launch_bounds__(mla_wgmma_v2::THREADS, 1)
sparse_mla_fwd_wgmma_v3(const u16* __restrict__ q, const u16* __restrict__ kv, const int* __restrict__ indices,
                        const int* __restrict__ topk_length, const float* __restrict__ attn_sink,
                        float* __restrict__ out, float* __restrict__ lse, int h, int s_kv, int topk, float scale_log2) {
    mla_wgmma_v2::sparse_mla_fwd_wgmma_v2_body<false, false, true>(q, reinterpret_cast<const u8*>(kv), indices,
                                                                   topk_length, attn_sink, out, lse, h, s_kv, topk,
                                                                   scale_log2);
}

extern "C" __global__ void __launch_bounds__(mla_wgmma_v2::THREADS, 1)
sparse_mla_fwd_wgmma_fp8_v3(const u16* __restrict__ q, const u8* __restrict__ kv, const int* __restrict__ indices,
                            const int* __restrict__ topk_length, const float* __restrict__ attn_sink,
                            float* __restrict__ out, float* __restrict__ lse, int h, int s_kv, int topk,
                            float scale_log2) {
    mla_wgmma_v2::sparse_mla_fwd_wgmma_v2_body<true, false, true>(q, kv, indices, topk_length, attn_sink, out, lse, h,
                                                                  s_kv, topk, scale_log2);
}

extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(mla_wgmma_v2::THREADS, 1)
sparse_mla_fwd_wgmma_fp8_pair_v3(const u16* __restrict__ q, const u8* __restrict__ kv, const int* __restrict__ indices,
                                 const int* __restrict__ topk_length, const float* __restrict__ attn_sink,
                                 float* __restrict__ out, float* __restrict__ lse, int h, int s_kv, int topk,
                                 float scale_log2) {
    mla_wgmma_v2::sparse_mla_fwd_wgmma_v2_body<true, true, true>(q, kv, indices, topk_length, attn_sink, out, lse, h,
                                                                 s_kv, topk, scale_log2);
}
