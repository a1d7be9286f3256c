"""Same tables before and after a change: run ``deldist curate`` (embed -> cluster -> dedup ->
select, the demo's config) with the code of two git revisions on the same generated sample and
compare every table the runs publish, content for content.

    .venv/bin/python bench/same_tables.py --before <rev> [--after <rev or "."> ] [--size demo]

``--share-embeddings``: the after side starts from a copy of the before side's ``embeddings/``
(and ``errors/``), so its embed is a no-op and clusters onwards are compared on identical
input rows in identical order. Without it, revisions older than the order-free k-means
sampling cluster differently whenever embed's tasks finish in another order (the rows of
``embeddings/`` come in task completion order).

Each side runs in its own Python process (``PYTHONPATH`` = that revision's checkout, a git
worktree for a revision) with its own local Ray cluster. Compared, sorted by id (or by
cluster): ``embeddings``, ``errors``, ``clusters`` (centroids and assignments), ``dedup/scores``,
each selection's ``retained`` and ``removed``, and each ``summary.json`` without its timings
and the run root in its parameters. Parquet part names are random, so files are compared by
content, not by bytes. Exit status 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.yaml"
RUNNER = """
import sys
from deldist import curate
from deldist.config import load_config
cfg = load_config(curate.Config, sys.argv[1], [f"input={sys.argv[2]}", f"output={sys.argv[3]}",
                                               f"ground_truth={sys.argv[4]}", "html=false"], section="curate")
curate.run(cfg)
"""


def checkout(rev: str, into: str) -> str:
    """The source tree of ``rev`` ("." = this working tree)."""
    if rev == ".":
        return str(REPO)
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", into, rev], check=True,
                   capture_output=True)
    return into


def curate(tree: str, sample: Path, out: str) -> None:
    env = {**os.environ, "PYTHONPATH": tree, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    subprocess.run([sys.executable, "-c", RUNNER, str(CONFIG), str(sample / "videos"), out,
                    str(sample / "ground_truth.parquet")], check=True, env=env, cwd=tree,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def tables(root: str) -> dict[str, object]:
    """Every published table of a curate run, sorted, and the summaries without timings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deldist import storage

    out: dict[str, object] = {}

    def sort(table: pa.Table) -> pa.Table:
        keys = [k for k in ("id", "source", "cluster") if k in table.column_names]
        return table.sort_by([(k, "ascending") for k in keys]) if keys else table

    for name in ("embeddings", "errors", "dedup/scores", "clusters/assignments"):
        path = storage.join(root, name)
        if storage.is_published(path):
            out[name] = sort(storage.read_published(path))
    centroids = storage.join(root, "clusters", "centroids")  # a table dir; one file in revisions before dd98045
    if storage.is_published(centroids):
        out["clusters/centroids"] = sort(storage.read_published(centroids))
    else:
        fs, path = storage.resolve(centroids + ".parquet")
        out["clusters/centroids"] = sort(pq.read_table(path, filesystem=fs))
    for selection in sorted(os.listdir(os.path.join(root, "selections"))):
        for table in ("retained", "removed"):
            out[f"selections/{selection}/{table}"] = sort(storage.read_published(
                storage.join(root, "selections", selection, table)))
        summary = storage.read_json(storage.join(root, "selections", selection, "summary.json"))
        summary.pop("seconds", None)
        text = json.dumps(summary, sort_keys=True).replace(root, "<root>")
        out[f"selections/{selection}/summary.json"] = json.loads(text)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", default=".")
    parser.add_argument("--size", default="demo", choices=["tiny", "small", "demo"])
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--share-embeddings", action="store_true",
                        help="the after side reuses the before side's embeddings (compare clusters onwards)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from deldist import sample

    work = tempfile.mkdtemp(prefix="same-tables-")
    trees = []
    try:
        data = Path(work) / "sample"
        sample.generate(str(data), size=args.size, seed=0)
        results = {}
        for side, rev in (("before", args.before), ("after", args.after)):
            tree = checkout(rev, os.path.join(work, f"tree-{side}"))
            if rev != ".":
                trees.append(tree)
            out = os.path.join(work, side)
            if side == "after" and args.share_embeddings:
                for name in ("embeddings", "errors"):
                    shutil.copytree(os.path.join(work, "before", name), os.path.join(out, name))
            curate(tree, data, out)
            results[side] = tables(out)
            print(f"{side} ({rev}): {len(results[side])} tables", flush=True)
        differ = []
        for name in sorted(set(results["before"]) | set(results["after"])):
            a, b = results["before"].get(name), results["after"].get(name)
            same = a == b if isinstance(a, dict) or a is None or b is None else a.equals(b)
            print(f"  {'same' if same else 'DIFFERS':7s} {name}")
            if not same:
                differ.append(name)
        print("identical" if not differ else f"{len(differ)} tables differ")
        return 1 if differ else 0
    finally:
        for tree in trees:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", tree], capture_output=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
