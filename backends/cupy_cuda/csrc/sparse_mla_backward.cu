// Sparse MLA backward (DeepSeek-V3.2 eq. 2, MQA mode) and the indexer's attention target.
//
// The spec is dsa_ref.reference.sparse_mla_backward / attention_target. FlashAttention-2's
// backward, made sparse: the probabilities are recomputed from the forward's lse,
//
//     P_t  = exp(sm_scale q . K_t - lse)                (0 at invalid slots, never read)
//     dl_t = P_t (f (dout . V_t - D) + d_lse)           D = sum(dout * out), f = sink share
//     dq   = sm_scale sum_t dl_t K_t
//     dkv[idx_t] += sm_scale dl_t q + [:d_v] f P_t dout (summed over heads)
//
// D and f are computed on the host side (cupy reductions, deterministic). The work is split in two
// kernels over a chunk of queries, with an fp32 scratch [chunk, h, topk] of dl_t and f P_t between them:
//
// * sparse_mla_bwd_query_simt: one block per (query, head): dl_t and f P_t for every slot (into
//   the scratch) and dq (complete: no atomics).
// * sparse_mla_bwd_dkv_simt: the scattered row gradients. One block per unit of work:
//     - default: one (query, slot) pair, added to dkv with fp32 atomicAdd;
//     - deterministic: one *segment*, all the pairs that read one kv row, in a fixed order
//       (the host sorts (row, pair) keys), summed in registers/shared memory and added to dkv
//       with a plain read-modify-write: exactly one block writes a row per launch, and
//       launches run in stream order, so two runs add the same numbers in the same order.
// * attention_probs_simt: P_t of every (query, head, slot), the attention target's input (the
//   host sums over heads and normalizes).
//
// All three compute in float32 (inputs of other dtypes are converted first).
#include "common.cuh"

using namespace dsa;

namespace mla_bwd {

constexpr int THREADS = 128;
constexpr int MAX_HEADS = 128;  // the dkv kernel keeps two coefficients per head in shared memory

__device__ __forceinline__ int slots_of(int query, int topk, const int* topk_length) {
    int n_slots = topk;
    if (topk_length != nullptr) n_slots = min(n_slots, max(topk_length[query], 0));
    return n_slots;
}

// The kv row a slot reads, or -1 where the slot is invalid (index outside [0, s_kv), or past topk_length).
__device__ __forceinline__ int row_of(const int* indices, int query, int slot, int topk, int n_slots, int s_kv) {
    if (slot >= n_slots) return -1;
    const int index = indices[(u64)query * topk + slot];
    return index >= 0 && index < s_kv ? index : -1;
}

}  // namespace mla_bwd

