// The paged fp8 indexer of indexer_wgmma.cu (same contract, output and cache layout),
//   scores[b n + j, t] = scale(s(b, t)) sum_h w[b n + j, h] ReLU(q[b n + j, h] . k[s(b, t)])
//                        for t <= context_lens[b] - n + j, -inf elsewhere,
// with s(b, t) slot t % block_size of block block_table[b, t / block_size] and n = next_n, rewritten
// for the issue slots it spends per 64-key step.
//
// Why. indexer_paged_wgmma_q1's loop is 586 SASS instructions a step and thread (sm_90a, nvcc 13.0;
// _q2's 749): two signed divisions by the runtime block_size a step (the page of the step loaded next
// and the page of the step scored), a block-table load on the path to the next copies, the copy loop
// left as a generic loop (its trip count depends on threadIdx.x as far as nvcc knows), about five
// instructions an accumulator element in the epilogue (ReLU as a compare and a select, the weight, a
// select for absent heads, the sum), and a product waited for as soon as it is issued. At five blocks
// of four warps an SM that is ~2900 issue cycles a sub-partition per five steps of 8.25 KB: 3.3 TB/s
// if every cycle issued, ~1.8 TB/s at the half of the cycles such loops issue in: the 0.63 ms measured.
//
// Here, per step:
// * the block's page entries are read once (lane l of every warp holds step l's block and slot) and
//   a step's page comes by two shuffles; no division in the loop;
// * the copies are four 16-byte cp.async a thread at fixed offsets from the page (thread t copies chunk
//   t % 8 of rows t / 8 + 16 i: its shared-memory offsets are constants), and one more for 16 threads'
//   scales; rows past the context inside a present page are copied too (the page holds them; their
//   scores are masked), so the only predicate is the page's presence;
// * two accumulators: the product of step s + 1 is issued before the epilogue of step s, which then
//   runs while the tensor cores work; the first k32 product of a step has scale-d = 0 (no zeroing);
// * the epilogue is two instructions an element: max.NaN (ReLU that keeps NaN) and an FMA into one of
//   four partial sums; no select for absent heads: their query rows are zero and their weights 0, so
//   they add 0, or NaN exactly when the key holds a NaN, and then every present head's dot product
//   (the same hardware products, with q_d * NaN) is NaN too and the reference's score is NaN as well;
// * after the quad's two shuffles each lane stores one value (lane % 4: half, then query): one store
//   instruction a step instead of two, 16 or 32 lanes a warp busy instead of 8.
//
// Grid: x = sequences, y = runs of STEPS steps of 64 positions, z = groups of QUERIES queries. Taken by
// the host (CupyBackend.paged_indexer_wgmma_v2) where indexer_paged_wgmma would run: e4m3 queries,
// h_i <= 64, d_I = 128, blocks of a multiple of 64 keys, sm_90a.
#include "hopper.cuh"

using namespace dsa;

