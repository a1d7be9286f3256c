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
