// Hopper (sm_90a) instructions the wgmma kernels use, as small inline-PTX wrappers.
//
// Everything here needs the `a` target (compute_90a): wgmma and setmaxnreg exist only there, so a
// source including this header is compiled for sm_90a alone (kernels.SOURCE_ARCHITECTURES).
//
// Shared-memory operands of wgmma are described by a 64-bit *matrix descriptor* rather than by
// per-thread addresses. The layout all our operands use is the 128-byte swizzle: a matrix is cut
// into "atoms" of 8 rows x 128 bytes (1024 bytes, 1024-byte aligned); inside an atom, 16-byte
// chunk c of row r is stored at chunk position c ^ r. The same physical tile serves both
// orientations: read with the reduction dimension along the 128-byte rows ("K-major") or across
// them ("MN-major", imm-trans = 1).
#pragma once

#include "common.cuh"

namespace dsa {
namespace hopper {

// ----------------------------------------------------------------------------- descriptors
// Bits of the descriptor (PTX ISA 8.x, "Matrix Descriptor Format" of wgmma; the same fields as
// CUTLASS's cute::GmmaDescriptor in include/cute/arch/mma_sm90_desc.hpp):
//   [0, 14)  (start address & 0x3FFFF) >> 4     [16, 30) leading-dimension byte offset (LBO) >> 4
//   [32, 46) stride-dimension byte offset (SBO) >> 4
//   [49, 52) base offset: 0 when the swizzle pattern starts on a 1024-byte boundary (ours all do)
//   [62, 64) layout: 0 interleave, 1 = 128-byte swizzle, 2 = 64-byte, 3 = 32-byte
// The swizzle is a function of the address: bits [4, 7) ^= bits [7, 10) (cute Swizzle<3,4,3>), so
// a start address moved by 32/64/96 bytes inside a 128-byte row (the k16 steps of a K-major
// operand) still reads the right chunks, while bits [7, 10) of a start address must stay 0.
// Canonical layouts, in 16-byte units (8 bf16), from make_gmma_desc in CUTLASS's
// include/cute/atom/mma_traits_sm90_gmma.hpp and the PTX ISA's "Strides" section:
//   K-major, 128-byte swizzle:  ((8, m), 2) : ((8, SBO), 1)  rows 128 bytes apart, SBO = distance
//     between 8-row groups (1024 for dense atoms); LBO unused (the k16 slice never leaves its
//     128-byte row), encoded as 1.
//   MN-major, 128-byte swizzle: ((8, n), (8, k)) : ((1, LBO), (8, SBO))  each 128-byte row holds 64
//     consecutive MN elements; LBO = distance between 64-element MN blocks, SBO = distance between
//     8-row groups along K.
// tnspA / tnspB (imm-trans-a / imm-trans-b): 0 = K-major, 1 = MN-major (CUTLASS GMMA::Major).
constexpr u64 SWIZZLE_128B = 1ull << 62;

__device__ __forceinline__ u64 matrix_descriptor(u32 smem_address, u32 leading_bytes, u32 stride_bytes) {
    return (u64)((smem_address & 0x3FFFF) >> 4) | ((u64)((leading_bytes >> 4) & 0x3FFF) << 16) |
           ((u64)((stride_bytes >> 4) & 0x3FFF) << 32) | SWIZZLE_128B;
}

// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` inside a 128-byte-swizzled block whose
// rows are 128 bytes apart: what the tensor cores expect to find there.
__device__ __forceinline__ u32 swizzle_128b(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

// ----------------------------------------------------------------------------- wgmma
// Registers written by generic instructions (zeroing, softmax rescaling) must be ordered before a
// wgmma that reads them as its accumulator: wgmma.fence does that for the whole warpgroup.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(PENDING) : "memory");
}

// Keeps the compiler from moving reads or writes of accumulator registers across the
// asynchronous window (between issue and wait the hardware owns them).
template <int N>
__device__ __forceinline__ void fence_registers(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i]) :: "memory");
}

#define DSA_ACC4(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define DSA_ACC16(d, i) DSA_ACC4(d, i), DSA_ACC4(d, i + 4), DSA_ACC4(d, i + 8), DSA_ACC4(d, i + 12)
#define DSA_OUT4(d, i) "=f"(d[i]), "=f"(d[i + 1]), "=f"(d[i + 2]), "=f"(d[i + 3])
#define DSA_OUT16(d, i) DSA_OUT4(d, i), DSA_OUT4(d, i + 4), DSA_OUT4(d, i + 8), DSA_OUT4(d, i + 12)
// The 128 accumulator operands of an m64n256 product, %0 .. %127, as the instruction lists them.
#define DSA_D128                                                                                         \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                             \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                    \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                    \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "                    \
    "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "                    \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "                    \
    "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "        \
    "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}"

