"""Curated versions of a selection, as ``deldist curate-new`` keeps them (see its module doc):

    curated/<selection>/v1/, v2/, ...   retained/ removed/ sources/ summary.json, published
    curated/<selection>/latest.json     {"version": N, "path": "vN"}: written last

A version's tables hold copies of the previous version's Parquet parts plus its own batch's
part: each version directory is a self-contained table that pandas, polars, duckdb and
pyarrow.dataset read on their own (on S3 the copies are server-side; nothing is rewritten).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deldist import storage
from deldist.layout import RunLayout, summary_of, table_of, version_name
from deldist.schema import REMOVED_SCHEMA, RETAINED_SCHEMA, VERSION_SOURCES_SCHEMA


def retained_roots(ids: pa.Array, parent: pa.Array, retained: np.ndarray) -> pa.Array:
    """The retained item each item stands for, following ``parent`` links (duplicate_of).

    ids: (n,) unique strings; parent: (n,) the id each item duplicates (null for none; an id not
    in ``ids`` ends the chain); retained: (n,) bool. Retained items are their own root; an item
    whose chain ends at a non-retained item has a null root. Returns (n,) strings.
    """
    n = len(ids)
    link = pc.index_in(parent, value_set=ids).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    retained = np.asarray(retained, bool)
    root = np.where(retained, np.arange(n), link)
    for _ in range(64):  # pointer jumping: settles chains of any length in log2(length) rounds
        hop = np.where(root >= 0, root, 0)
        settled = (root < 0) | retained[hop]
        jumped = np.where(settled, root, root[hop])
        if np.array_equal(jumped, root):
            break
        root = jumped
    ok = root >= 0
    ok &= retained[np.where(ok, root, 0)]  # chains ending at a non-retained item (or cycling) have no root
    taken = pc.take(ids, pa.array(np.where(ok, root, 0)))
    return pc.if_else(pa.array(ok), taken, pa.nulls(n, pa.string()))


def latest_version(corpus: str, selection: str) -> int:
    """The published version ``latest.json`` points at; 0 when none exists yet."""
    path = RunLayout(corpus).latest(selection)
    return int(storage.read_json(path)["version"]) if storage.exists(path) else 0


def version_dir(corpus: str, selection: str, version: int | None = None) -> str:
    """``curated/<selection>/v<version>`` (default: the latest)."""
    version = latest_version(corpus, selection) if version is None else version
    if version < 1:
        raise FileNotFoundError(f"{RunLayout(corpus).curated(selection)} has no version yet; run deldist curate-new")
    return RunLayout(corpus).version(selection, version)


def read_version(corpus: str, selection: str, table: str, version: int | None = None,
                 columns: list[str] | None = None) -> pa.Table:
    """One table (``retained``, ``removed`` or ``sources``) of a version (default: latest)."""
    return storage.read_published(table_of(version_dir(corpus, selection, version), table), columns)


def set_latest(corpus: str, selection: str, version: int) -> None:
    storage.write_json(RunLayout(corpus).latest(selection), {"version": version, "path": version_name(version)})


def publish_table(dir_uri: str, shared: Sequence[str], table: pa.Table | None, schema: pa.Schema) -> int:
    """Publish ``dir_uri``: copies of the parent's parts (``shared``) plus ``table`` as a new part."""
    files = storage.copy_into(dir_uri, shared)
    if table is not None and table.num_rows:
        path = storage.join(dir_uri, storage.new_part_name())
        storage.write_table(table, path)
        files.append(storage.resolve(path)[1])
    storage.publish(dir_uri, files, {"schema": storage.schema_hex(schema)})
    fs, paths = storage.published_paths(dir_uri)
    return sum(pq.ParquetFile(p, filesystem=fs).metadata.num_rows for p in paths)


def sources_ledger(frame_sources: pa.Table, version: int, failed: Iterable[str], sha256: dict[str, str],
                   identical: dict[str, str] | None = None) -> pa.Table:
    """A version's ``sources`` rows for what it brought in: every source with embedded frames
    (status embedded, its frame count), every source in ``failed`` without any (status error,
    0 frames) and every upload in ``identical`` (URI -> the source with the same bytes; status
    identical, not embedded). All are seen: a rerun does not retry them. frame_sources: one
    ``source`` row per embedded frame; sha256: URI -> digest of its bytes."""
    counts = frame_sources.group_by("source").aggregate([("source", "count")])
    errors = sorted(set(failed) - set(counts.column("source").to_pylist()))
    identical = identical or {}

    def rows(sources: list[str], status: str, frames: Any) -> pa.Table:
        n = len(sources)
        return pa.table({"source": pa.array(sources, pa.string()), "version": pa.array(np.full(n, version, np.int32)),
                         "status": pa.array([status] * n, pa.string()), "frames": frames,
                         "sha256": pa.array([sha256.get(s, "") for s in sources], pa.string()),
                         "copy_of": pa.array([identical.get(s) for s in sources], pa.string())},
                        schema=VERSION_SOURCES_SCHEMA)

    zeros = lambda n: pa.array(np.zeros(n, np.int64))  # noqa: E731
    return pa.concat_tables([rows(counts.column("source").to_pylist(), "embedded",
                                  counts.column("source_count").cast(pa.int64())),
                             rows(errors, "error", zeros(len(errors))),
                             rows(sorted(identical), "identical", zeros(len(identical)))])