namespace indexer_wgmma_v2 {
constexpr int THREADS = 128;  // one warpgroup, every thread a copier
constexpr int KEYS = 64;      // key positions a step: the product's rows
constexpr int ROW = 128;      // bytes of a key or query head row
constexpr int STEPS = 16;     // steps a block: 1024 positions
constexpr int STAGES_Q1 = 5;  // four blocks an SM at one query (51,456 B each)
constexpr int STAGES_Q2 = 8;  // two blocks an SM at two queries (their registers), so a deeper ring
constexpr int KEY_TILE = KEYS * ROW;
constexpr int SCALE_TILE = KEYS * 4;
template <int QUERIES, int STAGES>
struct Layout {  // offsets from the 1024-byte-aligned start of dynamic shared memory
    static constexpr int Q = 0;                           // [64 QUERIES][ROW], 128-byte swizzle
    static constexpr int K = Q + 64 * QUERIES * ROW;      // [STAGES][KEYS][ROW], 128-byte swizzle
    static constexpr int SCALES = K + STAGES * KEY_TILE;  // [STAGES][KEYS] float
    static constexpr int USED = SCALES + STAGES * SCALE_TILE;
    static constexpr int TOTAL = USED + 1024;             // what the launch asks for: room to align
};

// ReLU that keeps NaN, in one instruction (max.NaN: FMNMX.NAN).
__device__ __forceinline__ float relu_nan(float x) {
    float y;
    asm("max.NaN.f32 %0, %1, 0f00000000;\n" : "=f"(y) : "f"(x));
    return y;
}

#define DSA_V2_ACC4(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define DSA_V2_ACC16(d, i) DSA_V2_ACC4(d, i), DSA_V2_ACC4(d, i + 4), DSA_V2_ACC4(d, i + 8), DSA_V2_ACC4(d, i + 12)
#define DSA_V2_OUT4(d, i) "=f"(d[i]), "=f"(d[i + 1]), "=f"(d[i + 2]), "=f"(d[i + 3])
#define DSA_V2_OUT16(d, i) DSA_V2_OUT4(d, i), DSA_V2_OUT4(d, i + 4), DSA_V2_OUT4(d, i + 8), DSA_V2_OUT4(d, i + 12)
#define DSA_V2_REGS32                                                                      \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "              \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define DSA_V2_REGS64                                                                      \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "              \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "     \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "     \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// D[64 x N] (+)= A[64 x 32] B[32 x N], e4m3, both K-major in shared memory; ACCUMULATE = 0 is
// scale-d = 0 (D only written, so the compiler needs no zeroed registers). Register layout as in
// hopper.cuh: d[4 j + 2 half + e] is (row + 8 half, 8 j + 2 (t % 4) + e).
template <int N, int ACCUMULATE>
__device__ __forceinline__ void qgmma(float (&d)[N / 2], u64 a, u64 b) {
    if constexpr (N == 64) {
        if constexpr (ACCUMULATE)
            asm volatile("wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 " DSA_V2_REGS32 ", %32, %33, 1, 1, 1;\n"
                         : DSA_V2_ACC16(d, 0), DSA_V2_ACC16(d, 16) : "l"(a), "l"(b));
        else
            asm volatile("wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 " DSA_V2_REGS32 ", %32, %33, 0, 1, 1;\n"
                         : DSA_V2_OUT16(d, 0), DSA_V2_OUT16(d, 16) : "l"(a), "l"(b));
    } else {
        if constexpr (ACCUMULATE)
            asm volatile("wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 " DSA_V2_REGS64 ", %64, %65, 1, 1, 1;\n"
                         : DSA_V2_ACC16(d, 0), DSA_V2_ACC16(d, 16), DSA_V2_ACC16(d, 32), DSA_V2_ACC16(d, 48)
                         : "l"(a), "l"(b));
        else
            asm volatile("wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 " DSA_V2_REGS64 ", %64, %65, 0, 1, 1;\n"
                         : DSA_V2_OUT16(d, 0), DSA_V2_OUT16(d, 16), DSA_V2_OUT16(d, 32), DSA_V2_OUT16(d, 48)
                         : "l"(a), "l"(b));
    }
}
#undef DSA_V2_REGS64
#undef DSA_V2_REGS32
#undef DSA_V2_OUT16
#undef DSA_V2_OUT4
#undef DSA_V2_ACC16
#undef DSA_V2_ACC4

// The product of a step's 64 keys and the query tile over K = 128 bytes, issued and committed as one
// wgmma group, not waited for. a and b are the descriptors of the tiles' starts: a start address
// moved by `bytes` (a multiple of 16, the sum below 256 KB) is the descriptor plus bytes / 16, so the
// k32 slices and the stages cost one add each, not a descriptor built a step.
template <int N>
__device__ __forceinline__ void issue_product(float (&d)[N / 2], u64 a, u64 b) {
    hopper::wgmma_fence();
    qgmma<N, 0>(d, a, b);
#pragma unroll
    for (int k = 1; k < 4; ++k) qgmma<N, 1>(d, a + 2 * k, b + 2 * k);
    hopper::wgmma_commit();
}
}  // namespace indexer_wgmma_v2

