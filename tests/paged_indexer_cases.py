"""The paged-indexer problems both backends' kernel tests run (``problems.paged_indexer_problem``
arguments): ragged batches, pages smaller than, equal to and a multiple of a kernel's step, holes in
the block table, next_n 1-3 (more queries than one program stacks), a result wider than the table,
one block, long contexts."""

PAGED_INDEXER_CASES = {
    "v32-one-query": dict(batch=3, next_n=1, h_i=64, d_i=128, block_size=64, max_blocks=3),
    "two-queries-holes": dict(batch=3, next_n=2, h_i=16, d_i=64, block_size=16, max_blocks=5,
                              unallocated_fraction=0.3, spare_blocks=2),
    "three-queries-wide-result": dict(batch=2, next_n=3, h_i=8, d_i=32, block_size=8, max_blocks=4,
                                      max_context_len=True),
    "one-block": dict(batch=1, next_n=1, h_i=4, d_i=128, block_size=64, max_blocks=1),
    "three-queries-in-two-groups": dict(batch=2, next_n=3, h_i=64, d_i=32, block_size=16, max_blocks=3),
    "many-blocks-chunks": dict(batch=2, next_n=1, h_i=32, d_i=128, block_size=64, max_blocks=20,
                               unallocated_fraction=0.1),
    "long-contexts": dict(batch=4, next_n=2, h_i=64, d_i=128, block_size=64, max_blocks=40,
                          unallocated_fraction=0.02),
}
