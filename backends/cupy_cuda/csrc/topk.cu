// Top-k selection by radix select (paper eq. 2's Top-k), one block per query row.
//
// Floats are mapped to unsigned integers whose order is the float order (flip all bits of
// negatives, set the sign bit of positives), so "the k largest scores" becomes "the k largest
// keys" and can be found one byte at a time from the most significant end: a 256-bin histogram
// of the top byte says which byte value the k-th largest key has; the next pass histograms only
// the keys that share that byte, and so on. After at most 4 passes the exact k-th key (the
// threshold) is known, together with how many keys equal to it must still be taken. An early
// exit happens as soon as a whole bin is needed.
//
// Unselectable scores (-inf, NaN) map to key 0, which every histogram skips. -0.0 is mapped
// like +0.0 so that the two zeros tie, as they compare equal. Ties at the threshold go to the
// lowest key indices (the spec's rule), and the output is written in ascending key index order:
// the compaction is a block-wide prefix sum, never an atomic counter, so repeated runs give
// bitwise-identical output. Rows with at most k selectable keys return all of them, then -1.
//
// With IN_SMEM the row's keys are computed once into shared memory (up to 48K keys), and the
// later passes never touch device memory again; otherwise every pass re-reads the row, which
// mostly hits L2.
#include "common.cuh"

using namespace dsa;

