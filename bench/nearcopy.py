"""The near-copy Hamming join: deldist's multi-index join vs a vectorised all-pairs loop.

Hashes: like pHashes, 64-bit codes with exactly 32 bits set (uniform among those), a quarter
of them copies of another with 1-5 pairs of bits swapped (re-encodes and crops of a frame).
Both sides find every pair within ``--max-hamming`` (default: the rule's default, 10):

  all-pairs  one process: blocks of 64 x 4,096 hashes, XOR + np.bitwise_count + compare
             (the straightforward vectorised loop), over the upper triangle
  join       deldist.nearcopy.distributed_pairs on a local Ray cluster (num_cpus=2): the
             hashes in the object store once, the join's passes split over 2 tasks (compiled
             with numba; a warm-up call compiles first); also the same join in one process

The pairs must be identical. ``--large`` also times the join alone on 10M hashes, in a child
process, and prints its peak RSS. The machine line gives the CPU model, the float32 matmul
rate of 2 cores and the load average, for bench/RESULTS.md.

    .venv/bin/python bench/nearcopy.py [--n 200000] [--large] [--max-hamming 10]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _bits_to_codes(bits: np.ndarray) -> np.ndarray:
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


def pairs_of_codes(n: int, seed: int, copy_fraction: float = 0.25, chunk: int = 1 << 20) -> np.ndarray:
    """(n,) uint64 codes with 32 bits set; ``copy_fraction`` of them near copies of others
    (1-5 pairs of bits swapped, so still 32 set). Built in chunks: bounded memory at 10M."""
    rng = np.random.default_rng(seed)
    codes = np.empty(n, np.uint64)
    for a in range(0, n, chunk):
        m = min(chunk, n - a)
        rank = rng.random((m, 64), dtype=np.float32).argsort(axis=1)
        codes[a:a + m] = _bits_to_codes(rank < 32)  # 32 random positions set
    copies = rng.choice(n, int(copy_fraction * n), replace=False)
    for a in range(0, len(copies), chunk):
        rows = copies[a:a + chunk]
        source = codes[rng.integers(0, n, len(rows))]
        bits = np.unpackbits(source.astype(">u8").view(np.uint8).reshape(-1, 8), axis=1).astype(bool)
        k = rng.integers(1, 6, len(rows))[:, None]
        noise = rng.random(bits.shape, dtype=np.float32)
        # the k ones and the k zeros with the smallest noise flip: weight stays 32
        one_rank = np.where(bits, noise, 2.0).argsort(axis=1).argsort(axis=1)
        zero_rank = np.where(~bits, noise, 2.0).argsort(axis=1).argsort(axis=1)
        flip = (bits & (one_rank < k)) | (~bits & (zero_rank < k))
        codes[rows] = _bits_to_codes(bits ^ flip)
    return codes


def all_pairs(codes: np.ndarray, max_distance: int, rows: int = 64, cols: int = 4096) -> set[tuple[int, int]]:
    """The vectorised all-pairs loop over the upper triangle, in cache-sized blocks (64 x 4,096
    was the fastest block here); pairs are gathered only from blocks that hold some."""
    found: set[tuple[int, int]] = set()
    n = len(codes)
    for r0 in range(0, n, rows):
        a = codes[r0:r0 + rows, None]
        for c0 in range(r0, n, cols):
            hits = np.bitwise_count(a ^ codes[None, c0:c0 + cols]) <= max_distance
            if hits.any():
                i, j = np.nonzero(hits)
                keep = c0 + j > r0 + i
                found.update(zip((r0 + i[keep]).tolist(), (c0 + j[keep]).tolist()))
    return found


def machine() -> dict:
    from dedup import sgemm_gflops
    from kmeans import cpu_model

    return {"cpu": cpu_model(), "sgemm_gflops_2cores": {k: round(v, 1) for k, v in sgemm_gflops().items()}, "loadavg": os.getloadavg()}


def child_large(n: int, max_distance: int, seed: int) -> dict:
    from deldist.nearcopy import hamming_pairs, plan_join

    codes = pairs_of_codes(n, seed)
    hamming_pairs(codes[:1000], max_distance)  # compile
    start = time.perf_counter()
    i, j, d = hamming_pairs(codes, max_distance)
    seconds = time.perf_counter() - start
    plan = plan_join(n, max_distance)
    return {"n": n, "pairs": int(len(i)), "seconds": round(seconds, 1), "peak_rss_gib":
            round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "plan": {"bands": [w for _, w in plan.bands], "radius": plan.radius}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--max-hamming", type=int, default=None)
    parser.add_argument("--large", action="store_true", help="also the join alone on 10M hashes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child-large", type=int, default=0)
    args = parser.parse_args()
    from deldist.rules import NearCopyRule

    h = NearCopyRule().max_hamming if args.max_hamming is None else args.max_hamming
    if args.child_large:
        print(json.dumps(child_large(args.child_large, h, args.seed)))
        return

    import ray

    from deldist.nearcopy import chance_pairs, distributed_pairs, hamming_pairs, plan_join

    print(json.dumps({"machine": machine(), "max_hamming": h}), flush=True)
    codes = pairs_of_codes(args.n, args.seed)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    distributed_pairs(codes[:2000], h, tasks=2)  # warm-up: workers start, numba compiles
    hamming_pairs(codes[:2000], h)
    start = time.perf_counter()
    i, j, _ = distributed_pairs(codes, h, tasks=2)
    join_s = time.perf_counter() - start
    start = time.perf_counter()
    i1, j1, _ = hamming_pairs(codes, h)
    one_s = time.perf_counter() - start
    start = time.perf_counter()
    brute = all_pairs(codes, h)
    brute_s = time.perf_counter() - start
    joined = set(zip(i.tolist(), j.tolist()))
    plan = plan_join(len(codes), h)
    print(json.dumps({
        "n": args.n, "pairs": len(brute), "chance_pairs_model": round(chance_pairs(args.n, h), 1),
        "same_pairs": joined == brute and len(i) == len(brute) and set(zip(i1.tolist(), j1.tolist())) == brute,
        "all_pairs_s": round(brute_s, 2), "join_ray_2_tasks_s": round(join_s, 2), "join_1_process_s": round(one_s, 2),
        "speedup_ray": round(brute_s / join_s, 1), "speedup_1_process": round(brute_s / one_s, 1),
        "plan": {"bands": [w for _, w in plan.bands], "radius": plan.radius}, "loadavg_after": os.getloadavg()}),
        flush=True)
    ray.shutdown()
    if args.large:
        out = subprocess.run([sys.executable, __file__, "--child-large", "10000000", "--max-hamming", str(h)],
                             check=True, capture_output=True, text=True)
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
