// Top-k selection (paper eq. 2's Top-k): one block per query row, one read of the row.
//
// Scores become unsigned 32-bit keys whose integer order is the float order (flip all bits of a
// negative float, set the sign bit of a positive one); -inf and NaN, which may never be selected,
// become key 0, and -0.0 is folded into +0.0 so that the two zeros tie, as they compare equal.
// A coarse digit of a key is the top byte of the order key of its score *rounded to half
// precision* (sign, 5 exponent bits, 2 mantissa bits): rounding is monotone, so the digit is too,
// and its 256 bins are narrow where scores live.
//
// 0. A cut from a sample (1024 keys in 32 runs spread over the row): the coarse bin above which
//    the row should hold about 1.5 k keys.
// 1. The one read of the row: every key in the cut's bin or above (the candidates) is copied to
//    shared memory with its index, in index order, and the selectable keys are counted.
// 2. If the candidates number more than k and fit, a radix select among them alone: 8 bits a pass
//    from the most significant, on the exact 32-bit keys, stopping as soon as a bin is taken
//    whole. It ends with a prefix P: candidates above it are selected, and the first `ties`
//    candidates equal to it (lower index first among ties: the spec's rule).
// 3. Those candidates are written out.
// When the sample misjudges the row (fewer than k keys above the cut, or more than fit), the
// block falls back to a coarse histogram of the whole row, writes the keys above the threshold bin
// and refines that bin's keys the same way (in shared memory, or over the row if they do not fit).
//
// Positions come from prefix sums, never from atomic counters, so repeated runs give
// bitwise-identical output. Rows with at most k selectable keys return all of them, then -1.
#include "common.cuh"

using namespace dsa;

namespace topk {
constexpr int THREADS = 512;
constexpr int WARPS = THREADS / 32;
constexpr int BINS = 256;
constexpr int LOADS = 4;                       // 16-byte loads a lane issues before using any
constexpr int SEGMENT = 32 * 4 * LOADS;        // consecutive keys a warp owns in one block step
constexpr int CHUNK = WARPS * SEGMENT;         // keys per block step
constexpr u32 FULL = 0xffffffffu;
constexpr u32 NO_BIN = 0xffffffffu;
constexpr int SAMPLE_RUNS = 32;                // runs of 32 consecutive keys in the sample

__device__ __forceinline__ u32 order_key(float score) {
    u32 bits = __float_as_uint(score);
    if (score != score || bits == 0xff800000u) return 0u;  // NaN, -inf: never selected
    if (bits == 0x80000000u) bits = 0u;                     // -0.0 ties with +0.0
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// The coarse digit of a (non-zero) key: top byte of the half-precision order key of its score.
__device__ __forceinline__ u32 coarse_digit(u32 key) {
    const float score = __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
    unsigned short half_bits;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(half_bits) : "f"(score));
    const u32 h = half_bits;
    return ((h & 0x8000u) ? (~h & 0xffffu) : (h | 0x8000u)) >> 8;
}

// Add one key per lane to a warp's histogram. A warp whose keys all fall in one bin (a plateau of
// equal scores, common after ReLU) adds 32 once instead of 32 conflicting atomics; a warp of
// unselectable keys (a causal mask) adds nothing. Every lane of the warp must call.
__device__ __forceinline__ void count_coarse(u32* warp_histogram, u32 key) {
    const u32 bin = key ? coarse_digit(key) : NO_BIN;
    const u32 first = __shfl_sync(FULL, bin, 0);
    if (__all_sync(FULL, bin == first)) {
        if ((threadIdx.x & 31) == 0 && first != NO_BIN) atomicAdd(&warp_histogram[first], 32u);
    } else if (bin != NO_BIN) {
        atomicAdd(&warp_histogram[bin], 1u);
    }
}

// Where the `needed`-th largest key falls in a 256-bin histogram (counted from the top bin).
struct Choice {
    u32 total;   // keys counted
    u32 bin;     // the bin holding the needed-th largest (unset when total < needed)
    u32 above;   // keys in higher bins
    u32 in_bin;  // keys in that bin
};

// Warp 0 only, all lanes: lane l owns bins 255 - 8 l down to 248 - 8 l.
__device__ __forceinline__ void choose_bin(const u32* histogram, u32 needed, Choice* choice) {
    const int lane = threadIdx.x & 31;
    u32 counts[8], lane_total = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) { counts[i] = histogram[255 - 8 * lane - i]; lane_total += counts[i]; }
    u32 inclusive = lane_total;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
        const u32 other = __shfl_up_sync(FULL, inclusive, offset);
        if (lane >= offset) inclusive += other;
    }
    const u32 exclusive = inclusive - lane_total;
    if (lane == 31) choice->total = inclusive;
    if (exclusive < needed && needed <= inclusive) {
        u32 above = exclusive;
        bool found = false;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            if (!found && above + counts[i] >= needed) {
                found = true;
                choice->bin = 255 - 8 * lane - i;
                choice->in_bin = counts[i];
                choice->above = above;
            } else if (!found) {
                above += counts[i];
            }
        }
    }
}

