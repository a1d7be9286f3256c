"""Within-cluster pairwise stage: deldist.dedup vs a plain per-cluster loop vs the matmul floor.

Same synthetic clustered embeddings as bench/kmeans.py (log-normal cluster sizes, near-
duplicates), clustered by their generating labels (k = 1000) and ranked ``keep="hard"``.
Each variant runs in its own subprocess (clean peak memory) on 2 CPUs:

  plain    one process, torch: per cluster the full n x n matrix, torch.triu and a column
           max (the SemDeDup reference code's loop), timed with 2 and with 1 torch threads (the
           faster counts), on the in-memory matrix and end to end (read the same Parquet
           embeddings + assignments, group, loop, write), end to end twice in one process:
           the first run (cold) and the repeat (warm)
  kernel   one process: deldist.pairwise.triu_max_sim per cluster (blockwise, lower triangle
           only, NumPy sgemm) on the same in-memory matrix, clusters over 2 threads x 1 BLAS thread
  lowp     the kernel as the stage's ``precision: auto`` runs it: deldist.pairwise_lowp (``--low``:
           int8 or bfloat16 tiles, every result recomputed in float32) for clusters of >=
           LOWP_MIN_ROWS rows, float32 below; max only (``lowp``) and with the stage's neighbour
           lists (``lowp_lists``), clusters over 2 threads x 1 torch thread
  stage    deldist.dedup.run on a local Ray cluster (num_cpus=2) from Parquet: read + shuffle
           by cluster + score (2 tasks x 1 BLAS thread) + write dedup/scores/; the stage also
           keeps every item's neighbour lists (16 + 16 earlier items above 0.5, the default),
           which the plain loop and the kernel variant do not compute; ``--precision``:
           the stage's precision setting (auto: int8 for large clusters on CPUs with AMX);
           timed after a first (cold) run that starts the workers

The stage against the plain loop end to end compares like with like: warm against warm (the
target), and the first runs, cold against cold.

floor = sum over clusters of n_c^2 * D * 2 FLOPs / the float32 matmul rate of 2 cores measured
in this run (the faster of torch.mm, best of 2 threads and 2 x 1 thread, and NumPy's OpenBLAS,
2 x 1 thread, see :func:`sgemm_gflops`): the full matrix's flops, which is what "plain" computes.
Variants run interleaved for ``--rounds`` rounds; each one's fastest counts (shared machine). Results are checked identical: max_sim within 1e-5 and duplicate_of equal (ties within 1e-6
accepted) between every pair of variants, and the decisions max_sim > 1 - eps at every eps
in 0.01, 0.02, ..., 0.3: a decision may differ only where both values lie within float32
rounding (1e-6) of the threshold (two float32 summation orders, e.g. torch's and OpenBLAS's,
differ there too).

    .venv/bin/python bench/dedup.py [--n 200000] [--large] [--k 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kmeans import DIM, TreeMemory, ray_start, run_child, self_peak_rss_gib, synthetic, write_embeddings  # noqa: E402


def _load(workdir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (n, D) float32, rows in (cluster, rank) order (n,), cluster starts (k + 1,)."""
    x = np.load(os.path.join(workdir, "x.npy"))
    order = np.load(os.path.join(workdir, "order.npy"))
    bounds = np.load(os.path.join(workdir, "bounds.npy"))
    return x, order, bounds


def _save(workdir: str, name: str, max_sim: np.ndarray, dup_row: np.ndarray) -> None:
    np.save(os.path.join(workdir, f"{name}_sim.npy"), max_sim)
    np.save(os.path.join(workdir, f"{name}_dup.npy"), dup_row)


