"""Lightning indexer over a paged fp8 key cache (the decode step's scores, DeepGEMM's paged layout),
reading the pages in place.

.. math:: I_{b \\cdot n + j,\\,t} = \\mathrm{scale}_{s(b,t)} \\sum_h w_{b n + j,h}\\,
          \\mathrm{ReLU}(q_{b n + j,h}\\cdot k_{s(b,t)}) \\quad\\text{for } t \\le
          \\mathrm{context\\_lens}_b - n + j,\\ \\text{else } -\\infty

where ``s(b, t)`` is slot ``t % block_size`` of block ``block_table[b, t // block_size]`` and ``n``
is ``next_n``. The composed op (``Backend.lightning_indexer_paged``) gathers each sequence's keys
and runs the dense indexer once per sequence: a decode batch of 64 sequences is 64 launches of one
query against the whole context, each on a single program of the dense kernel, which parallelizes
over query blocks. Here one launch covers the batch: a program takes one sequence and a chunk of
``STEPS * BLOCK_N`` key positions, loads the sequence's ``next_n * H_I`` query rows once, and walks
its chunk ``BLOCK_N`` positions at a time: the block table gives each position's page, the keys
(``e4m3``) and their float32 scales are read straight out of the page, one tensor-core product
``[BLOCK_N, d_I] x [d_I, next_n * H_I]`` gives the logits, and the epilogue (ReLU, head weights, the
sum over heads, the scale, the causal bound and absent pages) is the dense kernel's. Positions past
a sequence's context are written ``-inf`` without being computed.

Keys are the product's rows and heads its columns (the transpose of the dense kernel's product):
the sum over heads is then a sum along an accumulator row, which the wgmma layout keeps in the four
threads of a quad (two shuffles), where heads on the rows spread it over every warp (shuffles and a
shared-memory exchange a step; NOTES.md, version 9).

The scales are float32 values stored inside the uint8 cache at offsets that are multiples of 4:
where every block starts on a 4-byte boundary, the cache is also passed viewed as float32 words and
a scale is one load; otherwise its four bytes are read and reassembled (little-endian, as the GPU
stores them). Neither needs a pointer cast, so the kernel runs on Triton's interpreter too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: The scale of a key takes this many bytes after the block's values (a float32).
KEY_SCALE_BYTES = 4
SCALE_BYTES = tl.constexpr(KEY_SCALE_BYTES)  # the same, for the kernel


@triton.jit
def _paged_indexer_kernel(
    p_q, p_weights, p_cache, p_cache_words, p_table, p_lens, p_scores,
    num_blocks, max_blocks, max_context_len, h_i, d_i, next_n, block_size,
    stride_q_m, stride_q_h, stride_w_m, stride_cache_block, stride_cache_words, stride_table_b, stride_s_m,
    NEXT_N: tl.constexpr, HEADS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    STEPS: tl.constexpr, ONE_PAGE: tl.constexpr, WORD_SCALES: tl.constexpr,
):
    sequence = tl.program_id(0)
    chunk = tl.program_id(1)
    group = tl.program_id(2)  # queries [group * NEXT_N, (group + 1) * NEXT_N) of the sequence
    # Rows of the stacked operand: row r is head (r % HEADS) of query group * NEXT_N + r // HEADS.
    o_r = tl.arange(0, NEXT_N * HEADS)
    o_query = group * NEXT_N + o_r // HEADS
    o_head = o_r % HEADS
    m_r = (o_query < next_n) & (o_head < h_i)
    o_row = (sequence * next_n + o_query).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < d_i
    b_q = tl.load(p_q + o_row[:, None] * stride_q_m + o_head[:, None] * stride_q_h + o_d[None, :],
                  mask=m_r[:, None] & m_d[None, :], other=0.0)  # [NEXT_N*HEADS, BLOCK_D]
    # Padded heads and queries get weight 0 and q = 0: they add exactly 0 to the sums.
    b_w = tl.load(p_weights + o_row * stride_w_m + o_head, mask=m_r, other=0.0).to(tl.float32)

    length = tl.load(p_lens + sequence).to(tl.int32)  # tokens of this sequence, this step's included
    o_j = group * NEXT_N + tl.arange(0, NEXT_N)
    m_j = o_j < next_n
    last_visible = length - next_n + o_j  # [NEXT_N]   query j sees positions <= this
    p_scores_cols = p_scores + (sequence * next_n + o_j).to(tl.int64) * stride_s_m  # [NEXT_N]
    p_table_row = p_table + sequence.to(tl.int64) * stride_table_b

    begin = chunk * (STEPS * BLOCK_N)
    # Steps that hold a position of the context, then steps wholly past it: two loops with no branch
    # in their bodies, so that the first one's loads are software-pipelined.
    live = tl.minimum(tl.maximum(tl.cdiv(length - begin, BLOCK_N), 0), STEPS)
    for step in range(0, live):
        o_t = begin + step * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]   key positions
        m_t = o_t < max_context_len
        if ONE_PAGE:
            # block_size is a multiple of BLOCK_N: the step's positions lie in one page, whose
            # address is a scalar and whose keys are contiguous (32-bit offsets from it).
            logical = (begin + step * BLOCK_N) // block_size
            # Read in range (max_blocks >= 1: the launcher returns early otherwise), then judged:
            # a scalar load takes no mask on every Triton release's interpreter.
            page = tl.load(p_table_row + tl.minimum(logical, max_blocks - 1))
            page = page.to(tl.int64)
            # The page's verdict broadcast as an integer: a mask built from a scalar bool has no
            # dtype the newest interpreter loads with.
            page_ok = ((logical < max_blocks) & (page >= 0) & (page < num_blocks)).to(tl.int32)
            present = m_t & (o_t < length) & ((tl.zeros((BLOCK_N,), tl.int32) + page_ok) != 0)  # [BLOCK_N]
            # Any page of the cache for the address: the loads of an absent page are masked.
            safe_page = tl.maximum(tl.minimum(page, num_blocks - 1), 0)
            offset = o_t - logical * block_size  # [BLOCK_N]   slots of the page
        else:
            logical = o_t // block_size
            page = tl.load(p_table_row + logical,
                           mask=m_t & (logical < max_blocks), other=-1).to(tl.int64)
            present = m_t & (o_t < length) & (page >= 0) & (page < num_blocks)  # [BLOCK_N]
            safe_page = tl.where(present, page, 0)  # [BLOCK_N]
            offset = (o_t % block_size).to(tl.int64)
        p_page = p_cache + safe_page * stride_cache_block  # the page's first byte (per position or not)
        if ONE_PAGE:
            b_k = tl.load(p_page + offset[:, None] * d_i + o_d[None, :],
                          mask=present[:, None] & m_d[None, :], other=0)  # [BLOCK_N, BLOCK_D] uint8
        else:
            b_k = tl.load(p_page[:, None] + offset[:, None] * d_i + o_d[None, :],
                          mask=present[:, None] & m_d[None, :], other=0)  # [BLOCK_N, BLOCK_D] uint8
        b_k = b_k.to(tl.float8e4nv, bitcast=True)
        if WORD_SCALES:
            # The same cache viewed as float32 words: a block's scales start at word block_size * d_i / 4.
            p_scale = p_cache_words + safe_page * stride_cache_words + (block_size * d_i) // SCALE_BYTES + offset
            b_scale = tl.load(p_scale, mask=present, other=0.0)  # [BLOCK_N]
        else:
            p_scale = p_page + block_size * d_i + offset * SCALE_BYTES
            bits = tl.load(p_scale, mask=present, other=0).to(tl.uint32)
            bits |= tl.load(p_scale + 1, mask=present, other=0).to(tl.uint32) << 8
            bits |= tl.load(p_scale + 2, mask=present, other=0).to(tl.uint32) << 16
            bits |= tl.load(p_scale + 3, mask=present, other=0).to(tl.uint32) << 24
            b_scale = bits.to(tl.float32, bitcast=True)  # [BLOCK_N]

        # Keys on the rows of the product, heads on its columns: the sum over heads stays within
        # the threads that hold a row of the accumulator.
        b_logits = tl.dot(b_k, tl.trans(b_q))  # [BLOCK_N, NEXT_N*HEADS]   k . q, fp32
        # ReLU that keeps NaN (the reference's np.maximum does), then the head weight.
        b_gated = tl.maximum(b_logits, 0.0, propagate_nan=tl.PropagateNan.ALL) * b_w[None, :]
        b_scores = tl.sum(tl.reshape(b_gated, (BLOCK_N, NEXT_N, HEADS)), axis=2) * b_scale[:, None]
        m_visible = present[:, None] & (o_t[:, None] <= last_visible[None, :])
        b_scores = tl.where(m_visible, b_scores, float("-inf"))  # [BLOCK_N, NEXT_N]
        tl.store(p_scores_cols[None, :] + o_t[:, None], b_scores, mask=m_t[:, None] & m_j[None, :])
    for step in range(live, STEPS):
        o_t = begin + step * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]   past the context: no key
        b_scores = tl.full((BLOCK_N, NEXT_N), float("-inf"), tl.float32)
        tl.store(p_scores_cols[None, :] + o_t[:, None], b_scores,
                 mask=(o_t < max_context_len)[:, None] & m_j[None, :])


def paged_indexer_config(h_i: int, d_i: int, next_n: int, block_size: int = 64) -> dict:
    """Block sizes: the sequence's ``next_n * H_I`` query rows stacked, at most 128 (64 for one V3.2
    query, 128 for two; more queries are split over the grid's third axis), 64 key positions a step
    (the rows of one m64 tensor-core product, the stacked queries its columns), 16 steps (1024
    positions) a program: at b 64 and a 128K context that is 8192 programs, and each loads its query
    rows once for 16 products. One warpgroup, three stages of keys in flight. Pages of a multiple of
    64 tokens (``ONE_PAGE``) put a step's keys in one page: one scalar page address and 32-bit
    offsets. sm_90 compile at V3.2's sizes (tests/test_triton_paged_indexer.py): 89 registers at
    next_n 1, 157 at next_n 2, 96 with a page looked up per position; no spills."""
    heads = triton.next_power_of_2(max(h_i, 1))
    # Queries a program stacks: all of the sequence's, up to 128 rows (more take a third grid axis).
    next_n_padded = min(triton.next_power_of_2(max(next_n, 1)), max(1, 128 // heads))
    while next_n_padded * heads < 16:  # tl.dot takes at least 16 rows
        heads *= 2
    block_d = max(32, triton.next_power_of_2(max(d_i, 1)))  # fp8 tl.dot takes K >= 32; padding is masked
    return dict(NEXT_N=next_n_padded, HEADS=heads, BLOCK_D=block_d, BLOCK_N=64, STEPS=16,
                ONE_PAGE=block_size % 64 == 0, num_warps=4, num_stages=3)


def _as_words(k_cache):
    """The uint8 cache viewed as float32 words, or None where a block does not start on a word."""
    if (k_cache.shape[1] % KEY_SCALE_BYTES or k_cache.stride(0) % KEY_SCALE_BYTES
            or k_cache.storage_offset() % KEY_SCALE_BYTES or k_cache.data_ptr() % KEY_SCALE_BYTES):
        return None
    return k_cache.view(torch.float32)


def paged_indexer_reasons(q, k_cache) -> list[str]:
    """Why :func:`lightning_indexer_paged` does not take these inputs (the composed op runs instead)."""
    reasons = []
    if q.dtype != torch.float8_e4m3fn:
        reasons.append(f"q dtype={q.dtype} (the paged kernel multiplies e4m3 queries with the cache's e4m3 keys)")
    if triton.next_power_of_2(max(q.shape[1], 1)) > 128:
        reasons.append(f"h_i={q.shape[1]} (the paged kernel stacks at most 128 heads)")
    return reasons


def lightning_indexer_paged(q, weights, k_cache, block_table, context_lens, next_n: int, max_context_len: int,
                            config: dict | None = None):
    """float32 ``[b * next_n, max_context_len]`` scores; see :func:`dsa_ref.lightning_indexer_paged`.

    ``context_lens`` are taken as given (the public op has checked or clamped them); ``q`` is e4m3
    (:func:`paged_indexer_reasons`)."""
    rows, h_i, d_i = q.shape
    batch = context_lens.shape[0]
    num_blocks, block_bytes = k_cache.shape
    block_size = block_bytes // (d_i + KEY_SCALE_BYTES)
    out = torch.empty((rows, max_context_len), dtype=torch.float32, device=q.device)
    if rows == 0 or max_context_len == 0:
        return out
    if block_table.shape[1] == 0:  # a table of no blocks holds no key
        return out.fill_(float("-inf"))
    q = q if q.stride(-1) == 1 else q.contiguous()
    weights = weights if weights.stride(-1) == 1 else weights.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    block_table = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
    context_lens = context_lens.contiguous()
    config = {**paged_indexer_config(h_i, d_i, next_n, block_size), **(config or {})}
    config["ONE_PAGE"] = block_size % config["BLOCK_N"] == 0
    # The scales as float32 words where the cache's layout allows (every block starts on a word):
    # one load a key instead of four bytes reassembled.
    words = _as_words(k_cache)
    config["WORD_SCALES"] = words is not None
    grid = (batch, triton.cdiv(max_context_len, config["STEPS"] * config["BLOCK_N"]),
            triton.cdiv(next_n, config["NEXT_N"]))
    _paged_indexer_kernel[grid](
        q, weights, k_cache, k_cache if words is None else words, block_table, context_lens, out,
        num_blocks, block_table.shape[1], max_context_len, h_i, d_i, next_n, block_size,
        q.stride(0), q.stride(1), weights.stride(0), k_cache.stride(0), k_cache.stride(0) // KEY_SCALE_BYTES,
        block_table.stride(0), out.stride(0),
        **config,
    )
    return out