// D[64 x 32] += A[64 x 16] B[16 x 32], bf16 in, fp32 accumulate; A and B in shared memory, both
// K-major. Thread t of the warpgroup holds D rows 16 (t / 32) + (t % 32) / 4 (+ 8) and columns
// 8 j + 2 (t % 4) (+ 1): element d[4 j + 2 half + e] is (row + 8 half, column 8 j + 2 (t % 4) + e).
__device__ __forceinline__ void wgmma_m64n32k16_bf16(float (&d)[16], u64 a_descriptor, u64 b_descriptor) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
        "%16, %17, 1, 1, 1, 0, 0;\n"
        : DSA_ACC16(d, 0)
        : "l"(a_descriptor), "l"(b_descriptor));
}

// D[64 x 256] += A[64 x 16] B[16 x 256]; A K-major, B MN-major (imm-trans-b = 1): B's rows are
// the reduction dimension, each 128-byte row holding 64 consecutive output columns.
__device__ __forceinline__ void wgmma_m64n256k16_bf16_b_mn_major(float (&d)[128], u64 a_descriptor,
                                                                  u64 b_descriptor) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        DSA_D128 ", "
        "%128, %129, 1, 1, 1, 0, 1;\n"
        : DSA_ACC16(d, 0), DSA_ACC16(d, 16), DSA_ACC16(d, 32), DSA_ACC16(d, 48),
          DSA_ACC16(d, 64), DSA_ACC16(d, 80), DSA_ACC16(d, 96), DSA_ACC16(d, 112)
        : "l"(a_descriptor), "l"(b_descriptor));
}

// D[64 x 256] += A[64 x 16] B[16 x 256] with A from registers (the RS form): four bf16x2 words a thread,
// a[0] = (row, k 2 (t % 4) .. + 1), a[1] = (row + 8, same k), a[2] = (row, k 8 + 2 (t % 4) ..), a[3] = (row + 8,
// k 8 + ..), rows as in the accumulator layout above: the layout of a 64 x 16 slice of an accumulator of
// this shape family (d[4 j + 2 half + e] with j = 2 kk, 2 kk + 1), so a product's result, packed to bf16,
// is the next product's A without passing through shared memory. B in shared memory, MN-major.
__device__ __forceinline__ void wgmma_m64n256k16_bf16_rs_b_mn_major(float (&d)[128], const u32 (&a)[4],
                                                                     u64 b_descriptor) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        DSA_D128 ", "
        "{%128, %129, %130, %131}, %132, 1, 1, 1, 1;\n"
        : DSA_ACC16(d, 0), DSA_ACC16(d, 16), DSA_ACC16(d, 32), DSA_ACC16(d, 48),
          DSA_ACC16(d, 64), DSA_ACC16(d, 80), DSA_ACC16(d, 96), DSA_ACC16(d, 112)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_descriptor));
}

// D[64 x 64] += A[64 x 32] B[32 x 64], e4m3 in, fp32 accumulate (QGMMA); A and B in shared memory,
// both K-major (fp8 wgmma reads K-major operands only: the instruction has no transpose flags).
// Register layout as wgmma_m64n32k16_bf16's: d[4 j + 2 half + e] is (row + 8 half, 8 j + 2 (t % 4) + e).
__device__ __forceinline__ void wgmma_m64n64k32_e4m3(float (&d)[32], u64 a_descriptor, u64 b_descriptor) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, 1, 1, 1;\n"
        : DSA_ACC16(d, 0), DSA_ACC16(d, 16)
        : "l"(a_descriptor), "l"(b_descriptor));
}

// D[64 x 128] += A[64 x 32] B[32 x 128], e4m3, as wgmma_m64n64k32_e4m3 with 16 column groups.
__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float (&d)[64], u64 a_descriptor, u64 b_descriptor) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, 1, 1, 1;\n"
        : DSA_ACC16(d, 0), DSA_ACC16(d, 16), DSA_ACC16(d, 32), DSA_ACC16(d, 48)
        : "l"(a_descriptor), "l"(b_descriptor));
}

// The product of one 64-row A tile and an N-column B tile over K = 128 bytes of e4m3 (four k32
// steps, each 32 bytes further along the 128-byte swizzled rows), into a zeroed accumulator.
template <int N>
__device__ __forceinline__ void wgmma_e4m3_k128(float (&d)[N / 2], u32 a_tile, u32 b_tile) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) d[i] = 0.0f;
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const u64 a = matrix_descriptor(a_tile + 32 * k, 16, 1024);
        const u64 b = matrix_descriptor(b_tile + 32 * k, 16, 1024);
        if constexpr (N == 64) wgmma_m64n64k32_e4m3(d, a, b);
        else wgmma_m64n128k32_e4m3(d, a, b);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_registers(d);
}

