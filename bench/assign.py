"""The k-means assignment (each row's nearest centroid): faiss ``IndexFlatIP`` in float32 vs
deldist's low-precision tiles with float32 results (:func:`deldist.pairwise_lowp.nearest_lowp`).

The streamed assignment pass of ``deldist cluster`` (``precision``) labels every row against
k centroids; this times that call alone, one core (one torch / faiss / BLAS thread), on the
synthetic clustered embeddings of bench/kmeans.py, the centroids their clusters' normalised
means. Variants run interleaved for ``--rounds`` rounds in one process; each one's fastest
counts. Checked: the low-precision labels equal faiss's (ties within 1e-6 accepted) and the
similarities agree within 1e-5. ``--tiles`` defaults to the tiles this CPU multiplies natively
(int8 with AMX, bfloat16 with AVX512-BF16 or AMX).

    .venv/bin/python bench/assign.py [--rows 20000] [--k 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kmeans import cpu_model, synthetic  # noqa: E402


def main() -> None:
    if not os.environ.get("DELDIST_BENCH_BLAS_SET"):
        # faiss's and NumPy's OpenBLAS read OPENBLAS_CORETYPE when they load: restart with the
        # kernels deldist's workers run (deldist.runtime), as bench/dedup.py and kmeans.py do
        from deldist.runtime import tune_worker_blas

        tune_worker_blas()
        os.environ["DELDIST_BENCH_BLAS_SET"] = "1"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--k", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiles", nargs="*", choices=["int8", "bfloat16"])
    args = parser.parse_args()

    import faiss
    import torch

    from deldist import bf16_tiles, int8_tiles
    from deldist.kmeans import nearest_centroid

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    tiles = args.tiles if args.tiles is not None else \
        [t for t, ok in (("int8", int8_tiles.int8_supported()), ("bfloat16", bf16_tiles.bf16_supported())) if ok]
    x, labels = synthetic(max(args.rows, 6 * args.k), clusters=args.k, seed=0)
    centroids = torch.zeros((args.k, x.shape[1])).index_add_(0, torch.from_numpy(labels), torch.from_numpy(x)).numpy()
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-30)
    q = np.ascontiguousarray(x[:args.rows])
    variants = ["float32", *tiles]
    times: dict[str, list[float]] = {v: [] for v in variants}
    results = {}
    for v in variants:  # warm-up: numba's cached code, oneDNN's kernels
        nearest_centroid(q[:256], centroids, False, v)
    for _ in range(args.rounds):
        for v in variants:
            start = time.perf_counter()
            results[v] = nearest_centroid(q, centroids, False, v)
            times[v].append(time.perf_counter() - start)
    ref_labels, ref_sims = results["float32"]
    checks = {}
    for v in tiles:
        got_labels, got_sims = results[v]
        differ = np.flatnonzero(got_labels != ref_labels)
        ties = all(abs(float(q[i] @ centroids[got_labels[i]]) - float(q[i] @ centroids[ref_labels[i]])) <= 1e-6
                   for i in differ)
        checks[v] = {"labels_differing": int(len(differ)), "differences_are_ties": bool(ties),
                     "max_abs_sim_diff": float(np.abs(got_sims - ref_sims).max())}
    best = {v: min(t) for v, t in times.items()}
    summary = {"rows": args.rows, "k": args.k, "dim": int(x.shape[1]), "rounds": args.rounds,
               "cpu": cpu_model(),
               "load_average": os.getloadavg(), "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", "auto"),
               "seconds": {v: round(t, 3) for v, t in best.items()},
               "seconds_all": {v: [round(s, 3) for s in t] for v, t in times.items()},
               "faiss_float32_gflops": round(2 * args.rows * args.k * x.shape[1] / best["float32"] / 1e9, 1),
               "time_over_faiss": {v: round(best[v] / best["float32"], 2) for v in tiles},
               "identical": checks}
    print(json.dumps(summary, indent=1))
    for v in tiles:
        print(f"{v} tiles: {best[v]:.3f} s against faiss float32 {best['float32']:.3f} s "
              f"({summary['time_over_faiss'][v]}x), labels differing {checks[v]['labels_differing']}")


if __name__ == "__main__":
    main()