def _plain_loop(x: np.ndarray, order: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SemDeDup's per-cluster loop: full n x n matrix, torch.triu, column max."""
    import torch

    max_sim = np.zeros(len(x), np.float32)
    dup_row = np.full(len(x), -1, np.int64)
    for s, e in zip(bounds[:-1], bounds[1:]):
        rows = order[s:e]
        reps = torch.from_numpy(x[rows])
        pair_w_sim_matrix = reps @ reps.T
        triu_sim_mat = torch.triu(pair_w_sim_matrix, diagonal=1)
        values, index = torch.max(triu_sim_mat, dim=0)
        max_sim[rows] = values.numpy()
        dup_row[rows[1:]] = rows[index.numpy()[1:]]
    return max_sim, dup_row


def child_plain(workdir: str, rounds: int) -> dict:
    """The plain loop (torch, 2 threads) on the in-memory matrix, then end to end: read the same
    Parquet embeddings + assignments in one process, group, loop, write; at least twice, so
    there is a first run in the process (cold, as the stage's first run) and a repeat (warm, as
    the stage's timed runs: on these VMs the first touch of fresh memory alone costs up to 2.5 s
    here, bench/RESULTS.md)."""
    import pyarrow as pa
    import torch

    from deldist import storage
    from deldist.dedup_scores import rank_within_clusters, scores_table
    from deldist.shards import embedding_matrix

    x, order, bounds = _load(workdir)
    loaded_gib = self_peak_rss_gib()
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(rounds):
        for threads in (2, 1):
            torch.set_num_threads(threads)
            start = time.perf_counter()
            max_sim, dup_row = _plain_loop(x, order, bounds)
            times[threads].append(time.perf_counter() - start)
    best_threads = min(times, key=lambda t: min(times[t]))
    torch.set_num_threads(best_threads)
    _save(workdir, "plain", max_sim, dup_row)
    peak_gib = self_peak_rss_gib()
    del x

    end_to_end, read_s = [], []
    for _ in range(max(rounds, 2)):
        start = time.perf_counter()
        emb = storage.read_published(os.path.join(workdir, "embeddings"), ["id", "embedding"])
        assignments = storage.read_published(os.path.join(workdir, "clusters", "assignments"))
        ids = emb.column("id").combine_chunks()
        position = pa.compute.index_in(ids, value_set=assignments.column("id")).to_numpy()
        labels = assignments.column("cluster").to_numpy()[position]
        rank = rank_within_clusters(ids, labels, assignments.column("distance").to_numpy()[position], "hard")
        order2 = np.lexsort((rank, labels))
        bounds2 = np.r_[0, np.cumsum(np.bincount(labels))]
        x2 = embedding_matrix(emb.column("embedding"))
        read_s.append(time.perf_counter() - start)
        sims2, dup2 = _plain_loop(x2, order2, bounds2)
        n2 = len(sims2)  # SemDeDup's scores: no neighbour lists
        table = scores_table(ids, labels, rank, sims2, dup2, np.full((n2, 0), -1), np.zeros((n2, 0), np.float32),
                             np.full(n2, np.inf, np.float32))
        storage.write_table(table, os.path.join(workdir, "plain_scores.parquet"))
        end_to_end.append(time.perf_counter() - start)
        del emb, x2, table
    return {"seconds": min(times[best_threads]), "threads": best_threads, "seconds_by_threads": times,
            "end_to_end_seconds": min(end_to_end[1:]), "end_to_end_cold_seconds": end_to_end[0],
            "read_seconds": min(read_s[1:]), "read_cold_seconds": read_s[0], "loaded_gib": loaded_gib, "peak_gib": peak_gib,
            "peak_end_to_end_gib": self_peak_rss_gib()}


def child_kernel(workdir: str, block_rows: int, rounds: int) -> dict:
    """Our kernel in one process: clusters spread over 2 threads with single-threaded BLAS
    each (like the stage's 2 single-threaded tasks; NumPy releases the GIL in matmul).
    Started with OPENBLAS_NUM_THREADS=1."""
    from concurrent.futures import ThreadPoolExecutor

    from deldist.pairwise import triu_max_sim

    x, order, bounds = _load(workdir)
    loaded_gib = self_peak_rss_gib()
    max_sim = np.zeros(len(x), np.float32)
    dup_row = np.full(len(x), -1, np.int64)

    def score(span: tuple[int, int]) -> None:
        rows = order[span[0]:span[1]]
        sims, arg = triu_max_sim(x[rows], block_rows=block_rows)
        max_sim[rows] = sims
        dup_row[rows] = np.where(arg >= 0, rows[np.maximum(arg, 0)], -1)

    spans = sorted(zip(bounds[:-1], bounds[1:]), key=lambda se: se[0] - se[1])  # largest first
    triu_max_sim(x[:3000])  # numba's cached merge loads on first use: not timed
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(score, spans))
        times.append(time.perf_counter() - start)
    _save(workdir, "kernel", max_sim, dup_row)
    return {"seconds": min(times), "seconds_all": times, "loaded_gib": loaded_gib, "peak_gib": self_peak_rss_gib()}