// D[64 x 32] (+)= A[64 x 16] B[16 x 32], bf16, each operand's orientation chosen: TRANS_A / TRANS_B = 1
// reads it MN-major (imm-trans = 1: for A, each 128-byte row holds 64 consecutive rows of the product,
// the reduction dimension running across the rows). ACCUMULATE = 0 is scale-d = 0: D's old contents
// are ignored, so the first product of a fresh accumulator needs no zeroing. Only d[0..15] of an array
// of SIZE >= 16 are used (one accumulator array may serve products of several widths). Register layout
// as wgmma_m64n32k16_bf16's.
template <int ACCUMULATE, int TRANS_A, int TRANS_B, int SIZE>
__device__ __forceinline__ void wgmma_m64n32k16_bf16_t(float (&d)[SIZE], u64 a_descriptor, u64 b_descriptor) {
    static_assert(SIZE >= 16, "a 64 x 32 accumulator is 16 registers a thread");
#define DSA_WGMMA_N32                                                                  \
    "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "                            \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "         \
    "%16, %17, %18, 1, 1, %19, %20;\n"
    // Without accumulation D is only written: "=f", so that the old values are dead for the compiler too.
    if constexpr (ACCUMULATE)
        asm volatile(DSA_WGMMA_N32 : DSA_ACC16(d, 0)
                     : "l"(a_descriptor), "l"(b_descriptor), "n"(ACCUMULATE), "n"(TRANS_A), "n"(TRANS_B));
    else
        asm volatile(DSA_WGMMA_N32 : DSA_OUT16(d, 0)
                     : "l"(a_descriptor), "l"(b_descriptor), "n"(ACCUMULATE), "n"(TRANS_A), "n"(TRANS_B));
#undef DSA_WGMMA_N32
}

// D[64 x 64] (+)= A[64 x 16] B[16 x 64], as wgmma_m64n32k16_bf16_t with 8 column groups of 8.
template <int ACCUMULATE, int TRANS_A, int TRANS_B>
__device__ __forceinline__ void wgmma_m64n64k16_bf16_t(float (&d)[32], u64 a_descriptor, u64 b_descriptor) {
#define DSA_WGMMA_N64                                                                  \
    "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "                            \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "          \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, " \
    "%32, %33, %34, 1, 1, %35, %36;\n"
    if constexpr (ACCUMULATE)
        asm volatile(DSA_WGMMA_N64 : DSA_ACC16(d, 0), DSA_ACC16(d, 16)
                     : "l"(a_descriptor), "l"(b_descriptor), "n"(ACCUMULATE), "n"(TRANS_A), "n"(TRANS_B));
    else
        asm volatile(DSA_WGMMA_N64 : DSA_OUT16(d, 0), DSA_OUT16(d, 16)
                     : "l"(a_descriptor), "l"(b_descriptor), "n"(ACCUMULATE), "n"(TRANS_A), "n"(TRANS_B));
#undef DSA_WGMMA_N64
}

#undef DSA_D128
#undef DSA_OUT16
#undef DSA_OUT4
#undef DSA_ACC16
#undef DSA_ACC4

// ----------------------------------------------------------------------------- vector reductions
// dst[0..3] += v (float32, relaxed, gpu scope; no value comes back): one 16-byte reduction where four
// scalar atomics would be four. dst must be 16-byte aligned. sm_90 (PTX 8.1) adds the vector forms.
__device__ __forceinline__ void red_add_v4_f32(float* dst, float a, float b, float c, float d) {
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n"
                 :: "l"(dst), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
}
// dst[0..1] += v; dst 8-byte aligned.
__device__ __forceinline__ void red_add_v2_f32(float* dst, float a, float b) {
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" :: "l"(dst), "f"(a), "f"(b) : "memory");
}

// ----------------------------------------------------------------------------- proxies
// wgmma reads shared memory through the async proxy; writes made by ordinary stores or cp.async
// (the generic proxy) become visible to it only after this fence, issued by the writing thread
// before it signals the reader.
__device__ __forceinline__ void fence_proxy_async_shared() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// ----------------------------------------------------------------------------- mbarriers
// A 64-bit shared-memory barrier that completes a phase when `count` arrivals have been made;
// waiters name the phase by its parity.
__device__ __forceinline__ void mbarrier_init(u32 barrier, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(barrier), "r"(count) : "memory");
}

// Release semantics: this thread's earlier writes are visible to whoever sees the phase complete.
__device__ __forceinline__ void mbarrier_arrive(u32 barrier) {
    asm volatile("{ .reg .b64 state; mbarrier.arrive.release.cta.shared::cta.b64 state, [%0]; }\n"
                 :: "r"(barrier) : "memory");
}