template <int QUERIES, int STAGES>
__device__ __forceinline__ void
indexer_paged_wgmma_v2(const u8* __restrict__ q,              // [b * next_n, h_i, 128] e4m3
                       const float* __restrict__ weights,     // [b * next_n, h_i]
                       const u8* __restrict__ cache,          // [num_blocks, block_size * 132]
                       const int* __restrict__ block_table,   // [b, max_blocks]
                       const int* __restrict__ context_lens,  // [b], in [next_n, max_blocks * block_size]
                       float* __restrict__ scores,            // [b * next_n, max_context_len]
                       int num_blocks, int max_blocks, int block_size, int next_n, int max_context_len, int h_i) {
    using namespace indexer_wgmma_v2;
    using namespace hopper;
    constexpr int N = 64 * QUERIES;
    using L = Layout<QUERIES, STAGES>;
    static_assert(STAGES >= 3, "the stage refilled at step s is step s - 1's, two products after it");
    extern __shared__ __align__(1024) u8 dynamic_smem[];
    const u32 raw_base = smem_u32(dynamic_smem);
    const u32 base = (raw_base + 1023u) & ~1023u;
    const float* scale_tiles = reinterpret_cast<const float*>(dynamic_smem + (base - raw_base) + L::SCALES);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int sequence = blockIdx.x;
    const int first_query = blockIdx.z * QUERIES;
    const int first_position = blockIdx.y * STEPS * KEYS;
    const int length = context_lens[sequence];
    const u64 block_bytes = (u64)block_size * (ROW + 4);
    const int live = max(0, min(STEPS, (length - first_position + KEYS - 1) / KEYS));
    const int columns = max(0, min(STEPS, (max_context_len - first_position + KEYS - 1) / KEYS));
    const int first_row = sequence * next_n + first_query, rows_valid = min(QUERIES, next_n - first_query);

    // Lane l's page entry: the block and slot of step l % STEPS's first position (-1: no block).
    int my_block = -1, my_slot = 0;
    {
        const int position = first_position + (lane % STEPS) * KEYS;
        const int logical = position / block_size;
        if ((lane % STEPS) < live && logical < max_blocks) {
            const int block = block_table[(u64)sequence * max_blocks + logical];
            my_block = block < num_blocks ? block : -1;
        }
        my_slot = position - logical * block_size;
    }

    // The queries' heads into the B tile (part of the first copy group): row j 64 + h is head h of
    // query j; absent heads and queries are zero rows.
    for (int c = tid; c < 64 * QUERIES * (ROW / 16); c += THREADS) {
        const int row = c / (ROW / 16), chunk = c % (ROW / 16);
        const int j = row / 64, head = row % 64;
        const bool valid = j < rows_valid && head < h_i;
        const u8* src = q + (valid ? ((u64)(first_row + j) * h_i + head) * ROW + chunk * 16 : 0);
        cp_async_16(base + L::Q + swizzle_128b(row, chunk), src, valid);
    }
    // This thread's head weights: w[2 jj + e] for column 8 jj + 2 (lane % 4) + e; 0 for absent heads.
    float w[N / 4];
#pragma unroll
    for (int jj = 0; jj < 8 * QUERIES; ++jj)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int column = 8 * jj + 2 * (lane & 3) + e, j = column / 64, head = column % 64;
            const bool valid = j < rows_valid && head < h_i;
            w[2 * jj + e] = valid ? weights[(u64)(first_row + j) * h_i + head] : 0.0f;
        }

    // Thread tid copies 16-byte chunk tid % 8 of rows tid / 8 + 16 i: global offset tid 16 + 2048 i from
    // the step's first key, shared offset swizzle(tid / 8, tid % 8) + 2048 i.
    const u32 copy_offset = swizzle_128b(tid >> 3, tid & 7);
    auto load_step = [&](int step, int stage) {
        const int block = __shfl_sync(0xffffffffu, my_block, step);
        const int slot = __shfl_sync(0xffffffffu, my_slot, step);
        const bool present = block >= 0;
        const u8* page = cache + (present ? (u64)block * block_bytes : 0);
        const u8* keys = page + (u64)slot * ROW + tid * 16;
        const u32 tile = base + L::K + stage * KEY_TILE + copy_offset;
#pragma unroll
        for (int i = 0; i < KEYS * ROW / 16 / THREADS; ++i) cp_async_16(tile + 2048 * i, keys + 2048 * i, present);
        if (tid < SCALE_TILE / 16)
            cp_async_16(base + L::SCALES + stage * SCALE_TILE + tid * 16,
                        page + (u64)block_size * ROW + (u64)slot * 4 + tid * 16, present);
    };

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < live) load_step(s, s);
        cp_async_commit();  // one group a step, empty or not, so that the waits count steps
    }

    // This thread's key rows (row, row + 8), the lane that stores and what: lane % 4 = 2 j + half.
    const int row0 = warp * 16 + (lane >> 2);
    const int pick = lane & 3, pick_half = pick & 1, pick_query = pick >> 1;
    const int store_row = row0 + 8 * pick_half;
    const int query = first_query + pick_query;
    const bool stores = pick_query < QUERIES && query < next_n;
    const int last_visible = length - next_n + query;  // query sees positions <= this (< length too)
    // This lane's score of step 0 (a step further is 64 floats on), and the positions it may write.
    float* score = scores + (u64)(sequence * next_n + (stores ? query : 0)) * max_context_len + first_position
                   + store_row;
    const int store_limit = stores ? max_context_len - first_position - store_row : 0;  // steps * 64 below this
    const int visible_limit = last_visible - first_position - store_row;               // ... and <= this

    // The epilogue of step `step` from its accumulator: the weighted ReLU sum over each query's heads
    // (four partial sums a row, for the FMA latency), the quad's sum, the key's scale, one store.
    auto epilogue = [&](int step, const float (&acc)[N / 2]) {
        float sums[2][QUERIES];
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
            for (int j = 0; j < QUERIES; ++j) {
                float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int jj = 8 * j; jj < 8 * j + 8; ++jj)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                        part[2 * (jj & 1) + e] = fmaf(w[2 * jj + e], relu_nan(acc[4 * jj + 2 * half + e]),
                                                      part[2 * (jj & 1) + e]);
                sums[half][j] = (part[0] + part[1]) + (part[2] + part[3]);
            }