// Grid: one block per (query of the chunk, head); block: 128 threads.
// Slots are processed in chunks of 128: thread t computes the two dot products of slot t (q . K and
// dout . V, read from the same row), then every thread accumulates its own dims d = t, t + 128, ...
// of dq over the chunk's slots, reading each gathered row coalesced across the block.
extern "C" __global__ void __launch_bounds__(mla_bwd::THREADS)
sparse_mla_bwd_query_simt(const float* __restrict__ q,            // [c, h, d_qk]
                          const float* __restrict__ kv,           // [s_kv, d_qk]
                          const int* __restrict__ indices,        // [c, topk]
                          const int* __restrict__ topk_length,    // [c] or null
                          const float* __restrict__ lse,          // [c, h]
                          const float* __restrict__ d_out,        // [c, h, d_v]
                          const float* __restrict__ delta,        // [c, h] D
                          const float* __restrict__ share,        // [c, h] f
                          const float* __restrict__ d_lse,        // [c, h] or null
                          float* __restrict__ dq,                 // [c, h, d_qk]
                          float* __restrict__ d_logits,           // [c, h, topk] scratch: dl_t
                          float* __restrict__ value_weights,      // [c, h, topk] scratch: f P_t
                          int h, int s_kv, int topk, int d_qk, int d_v, float sm_scale) {
    using namespace mla_bwd;
    extern __shared__ float dynamic_smem[];
    float* q_row = dynamic_smem;               // [d_qk]
    float* d_out_row = dynamic_smem + d_qk;    // [d_v]
    float* acc = d_out_row + d_v;              // [d_qk]
    __shared__ float chunk_d_logits[THREADS];
    __shared__ int chunk_rows[THREADS];

    const int tid = threadIdx.x;
    const int query = blockIdx.x / h, head = blockIdx.x - query * h;
    const u64 query_head = (u64)query * h + head;
    for (int d = tid; d < d_qk; d += THREADS) {
        q_row[d] = q[query_head * d_qk + d];
        acc[d] = 0.0f;
    }
    for (int d = tid; d < d_v; d += THREADS) d_out_row[d] = d_out[query_head * d_v + d];
    const float row_lse = lse[query_head], row_delta = delta[query_head], row_share = share[query_head];
    const float row_d_lse = d_lse != nullptr ? d_lse[query_head] : 0.0f;
    const int n_slots = slots_of(query, topk, topk_length);
    __syncthreads();

    for (int chunk = 0; chunk < n_slots; chunk += THREADS) {
        const int slot = chunk + tid;
        const int row = row_of(indices, query, slot, topk, n_slots, s_kv);
        float d_logit = 0.0f, value_weight = 0.0f;
        if (row >= 0) {
            const float* kv_row = kv + (u64)row * d_qk;
            float score = 0.0f, d_prob = 0.0f;
            for (int d = 0; d < d_v; ++d) {
                const float x = kv_row[d];
                score = fmaf(q_row[d], x, score);
                d_prob = fmaf(d_out_row[d], x, d_prob);
            }
            for (int d = d_v; d < d_qk; ++d) score = fmaf(q_row[d], kv_row[d], score);
            const float prob = expf(score * sm_scale - row_lse);
            d_logit = prob * (row_share * (d_prob - row_delta) + row_d_lse);
            value_weight = row_share * prob;
        }
        if (slot < n_slots) {
            d_logits[query_head * topk + slot] = d_logit;
            value_weights[query_head * topk + slot] = value_weight;
        }
        chunk_d_logits[tid] = d_logit;
        chunk_rows[tid] = row;
        __syncthreads();
        const int chunk_slots = min(THREADS, n_slots - chunk);
        for (int d = tid; d < d_qk; d += THREADS) {
            float value = acc[d];
            for (int s = 0; s < chunk_slots; ++s) {
                if (chunk_rows[s] >= 0) value = fmaf(chunk_d_logits[s], kv[(u64)chunk_rows[s] * d_qk + d], value);
            }
            acc[d] = value;
        }
        __syncthreads();
    }
    for (int d = tid; d < d_qk; d += THREADS) dq[query_head * d_qk + d] = acc[d] * sm_scale;
}

