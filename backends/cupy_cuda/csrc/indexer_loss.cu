// The indexer's training loss (DeepSeek-V3.2 eqs. 3-4) and its backward; the spec is
// dsa_ref.reference.indexer_loss / indexer_loss_backward.
//
// Both stages run on "entries": for a chunk of queries, keys[i, e] is the key entry e of query i
// scores, or -1 where the entry takes no part in the softmax (an invalid index of the sparse stage,
// a key outside the dense stage's range). The host builds keys, and does the row-wise softmax, KL and
// dI = dL (softmax - target) with cupy reductions; the kernels do the h_i x d_i products:
//
// * indexer_entry_scores_simt: I[i, e] = ks[key] sum_j w[i, j] ReLU(q[i, j] . k[key]), -inf off the set.
// * indexer_loss_bwd_query_simt: dq[i, j] = sum_e dI ks w_j [g > 0] k[key], dw[i, j] = sum_e dI ks ReLU(g).
// * indexer_loss_bwd_dk_simt: dk[key] += sum_j dI ks w_j [g > 0] q[i, j], one block per (query, entry)
//   pair with atomicAdd, or, in deterministic mode, one block per key summing its pairs in the order
//   the host sorted them (see sparse_mla_backward.cu: the same segment scheme).
//
// g = q[i, j] . k[key] is recomputed wherever it is needed rather than stored ([s_q, h_i, n] floats).
// Float32 throughout (inputs of other dtypes are converted first); h_i <= 64, d_i <= 128.
#include "common.cuh"

using namespace dsa;

namespace indexer_loss {

constexpr int MAX_HEADS = 64;
constexpr int LANE_DIMS = 4;            // d_i <= 32 * LANE_DIMS = 128
constexpr int SCORE_THREADS = 256;      // 8 warps
constexpr int SCORE_ENTRIES = 64;       // entries of one block: 8 per warp
constexpr int QUERY_THREADS = 256;      // 8 warps, heads w, w + 8, ...
constexpr int HEADS_PER_WARP = MAX_HEADS / (QUERY_THREADS / 32);
constexpr int DK_THREADS = 128;         // thread t owns dim t

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}

}  // namespace indexer_loss

// Grid: (queries of the chunk, ceil(n / 64)); block: 8 warps, warp w scoring entries 8 w .. 8 w + 7 of
// the block's 64. The query's [h_i, d_i] rows and weights sit in shared memory; lane l holds dims
// l, l + 32, ... of the key row.
extern "C" __global__ void __launch_bounds__(indexer_loss::SCORE_THREADS)
indexer_entry_scores_simt(const float* __restrict__ q,         // [c, h_i, d_i]
                          const float* __restrict__ weights,   // [c, h_i]
                          const float* __restrict__ k,         // [s_kv, d_i]
                          const float* __restrict__ k_scale,   // [s_kv] or null
                          const int* __restrict__ keys,        // [c, n]
                          float* __restrict__ scores,          // [c, n]
                          int h_i, int d_i, int n) {
    using namespace indexer_loss;
    extern __shared__ float dynamic_smem[];
    float* q_rows = dynamic_smem;               // [h_i * d_i]
    float* row_weights = dynamic_smem + h_i * d_i;  // [h_i]
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int query = blockIdx.x;
    const float* q_query = q + (u64)query * h_i * d_i;
    for (int x = tid; x < h_i * d_i; x += SCORE_THREADS) q_rows[x] = q_query[x];
    for (int j = tid; j < h_i; j += SCORE_THREADS) row_weights[j] = weights[(u64)query * h_i + j];
    __syncthreads();
    const int first = blockIdx.y * SCORE_ENTRIES + warp * (SCORE_ENTRIES / 8);
    for (int entry = first; entry < min(n, first + SCORE_ENTRIES / 8); ++entry) {
        const int key = keys[(u64)query * n + entry];
        float score = DSA_NEG_INF;
        if (key >= 0) {
            float k_part[LANE_DIMS];
#pragma unroll
            for (int r = 0; r < LANE_DIMS; ++r) {
                const int d = lane + 32 * r;
                k_part[r] = d < d_i ? k[(u64)key * d_i + d] : 0.0f;
            }
            float total = 0.0f;
            for (int j = 0; j < h_i; ++j) {
                float partial = 0.0f;
#pragma unroll
                for (int r = 0; r < LANE_DIMS; ++r) {
                    const int d = lane + 32 * r;
                    if (d < d_i) partial = fmaf(q_rows[j * d_i + d], k_part[r], partial);
                }
                total = fmaf(row_weights[j], relu_keep_nan(warp_sum(partial)), total);
            }
            score = (k_scale != nullptr ? k_scale[key] : 1.0f) * total;
        }
        if (lane == 0) scores[(u64)query * n + entry] = score;
    }
}

