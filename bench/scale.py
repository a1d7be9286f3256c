"""cluster -> dedup -> select at 1M, 3M and 10M frames on one 2-CPU Ray node (issue 13).

Synthetic clustered embeddings as ``bench/kmeans.py`` makes them (scene centres, sub-centres,
log-normal cluster sizes, 40 % near-copies), generated chunk by chunk so 10M x 768 never sits in
memory, written as published ``embeddings/`` Parquet with ``float16`` vectors (what
``embedding_dtype: float16`` writes). Then, in a fresh process per size (clean peak memory):

  cluster  k = 10,000, fit_fraction 0.1 (fit on a sample, then one streamed assignment pass)
  dedup    the default stage (waves of buckets within the object store's budget)
  select   method meddel, target_ratio 0.2

Per stage: wall time, the peak summed PSS of the driver and every process it started
(bench/kmeans.py:TreeMemory) and the driver's own peak RSS, then the cost growth between sizes.
``--verify`` runs ``deldist verify`` on the output. ``--keep`` keeps each size's run;
``--workdir <kept run> --only select`` reruns stages on it in a fresh process.

    .venv/bin/python bench/scale.py --sizes 1000000 3000000 10000000 [--k 10000] [--keep]
    .venv/bin/python bench/scale.py --workdir /tmp/bench-scale-1000000-xxxx --only select
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

from kmeans import DIM, TreeMemory, ray_start, run_child  # noqa: E402

CHUNK = 250_000
GEN_CLUSTERS = 10_000


def write_synthetic(emb_dir: str, n: int, seed: int = 0, rows_per_part: int = 65_536) -> None:
    """Publish n clustered unit rows (float16 Parquet) under ``emb_dir``, CHUNK rows at a time."""
    import pyarrow as pa

    from deldist import storage
    from deldist.schema import QUALITY_COLUMNS, embedding_array, embeddings_schema

    rng = np.random.default_rng(seed)
    scenes = rng.standard_normal((GEN_CLUSTERS // 5, DIM)).astype(np.float32)
    centres = scenes[rng.integers(0, len(scenes), GEN_CLUSTERS)] + \
        0.7 * rng.standard_normal((GEN_CLUSTERS, DIM)).astype(np.float32)
    weights = rng.lognormal(0.0, 1.0, GEN_CLUSTERS)
    weights /= weights.sum()
    schema = embeddings_schema(DIM, "float16")
    files = []
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        label = np.sort(rng.choice(GEN_CLUSTERS, m, p=weights))
        x = centres[label] + 0.8 * rng.standard_normal((m, DIM), dtype=np.float32)
        same = np.r_[False, label[1:] == label[:-1]]
        copies = np.flatnonzero(same & (rng.random(m) < 0.4))
        x[copies] = x[copies - 1] + 0.15 * rng.standard_normal((len(copies), DIM), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        order = rng.permutation(m)
        x = x[order]
        for a in range(0, m, rows_per_part):
            rows = np.arange(start + a, start + min(a + rows_per_part, m))
            ids = [f"site_{i // 5_000_000}/video_{i // 5000:05d}.mp4#{i % 5000}" for i in rows.tolist()]
            table = pa.table({
                "id": ids, "source": [f"s3://in/{i.split('#')[0]}" for i in ids],
                "frame_index": pa.array(rows % 5000, pa.int64()), "timestamp_s": pa.array((rows % 5000) / 2.0),
                "dataset": ["synthetic"] * len(rows),
                "embedding": embedding_array(x[a:a + len(rows)], "float16"),
                **{q: pa.array(np.full(len(rows), 0.5, np.float32)) for q in QUALITY_COLUMNS},
                "phash": pa.array(np.zeros(len(rows), np.uint64)),
            }, schema=schema)
            path = storage.join(emb_dir, storage.new_part_name())
            storage.write_table(table, path)
            files.append(storage.resolve(path)[1])
        print(f"  generated {start + m:,} / {n:,} rows", flush=True)
    storage.publish(emb_dir, files, {"dim": DIM, "model": "synthetic", "embedding_dtype": "float16",
                                     "schema": storage.schema_hex(schema), "rows": n})


def driver_peak_reset() -> None:
    """Start a new peak RSS (VmHWM) for this process: Linux resets it on "5" to clear_refs."""
    Path("/proc/self/clear_refs").write_text("5")


def driver_peak_gib() -> float:
    """This process's peak RSS (VmHWM) since :func:`driver_peak_reset`."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 2**20