namespace topk {
constexpr int THREADS = 1024;
constexpr int WARPS = THREADS / 32;
constexpr int BINS = 256;
constexpr int PER_THREAD = 4;                   // consecutive keys per thread in the later passes
constexpr int TILE = THREADS * PER_THREAD;      // keys per block step
constexpr int LOADS_IN_FLIGHT = 8;              // float4 loads each thread issues before using any

__device__ __forceinline__ u32 order_key(float score) {
    u32 bits = __float_as_uint(score);
    if (score != score || bits == 0xff800000u) return 0u;  // NaN, -inf: never selected
    if (bits == 0x80000000u) bits = 0u;                     // -0.0 ties with +0.0
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Histogram update aggregated per warp: lanes with the same bin elect one lane that adds the
// count of its peers, so a plateau of equal scores (ReLU-sum scores have many exact zeros)
// costs one shared atomic per warp, not 32 serialized ones. Every lane of the warp must call.
__device__ __forceinline__ void histogram_add(u32* histogram, u32 bin, bool active) {
    const u32 tag = active ? bin : 0xffffffffu;
    const u32 peers = __match_any_sync(0xffffffffu, tag);
    const int lane = threadIdx.x & 31;
    if (active && (__ffs(peers) - 1) == lane) atomicAdd(&histogram[bin], (u32)__popc(peers));
}
}  // namespace topk

template <bool IN_SMEM>
__global__ void __launch_bounds__(topk::THREADS, 1)
topk_radix(const float* __restrict__ scores,  // [s_q, s_kv]
           int* __restrict__ indices,         // [s_q, topk]
           int s_kv, int topk) {
    using namespace topk;
    extern __shared__ u32 row_keys[];          // [s_kv] when IN_SMEM
    __shared__ u32 histogram[BINS];
    __shared__ u32 warp_totals[WARPS];          // per warp: above count | equal count << 16
    __shared__ u32 selectable_count;
    __shared__ u32 prefix_shared, needed_shared, done_shared;
    __shared__ u32 gt_base, eq_base;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const u64 row = blockIdx.x;
    const float* row_scores = scores + row * s_kv;
    int* row_out = indices + row * topk;

    for (int b = tid; b < BINS; b += THREADS) histogram[b] = 0;
    if (tid == 0) { selectable_count = 0; gt_base = 0; eq_base = 0; }
    __syncthreads();

    // ---- pass over device memory: keys (kept in shared memory), selectable count, top-byte histogram.
    // Each thread issues LOADS_IN_FLIGHT independent 16-byte loads before touching any of them, so
    // that enough bytes are in flight to approach the memory bandwidth with one block per SM.
    u32 my_selectable = 0;
    if ((s_kv & 3) == 0) {  // rows are 16-byte aligned: float4 loads
        for (int base = 0; base < s_kv; base += 4 * THREADS * LOADS_IN_FLIGHT) {
            float4 loaded[LOADS_IN_FLIGHT];
#pragma unroll
            for (int u = 0; u < LOADS_IN_FLIGHT; ++u) {
                const int j = base + 4 * (tid + u * THREADS);
                loaded[u] = j < s_kv ? *reinterpret_cast<const float4*>(row_scores + j) : make_float4(0.f, 0.f, 0.f, 0.f);
            }
#pragma unroll
            for (int u = 0; u < LOADS_IN_FLIGHT; ++u) {
                const int j = base + 4 * (tid + u * THREADS);
                const float values[4] = {loaded[u].x, loaded[u].y, loaded[u].z, loaded[u].w};
                u32 keys[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    keys[e] = j < s_kv ? order_key(values[e]) : 0u;
                    my_selectable += keys[e] != 0u;
                    histogram_add(histogram, keys[e] >> 24, keys[e] != 0u);
                }
                if (IN_SMEM && j < s_kv) *reinterpret_cast<uint4*>(row_keys + j) = make_uint4(keys[0], keys[1], keys[2], keys[3]);
            }
        }
    } else {
        for (int base = 0; base < s_kv; base += THREADS) {
            const int j = base + tid;
            const u32 key = j < s_kv ? order_key(row_scores[j]) : 0u;
            if (IN_SMEM && j < s_kv) row_keys[j] = key;
            my_selectable += key != 0u;
            histogram_add(histogram, key >> 24, key != 0u);
        }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) my_selectable += __shfl_xor_sync(0xffffffffu, my_selectable, offset);
    if (lane == 0) atomicAdd(&selectable_count, my_selectable);
    __syncthreads();
    const u32 n_selectable = selectable_count;
    const bool take_all = n_selectable <= (u32)topk;

    // Keys j .. j + 3 of the row (0 past its end): one 16-byte shared load when possible.
    auto load_four = [&](int j, u32 (&keys)[4]) {
        if (IN_SMEM && (s_kv & 3) == 0 && j < s_kv) {
            const uint4 four = *reinterpret_cast<const uint4*>(row_keys + j);
            keys[0] = four.x; keys[1] = four.y; keys[2] = four.z; keys[3] = four.w;
        } else {
#pragma unroll
            for (int e = 0; e < 4; ++e)
                keys[e] = j + e < s_kv ? (IN_SMEM ? row_keys[j + e] : order_key(row_scores[j + e])) : 0u;
        }
    };

    // ---- radix passes: narrow the threshold to a prefix of `prefix_bits` bits.
    u32 prefix = 0, needed = (u32)topk;
    int prefix_bits = 0;
    if (!take_all) {
        for (int pass = 0; pass < 4; ++pass) {
            const int shift = 24 - 8 * pass;
            if (pass > 0) {
                for (int base = 0; base < s_kv; base += TILE) {
                    u32 keys[4];
                    load_four(base + PER_THREAD * tid, keys);
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const bool match = keys[e] != 0u && (keys[e] >> (shift + 8)) == prefix;
                        // Later passes see few matching keys: skip the warp-wide match when none does.
                        if (__any_sync(0xffffffffu, match)) histogram_add(histogram, (keys[e] >> shift) & 0xffu, match);
                    }
                }
                __syncthreads();
            }
            if (warp == 0) {
                // Lane l owns bins 255 - 8 l down to 248 - 8 l; counts accumulate from the top.
                u32 counts[8], lane_total = 0;
#pragma unroll
                for (int i = 0; i < 8; ++i) { counts[i] = histogram[255 - 8 * lane - i]; lane_total += counts[i]; }
                u32 inclusive = lane_total;
#pragma unroll
                for (int offset = 1; offset < 32; offset <<= 1) {
                    const u32 other = __shfl_up_sync(0xffffffffu, inclusive, offset);
                    if (lane >= offset) inclusive += other;
                }
                const u32 exclusive = inclusive - lane_total;
                if (exclusive < needed && needed <= inclusive) {
                    u32 above = exclusive, bin = 0, bin_count = 0;
                    bool found = false;
#pragma unroll
                    for (int i = 0; i < 8; ++i) {
                        if (!found && above + counts[i] >= needed) { found = true; bin = 255 - 8 * lane - i; bin_count = counts[i]; }
                        else if (!found) above += counts[i];
                    }
                    prefix_shared = (prefix << 8) | bin;
                    needed_shared = needed - above;
                    done_shared = bin_count == needed - above;
                }
            }
            __syncthreads();
            prefix = prefix_shared;
            needed = needed_shared;
            prefix_bits = 8 * (pass + 1);
            const bool done = done_shared != 0u;
            for (int b = tid; b < BINS; b += THREADS) histogram[b] = 0;
            __syncthreads();
            if (done) break;
        }
    }

