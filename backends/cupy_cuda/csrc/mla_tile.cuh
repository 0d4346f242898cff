// The tile the wgmma sparse-MLA kernels read their gathered latent rows from (sparse_mla_wgmma.cu,
// sparse_mla_wgmma_v2.cu, and the FP8 rows' stores of fp8_rows.cuh): 64 rows of 576 bf16 values in nine
// column blocks of 64 dims, each block 64 rows x 128 bytes in the 128-byte swizzle (hopper.cuh says how
// wgmma reads it). Q tiles use the same layout.
#pragma once

#include "hopper.cuh"

namespace dsa {
namespace mla_tile {

constexpr int COLUMN_BLOCK_BYTES = 64 * 128;  // 64 rows x 64 dims: one swizzled column block

// Byte offset of 16-byte chunk `chunk` (0..71) of row `row` of a swizzled [64, 576] tile.
__device__ __forceinline__ u32 tile_offset(int row, int chunk) {
    return (chunk >> 3) * COLUMN_BLOCK_BYTES + hopper::swizzle_128b(row, chunk & 7);
}

}  // namespace mla_tile
}  // namespace dsa
