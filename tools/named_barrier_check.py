"""What compute-sanitizer's racecheck and synccheck say about named-barrier hand-offs between two warpgroups.

Why. The split-V forwards (csrc/sparse_mla_wgmma_v2.cu, ``consume_split_v``) hand a buffer from one consumer
warpgroup to the other through named barriers, each warpgroup from its own code. Two questions decide how those
hand-offs are written: does synccheck accept a barrier that two warpgroups reach from different instructions
(``bar.sync`` is ``barrier.sync.aligned``; ``barrier.sync`` is not aligned), and does racecheck follow a
one-sided hand-off (the signalling side ``barrier.arrive``\\ s, the other waits), which the PTX memory model
orders? This kernel is the pattern alone: the first warpgroup writes a shared buffer and signals READY
(barrier 4), the second reads it and signals FREE (barrier 5), eight rounds.

Run each form under the tools on a GPU::

    compute-sanitizer --tool synccheck python tools/named_barrier_check.py aligned
    compute-sanitizer --tool racecheck python tools/named_barrier_check.py unaligned 1 0

Arguments: ``aligned`` (``bar.sync``) or ``unaligned`` (``barrier.sync``) for the waits; then whether the
first side only arrives on READY and whether the second only arrives on FREE (0 or 1 each). The kernel checks
its own result (each reader's sum over the rounds) and exits 1 if it is wrong.

Measured on the H200 (CUDA 13.0 compute-sanitizer, 2026-12-03; ``docs/reports/sanitizer_split_v_2026-12-03d.txt``):
synccheck reports "Divergent thread(s) in block" for ``aligned`` and nothing for ``unaligned`` or an arrival;
racecheck reports hazards for every one-sided form and none for the two-sided one.
"""

from __future__ import annotations

import sys

SOURCE = r'''
template <bool ALIGNED>
__device__ __forceinline__ void wait_at(int id) {
    if (ALIGNED) asm volatile("bar.sync %0, 256;" :: "r"(id) : "memory");
    else asm volatile("barrier.sync %0, 256;" :: "r"(id) : "memory");
}
__device__ __forceinline__ void arrive_at(int id) { asm volatile("barrier.arrive %0, 256;" :: "r"(id) : "memory"); }

template <bool ALIGNED>
__device__ void hand_off(float* out, int ready_arrives, int free_arrives) {
    __shared__ float buffer[128];
    const int tid = threadIdx.x;
    float sum = 0.0f;
    for (int round = 0; round < ROUNDS; ++round) {
        if (tid < 128) {
            if (round > 0) wait_at<ALIGNED>(5);                 // FREE: the reader is done with the last one
            buffer[127 - tid] = (float)(round + tid);
            if (ready_arrives) arrive_at(4); else wait_at<ALIGNED>(4);  // READY
        } else {
            wait_at<ALIGNED>(4);
            sum += buffer[tid - 128];
            if (round + 1 < ROUNDS) { if (free_arrives) arrive_at(5); else wait_at<ALIGNED>(5); }
        }
    }
    out[tid] = sum;
}
extern "C" __global__ void hand_off_aligned(float* out, int a, int b) { hand_off<true>(out, a, b); }
extern "C" __global__ void hand_off_unaligned(float* out, int a, int b) { hand_off<false>(out, a, b); }
'''
ROUNDS = 8


def main(argv: list[str]) -> int:
    import cupy as cp

    if len(argv) not in (1, 3) or argv[0] not in ("aligned", "unaligned"):
        raise SystemExit(__doc__.split("\n\n")[3])
    ready_arrives, free_arrives = (int(argv[1]), int(argv[2])) if len(argv) == 3 else (0, 0)
    module = cp.RawModule(code=SOURCE.replace("ROUNDS", str(ROUNDS)), options=("--gpu-architecture=sm_90a",))
    kernel = module.get_function(f"hand_off_{argv[0]}")
    out = cp.zeros(256, cp.float32)
    kernel((2,), (256,), (out, cp.int32(ready_arrives), cp.int32(free_arrives)))
    got = cp.asnumpy(out[128:])
    # Reader tid reads buffer[tid - 128], written by writer 127 - (tid - 128) = 255 - tid.
    expected = [sum(r + 255 - t for r in range(ROUNDS)) for t in range(128, 256)]
    ok = [float(g) for g in got] == [float(e) for e in expected]
    print(f"{argv[0]} ready_arrives={ready_arrives} free_arrives={free_arrives}: {'ok' if ok else 'WRONG'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