#pragma unroll
        for (int half = 0; half < 2; ++half)
#pragma unroll
            for (int j = 0; j < QUERIES; ++j) {
                sums[half][j] += __shfl_xor_sync(0xffffffffu, sums[half][j], 1);
                sums[half][j] += __shfl_xor_sync(0xffffffffu, sums[half][j], 2);
            }
        float value = pick_half ? sums[1][0] : sums[0][0];
        if constexpr (QUERIES == 2) value = pick_query ? (pick_half ? sums[1][1] : sums[0][1]) : value;
        const bool present = __shfl_sync(0xffffffffu, my_block, step) >= 0;
        const float scale = scale_tiles[(step % STAGES) * KEYS + store_row];
        if (step * KEYS < store_limit)
            score[step * KEYS] = present && step * KEYS <= visible_limit ? value * scale : DSA_NEG_INF;
    };

    // Step s + 1's copies land, its product is issued, and step s's epilogue runs beside it. The loop is
    // unrolled whole (STEPS is a constant) and issues every step's product, also past `live` (on stale
    // keys, never stored): ptxas serializes the wgmma of a kernel where an accumulator in flight crosses
    // a loop's back edge or meets a branch's other value, and a run ends early only at a sequence's end.
    float acc[2][N / 2];
    const u64 k_descriptor = matrix_descriptor(base + L::K, 16, 1024), q_descriptor = matrix_descriptor(base + L::Q, 16, 1024);
    if (live > 0) {
        cp_async_wait<STAGES - 2>();  // step 0's copies and the queries landed
        fence_proxy_async_shared();
        __syncthreads();
        issue_product<N>(acc[0], k_descriptor, q_descriptor);
#pragma unroll
        for (int step = 0; step < STEPS; ++step) {
            if (step + 1 < STEPS) {
                cp_async_wait<STAGES - 3>();  // this thread's copies of step + 1 landed
                fence_proxy_async_shared();   // ... and are visible to the tensor cores
                __syncthreads();              // everyone's; every warp past step - 1's product and epilogue
                if (step + STAGES - 1 < live) load_step(step + STAGES - 1, (step + STAGES - 1) % STAGES);
                cp_async_commit();
                issue_product<N>(acc[(step + 1) & 1], k_descriptor + ((step + 1) % STAGES) * (KEY_TILE / 16),
                                 q_descriptor);
                wgmma_wait<1>();  // step's product done, step + 1's in flight
            } else {
                wgmma_wait<0>();
            }
            fence_registers(acc[step & 1]);
            if (step < live) epilogue(step, acc[step & 1]);
        }
    }
    cp_async_wait<0>();

    // Steps past the context: no key, nothing loaded.
    for (int step = live; step < columns; ++step) {
        const int position = first_position + step * KEYS;
        for (int i = tid; i < KEYS * QUERIES; i += THREADS) {
            const int t = position + i % KEYS, j = first_query + i / KEYS;
            if (j < next_n && t < max_context_len)
                scores[(u64)(sequence * next_n + j) * max_context_len + t] = DSA_NEG_INF;
        }
    }
}

// extern "C" so that the cubin NVRTC builds for sm_90a names them plainly (kernels.compile_cubin).
#define DSA_PAGED_WGMMA_V2_PARAMS                                                                \
    const u8* __restrict__ q, const float* __restrict__ weights, const u8* __restrict__ cache,     \
        const int* __restrict__ block_table, const int* __restrict__ context_lens,                 \
        float* __restrict__ scores, int num_blocks, int max_blocks, int block_size, int next_n,    \
        int max_context_len, int h_i
#define DSA_PAGED_WGMMA_V2_ARGS \
    q, weights, cache, block_table, context_lens, scores, num_blocks, max_blocks, block_size, next_n, max_context_len, h_i

extern "C" __global__ void __launch_bounds__(indexer_wgmma_v2::THREADS, 4)
indexer_paged_wgmma_v2_q1(DSA_PAGED_WGMMA_V2_PARAMS) {
    indexer_paged_wgmma_v2<1, indexer_wgmma_v2::STAGES_Q1>(DSA_PAGED_WGMMA_V2_ARGS);
}

extern "C" __global__ void __launch_bounds__(indexer_wgmma_v2::THREADS, 2)
indexer_paged_wgmma_v2_q2(DSA_PAGED_WGMMA_V2_PARAMS) {
    indexer_paged_wgmma_v2<2, indexer_wgmma_v2::STAGES_Q2>(DSA_PAGED_WGMMA_V2_ARGS);
}
