"""Checks every selection the tests make must pass (imported by the test modules)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from deldist import storage


def assert_nothing_lost(selection_dir: str, all_ids: list[str] | None = None) -> None:
    """Every id once across retained / removed; every removed item that names a duplicate_of
    names a retained id (for kept-rule and random selections: no group vanishes)."""
    retained = storage.read_published(storage.join(selection_dir, "retained")).column("id")
    removed = storage.read_published(storage.join(selection_dir, "removed"))
    ids = retained.to_pylist() + removed.column("id").to_pylist()
    assert len(ids) == len(set(ids))
    if all_ids is not None:
        assert sorted(ids) == sorted(all_ids)
    summary_uri = storage.join(selection_dir, "summary.json")
    summary = storage.read_json(summary_uri) if storage.exists(summary_uri) else {}
    if summary.get("dedup_rule", "kept") != "kept":
        return
    named = removed.filter(pc.is_valid(removed.column("duplicate_of")))
    lost = named.filter(pc.invert(pc.is_in(named.column("duplicate_of"),
                                           value_set=pa.chunked_array([retained]).combine_chunks())))
    assert lost.num_rows == 0, lost.slice(0, 5).to_pylist()


def published_tables(root: str) -> list[str]:
    """Every published directory under a local run root whose manifest lists Parquet files."""
    from pathlib import Path

    found = []
    for success in sorted(Path(root).rglob(storage.SUCCESS)):
        files = storage.read_manifest(str(success.parent)).get("files", [])
        if any(f.endswith(".parquet") for f in files):
            found.append(str(success.parent))
    return found


def assert_tables_open_everywhere(root: str) -> int:
    """Each published table directory under ``root`` is readable on its own, with the rows its
    manifest lists, by pyarrow.dataset, pandas, duckdb and polars (the last two by a recursive
    glob, so a stray Parquet file of another schema or a part the manifest does not list
    would show). Returns how many tables were checked."""
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    tables = published_tables(root)
    assert tables
    for table_dir in tables:
        expected = storage.read_published(table_dir).num_rows
        glob = f"{table_dir}/**/*.parquet"
        counts = {
            "pyarrow.dataset": ds.dataset(table_dir, format="parquet").count_rows(),
            "pandas": len(pd.read_parquet(table_dir)),
            "duckdb": duckdb.sql(f"select count(*) from read_parquet('{glob}')").fetchall()[0][0],
            "polars": pl.scan_parquet(glob).select(pl.len()).collect().item(),
        }
        assert set(counts.values()) == {expected}, (table_dir, expected, counts)
    return len(tables)