    // ---- compaction in index order. Keys above the threshold prefix go to slots [0, n_above);
    // keys equal to it fill the `needed` slots after them, lowest index first. Thread t owns keys
    // base + 4 t .. + 3, so a prefix sum over threads (both counts packed in one word: at most
    // 4096 each per step) gives every key its slot.
    const int shift = 32 - prefix_bits;  // 32 only in take_all mode, where it is unused
    const u32 n_above = take_all ? n_selectable : (u32)topk - needed;
    for (int base = 0; base < s_kv; base += TILE) {
        const int j = base + PER_THREAD * tid;
        u32 keys[4];
        load_four(j, keys);
        u32 above_mask = 0, equal_mask = 0;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            if (keys[e] == 0u) continue;
            if (take_all) {
                above_mask |= 1u << e;
            } else {
                const u32 top = keys[e] >> shift;
                above_mask |= (top > prefix ? 1u : 0u) << e;
                equal_mask |= (top == prefix ? 1u : 0u) << e;
            }
        }
        const u32 mine = (u32)__popc(above_mask) | ((u32)__popc(equal_mask) << 16);
        u32 inclusive = mine;
#pragma unroll
        for (int offset = 1; offset < 32; offset <<= 1) {
            const u32 other = __shfl_up_sync(0xffffffffu, inclusive, offset);
            if (lane >= offset) inclusive += other;
        }
        if (lane == 31) warp_totals[warp] = inclusive;
        __syncthreads();
        if (warp == 0) {  // exclusive prefix over the warps' totals
            const u32 total = warp_totals[lane];
            u32 warp_inclusive = total;
#pragma unroll
            for (int offset = 1; offset < 32; offset <<= 1) {
                const u32 other = __shfl_up_sync(0xffffffffu, warp_inclusive, offset);
                if (lane >= offset) warp_inclusive += other;
            }
            __syncwarp();
            warp_totals[lane] = warp_inclusive - total;
        }
        __syncthreads();
        const u32 before = warp_totals[warp] + inclusive - mine;
        u32 above_slot = gt_base + (before & 0xffffu);
        u32 equal_rank = eq_base + (before >> 16);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            if (above_mask & (1u << e)) row_out[above_slot++] = j + e;
            if (equal_mask & (1u << e)) {
                if (equal_rank < needed) row_out[n_above + equal_rank] = j + e;
                ++equal_rank;
            }
        }
        __syncthreads();  // every thread has read warp_totals and the bases
        if (tid == THREADS - 1) { gt_base = above_slot; eq_base = equal_rank; }  // the last thread ends the step
    }
    for (int slot = (int)n_above + (take_all ? 0 : (int)needed) + tid; slot < topk; slot += THREADS) row_out[slot] = -1;
}