// Grid: one block per unit of work (a pair, or a segment of pairs with pair_order); block: 128 threads,
// thread t owning dims t, t + 128, ... of the row. Pair p is (query p / topk of the chunk, slot p % topk).
//
// With pair_order == null, block b is pair b and adds its contribution with atomicAdd (invalid pairs
// return at once). Otherwise block b sums the pairs pair_order[segment_start[b] .. segment_start[b + 1])
// in that order (all of them valid and reading the same row) and adds the sum to dkv without atomics.
extern "C" __global__ void __launch_bounds__(mla_bwd::THREADS)
sparse_mla_bwd_dkv_simt(const float* __restrict__ q,               // [c, h, d_qk]
                        const float* __restrict__ d_out,           // [c, h, d_v]
                        const float* __restrict__ d_logits,        // [c, h, topk]
                        const float* __restrict__ value_weights,   // [c, h, topk]
                        const int* __restrict__ indices,           // [c, topk]
                        const int* __restrict__ topk_length,       // [c] or null
                        const int* __restrict__ pair_order,        // [pairs] or null
                        const int* __restrict__ segment_start,     // [segments + 1] or null
                        float* __restrict__ dkv,                   // [s_kv, d_qk]
                        int h, int s_kv, int topk, int d_qk, int d_v, float sm_scale) {
    using namespace mla_bwd;
    extern __shared__ float dynamic_smem[];
    float* acc = dynamic_smem;  // [d_qk]
    __shared__ float key_coefficient[MAX_HEADS];    // sm_scale dl_t per head
    __shared__ float value_coefficient[MAX_HEADS];  // f P_t per head

    const int tid = threadIdx.x;
    const bool segmented = pair_order != nullptr;
    const int begin = segmented ? segment_start[blockIdx.x] : (int)blockIdx.x;
    const int end = segmented ? segment_start[blockIdx.x + 1] : begin + 1;
    for (int d = tid; d < d_qk; d += THREADS) acc[d] = 0.0f;
    int row = -1;
    for (int position = begin; position < end; ++position) {
        const int pair = segmented ? pair_order[position] : position;
        const int query = pair / topk, slot = pair - query * topk;
        const int pair_row = row_of(indices, query, slot, topk, slots_of(query, topk, topk_length), s_kv);
        if (pair_row < 0) continue;  // the same for the whole block: no thread skips a barrier alone
        row = pair_row;
        __syncthreads();  // the previous pair's coefficients are no longer read
        for (int head = tid; head < h; head += THREADS) {
            const u64 at = ((u64)query * h + head) * topk + slot;
            key_coefficient[head] = d_logits[at] * sm_scale;
            value_coefficient[head] = value_weights[at];
        }
        __syncthreads();
        const float* q_query = q + (u64)query * h * d_qk;
        const float* d_out_query = d_out + (u64)query * h * d_v;
        for (int d = tid; d < d_qk; d += THREADS) {
            float value = acc[d];
            for (int head = 0; head < h; ++head) value = fmaf(key_coefficient[head], q_query[(u64)head * d_qk + d], value);
            if (d < d_v) {
                for (int head = 0; head < h; ++head)
                    value = fmaf(value_coefficient[head], d_out_query[(u64)head * d_v + d], value);
            }
            acc[d] = value;
        }
    }
    if (row < 0) return;
    float* dkv_row = dkv + (u64)row * d_qk;
    for (int d = tid; d < d_qk; d += THREADS) {
        if (segmented) {
            dkv_row[d] += acc[d];
        } else {
            atomicAdd(dkv_row + d, acc[d]);
        }
    }
}

// Grid: one block per (query of the chunk, head); block: 128 threads, one slot each per chunk of 128.
// Writes P_t for every slot t < topk: 0 where the slot is invalid.
extern "C" __global__ void __launch_bounds__(mla_bwd::THREADS)
attention_probs_simt(const float* __restrict__ q,            // [c, h, d_qk]
                     const float* __restrict__ kv,           // [s_kv, d_qk]
                     const int* __restrict__ indices,        // [c, topk]
                     const int* __restrict__ topk_length,    // [c] or null
                     const float* __restrict__ lse,          // [c, h]
                     float* __restrict__ probs,              // [c, h, topk]
                     int h, int s_kv, int topk, int d_qk, float sm_scale) {
    using namespace mla_bwd;
    extern __shared__ float dynamic_smem[];
    float* q_row = dynamic_smem;  // [d_qk]
    const int tid = threadIdx.x;
    const int query = blockIdx.x / h, head = blockIdx.x - query * h;
    const u64 query_head = (u64)query * h + head;
    for (int d = tid; d < d_qk; d += THREADS) q_row[d] = q[query_head * d_qk + d];
    const float row_lse = lse[query_head];
    const int n_slots = slots_of(query, topk, topk_length);
    __syncthreads();
    for (int slot = tid; slot < topk; slot += THREADS) {
        const int row = row_of(indices, query, slot, topk, n_slots, s_kv);
        float prob = 0.0f;
        if (row >= 0) {
            const float* kv_row = kv + (u64)row * d_qk;
            float score = 0.0f;
            for (int d = 0; d < d_qk; ++d) score = fmaf(q_row[d], kv_row[d], score);
            prob = expf(score * sm_scale - row_lse);
        }
        probs[query_head * topk + slot] = prob;
    }
}