def child_lowp(workdir: str, rounds: int, lists: int, low: str) -> dict:
    """The kernel as the stage's ``precision: auto`` runs it, 2 threads x 1 torch / BLAS thread
    (torch and numba release the GIL). Max only (``lists`` 0): deldist.pairwise_lowp (``low``
    tiles) for clusters of at least ``LOWP_MIN_ROWS`` rows, the float32 kernel below, clusters
    spread over the threads. With lists: deldist.dedup_scores.sorted_cluster_neighbours, the
    scoring tasks' own call (one call for a bucket's float32 clusters), on two contiguous
    halves of the clusters of equal cost, like two buckets."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from deldist import dedup_scores
    from deldist.pairwise import triu_max_sim
    from deldist.pairwise_lowp import triu_neighbours_lowp
    from deldist.shuffle import cluster_cost
    from deldist.tiles import ListSpec

    torch.set_num_threads(1)
    x, order, bounds = _load(workdir)
    xs = x[order]
    loaded_gib = self_peak_rss_gib()
    max_sim = np.zeros(len(x), np.float32)
    dup_row = np.full(len(x), -1, np.int64)
    stats: dict[str, int] = {}
    starts, ends = bounds[:-1], bounds[1:]
    def score_half(span: tuple[int, int]) -> None:
        a, b = span  # clusters [a, b)
        s0, s1 = int(starts[a]), int(ends[b - 1])
        sims, dup = dedup_scores.sorted_cluster_neighbours(xs[s0:s1], starts[a:b] - s0, ends[a:b] - s0,
                                                           ListSpec(lists, lists), precision="auto",
                                                           stats=stats)[:2]
        rows = order[s0:s1]
        max_sim[rows] = sims
        dup_row[rows] = np.where(dup >= 0, order[s0 + np.maximum(dup, 0)], -1)

    def score(span: tuple[int, int]) -> None:
        s, e = span
        if e - s >= dedup_scores.LOWP_MIN_ROWS[low, False]:
            out = triu_neighbours_lowp(xs[s:e], spec=None, precision=low, stats=stats)
        else:
            out = triu_max_sim(xs[s:e])
        rows = order[s:e]
        max_sim[rows] = out[0]
        dup_row[rows] = np.where(out[1] >= 0, rows[np.maximum(out[1], 0)], -1)

    cost = np.cumsum(cluster_cost(ends - starts).astype(np.float64))
    middle = int(np.searchsorted(cost, cost[-1] / 2)) + 1
    halves = [(0, middle), (middle, len(starts))]
    spans = sorted(zip(starts, ends), key=lambda se: se[0] - se[1])  # largest first
    work, items = (score_half, [h for h in halves if h[1] > h[0]]) if lists else (score, spans)
    score((0, min(len(xs), dedup_scores.LOWP_MIN_ROWS[low, False])))  # numba's cached code and oneDNN's kernels load on first use
    score_half((0, 2))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        stats.clear()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(work, items))
        times.append(time.perf_counter() - start)
    _save(workdir, "lowp_lists" if lists else "lowp", max_sim, dup_row)
    return {"seconds": min(times), "seconds_all": times, "loaded_gib": loaded_gib, "peak_gib": self_peak_rss_gib(),
            "candidates_per_row": round(stats.get("candidates", 0) / len(x), 1),
            "fallback_rows": stats.get("fallback_rows", 0)}


def child_stage(workdir: str, block_rows: int, rounds: int, lists: int = 16, precision: str = "auto") -> dict:
    from deldist import dedup, storage

    ray_start()
    # the first run on the same data starts and warms the worker pool (imports, first-touch
    # memory); it is reported as the cold time, the timed runs after it as the stage time
    start = time.perf_counter()
    settings = dict(output=workdir, block_rows=block_rows, keep="hard", neighbours_by_similarity=lists,
                    neighbours_by_rank=lists, precision=precision)
    dedup.run(dedup.Config(**settings))
    cold = time.perf_counter() - start
    times, runs = [], []
    with TreeMemory() as memory:
        for _ in range(rounds):
            start = time.perf_counter()
            runs.append(dedup.run(dedup.Config(**settings)))
            times.append(time.perf_counter() - start)
    summary = runs[int(np.argmin(times))]
    scores = storage.read_published(os.path.join(workdir, "dedup", "scores"))
    n = int(np.load(os.path.join(workdir, "order.npy"), mmap_mode="r").shape[0])
    row_of = {f"video_{i // 5000:04d}.mp4#{i % 5000}": i for i in range(n)}
    rows = np.array([row_of[i] for i in scores.column("id").to_pylist()])
    max_sim = np.zeros(n, np.float32)
    dup_row = np.full(n, -1, np.int64)
    max_sim[rows] = scores.column("max_sim").to_numpy()
    dup_row[rows] = [-1 if d is None else row_of[d] for d in scores.column("duplicate_of").to_pylist()]
    _save(workdir, "stage", max_sim, dup_row)
    return {"seconds": min(times), "seconds_all": times, "cold_seconds": cold,
            "score_tasks_total_s": summary["seconds"]["score_tasks_total"], "gather_tasks_total_s": summary["seconds"]["gather_tasks_total"],
            "tasks": summary["tasks"], "split_clusters": summary["split_clusters"], "peak_gib": memory.peak_gib,
            "breakdown_s": summary["seconds"]}


def _best_rate(matmul, size: int) -> float:
    """GFLOPS of ``matmul()`` (a (size x D) @ (D x size) product), best of 5 x 20."""
    matmul()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(20):
            matmul()
        best = min(best, (time.perf_counter() - start) / 20)
    return 2 * size * size * DIM / best / 1e9


def child_numpy_sgemm(size: int = 1024) -> dict:
    """NumPy's float32 matmul rate (the BLAS the kernels call), one BLAS thread (this child runs
    with OPENBLAS_NUM_THREADS=1); x2 for two single-threaded workers."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, DIM), dtype=np.float32)
    b = rng.standard_normal((DIM, size), dtype=np.float32)
    out = np.empty((size, size), np.float32)
    return {"gflops_2_cores": 2 * _best_rate(lambda: np.matmul(a, b, out=out), size)}