def child_chain(workdir: str, k: int, ratio: float, verify: bool, only: list[str] | None = None) -> dict:
    """cluster -> dedup -> select on a local 2-CPU Ray cluster (``only``: those stages, on the
    earlier ones' kept output); time, tree memory and the driver's own peak per stage."""
    from deldist import cluster, dedup, select

    ray_start()
    stages = {
        "cluster": lambda: cluster.run(cluster.Config(output=workdir, k=k, fit_fraction=0.1, max_iter=20)),
        "dedup": lambda: dedup.run(dedup.Config(output=workdir, keep="easy")),
        "select": lambda: select.run(select.Config(output=workdir, name="scale", method="meddel",
                                                   target_ratio=ratio)),
    }
    out: dict = {}
    for name, stage in stages.items():
        if only and name not in only:
            continue
        driver_peak_reset()
        start = time.perf_counter()
        with TreeMemory() as memory:
            summary = stage()
        out[name] = {"seconds": round(time.perf_counter() - start, 1), "peak_gib": round(memory.peak_gib, 2),
                     "driver_peak_gib": round(driver_peak_gib(), 2)}
        if name == "select":
            out[name].update(kept=summary["kept_count"], ratio=round(summary["ratio"], 4))
        print(f"  {name}: {json.dumps(out[name])}", flush=True)
        Path(workdir, "_bench_scale.json").write_text(json.dumps(out))  # kept if a later step fails
    if verify:
        from deldist import verify as verify_mod

        report = verify_mod.run(verify_mod.Config(output=workdir, fail=False))
        out["verify"] = {"checks": len(report.get("checked", [])), "failures": report.get("failures")}
        Path(workdir, "_bench_scale.json").write_text(json.dumps(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    parser.add_argument("--k", type=int, default=10_000)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the generated runs (printed)")
    parser.add_argument("--child")
    parser.add_argument("--workdir", help="with --only: a run --keep kept")
    parser.add_argument("--only", nargs="+", choices=["cluster", "dedup", "select"],
                        help="rerun these stages on --workdir's kept output, in a fresh process")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_chain(args.workdir, args.k, args.ratio, args.verify, args.only)))
        return
    if args.only:
        extra = ["--k", str(args.k), "--ratio", str(args.ratio), "--only", *args.only] + \
            (["--verify"] if args.verify else [])
        print(json.dumps(run_child(__file__, "chain", args.workdir, extra)))
        return
    results = {}
    for n in args.sizes:
        workdir = tempfile.mkdtemp(prefix=f"bench-scale-{n}-")
        try:
            start = time.perf_counter()
            write_synthetic(os.path.join(workdir, "embeddings"), n)
            print(f"{n:,} rows written in {time.perf_counter() - start:.0f} s", flush=True)
            extra = ["--k", str(args.k), "--ratio", str(args.ratio)] + (["--verify"] if args.verify else [])
            results[n] = run_child(__file__, "chain", workdir, extra)
            total = sum(results[n][s]["seconds"] for s in ("cluster", "dedup", "select"))
            print(f"{n:,}: {json.dumps(results[n])} total {total:.0f} s", flush=True)
        finally:
            if args.keep:
                print(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    sizes = sorted(results)
    for a, b in zip(sizes, sizes[1:]):
        growth = {s: round(results[b][s]["seconds"] / max(results[a][s]["seconds"], 1e-9), 2)
                  for s in ("cluster", "dedup", "select")}
        print(f"cost growth {a:,} -> {b:,} ({b / a:.1f}x rows): {growth}")
    print(json.dumps({str(n): r for n, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
