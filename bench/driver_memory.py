"""The embed driver's memory for its per-frame state, on the same Parquet parts:

- the resume state (which frames are in the parts): ``embed_units.FramesPresent``, built one
  part at a time, against a dict of Python lists of every frame index (what ``load_state`` did);
- the end-of-embed repeat check: ``deldist.storage.drop_repeated_ids`` (53-bit id hashes, exact
  strings only for colliding hashes) against a Python set of every id (what it did before).

Each variant runs in its own process; its peak RSS (VmHWM) minus its RSS before the call is
what the check itself holds. Ids look like embed's (``site_k/video_j.mp4#frame``);
``--repeat`` of the rows are copies of earlier ones (a retried task's part).

    .venv/bin/python bench/driver_memory.py [--n 2000000] [--parts 40] [--repeat 0.01]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _rss_mib() -> float:
    return _status_mib("VmRSS")


def write_parts(root: Path, n: int, parts: int, repeat: float, seed: int = 0) -> int:
    import pyarrow as pa

    from deldist import storage

    rng = np.random.default_rng(seed)
    ids = np.array([f"site_{i % 17}/video_{i // 900:06d}.mp4#{i % 900}" for i in range(n)], dtype=object)
    copies = rng.choice(n, int(n * repeat), replace=False)
    rows = np.concatenate([np.arange(n), np.sort(copies)])  # the copies come later, as a retry's part would
    for k, chunk in enumerate(np.array_split(rows, parts)):
        storage.write_table(pa.table({"id": pa.array(ids[chunk].tolist(), pa.string())}),
                            str(root / f"part-{k:04d}.parquet"))
    return len(copies)


def set_baseline(parts_dir: str) -> int:
    """A Python set of every id: the repeat check before this change (parts not rewritten here)."""
    import pyarrow.parquet as pq

    seen: set[str] = set()
    dropped = 0
    for path in sorted(Path(parts_dir).glob("*.parquet")):
        for i in pq.read_table(path, columns=["id"]).column("id").to_pylist():
            if i in seen:
                dropped += 1
            else:
                seen.add(i)
    return dropped


def dict_baseline(parts_dir: str) -> int:
    """Source key -> a list of frame indices, from every id as a Python string."""
    from collections import defaultdict

    import pyarrow.parquet as pq

    from deldist.ids import split_id

    present: dict[str, list[int]] = defaultdict(list)
    for path in sorted(Path(parts_dir).glob("*.parquet")):
        for i in pq.read_table(path, columns=["id"]).column("id").to_pylist():
            key, index = split_id(i)
            present[key].append(index)
    return sum(len(v) for v in present.values())


def frames_present(parts_dir: str) -> int:
    import pyarrow.parquet as pq

    from deldist.embed_units import FramesPresent

    paths = sorted(Path(parts_dir).glob("*.parquet"))
    return len(FramesPresent.from_ids(pq.read_table(p, columns=["id"]).column("id") for p in paths).index)


def child(variant: str, parts_dir: str) -> None:
    from deldist import storage

    before = _rss_mib()
    started = time.perf_counter()
    result = {"hashes": storage.drop_repeated_ids, "set": set_baseline, "dict": dict_baseline,
               "arrays": frames_present}[variant](parts_dir)
    seconds = time.perf_counter() - started
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over execve, so a child started by a
    # parent holding the generated ids would report the parent's peak
    peak = _status_mib("VmHWM")
    print(json.dumps({"variant": variant, "result": result, "seconds": round(seconds, 2),
                      "held_mib": round(peak - before, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2_000_000)
    parser.add_argument("--parts", type=int, default=40)
    parser.add_argument("--repeat", type=float, default=0.01)
    parser.add_argument("--child", choices=["set", "hashes", "dict", "arrays"])
    parser.add_argument("--dir")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dir)
        return
    with tempfile.TemporaryDirectory() as tmp:
        copies = write_parts(Path(tmp), args.n, args.parts, args.repeat)
        print(f"{args.n} ids + {copies} repeats in {args.parts} parts")
        results = {}
        for variant in ("dict", "arrays", "set", "hashes"):  # hashes last: drop_repeated_ids rewrites the parts
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--dir", tmp], check=True,
                                 capture_output=True, text=True).stdout
            results[variant] = json.loads(out.strip().splitlines()[-1])
            print(results[variant])
        assert results["set"]["result"] == results["hashes"]["result"] == copies
        assert results["dict"]["result"] == results["arrays"]["result"] == args.n + copies
        print(f"resume state held: dict {results['dict']['held_mib']} MiB, arrays {results['arrays']['held_mib']} MiB; "
              f"time: {results['dict']['seconds']} s, {results['arrays']['seconds']} s")
        print(f"repeat check held: set {results['set']['held_mib']} MiB, hashes {results['hashes']['held_mib']} MiB "
              f"({results['set']['held_mib'] / max(results['hashes']['held_mib'], 1e-9):.1f}x less); "
              f"time: set {results['set']['seconds']} s, hashes {results['hashes']['seconds']} s")


if __name__ == "__main__":
    main()