def sources_of_corpus(corpus: str) -> pa.Table:
    layout = RunLayout(corpus)
    failed = storage.read_published(layout.errors, ["source"]).column("source").to_pylist() \
        if storage.is_published(layout.errors) else []
    listed = storage.read_published(layout.sources) if storage.is_published(layout.sources) else pa.table({})
    sha256 = dict(zip(listed.column("source").to_pylist(), listed.column("sha256").to_pylist())) \
        if "sha256" in listed.column_names else {}
    return sources_ledger(storage.read_published(layout.embeddings, ["source"]), 1, failed, sha256)


def known_contents(sources: pa.Table) -> dict[str, str]:
    """sha256 -> the first source (in ledger order) curated with those bytes, from a version's
    ``sources`` table: what a byte-identical re-upload is a copy of."""
    known: dict[str, str] = {}
    for row in sources.select(["source", "status", "sha256", "copy_of"]).to_pylist():
        if row["sha256"] and row["status"] != "error":
            known.setdefault(row["sha256"], row["copy_of"] or row["source"])
    return known


def publish_selection_version(source: RunLayout, corpus: str, selection: str, version: int, sources: Sequence[str],
                               sources_table: pa.Table | None, embeddings: list[str],
                               extra: dict[str, Any]) -> dict[str, Any]:
    """Publish ``curated/<selection>/v<version>`` of ``corpus`` from selection ``selection`` of
    the run ``source`` (its retained / removed parts shared), then point ``latest.json`` at it."""
    sel_dir = source.selection(selection)
    summary = storage.read_json(summary_of(sel_dir))
    if summary.get("method") not in ("meddel", "semdedup"):
        raise ValueError(f"selection {selection!r} is a {summary.get('method')} selection; curate-new extends a "
                         "MedDEL or SemDeDup selection (its threshold and rules are applied to the uploads)")
    if summary.get("similarity_threshold") is None:
        raise ValueError(f"selection {selection!r} has no similarity threshold (built without eps / target_ratio)")
    scores_manifest = storage.read_manifest(source.scores)
    vdir = RunLayout(corpus).version(selection, version)
    for table in ("retained", "removed"):
        schema = RETAINED_SCHEMA if table == "retained" else REMOVED_SCHEMA
        publish_table(table_of(vdir, table), storage.published_paths(table_of(sel_dir, table))[1], None, schema)
    publish_table(table_of(vdir, "sources"), sources, sources_table, VERSION_SOURCES_SCHEMA)
    params = summary.get("parameters", {})
    manifest = {
        "version": version, "selection": selection, "clusters": source.clusters, "embeddings": embeddings,
        "assignments": [source.assignments],
        "similarity_threshold": summary["similarity_threshold"],
        "keep": scores_manifest.get("keep", "easy"), "seed": scores_manifest.get("seed", 0),
        "selection_parameters": params, **extra,
    }
    storage.write_json(summary_of(vdir), {**summary, "version": version, **extra})
    storage.publish(vdir, [], manifest)
    set_latest(corpus, selection, version)
    return manifest


def create_first_version(corpus: str, selection: str) -> dict[str, Any]:
    """``v1``: the corpus selection as curated, its retained / removed parts shared."""
    layout = RunLayout(corpus)
    return publish_selection_version(layout, corpus, selection, 1, [], sources_of_corpus(corpus),
                                      [layout.embeddings], {"parent": None})


def represented_items(vdir: str) -> pa.Table:
    """The corpus items an upload may be a copy of -> (id, stand_in): every retained item (its
    own stand-in) and every item removed as a copy of another (duplicate, near_copy, temporal)
    with the retained item standing for it. Items removed as invalid or outliers are not in it:
    an upload is never removed as a duplicate of a frame that was rejected for its own sake
    (:func:`rejected_items`)."""
    retained = storage.read_published(table_of(vdir, "retained"), ["id"]).column("id").combine_chunks()
    removed = storage.read_published(table_of(vdir, "removed"), ["id", "duplicate_of"])
    linked = removed.filter(pc.is_valid(removed.column("duplicate_of")))
    ids = pa.concat_arrays([retained, linked.column("id").combine_chunks()])
    parent = pa.concat_arrays([pa.nulls(len(retained), pa.string()), linked.column("duplicate_of").combine_chunks()])
    stand_in = retained_roots(ids, parent, np.r_[np.ones(len(retained), bool), np.zeros(linked.num_rows, bool)])
    table = pa.table({"id": ids, "stand_in": stand_in})
    return table.filter(pc.is_valid(table.column("stand_in")))


def rejected_items(vdir: str) -> pa.Table:
    """The corpus items removed for their own sake -> (id, reason): ``invalid`` or ``outlier``."""
    removed = storage.read_published(table_of(vdir, "removed"), ["id", "reason"])
    return removed.filter(pc.is_in(removed.column("reason"), value_set=pa.array(["invalid", "outlier"])))