// The row, read with 16-byte loads when it is 16-byte aligned and a multiple of 4 keys long.
struct RowKeys {
    const float* row;
    int length;
    bool vectorized;
    __device__ __forceinline__ void load4(int j, u32 (&keys)[4]) const {
        if (vectorized && j < length) {
            const float4 four = __ldg(reinterpret_cast<const float4*>(row + j));
            keys[0] = order_key(four.x); keys[1] = order_key(four.y);
            keys[2] = order_key(four.z); keys[3] = order_key(four.w);
        } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) keys[e] = j + e < length ? order_key(row[j + e]) : 0u;
        }
    }
    __device__ __forceinline__ int index(int j) const { return j; }
};

// The candidates copied to shared memory: keys and their row indices, in index order.
struct CandidateKeys {
    const u32* keys;
    const int* indices;
    int length;
    __device__ __forceinline__ void load4(int j, u32 (&four)[4]) const {
        if (j + 3 < length) {
            const uint4 loaded = *reinterpret_cast<const uint4*>(keys + j);
            four[0] = loaded.x; four[1] = loaded.y; four[2] = loaded.z; four[3] = loaded.w;
        } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) four[e] = j + e < length ? keys[j + e] : 0u;
        }
    }
    __device__ __forceinline__ int index(int j) const { return indices[j]; }
};

// One pass over a sequence of keys that sorts each into class A, class B or neither
// (classify(key) returns bit 0 for A, bit 1 for B) and hands every A and every B key to
// emit(index, key, is_b, rank), rank = how many keys of its class come before it in sequence order;
// returns the two class totals.
// Warp w owns keys [step + w SEGMENT, + SEGMENT) of each block step; lane l holds keys
// u 128 + 4 l .. + 3 of its warp's segment, so that ranks come from shuffles inside the warp and one
// read of the warps' totals. The totals are double-buffered: one barrier per block step.
template <class Sequence, class Classify, class Emit>
__device__ __forceinline__ uint2 ordered_pass(const Sequence& sequence, Classify classify, Emit emit,
                                              u32 (*warp_totals)[WARPS]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    u32 base_a = 0, base_b = 0;
    int parity = 0;
    for (int step = 0; step < sequence.length; step += CHUNK, parity ^= 1) {
        const int segment = step + warp * SEGMENT;
        u32 keys[LOADS][4];
#pragma unroll
        for (int u = 0; u < LOADS; ++u) sequence.load4(segment + 128 * u + 4 * lane, keys[u]);
        // Per load u: this lane's A and B bits, and the packed (A | B << 16) count of the lanes
        // before it plus the warp's earlier loads.
        u32 a_bits[LOADS], b_bits[LOADS], before[LOADS], warp_sum = 0;
#pragma unroll
        for (int u = 0; u < LOADS; ++u) {
            a_bits[u] = 0; b_bits[u] = 0;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const u32 cls = keys[u][e] ? classify(keys[u][e]) : 0u;
                a_bits[u] |= (cls & 1u) << e;
                b_bits[u] |= ((cls >> 1) & 1u) << e;
            }
            const u32 mine = (u32)__popc(a_bits[u]) | ((u32)__popc(b_bits[u]) << 16);
            u32 inclusive = mine;
#pragma unroll
            for (int offset = 1; offset < 32; offset <<= 1) {
                const u32 other = __shfl_up_sync(FULL, inclusive, offset);
                if (lane >= offset) inclusive += other;
            }
            before[u] = warp_sum + inclusive - mine;
            warp_sum += __shfl_sync(FULL, inclusive, 31);
        }
        if (lane == 0) warp_totals[parity][warp] = warp_sum;
        __syncthreads();
        u32 earlier_warps = 0, step_total = 0;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const u32 total = warp_totals[parity][w];
            earlier_warps += w < warp ? total : 0u;
            step_total += total;
        }
