// The packed FP8 decode cache's rows (dsa_ref.pack_kv_cache_fp8: 512 e4m3 latent values, four float32
// scales, one per 128 of them, 64 bf16 RoPE values) read by a producer warp and stored, dequantized, as
// bf16 rows of the 128-byte-swizzled [64, 576] tile the wgmma kernels read (sparse_mla_wgmma.cu and
// sparse_mla_wgmma_v2.cu, whose producers schedule these loads and stores differently).
//
// Warp w of a producer warpgroup fills tile rows w, w + 4, ..., w + 60 (16 rows); lane j < 16 holds the
// index of its row j (fp8_row_index), and the rows travel in batches of FP8_BATCH_ROWS (Fp8Batch).
#pragma once

#include "mla_tile.cuh"

namespace dsa {
namespace fp8_rows {

constexpr int D_V = 512;                      // the latent dims (V): the first 512 of a row
constexpr int BLOCK_T = 64;                   // rows of a tile

using mla_tile::tile_offset;  // the tile layout the kernels share (mla_tile.cuh)

// The packed FP8 cache row (dsa_ref/reference/formats.py): 656 = 41 x 16 bytes, so every row starts
// 16-byte aligned when the cache does, and each of its three parts starts on a 16-byte boundary.
constexpr int FP8_ROW_BYTES = 656;
constexpr int FP8_SCALES_OFFSET = 512;  // after the 512 e4m3 latent values: 4 float32 scales
constexpr int FP8_ROPE_OFFSET = 528;    // then the 64 RoPE values, bf16
constexpr int FP8_SCALE_BLOCK = 128;    // latent values per scale
static_assert(FP8_ROW_BYTES % 16 == 0 && FP8_SCALES_OFFSET % 16 == 0 && FP8_ROPE_OFFSET % 16 == 0, "16-byte loads");

// A batch: per lane FP8_BATCH_ROWS latent chunks of 4 registers, as many scales and FP8_BATCH_ROWS / 4
// RoPE chunks, 24 registers at 4 rows. A producer keeps one or more batches in flight while it
// dequantizes and stores another (how many is the kernel's schedule).
constexpr int PRODUCER_WARP_ROWS = BLOCK_T / 4;  // rows of a producer warp in a tile
constexpr int FP8_BATCH_ROWS = 4;
constexpr int FP8_BATCHES = PRODUCER_WARP_ROWS / FP8_BATCH_ROWS;
constexpr int FP8_ROPE_CHUNKS_PER_LANE = FP8_BATCH_ROWS * 8 / 32;  // a row's 8 RoPE chunks, over the warp
static_assert(PRODUCER_WARP_ROWS % FP8_BATCH_ROWS == 0 && FP8_BATCH_ROWS % 4 == 0, "whole batches, whole RoPE chunks");

// 16 bytes of the (read-only) cache through the non-coherent path, not kept in L1: a gathered row
// is read once per block. With valid == false nothing is read and the result is zero.
__device__ __forceinline__ uint4 load_16_or_zero(const u8* src, bool valid) {
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    asm volatile("{ .reg .pred p; setp.ne.b32 p, %4, 0;\n"
                 "@p ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%5]; }\n"
                 : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w) : "r"((int)valid), "l"(src));
    return v;
}
__device__ __forceinline__ float load_f32_or_zero(const u8* src, bool valid) {
    u32 v = 0u;
    asm volatile("{ .reg .pred p; setp.ne.b32 p, %1, 0;\n"
                 "@p ld.global.nc.L1::no_allocate.u32 %0, [%2]; }\n"
                 : "+r"(v) : "r"((int)valid), "l"(src));
    return __uint_as_float(v);
}

// Four e4m3 values (one word, the first in the low byte) times their block's scale, as two bf16x2
// words: the float32 product rounded to bf16, exactly as dequantize_tile in sparse_mla.cu does it,
// so both kernels give the tensor cores the same operands.
__device__ __forceinline__ void dequantize_e4m3x4(u32 word, float scale, u32& low_pair, u32& high_pair) {
    float v0, v1, v2, v3;
    e4m3x2_to_float2((u16)(word & 0xFFFFu), v0, v1);
    e4m3x2_to_float2((u16)(word >> 16), v2, v3);
    low_pair = pack_bf16x2(v0 * scale, v1 * scale);
    high_pair = pack_bf16x2(v2 * scale, v3 * scale);
}

// Producer, packed FP8 rows: the index of tile row `producer_warp + 4 j` of the warp's 16 rows, read
// by lane j < 16 (-1 where the slot is past n_slots or the index outside [0, s_kv)). Read before the
// producer waits for the stage to be free, so that its latency hides behind the wait.
__device__ __forceinline__ int fp8_row_index(const int* __restrict__ row_indices, int tile, int n_slots, int s_kv,
                                             int producer_warp, int lane) {
    const int slot = tile * BLOCK_T + producer_warp + 4 * (lane & 15);
    const int index = lane < PRODUCER_WARP_ROWS && slot < n_slots ? row_indices[slot] : -1;
    return index >= 0 && index < s_kv ? index : -1;
}

// One batch of packed rows in registers: lane l holds 16-byte latent chunk l (values 16 l .. +16, of
// scale block l / 8) of every row of the batch with that block's scale, and RoPE chunk l % 8 of
// rows l / 8, l / 8 + 4, ... of the batch.
struct Fp8Batch {
    uint4 latent[FP8_BATCH_ROWS];
    float scale[FP8_BATCH_ROWS];
    uint4 rope[FP8_ROPE_CHUNKS_PER_LANE];
};

// Issues the loads of batch `batch` (rows batch * FP8_BATCH_ROWS ..) of the warp's 16 rows; an
// invalid row is read by nobody and comes back as zeros. `warp_index` is fp8_row_index's.
__device__ __forceinline__ Fp8Batch load_fp8_batch(const u8* __restrict__ kv, int warp_index, int batch, int lane) {
    Fp8Batch rows;
#pragma unroll
    for (int r = 0; r < FP8_BATCH_ROWS; ++r) {
        const int index = __shfl_sync(0xffffffffu, warp_index, batch * FP8_BATCH_ROWS + r);
        const u8* row = kv + (index >= 0 ? (u64)index * FP8_ROW_BYTES : 0);
        rows.latent[r] = load_16_or_zero(row + 16 * lane, index >= 0);
        rows.scale[r] = load_f32_or_zero(row + FP8_SCALES_OFFSET + 4 * (16 * lane / FP8_SCALE_BLOCK), index >= 0);
    }
#pragma unroll
    for (int k = 0; k < FP8_ROPE_CHUNKS_PER_LANE; ++k) {
        const int index = __shfl_sync(0xffffffffu, warp_index, batch * FP8_BATCH_ROWS + (lane >> 3) + 4 * k);
        const u8* row = kv + (index >= 0 ? (u64)index * FP8_ROW_BYTES : 0);
        rows.rope[k] = load_16_or_zero(row + FP8_ROPE_OFFSET + 16 * (lane & 7), index >= 0);
    }
    return rows;
}

// Dequantizes batch `batch` and stores it as bf16 into the swizzled stage (tile row of warp row j:
// producer_warp + 4 j). Latent chunk l becomes bf16 chunks 2 l and 2 l + 1; lanes 4..7 of each
// quarter-warp store the odd one first, so that the eight 16-byte stores of a quarter-warp fall in
// eight different bank groups (the even chunks alone would cover only four).
// TO_PEER: each chunk also goes, at the same offset, into the other block of a cluster pair (its stage at
// shared::cluster address `peer_tile`), counted against its barrier `peer_barrier` (hopper::st_async_16):
// FP8_BATCH_ROWS * (D_V / 8 + 8) * 16 bytes a batch over the warp.
template <bool TO_PEER = false>
__device__ __forceinline__ void store_fp8_batch(u8* kv_tile, const Fp8Batch& rows, int batch, int producer_warp,
                                                int lane, u32 peer_tile = 0u, u32 peer_barrier = 0u) {
    const bool odd_first = (lane >> 2) & 1;
#pragma unroll
    for (int r = 0; r < FP8_BATCH_ROWS; ++r) {
        const int tile_row = producer_warp + 4 * (batch * FP8_BATCH_ROWS + r);
        uint4 even, odd;  // bf16 chunks 2 l and 2 l + 1
        dequantize_e4m3x4(rows.latent[r].x, rows.scale[r], even.x, even.y);
        dequantize_e4m3x4(rows.latent[r].y, rows.scale[r], even.z, even.w);
        dequantize_e4m3x4(rows.latent[r].z, rows.scale[r], odd.x, odd.y);
        dequantize_e4m3x4(rows.latent[r].w, rows.scale[r], odd.z, odd.w);
        *reinterpret_cast<uint4*>(kv_tile + tile_offset(tile_row, 2 * lane + (odd_first ? 1 : 0))) =
            odd_first ? odd : even;
        *reinterpret_cast<uint4*>(kv_tile + tile_offset(tile_row, 2 * lane + (odd_first ? 0 : 1))) =
            odd_first ? even : odd;
        if constexpr (TO_PEER) {
            hopper::st_async_16(peer_tile + tile_offset(tile_row, 2 * lane + (odd_first ? 1 : 0)),
                                odd_first ? odd : even, peer_barrier);
            hopper::st_async_16(peer_tile + tile_offset(tile_row, 2 * lane + (odd_first ? 0 : 1)),
                                odd_first ? even : odd, peer_barrier);
        }
    }
#pragma unroll
    for (int k = 0; k < FP8_ROPE_CHUNKS_PER_LANE; ++k) {
        const int tile_row = producer_warp + 4 * (batch * FP8_BATCH_ROWS + (lane >> 3) + 4 * k);
        // RoPE, as stored: bf16 chunk 64 + l % 8
        *reinterpret_cast<uint4*>(kv_tile + tile_offset(tile_row, D_V / 8 + (lane & 7))) = rows.rope[k];
        if constexpr (TO_PEER)
            hopper::st_async_16(peer_tile + tile_offset(tile_row, D_V / 8 + (lane & 7)), rows.rope[k], peer_barrier);
    }
}
// Bytes one call of store_fp8_batch<true> sends to the peer over a warp: FP8_BATCH_ROWS bf16 rows of 576.
constexpr int FP8_BATCH_PEER_BYTES = FP8_BATCH_ROWS * (D_V + 64) * 2;

}  // namespace fp8_rows
}  // namespace dsa
