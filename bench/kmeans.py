"""Distributed spherical k-means (deldist.cluster.run on Ray) vs faiss.Kmeans, one process.

Both fit the same synthetic clustered embeddings (unit rows, hierarchical clusters with
near-duplicates, log-normal cluster sizes) with the same k and the same number of Lloyd
iterations (tol = 0, so neither stops early); faiss uses all rows (no subsampling).
Each variant runs in its own subprocess, so its peak memory is its own:

  faiss   faiss.Kmeans(spherical=True) on the matrix in memory, with 2 and with 1 OpenMP
          threads (the faster counts: OpenMP threads suffer most on a shared machine)
  ours    deldist.cluster.run on a local Ray cluster (num_cpus=2) from the Parquet
          embeddings: load once, k-means++ init, Lloyd passes, full assignment pass + write

Variants run interleaved for ``--rounds`` rounds and each one's fastest run counts (the
machine may be shared). Prints the time ratios (fit only, and the whole stage) and the
objective ratio
(total cosine distance to the nearest centroid over all rows, lower is better), plus peak
memory: faiss = ru_maxrss of its process; ours = peak summed PSS of the driver and every
Ray process it started (raylet, workers, object store pages), sampled every second.

    .venv/bin/python bench/kmeans.py [--n 200000] [--large] [--k 1000] [--iters 20]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DIM = 768


# ----------------------------------------------------------------------------- data


def synthetic(n: int, dim: int = DIM, clusters: int = 1000, seed: int = 0, size_sigma: float = 1.0,
              duplicate_fraction: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit embeddings -> (x (n, dim) float32, cluster label (n,) int64).

    ``clusters`` sub-centres around ``clusters // 5`` scene centres (correlated clusters, so
    k-means has work to do); cluster sizes log-normal(0, size_sigma); within a cluster, a
    ``duplicate_fraction`` of the rows are near-copies of an earlier row (video frames).
    Rows come out shuffled.
    """
    rng = np.random.default_rng(seed)
    scenes = rng.standard_normal((max(1, clusters // 5), dim)).astype(np.float32)
    parent = rng.integers(0, len(scenes), clusters)
    centres = scenes[parent] + 0.7 * rng.standard_normal((clusters, dim)).astype(np.float32)
    weights = rng.lognormal(0.0, size_sigma, clusters)
    sizes = np.maximum(1, np.floor(weights / weights.sum() * n).astype(np.int64))
    sizes[np.argmax(sizes)] += n - sizes.sum()
    x = np.empty((n, dim), np.float32)
    labels = np.repeat(np.arange(clusters), sizes)
    start = 0
    for c, size in enumerate(sizes):
        block = x[start:start + size]
        block[:] = centres[c] + 0.8 * rng.standard_normal((size, dim), dtype=np.float32)
        copies = np.flatnonzero(rng.random(size) < duplicate_fraction)
        copies = copies[copies > 0]
        if len(copies):
            source = (rng.random(len(copies)) * copies).astype(np.int64)  # an earlier row
            block[copies] = block[source] + 0.15 * rng.standard_normal((len(copies), dim), dtype=np.float32)
        start += size
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    order = rng.permutation(n)
    return x[order], labels[order]


def ids_for(n: int) -> list[str]:
    return [f"video_{i // 5000:04d}.mp4#{i % 5000}" for i in range(n)]


def write_embeddings(emb_dir: str, x: np.ndarray, rows_per_part: int = 8192) -> list[str]:
    """Publish ``x`` as ``embeddings/`` (Parquet parts + manifest), ids from :func:`ids_for`."""
    import pyarrow as pa

    from deldist import storage
    from deldist.schema import QUALITY_COLUMNS, embedding_array, embeddings_schema

    n, dim = x.shape
    ids = ids_for(n)
    schema = embeddings_schema(dim)
    files = []
    for start in range(0, n, rows_per_part):
        stop = min(n, start + rows_per_part)
        rows = np.arange(start, stop)
        table = pa.table({
            "id": ids[start:stop], "source": [f"s3://in/{i.split('#')[0]}" for i in ids[start:stop]],
            "frame_index": pa.array(rows % 5000, pa.int64()), "timestamp_s": pa.array((rows % 5000) / 2.0),
            "dataset": ["synthetic"] * len(rows),
            "embedding": embedding_array(x[start:stop]),
            **{q: pa.array(np.full(len(rows), 0.5, np.float32)) for q in QUALITY_COLUMNS},
            "phash": pa.array(np.zeros(len(rows), np.uint64)),
        }, schema=schema)
        path = storage.join(emb_dir, storage.new_part_name())
        storage.write_table(table, path)
        files.append(storage.resolve(path)[1])
    storage.publish(emb_dir, files, {"dim": dim, "model": "synthetic", "schema": storage.schema_hex(schema)})
    return ids


# ----------------------------------------------------------------------------- memory


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory:
    """Peak summed PSS (GiB) of this process and all its descendants, sampled in a thread.

    A sample reads every process's ``smaps_rollup``, which walks its page tables: at 10M rows
    (Ray workers mapping a 15 GB object store) one sample took a large share of a core in kernel
    time. So the thread waits at least ``overhead`` times as long as the last sample took
    (~10 % of one core at most), and ``interval`` when sampling is cheap."""

    def __init__(self, interval: float = 1.0, overhead: float = 10.0) -> None:
        self.interval, self.overhead, self.peak_kib, self._stop = interval, overhead, 0, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            began = time.perf_counter()
            self.peak_kib = max(self.peak_kib, sum(_pss_kib(p) for p in _descendants(os.getpid())))
            self._stop.wait(max(self.interval, self.overhead * (time.perf_counter() - began)))

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_gib(self) -> float:
        return self.peak_kib / 2**20


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for a RESULTS entry."""
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")


def self_peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_child(script: str, variant: str, workdir: str, extra: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``script --child variant`` in a fresh interpreter; it prints one JSON line last."""
    out = subprocess.run([sys.executable, script, "--child", variant, "--workdir", workdir, *extra],
                         capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode:
        raise RuntimeError(f"{variant} child failed (exit {out.returncode}); its stdout and stderr end:\n"
                           + "\n".join(out.stdout.splitlines()[-20:] + out.stderr.splitlines()[-60:]))
    for line in reversed(out.stdout.strip().splitlines()):  # the last JSON line (a library may print after it)
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    raise RuntimeError(f"{variant} child printed no JSON line; its stdout and stderr end:\n"
                       + "\n".join(out.stdout.splitlines()[-20:] + out.stderr.splitlines()[-60:]))


def ray_start() -> None:
    import ray

    from deldist.runtime import tune_worker_blas

    tune_worker_blas()  # the BLAS kernels deldist's own local clusters run (deldist.runtime.init_ray)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")


# ----------------------------------------------------------------------------- variants


def child_faiss(workdir: str, k: int, iters: int, seed: int, threads: int) -> dict:
    import faiss

    from deldist.kmeans import objective

    faiss.omp_set_num_threads(threads)
    x = np.load(os.path.join(workdir, "x.npy"))
    km = faiss.Kmeans(x.shape[1], k, niter=iters, spherical=True, seed=seed + 1, max_points_per_centroid=10**9)
    start = time.perf_counter()
    km.train(x)
    seconds = time.perf_counter() - start
    return {"fit_seconds": seconds, "objective": objective(x, km.centroids), "peak_gib": self_peak_rss_gib(),
            "threads": faiss.omp_get_max_threads()}


def child_ours(workdir: str, k: int, iters: int, seed: int) -> dict:
    from deldist import cluster

    ray_start()
    config = cluster.Config(output=workdir, k=k, max_iter=iters, tol=0.0, seed=seed)
    with TreeMemory() as memory:
        start = time.perf_counter()
        summary = cluster.run(config)
        seconds = time.perf_counter() - start
    s = summary["seconds"]
    return {"stage_seconds": seconds, "fit_seconds": s["init"] + s["fit"], "load_seconds": s["load"],
            "assign_seconds": s["assign"], "init_seconds": s["init"], "objective": summary["objective"],
            "iterations": summary["iterations"], "fit_tasks": summary["fit_tasks"], "peak_gib": memory.peak_gib,
            "searched_fraction": summary["searched_fraction"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--large", action="store_true", help="1M x 768")
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faiss-threads", default="2,1",
                        help="OpenMP thread counts tried for faiss; the fastest counts (shared machines)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; each variant's fastest counts")
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["faiss", "ours"])
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.child:
        if args.child == "faiss":
            print(json.dumps(child_faiss(args.workdir, args.k, args.iters, args.seed, args.threads)))
        else:
            print(json.dumps(child_ours(args.workdir, args.k, args.iters, args.seed)))
        return
    n = 1_000_000 if args.large else args.n
    workdir = tempfile.mkdtemp(prefix="bench-kmeans-")
    try:
        t = time.perf_counter()
        x, _ = synthetic(n, seed=args.seed)
        np.save(os.path.join(workdir, "x.npy"), x)
        write_embeddings(os.path.join(workdir, "embeddings"), x)
        del x
        print(f"data: {n} x {DIM} float32, k={args.k}, {args.iters} iterations "
              f"(generated in {time.perf_counter() - t:.0f} s)", flush=True)
        extra = ["--k", str(args.k), "--iters", str(args.iters), "--seed", str(args.seed)]
        variants = [f"faiss-{t}" for t in args.faiss_threads.split(",")] + ["ours"]
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.rounds):  # interleaved, so a burst of load hits every variant alike
            for v in variants:
                if v == "ours":
                    runs[v].append(run_child(__file__, "ours", workdir, extra))
                else:
                    runs[v].append(run_child(__file__, "faiss", workdir, [*extra, "--threads", v.split("-")[1]]))
                print(f"round {r} {v}: {json.dumps(runs[v][-1])}", flush=True)
        best = {v: min(runs[v], key=lambda x: x["fit_seconds"]) for v in variants}
        faiss_v = min((v for v in variants if v != "ours"), key=lambda v: best[v]["fit_seconds"])
        faiss_r, ours = best[faiss_v], best["ours"]
        ours_stage = min(x["stage_seconds"] for x in runs["ours"])
        result = {
            "n": n, "dim": DIM, "k": args.k, "iterations": args.iters, "rounds": args.rounds,
            "faiss_threads": faiss_r["threads"], "faiss_fit_s": round(faiss_r["fit_seconds"], 2),
            "faiss_fit_s_all": {v: [round(x["fit_seconds"], 2) for x in runs[v]] for v in variants if v != "ours"},
            "ours_fit_s": round(ours["fit_seconds"], 2), "ours_stage_s": round(ours_stage, 2),
            "ours_fit_s_all": [round(x["fit_seconds"], 2) for x in runs["ours"]],
            "ours_breakdown_s": {key: round(ours[key], 2) for key in ("load_seconds", "init_seconds", "assign_seconds")},
            "ours_searched_fraction": ours["searched_fraction"],
            "fit_time_ratio": round(ours["fit_seconds"] / faiss_r["fit_seconds"], 3),
            "stage_time_ratio": round(ours_stage / faiss_r["fit_seconds"], 3),
            "objective_ratio": round(ours["objective"] / faiss_r["objective"], 5),
            "faiss_peak_gib": round(max(x["peak_gib"] for v in variants if v != "ours" for x in runs[v]), 2),
            "ours_peak_gib": round(max(x["peak_gib"] for x in runs["ours"]), 2),
        }
        print(json.dumps(result, indent=1))
        print(f"fit time ours/faiss = {result['fit_time_ratio']:.2f}x (target <= 1.5), whole stage "
              f"{result['stage_time_ratio']:.2f}x; objective ours/faiss = {result['objective_ratio']:.4f} "
              f"(target <= 1.01); peak memory faiss {result['faiss_peak_gib']} GiB, ours {result['ours_peak_gib']} GiB")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