#pragma unroll
        for (int u = 0; u < LOADS; ++u) {
            u32 rank_a = base_a + (earlier_warps & 0xffffu) + (before[u] & 0xffffu);
            u32 rank_b = base_b + (earlier_warps >> 16) + (before[u] >> 16);
            const int j = segment + 128 * u + 4 * lane;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                if (a_bits[u] & (1u << e)) emit(sequence.index(j + e), keys[u][e], false, rank_a++);
                if (b_bits[u] & (1u << e)) emit(sequence.index(j + e), keys[u][e], true, rank_b++);
            }
        }
        base_a += step_total & 0xffffu;
        base_b += step_total >> 16;
    }
    return make_uint2(base_a, base_b);  // how many keys of class A and of class B
}

// Radix select over the candidates (keys whose coarse digit is `coarse`, or all when coarse is
// NO_BIN), 8 bits a pass: returns how many of the top `prefix_bits` bits are fixed in *prefix,
// and in *ties how many keys equal to the prefix are taken (the first ones in index order).
template <class Read>
__device__ __forceinline__ int refine(int count, Read read, u32 coarse, u32 needed, u32* histogram,
                                      Choice* choice, u32* prefix, u32* ties) {
    u32 found = 0, left = needed;
    int bits = 0;
    for (int pass = 0; pass < 4; ++pass) {
        const int shift = 24 - 8 * pass;
        for (int b = threadIdx.x; b < BINS; b += THREADS) histogram[b] = 0;
        __syncthreads();
        for (int j = threadIdx.x; j < count; j += THREADS) {
            const u32 key = read(j);
            const bool match = key != 0u && (coarse == NO_BIN || coarse_digit(key) == coarse) &&
                               (bits == 0 || (key >> (32 - bits)) == found);
            if (match) atomicAdd(&histogram[(key >> shift) & 0xffu], 1u);
        }
        __syncthreads();
        if (threadIdx.x < 32) choose_bin(histogram, left, choice);
        __syncthreads();
        found = (found << 8) | choice->bin;
        bits += 8;
        left -= choice->above;
        if (choice->in_bin == left) break;  // the bin is taken whole: no lower bit matters
        // (choice is next written two barriers later, after every thread has read it)
    }
    *prefix = found;
    *ties = left;
    return bits;
}
// The selection when the sample's cut fails: a coarse histogram of the whole row (a second read),
// keys above the threshold bin out, the threshold bin's keys to the candidates (a third read),
// refined there (or, if they do not fit, over the row). Returns how many slots it filled.
__device__ __forceinline__ u32 select_by_coarse_histogram(const RowKeys& row, int* __restrict__ row_out, int topk,
                                                      int candidate_capacity, u32 (*histograms)[BINS],
                                                      u32 (*warp_totals)[WARPS], Choice* choice,
                                                      u32* candidate_keys, int* candidate_indices) {
    const int tid = threadIdx.x, warp = tid >> 5;
    for (int i = tid; i < WARPS * BINS; i += THREADS) (&histograms[0][0])[i] = 0;
    __syncthreads();
    for (int step = 0; step < row.length; step += CHUNK) {
        const int segment = step + warp * SEGMENT;
        u32 keys[LOADS][4];
#pragma unroll
        for (int u = 0; u < LOADS; ++u) row.load4(segment + 128 * u + 4 * (tid & 31), keys[u]);
#pragma unroll
        for (int u = 0; u < LOADS; ++u)
#pragma unroll
            for (int e = 0; e < 4; ++e) count_coarse(histograms[warp], keys[u][e]);
    }
    __syncthreads();
    for (int b = tid; b < BINS; b += THREADS) {
        u32 sum = 0;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sum += histograms[w][b];
        histograms[0][b] = sum;  // only this thread touches column b
    }
    __syncthreads();
    if (tid < 32) choose_bin(histograms[0], (u32)topk, choice);
    __syncthreads();
    const Choice coarse = *choice;
    __syncthreads();  // choice is rewritten by the refinement

    auto write_out = [&](int index, u32, bool, u32 rank) { row_out[rank] = index; };
    if (coarse.total <= (u32)topk) {
        ordered_pass(row, [](u32) { return 1u; }, write_out, warp_totals);
        return coarse.total;
    }
    const u32 bin = coarse.bin, above = coarse.above, needed = (u32)topk - coarse.above;
    if (coarse.in_bin == needed) {  // the threshold bin is taken whole
        ordered_pass(row, [bin](u32 key) { return coarse_digit(key) >= bin ? 1u : 0u; }, write_out, warp_totals);
        return (u32)topk;
    }
    const bool copied = coarse.in_bin <= (u32)candidate_capacity;
    ordered_pass(
        row,
        [bin, copied](u32 key) {
            const u32 digit = coarse_digit(key);
            return (digit > bin ? 1u : 0u) | (copied && digit == bin ? 2u : 0u);
        },
        [&](int index, u32 key, bool is_candidate, u32 rank) {
            if (!is_candidate) row_out[rank] = index;
            else { candidate_keys[rank] = key; candidate_indices[rank] = index; }
        },
        warp_totals);
    __syncthreads();
    u32 prefix, ties;
    int bits;
    if (copied) {
        bits = refine((int)coarse.in_bin, [&](int j) { return candidate_keys[j]; }, NO_BIN, needed,
                      histograms[0], choice, &prefix, &ties);
    } else {
        bits = refine(row.length, [&](int j) { return order_key(row.row[j]); }, bin, needed,
                      histograms[0], choice, &prefix, &ties);
    }
    const int shift = 32 - bits;
    const u32 greater = needed - ties;
    auto classify = [prefix, shift](u32 key) {
        const u32 top = key >> shift;
        return (top > prefix ? 1u : 0u) | (top == prefix ? 2u : 0u);
    };
    auto write_selected = [&](int index, u32, bool is_tie, u32 rank) {
        if (!is_tie) row_out[above + rank] = index;
        else if (rank < ties) row_out[above + greater + rank] = index;
    };
    if (copied) {
        ordered_pass(CandidateKeys{candidate_keys, candidate_indices, (int)coarse.in_bin}, classify,
                     write_selected, warp_totals);
    } else {
        ordered_pass(row, [classify, bin](u32 key) { return coarse_digit(key) == bin ? classify(key) : 0u; },
                     write_selected, warp_totals);
    }
    return (u32)topk;
}
}  // namespace topk

