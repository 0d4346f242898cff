"""DSA attention composed from the kernels, with the indexer -> top-k step fused by chunks.

The plain composition writes the whole ``[s_q, s_kv]`` float32 score matrix and reads it back
for top-k: 17 GB at 64K tokens, more than the time of the indexer itself to move, and more than
many GPUs hold. The fused path runs the indexer and the top-k one chunk of queries at a time
through one reused score buffer (at most ``chunk_bytes``), and writes each chunk only inside
its queries' key ranges: the top-k kernel reads only ``[key_start, key_end)`` of each row, so
nothing else of the buffer is written or read (for a causal prefill, half the matrix never
exists).

(A fully fused kernel that selects while it scores must either keep a row's scores on chip,
which does not fit at long contexts, or compute the scores twice; at H_I = 64, d_I = 128 the
indexer's arithmetic is 8192 FLOP per score against 8 bytes of write and read, so storing the
chunk is the cheaper side on an H100.)
"""

from __future__ import annotations

import torch

from .indexer import lightning_indexer
from .sparse_mla import sparse_mla
from .topk import topk_indices

#: Largest score buffer of the fused path (1 GiB: 4096 queries x 64K keys).
CHUNK_BYTES = 1 << 30


def fused_indexer_topk(q_index, weights, k_index, key_start, key_end, k_scale, topk: int,
                       chunk_bytes: int = CHUNK_BYTES):
    """int32 ``[s_q, topk]`` top-k indices of the indexer scores, never holding more than
    ``chunk_bytes`` of scores."""
    s_q, s_kv = q_index.shape[0], k_index.shape[0]
    indices = torch.empty((s_q, topk), dtype=torch.int32, device=q_index.device)
    if s_q == 0:
        return indices
    rows_per_chunk = max(1, min(s_q, chunk_bytes // (4 * max(s_kv, 1))))
    buffer = torch.empty((rows_per_chunk, max(s_kv, 1)), dtype=torch.float32, device=q_index.device)
    for row_begin in range(0, s_q, rows_per_chunk):
        row_end = min(s_q, row_begin + rows_per_chunk)
        scores = buffer[: row_end - row_begin]
        lightning_indexer(q_index, weights, k_index, key_start, key_end, k_scale, out=scores,
                          row_begin=row_begin, row_end=row_end, fill_masked=False)
        topk_indices(scores[:, :s_kv], topk, key_start[row_begin:row_end], key_end[row_begin:row_end],
                     out=indices[row_begin:row_end])
    return indices


def dsa_attention(q, kv, q_index, weights, k_index, *, topk: int, key_start, key_end, k_scale,
                  sm_scale: float, d_v: int, chunk_bytes: int = CHUNK_BYTES):
    """``(out, lse, indices)``: fused indexer -> top-k, then sparse MLA over the selection."""
    indices = fused_indexer_topk(q_index, weights, k_index, key_start, key_end, k_scale, topk, chunk_bytes)
    out, lse = sparse_mla(q, kv, indices, sm_scale, d_v)
    return out, lse, indices