def sgemm_gflops(size: int = 1024) -> dict[str, float]:
    """Best float32 matmul rate on 2 cores, per library: torch.mm (MKL) with 2 threads or twice
    its 1-thread rate, and NumPy's OpenBLAS (with the kernel set deldist's workers get) as twice
    its 1-thread rate. The floor uses the faster: on an AMD Zen 5 MKL runs ~96 GFLOPS per core
    and OpenBLAS's SkylakeX kernels ~207, and a floor from the slower library would flatter
    every ratio to it."""
    import torch

    a = torch.randn(size, DIM)
    b = torch.randn(DIM, size)
    rates = []
    for threads in (2, 1):
        torch.set_num_threads(threads)
        rates.append(_best_rate(lambda: torch.mm(a, b), size) * (2 if threads == 1 else 1))
    numpy_rate = run_child(__file__, "sgemm", tempfile.gettempdir(), [],
                           {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})["gflops_2_cores"]
    return {"torch": max(rates), "numpy": numpy_rate, "best": max(max(rates), numpy_rate)}


EPS_GRID = np.round(np.arange(0.01, 0.3001, 0.01), 2)  # issue 13: identical decisions at every eps in [0.01, 0.3]


def compare(workdir: str, x: np.ndarray, a: str, b: str) -> dict:
    """Variant ``a`` against ``b``: the largest max_sim difference, the rows whose
    duplicate_of differs (and whether those are float32 ties), and the rows whose decision
    ``max_sim > 1 - eps`` differs at each eps of :data:`EPS_GRID` (summed)."""
    sa, sb = (np.load(os.path.join(workdir, f"{v}_sim.npy")) for v in (a, b))
    da, db = (np.load(os.path.join(workdir, f"{v}_dup.npy")) for v in (a, b))
    positive = (sa > 0) | (sb > 0)  # the plain loop clamps negative maxima to 0 (torch.triu zeros)
    differ = np.flatnonzero(positive & (da != db))
    tie_ok = all(abs(float(x[i] @ x[da[i]]) - float(x[i] @ x[db[i]])) <= 1e-6 for i in differ)
    flips = [((sa > t) != (sb > t)) for t in (1.0 - EPS_GRID).astype(np.float32)]
    # a flip is a float32 tie when both values lie within float32 rounding (1e-6) of the threshold
    ties = all(np.all(np.abs(np.r_[sa[f], sb[f]] - t) <= 1e-6) for f, t in zip(flips, 1.0 - EPS_GRID))
    return {"max_abs_sim_diff": float(np.abs(sa[positive] - sb[positive]).max()),
            "dup_mismatch": int(len(differ)), "mismatches_are_ties": bool(tie_ok),
            "decisions_differing_over_eps_grid": int(sum(f.sum() for f in flips)), "decision_flips_are_ties": bool(ties)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--large", action="store_true", help="1M x 768")
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--block-rows", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved repetitions of every variant; each variant's fastest counts")
    parser.add_argument("--lists", type=int, default=16,
                        help="the stage's neighbour lists per item (by similarity and by rank each; 0: none)")
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "int8", "bfloat16"],
                        help="the stage's precision setting")
    parser.add_argument("--low", default="int8", choices=["int8", "bfloat16"], help="the lowp variants' tiles")
    parser.add_argument("--child", choices=["plain", "kernel", "lowp", "lowp_lists", "stage", "sgemm"])
    parser.add_argument("--workdir")
    parser.add_argument("--keep", action="store_true", help="keep the generated data (its directory is printed)")
    args = parser.parse_args()
    if not args.child:  # every variant's NumPy runs the OpenBLAS kernels deldist's workers run
        from deldist.runtime import tune_worker_blas

        tune_worker_blas()
    if args.child:
        if args.child == "sgemm":
            result = child_numpy_sgemm()
        elif args.child == "plain":
            result = child_plain(args.workdir, args.rounds)
        elif args.child == "kernel":
            result = child_kernel(args.workdir, args.block_rows, args.rounds)
        elif args.child in ("lowp", "lowp_lists"):
            result = child_lowp(args.workdir, args.rounds, args.lists if args.child == "lowp_lists" else 0, args.low)
        else:
            result = child_stage(args.workdir, args.block_rows, args.rounds, args.lists, args.precision)
        print(json.dumps(result))
        return

    import pyarrow as pa
    import torch

    from deldist import storage
    from deldist.dedup_scores import rank_within_clusters
    from deldist.schema import ASSIGNMENTS_SCHEMA

    n = 1_000_000 if args.large else args.n
    workdir = tempfile.mkdtemp(prefix="bench-dedup-")
    try:
        t = time.perf_counter()
        x, labels = synthetic(n, clusters=args.k, seed=args.seed)
        sizes = np.bincount(labels, minlength=args.k)
        means = torch.zeros((args.k, DIM)).index_add_(0, torch.from_numpy(labels), torch.from_numpy(x)).numpy()
        means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-30)
        distance = (1.0 - np.einsum("ij,ij->i", x, means[labels])).astype(np.float32)
        ids = write_embeddings(os.path.join(workdir, "embeddings"), x)
        rank = rank_within_clusters(pa.array(ids), labels, distance, "hard")
        order = np.lexsort((rank, labels))
        np.save(os.path.join(workdir, "x.npy"), x)
        np.save(os.path.join(workdir, "order.npy"), order)
        np.save(os.path.join(workdir, "bounds.npy"), np.r_[0, np.cumsum(sizes)])
        clusters_dir = os.path.join(workdir, "clusters")
        assign_dir = os.path.join(clusters_dir, "assignments")
        path = os.path.join(assign_dir, storage.new_part_name())
        storage.write_table(pa.table({"id": ids, "cluster": labels.astype(np.int32), "distance": distance},
                                     schema=ASSIGNMENTS_SCHEMA), path)
        storage.publish(assign_dir, [path], {"schema": storage.schema_hex(ASSIGNMENTS_SCHEMA)})
        storage.publish(clusters_dir, [], {"dim": DIM, "assignments": "assignments"})
        pairs_full = float((sizes.astype(np.float64) ** 2).sum())
        print(f"data: {n} x {DIM}, k={args.k}, cluster sizes median {int(np.median(sizes))}, "
              f"max {sizes.max()}, sum n_c^2 = {pairs_full:.3g} (generated in {time.perf_counter() - t:.0f} s)",
              flush=True)

        extra = ["--block-rows", str(args.block_rows), "--rounds", "1", "--lists", str(args.lists),
                 "--precision", args.precision, "--low", args.low]
        runs: dict[str, list[dict]] = {"plain": [], "kernel": [], "lowp": [], "lowp_lists": [], "stage": []}
        rates = []
        for r in range(args.rounds):  # interleaved, so a burst of load hits every variant alike
            rates.append(sgemm_gflops())
            for variant in runs:
                env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"} if variant != "plain" and \
                    variant != "stage" else None
                runs[variant].append(run_child(__file__, variant, workdir, extra, env))
                print(f"round {r} {variant}: {json.dumps(runs[variant][-1])}", flush=True)
        results = {v: min(runs[v], key=lambda x: x["seconds"]) for v in runs}
        results["plain"]["end_to_end_seconds"] = min(x["end_to_end_seconds"] for x in runs["plain"])
        plain_cold = min(x["end_to_end_cold_seconds"] for x in runs["plain"])
        stage_cold = min(x["cold_seconds"] for x in runs["stage"])
        rate = max(r["best"] for r in rates)
        floor = pairs_full * DIM * 2 / (rate * 1e9)
        checks = {f"{a}_vs_{b}": compare(workdir, x, a, b) for a, b in
                  (("plain", "kernel"), ("plain", "stage"), ("kernel", "stage"), ("kernel", "lowp"),
                   ("kernel", "lowp_lists"))}
        plain, kernel, stage, lowp, lowp_lists = (results[v]["seconds"] for v in ("plain", "kernel", "stage", "lowp",
                                                                                   "lowp_lists"))
        summary = {
            "n": n, "dim": DIM, "k": args.k, "sgemm_gflops_2_cores": round(rate, 1),
            "sgemm_gflops_by_library": {lib: round(max(r[lib] for r in rates), 1) for lib in ("torch", "numpy")},
            "floor_s": round(floor, 3),
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", "auto"),
            "plain_s": round(plain, 3), "kernel_s": round(kernel, 3), "stage_s": round(stage, 3),
            "plain_end_to_end_s": round(results["plain"]["end_to_end_seconds"], 3),
            "plain_end_to_end_cold_s": round(plain_cold, 3), "stage_cold_s": round(stage_cold, 3),
            "speedup_stage_vs_plain_end_to_end": round(results["plain"]["end_to_end_seconds"] / stage, 2),
            "speedup_stage_vs_plain_end_to_end_cold": round(plain_cold / stage_cold, 2),
            "stage_score_tasks_total_s": round(results["stage"]["score_tasks_total_s"], 3),
            "stage_breakdown_s": {k: round(v, 3) for k, v in results["stage"]["breakdown_s"].items()},
            "speedup_kernel_vs_plain": round(plain / kernel, 2), "speedup_stage_vs_plain": round(plain / stage, 2),
            "kernel_over_floor": round(kernel / floor, 2), "stage_over_floor": round(stage / floor, 2),
            "plain_over_floor": round(plain / floor, 2),
            "lowp_tiles": args.low, "lowp_s": round(lowp, 3), "lowp_lists_s": round(lowp_lists, 3),
            "lowp_over_floor": round(lowp / floor, 2), "lowp_lists_over_floor": round(lowp_lists / floor, 2),
            "stage_precision": args.precision,
            "lowp_candidates_per_row": {v: results[v]["candidates_per_row"] for v in ("lowp", "lowp_lists")},
            "lowp_fallback_rows": {v: results[v]["fallback_rows"] for v in ("lowp", "lowp_lists")},
            "plain_threads": results["plain"]["threads"], "rounds": args.rounds,
            "seconds_all": {v: [round(x["seconds"], 3) for x in runs[v]] for v in runs},
            "peak_gib": {v: round(max(x["peak_gib"] for x in runs[v]), 2) for v in runs},
            "peak_gib_plain_end_to_end": round(max(x["peak_end_to_end_gib"] for x in runs["plain"]), 2),
            "rss_after_loading_input_gib": {v: round(results[v]["loaded_gib"], 2) for v in ("plain", "kernel", "lowp")},
            "identical": checks,
        }
        print(json.dumps(summary, indent=1))
        print(f"speedup vs plain loop: kernel {summary['speedup_kernel_vs_plain']}x (same in-memory input), "
              f"Ray stage from Parquet {summary['speedup_stage_vs_plain_end_to_end']}x vs the plain loop from the "
              f"same Parquet, both repeated in a warm process (target >= 2; first runs: "
              f"{summary['speedup_stage_vs_plain_end_to_end_cold']}x); over the matmul floor: kernel "
              f"{summary['kernel_over_floor']}x, stage {summary['stage_over_floor']}x (target <= 2); {args.low} kernel "
              f"{summary['lowp_over_floor']}x, with lists {summary['lowp_lists_over_floor']}x (target <= 0.5)")
    finally:
        if args.keep:
            print(f"data kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