extern "C" __global__ void __launch_bounds__(topk::THREADS, 2)
topk_select(const float* __restrict__ scores,  // [s_q, s_kv]
            int* __restrict__ indices,         // [s_q, topk]
            int s_kv, int topk, int candidate_capacity) {
    using namespace topk;
    __shared__ u32 histograms[WARPS][BINS];    // one per warp in the coarse pass; [0] elsewhere
    __shared__ u32 warp_totals[2][WARPS];
    __shared__ Choice choice;
    extern __shared__ __align__(16) u32 candidate_keys[];  // [candidate_capacity], then the indices
    int* candidate_indices = reinterpret_cast<int*>(candidate_keys + candidate_capacity);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const u64 row_number = blockIdx.x;
    const float* row_scores = scores + row_number * s_kv;
    int* row_out = indices + row_number * topk;
    const RowKeys row{row_scores, s_kv, (s_kv & 3) == 0 && (reinterpret_cast<u64>(row_scores) & 15) == 0};

    // ---- 0. a cut from a sample: SAMPLE_RUNS runs of 32 consecutive keys spread over the row
    // (the whole row when it is that short). The cut is the coarse bin that holds the sample's
    // m-th largest key, m = 1.5 x the sample's expected share of the top k, plus a margin: the row
    // then has about 1.5 k keys at or above it, comfortably more than k and fewer than the capacity.
    for (int b = tid; b < BINS; b += THREADS) histograms[0][b] = 0;
    __syncthreads();
    const int sample = s_kv < SAMPLE_RUNS * 32 ? s_kv : SAMPLE_RUNS * 32;
    for (int run = warp; run < SAMPLE_RUNS; run += WARPS) {
        const int start = s_kv <= SAMPLE_RUNS * 32 ? 32 * run : (int)((i64)run * (s_kv - 32) / (SAMPLE_RUNS - 1));
        const int j = start + lane;
        count_coarse(histograms[0], j < s_kv ? order_key(row_scores[j]) : 0u);
    }
    __syncthreads();
    const u32 cut_rank = (u32)((3 * (i64)topk * sample) / (2 * (i64)s_kv)) + 32;
    if (tid < 32) choose_bin(histograms[0], cut_rank, &choice);
    __syncthreads();
    const u32 cut = choice.total >= cut_rank ? choice.bin : 0u;  // 0: every selectable key

    // ---- 1. the one read of the row: keys in the cut's bin or above go to the candidates, in index order
    const uint2 counts = ordered_pass(
        row, [cut](u32 key) { return coarse_digit(key) >= cut ? 1u : 2u; },
        [&](int index, u32 key, bool below, u32 rank) {
            if (!below && rank < (u32)candidate_capacity) { candidate_keys[rank] = key; candidate_indices[rank] = index; }
        },
        warp_totals);
    __syncthreads();
    const u32 n_cut = counts.x, n_selectable = counts.x + counts.y;
    const CandidateKeys candidates{candidate_keys, candidate_indices, (int)n_cut};
    auto write_out = [&](int index, u32, bool, u32 rank) { row_out[rank] = index; };
    u32 taken;
    if (n_selectable <= (u32)topk && n_cut == n_selectable && n_cut <= (u32)candidate_capacity) {
        // ---- every selectable key is taken, and all are candidates
        ordered_pass(candidates, [](u32) { return 1u; }, write_out, warp_totals);
        taken = n_selectable;
    } else if (n_cut >= (u32)topk && n_cut <= (u32)candidate_capacity) {
        // ---- 2. radix select among the candidates
        u32 prefix, ties;
        const int bits = refine((int)n_cut, [&](int j) { return candidate_keys[j]; }, NO_BIN, (u32)topk,
                                histograms[0], &choice, &prefix, &ties);
        // ---- 3. the candidates above the prefix, then the first `ties` equal to it
        const int shift = 32 - bits;
        const u32 greater = (u32)topk - ties;
        ordered_pass(
            candidates,
            [prefix, shift](u32 key) {
                const u32 top = key >> shift;
                return (top > prefix ? 1u : 0u) | (top == prefix ? 2u : 0u);
            },
            [&](int index, u32, bool is_tie, u32 rank) {
                if (!is_tie) row_out[rank] = index;
                else if (rank < ties) row_out[greater + rank] = index;
            },
            warp_totals);
        taken = (u32)topk;
    } else {
        // ---- the sample misjudged the row (or it has at most k selectable keys, not all copied)
        taken = select_by_coarse_histogram(row, row_out, topk, candidate_capacity, histograms, warp_totals,
                                           &choice, candidate_keys, candidate_indices);
    }
    for (int slot = (int)taken + tid; slot < topk; slot += THREADS) row_out[slot] = -1;
}