// True once the phase of parity `parity` has completed (acquire semantics). The hardware may
// suspend the thread for a while before answering false, so a spin on it is not a busy loop.
__device__ __forceinline__ bool mbarrier_try_wait(u32 barrier, u32 parity) {
    u32 done;
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 p, [%1], %2; "
                 "selp.u32 %0, 1, 0, p; }\n"
                 : "=r"(done) : "r"(barrier), "r"(parity) : "memory");
    return done != 0;
}

__device__ __forceinline__ void mbarrier_wait(u32 barrier, u32 parity) {
    while (!mbarrier_try_wait(barrier, parity)) {
    }
}

// ----------------------------------------------------------------------------- clusters
// A kernel declared with __cluster_dims__ runs its blocks in clusters, whose blocks can read and write
// each other's shared memory and barriers through the shared::cluster window. A block's own shared
// address becomes the same place in block `rank`'s memory through mapa; offsets stay linear.
__device__ __forceinline__ u32 cluster_rank() {
    u32 rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
    return rank;
}
__device__ __forceinline__ u32 peer_shared_address(u32 address, u32 rank) {
    u32 peer;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(peer) : "r"(address), "r"(rank));
    return peer;
}
// Barriers initialized by one thread become visible to the other blocks of the cluster after this and a
// cluster barrier.
__device__ __forceinline__ void fence_mbarrier_init_cluster() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// Every thread of the cluster that has not exited meets here (release, then acquire at cluster scope):
// what a thread wrote before is visible to every thread of the cluster after.
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n"
                 "barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// 16 bytes stored into another block's shared memory (a shared::cluster address) without waiting: the
// store counts its bytes against the transaction count of that block's barrier `peer_barrier` (also a
// shared::cluster address), whose phase completes only once every expected byte has landed; a thread
// that sees the phase complete may read them, tensor-core reads included, with no proxy fence.
__device__ __forceinline__ void st_async_16(u32 peer_address, uint4 v, u32 peer_barrier) {
    asm volatile("st.async.weak.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];\n"
                 :: "r"(peer_address), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(peer_barrier) : "memory");
}
// An arrival (release) that also expects `bytes` more of transactions in the current phase.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(u32 barrier, u32 bytes) {
    asm volatile("{ .reg .b64 state; mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 state, [%0], %1; }\n"
                 :: "r"(barrier), "r"(bytes) : "memory");
}
// An arrival on another block's barrier (a shared::cluster address), with the default semantics (release at
// CTA scope), as CUTLASS's ClusterBarrier::arrive(cta_id) makes it: what it orders is this warp's tensor-core
// reads of a stage, complete before it (wgmma_wait), against the peer producer's later writes to it. With
// release at cluster scope ptxas adds a memory barrier (ERRBAR) before every such arrival, and the
// peer's wait at cluster scope an L1 invalidation (CCTL.IVALL) at every wait: the two cost the first pair
// kernel ~12% of its warps' samples (ncu's source page, backends/cupy_cuda/NOTES.md).
__device__ __forceinline__ void mbarrier_arrive_cluster(u32 peer_barrier) {
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" :: "r"(peer_barrier) : "memory");
}

// ----------------------------------------------------------------------------- warp roles
// Named barrier 1..15 over `threads` threads (a multiple of 32): lets two warpgroups meet without
// stopping the third (barrier 0 is __syncthreads).
__device__ __forceinline__ void named_barrier_sync(u32 id, u32 threads) {
    asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(threads) : "memory");
}
// The same for warps that reach the barrier from different instructions (other roles' code): the .aligned
// form above requires all of them to execute the same one.
__device__ __forceinline__ void named_barrier_sync_unaligned(u32 id, u32 threads) {
    asm volatile("barrier.sync %0, %1;\n" :: "r"(id), "r"(threads) : "memory");
}
// The arriving half of a producer / consumer hand-off on named barrier `id`: counts this thread without
// waiting; the threads that named_barrier_sync on it see this thread's earlier writes once it completes.
__device__ __forceinline__ void named_barrier_arrive(u32 id, u32 threads) {
    asm volatile("bar.arrive %0, %1;\n" :: "r"(id), "r"(threads) : "memory");
}

// Moves registers between warpgroups: the whole warpgroup executes it; the new per-thread count
// is a multiple of 8 in [24, 256], and the counts of all warps must fit the register file.
template <int REGISTERS>
__device__ __forceinline__ void setmaxnreg_increase() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(REGISTERS));
}
template <int REGISTERS>
__device__ __forceinline__ void setmaxnreg_decrease() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(REGISTERS));
}

}  // namespace hopper
}  // namespace dsa
