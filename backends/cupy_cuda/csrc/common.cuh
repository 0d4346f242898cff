// Small device helpers shared by the dsa-ref CUDA kernels.
//
// The sources compile both under NVRTC (at run time, through cupy.RawModule) and under nvcc
// (in CI, to check warnings, registers and spills). NVRTC ships no C++ standard headers, so
// nothing here includes any: integer types are spelled out, and the few PTX instructions we
// need (asynchronous copies, ldmatrix, mma.sync, bf16/fp8 conversions) are written inline.
#pragma once

namespace dsa {

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef long long i64;
typedef unsigned long long u64;  // NVRTC has no <cstddef>: 64-bit offsets are spelled out

#define DSA_NEG_INF (__int_as_float(0xff800000))
#define DSA_LOG2E 1.4426950408889634f
#define DSA_LN2 0.6931471805599453f

// ----------------------------------------------------------------------------- shared memory
// Shared-memory address of a generic pointer, as the 32-bit operand PTX instructions take.
__device__ __forceinline__ u32 smem_u32(const void* ptr) {
    u32 address;
    asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }"
                 : "=r"(address) : "l"(ptr));
    return address;
}

// 16-byte asynchronous global -> shared copy (sm_80+). With valid == false the source size is
// 0: the 16 destination bytes are zero-filled and *nothing is read*, which is how invalid
// gather indices are skipped without ever dereferencing them.
__device__ __forceinline__ void cp_async_16(u32 smem_dst, const void* global_src, bool valid) {
    int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(smem_dst), "l"(global_src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(PENDING) : "memory"); }

// ----------------------------------------------------------------------------- tensor cores
// Four 8x8 matrices of 16-bit elements (8 rows of 16 bytes each) from shared memory; lane l
// gives the address of row (l % 8) of matrix (l / 8). Because each register holds 4 bytes of a
// row, the same instruction feeds 8-bit (fp8) operands: a "16-bit column pair" is then 4 fp8.
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 smem_address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_address));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], u32 smem_address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_address));
}

// Element kinds of the tensor-core paths. All three use the same register layout per 32 bytes
// of reduction depth (m16n8k16 for 16-bit types, m16n8k32 for fp8): only the instruction differs.
enum ElementKind { ELEM_BF16 = 0, ELEM_F16 = 1, ELEM_E4M3 = 2 };

// D += A * B for one 16 x 8 output tile and 32 bytes of reduction depth.
// A: 16 x 32 bytes (row major), B: 32 bytes x 8 (column major), D: float32.
template <int ELEM>
__device__ __forceinline__ void mma_16x8x32bytes(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    if constexpr (ELEM == ELEM_BF16) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else if constexpr (ELEM == ELEM_F16) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
        asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
        __trap();  // fp8 tensor cores need sm_89+; the host side never launches this there.
#endif
    }
}

// ----------------------------------------------------------------------------- conversions
// Two float32 -> packed bf16x2 (round to nearest even); `low` lands in the low half.
__device__ __forceinline__ u32 pack_bf16x2(float low, float high) {
    u32 packed;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(packed) : "f"(high), "f"(low));
    return packed;
}
__device__ __forceinline__ float bf16_bits_to_float(u16 bits) { return __uint_as_float(((u32)bits) << 16); }

// e4m3 (fp8, no infinities, one NaN pattern per sign) -> float32, exactly, in integer arithmetic,
// so that it compiles for every architecture. Used off the hot loops.
__device__ __forceinline__ float e4m3_to_float(u8 bits) {
    u32 sign = (u32)(bits & 0x80) << 24;
    u32 exponent = (bits >> 3) & 0xF;
    u32 mantissa = bits & 0x7;
    if (exponent == 0xF && mantissa == 0x7) return __uint_as_float(0x7fc00000u | sign);  // NaN
    if (exponent == 0) {  // subnormal: mantissa * 2^-9
        float magnitude = (float)mantissa * 0.001953125f;
        return sign ? -magnitude : magnitude;
    }
    return __uint_as_float(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

// Two e4m3 bytes (low byte first) -> two float32, exactly, through the sm_89+ hardware
// conversion to f16x2 (every e4m3 value is an f16 value).
__device__ __forceinline__ void e4m3x2_to_float2(u16 pair, float& low, float& high) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    u32 halves;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(halves) : "h"(pair));
    asm("{ .reg .f16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }\n"
        : "=f"(low), "=f"(high) : "r"(halves));
#else
    low = e4m3_to_float((u8)(pair & 0xFF));
    high = e4m3_to_float((u8)(pair >> 8));
#endif
}

// Four e4m3 bytes -> two f16x2 registers (bytes 0,1 -> `low_pair`, bytes 2,3 -> `high_pair`),
// exactly. Hopper's tensor cores take fp8 only through wgmma; with mma.sync the fp8 operand is
// widened to f16 here and multiplied on the f16 path, which gives the same products.
__device__ __forceinline__ void e4m3x4_to_f16x2x2(u32 four, u32& low_pair, u32& high_pair) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm("{ .reg .b16 l, h; mov.b32 {l, h}, %2; cvt.rn.f16x2.e4m3x2 %0, l; cvt.rn.f16x2.e4m3x2 %1, h; }\n"
        : "=r"(low_pair), "=r"(high_pair) : "r"(four));
#else
    (void)four;
    low_pair = high_pair = 0;
    __trap();  // the host side never launches fp8 kernels below sm_89
#endif
}

// exp2 on the special-function unit; exp2(-inf) = 0, which the online softmax relies on.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// ReLU that keeps NaN (fmaxf(NaN, 0) would return 0 and hide it): the spec lets NaN propagate.
__device__ __forceinline__ float relu_keep_nan(float x) { return x < 0.0f ? 0.0f : x; }

// One tile of the online softmax (base 2) for a row: the running maximum becomes the larger of it
// and `tile_max` (this tile's maximum over every warp that shares the row), the running sum is rescaled
// to it, and the result is the factor the output accumulator is rescaled by (0 when the row had no
// valid slot before). `exp_base` is what the tile's exponentials subtract: the new maximum, or 0
// while every slot so far is masked, so that they stay finite.
__device__ __forceinline__ float rescale_softmax_row(float& row_max, float& row_sum, float tile_max, float& exp_base) {
    const float new_max = fmaxf(row_max, tile_max);
    exp_base = new_max == DSA_NEG_INF ? 0.0f : new_max;
    const float alpha = fast_exp2(row_max - exp_base);
    row_max = new_max;
    row_sum *= alpha;
    return alpha;
}

// The end of a base-2 online softmax for one head: from its running max (log2 units) and its
// denominator, the natural-log lse (-inf for a row with no valid slot) and the factor that
// normalizes the output, the attention sink's share included (sink may be null).
__device__ __forceinline__ void finish_softmax_row(float row_max, float denominator, const float* attn_sink, int head,
                                                   float& row_lse, float& factor) {
    row_lse = DSA_NEG_INF;
    factor = 0.0f;
    if (denominator > 0.0f) {
        row_lse = (row_max + log2f(denominator)) * DSA_LN2;
        factor = 1.0f / denominator;
        if (attn_sink != nullptr) factor *= 1.0f / (1.0f + expf(attn_sink[head] - row_lse));
    }
}

}  // namespace dsa