// Grid: one block per query of the chunk; block: 8 warps, warp w owning heads w, w + 8, ... (at most
// 8 of them): their q rows and dq accumulators live in registers (lane l: dims l, l + 32, ...). Every
// warp walks all entries of the query; the key row is read once per warp (L1 serves the others).
extern "C" __global__ void __launch_bounds__(indexer_loss::QUERY_THREADS)
indexer_loss_bwd_query_simt(const float* __restrict__ q,          // [c, h_i, d_i]
                            const float* __restrict__ weights,    // [c, h_i]
                            const float* __restrict__ k,          // [s_kv, d_i]
                            const float* __restrict__ k_scale,    // [s_kv] or null
                            const int* __restrict__ keys,         // [c, n]
                            const float* __restrict__ d_scores,   // [c, n] dI
                            float* __restrict__ dq,               // [c, h_i, d_i]
                            float* __restrict__ d_weights,        // [c, h_i]
                            int h_i, int d_i, int n) {
    using namespace indexer_loss;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int query = blockIdx.x;
    float q_part[HEADS_PER_WARP][LANE_DIMS], dq_part[HEADS_PER_WARP][LANE_DIMS];
    float head_weight[HEADS_PER_WARP], dw_acc[HEADS_PER_WARP];
#pragma unroll
    for (int m = 0; m < HEADS_PER_WARP; ++m) {
        const int head = warp + 8 * m;
        head_weight[m] = head < h_i ? weights[(u64)query * h_i + head] : 0.0f;
        dw_acc[m] = 0.0f;
#pragma unroll
        for (int r = 0; r < LANE_DIMS; ++r) {
            const int d = lane + 32 * r;
            q_part[m][r] = head < h_i && d < d_i ? q[((u64)query * h_i + head) * d_i + d] : 0.0f;
            dq_part[m][r] = 0.0f;
        }
    }
    for (int entry = 0; entry < n; ++entry) {
        const int key = keys[(u64)query * n + entry];
        if (key < 0) continue;
        const float scaled = d_scores[(u64)query * n + entry] * (k_scale != nullptr ? k_scale[key] : 1.0f);
        float k_part[LANE_DIMS];
#pragma unroll
        for (int r = 0; r < LANE_DIMS; ++r) {
            const int d = lane + 32 * r;
            k_part[r] = d < d_i ? k[(u64)key * d_i + d] : 0.0f;
        }
#pragma unroll
        for (int m = 0; m < HEADS_PER_WARP; ++m) {
            if (warp + 8 * m >= h_i) continue;  // the same for the whole warp
            float partial = 0.0f;
#pragma unroll
            for (int r = 0; r < LANE_DIMS; ++r) partial = fmaf(q_part[m][r], k_part[r], partial);
            const float gate = warp_sum(partial);
            dw_acc[m] = fmaf(scaled, relu_keep_nan(gate), dw_acc[m]);
            const float coefficient = gate > 0.0f ? scaled * head_weight[m] : 0.0f;
#pragma unroll
            for (int r = 0; r < LANE_DIMS; ++r) dq_part[m][r] = fmaf(coefficient, k_part[r], dq_part[m][r]);
        }
    }
#pragma unroll
    for (int m = 0; m < HEADS_PER_WARP; ++m) {
        const int head = warp + 8 * m;
        if (head >= h_i) continue;
#pragma unroll
        for (int r = 0; r < LANE_DIMS; ++r) {
            const int d = lane + 32 * r;
            if (d < d_i) dq[((u64)query * h_i + head) * d_i + d] = dq_part[m][r];
        }
        if (lane == 0) d_weights[(u64)query * h_i + head] = dw_acc[m];
    }
}

// Grid: one block per unit of work (see the file comment); block: 128 threads, thread t owning dim t.
// Pair p is (query p / n of the chunk, entry p % n). Per pair: the key row into shared memory, the
// warps compute g for heads w, w + 4, ..., the coefficients go to shared memory, and thread t adds
// sum_j coefficient_j q[i, j, t].
extern "C" __global__ void __launch_bounds__(indexer_loss::DK_THREADS)
indexer_loss_bwd_dk_simt(const float* __restrict__ q,             // [c, h_i, d_i]
                         const float* __restrict__ weights,       // [c, h_i]
                         const float* __restrict__ k,             // [s_kv, d_i]
                         const float* __restrict__ k_scale,       // [s_kv] or null
                         const int* __restrict__ keys,            // [c, n]
                         const float* __restrict__ d_scores,      // [c, n]
                         const int* __restrict__ pair_order,      // [pairs] or null
                         const int* __restrict__ segment_start,   // [segments + 1] or null
                         float* __restrict__ dk,                  // [s_kv, d_i]
                         int h_i, int d_i, int n) {
    using namespace indexer_loss;
    __shared__ float key_row[32 * LANE_DIMS];
    __shared__ float coefficient[MAX_HEADS];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const bool segmented = pair_order != nullptr;
    const int begin = segmented ? segment_start[blockIdx.x] : (int)blockIdx.x;
    const int end = segmented ? segment_start[blockIdx.x + 1] : begin + 1;
    float acc = 0.0f;
    int row = -1;
    for (int position = begin; position < end; ++position) {
        const int pair = segmented ? pair_order[position] : position;
        const int query = pair / n;
        const int key = keys[pair];
        if (key < 0) continue;  // the same for the whole block
        row = key;
        __syncthreads();  // the previous pair's key row and coefficients are no longer read
        if (tid < d_i) key_row[tid] = k[(u64)key * d_i + tid];
        __syncthreads();
        const float scaled = d_scores[pair] * (k_scale != nullptr ? k_scale[key] : 1.0f);
        const float* q_query = q + (u64)query * h_i * d_i;
        for (int head = warp; head < h_i; head += DK_THREADS / 32) {
            float partial = 0.0f;
#pragma unroll
            for (int r = 0; r < LANE_DIMS; ++r) {
                const int d = lane + 32 * r;
                if (d < d_i) partial = fmaf(q_query[head * d_i + d], key_row[d], partial);
            }
            const float gate = warp_sum(partial);
            if (lane == 0) coefficient[head] = gate > 0.0f ? scaled * weights[(u64)query * h_i + head] : 0.0f;
        }
        __syncthreads();
        if (tid < d_i) {
            for (int head = 0; head < h_i; ++head) acc = fmaf(coefficient[head], q_query[head * d_i + tid], acc);
        }
    }
    if (row < 0 || tid >= d_i) return;
    if (segmented) {
        dk[(u64)row * d_i + tid] += acc;
    } else {
        atomicAdd(dk + (u64)row * d_i + tid, acc);
    }
}
