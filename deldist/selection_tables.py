"""A selection's two tables, written part by part: ``retained`` (id + the frame columns of
``embeddings/``) and ``removed`` (id, reason, duplicate_of, max_sim), and the per-dataset counts.

The driver holds each frame's id and decision, never the retained table's columns: every
read shard of the embeddings (:func:`deldist.shards.plan_shards`, whole row groups in stored
order, so shard i is the driver's rows offset_i .. offset_i + rows_i) is one Ray task that reads
its own id / source / frame_index / timestamp_s / dataset, checks its ids against the driver's
(their 53-bit hashes, in order), and writes its retained part (:func:`retained_part`). The
removed table is written by the driver one shard's range at a time. deldist's own wiring; the
rules that fill the decision are in :mod:`deldist.select`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deldist import storage
from deldist.greedy import follow_to_kept
from deldist.ids import id_hash
from deldist.layout import RunLayout
from deldist.rules import REASONS, Decision, SelectionInvariantError, check_partition
from deldist.schema import REMOVED_SCHEMA, RETAINED_META, RETAINED_SCHEMA
from deldist.shards import Shard, plan_shards, read_shard

PART_ROWS = 1 << 20  # rows of embeddings per retained part: ~100 bytes each without the vectors


def stand_in_rows(decision: Decision, strict: bool = True) -> np.ndarray:
    """(n,) int64: the row of the retained item standing for each removed item (its link
    followed through items later rules removed), -1 where none (kept items, unlinked reasons).
    ``strict`` (the kept rule): every linked item must reach a retained one
    (:class:`SelectionInvariantError` otherwise); else (SemDeDup's rule) a duplicate names the
    item it matched, kept or not."""
    reason, kept = decision.reason, decision.reason < 0
    stand_in = follow_to_kept(decision.link, kept)
    if strict:
        broken = int(((reason >= 0) & (decision.link >= 0) & (stand_in < 0)).sum())
        if broken:
            raise SelectionInvariantError(f"{broken} removed items stand for no retained item")
    else:
        stand_in = np.where((stand_in < 0) | (reason == REASONS.index("duplicate")), decision.link, stand_in)
    return np.where(kept, -1, stand_in).astype(np.int64)


def ids_at(ids: pa.Array, rows: np.ndarray) -> pa.Array:
    """``ids`` at ``rows`` (int64), null where a row is -1 (no string copied for those)."""
    named = rows >= 0
    return ids.take(pa.array(np.where(named, rows, 0), mask=~named))


def removed_table(ids: pa.Array, decision: Decision, stand_in: np.ndarray, start: int, stop: int) -> pa.Table:
    """The removed rows among rows start..stop: id, reason, duplicate_of (the stand-in's id),
    max_sim (the score the removing rule measured)."""
    rows = start + np.flatnonzero(decision.reason[start:stop] >= 0)
    return _removed_rows(ids, decision, rows, ids_at(ids, stand_in[rows]))


def _removed_rows(ids: pa.Array, decision: Decision, rows: np.ndarray, duplicate_of: pa.Array) -> pa.Table:
    """The removed table of ``rows`` (int64, removed), ``duplicate_of`` aligned with them."""
    return pa.table({
        "id": ids.take(pa.array(rows)),
        "reason": pa.array(np.asarray(REASONS, dtype=object)[decision.reason[rows]], pa.string()),
        "duplicate_of": duplicate_of,
        "max_sim": pa.array(decision.score[rows], pa.float32(), from_pandas=True),
    }, schema=REMOVED_SCHEMA)


def build_tables(ids: pa.Array, decision: Decision, duplicate_of: pa.Array, meta: pa.Table) -> dict[str, pa.Table]:
    """Both tables in memory (curate-new's batches), partition checked; duplicate_of: (n,) ids
    of the stand-ins (null: none); meta: the frames' :data:`RETAINED_META` columns, row-aligned."""
    kept = decision.reason < 0
    rows = np.flatnonzero(~kept)
    mask = pa.array(kept)
    tables = {
        "retained": pa.table({"id": ids.filter(mask), **{c: meta.column(c).filter(mask) for c in RETAINED_META}},
                             schema=RETAINED_SCHEMA),
        "removed": _removed_rows(ids, decision, rows, duplicate_of.take(pa.array(rows))),
    }
    check_partition(ids, tables["retained"].column("id"), tables["removed"].column("id"))
    return tables


def dataset_counts(dataset: pa.Array | pa.ChunkedArray, reason: np.ndarray) -> dict[str, np.ndarray]:
    """dataset name -> int64 (1 + len(REASONS),): [kept, removed for each reason] over its rows."""
    encoded = pc.dictionary_encode(pc.fill_null(dataset, ""))
    encoded = encoded.combine_chunks() if isinstance(encoded, pa.ChunkedArray) else encoded
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    width = 1 + len(REASONS)
    table = np.bincount(codes * width + (reason.astype(np.int64) + 1),
                        minlength=len(encoded.dictionary) * width).reshape(-1, width)
    return {str(name): table[code] for code, name in enumerate(encoded.dictionary.to_pylist())}


def per_dataset_summary(counts: dict[str, np.ndarray]) -> dict[str, Any]:
    """``summary.json``'s ``per_dataset`` from :func:`dataset_counts` (summed over parts)."""
    out = {}
    for name in sorted(counts):
        c = counts[name]
        total = int(c.sum())
        out[name] = {"input": total, "kept": int(c[0]), "ratio": float(c[0] / total) if total else 0.0,
                     "removed_by_reason": {r: int(c[1 + i]) for i, r in enumerate(REASONS) if c[1 + i]}}
    return out


def part_name(table: str, index: int) -> str:
    """Part ``index`` of a table: names sort in row order (the manifest lists files sorted)."""
    return storage.new_part_name(f"{table}-{index:05d}")


def retained_part(emb_dir: str, shard: Shard, index: int, reason: np.ndarray, hashes: np.ndarray, out_dir: str,
                  ) -> tuple[str, int, dict[str, np.ndarray]]:
    """Task body: one shard of the embeddings -> its retained part under ``out_dir``.
    reason: (rows,) int8 the driver's decisions for the shard's rows (-1 kept); hashes: (rows,)
    :func:`deldist.ids.id_hash` of the driver's ids for them, which the ids read here must match
    in order. Returns (the part's fs path, rows written, :func:`dataset_counts`)."""
    table = read_shard(emb_dir, shard, ["id", *RETAINED_META])
    if table.num_rows != len(reason) or not np.array_equal(id_hash(table.column("id")), hashes):
        raise SelectionInvariantError(f"{emb_dir}: a shard's ids differ from the ones the selection decided on; "
                                      "the embeddings changed since select read them")
    kept = table.filter(pa.array(reason < 0)).cast(RETAINED_SCHEMA)
    path = storage.join(out_dir, part_name("retained", index))
    storage.write_table(kept, path)
    return storage.resolve(path)[1], kept.num_rows, dataset_counts(table.column("dataset"), reason)


@dataclass
class Written:
    """What :func:`write_tables` wrote: row counts and the per-dataset counts."""

    retained: int = 0
    removed: int = 0
    per_dataset: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, counts: dict[str, np.ndarray]) -> None:
        for name, c in counts.items():
            self.per_dataset[name] = self.per_dataset.get(name, 0) + c


def write_tables(layout: RunLayout, name: str, ids: pa.Array, decision: Decision, stand_in: np.ndarray,
                 io_cpus: float = 0.5, part_rows: int = PART_ROWS) -> Written:
    """Write and publish ``retained/`` and ``removed/`` of selection ``name`` (see the module
    doc); one task per shard from two shards on (one: in this process). Checks that the parts
    hold every id once: each part's ids are the driver's rows in order, retained where kept."""
    shards = plan_shards(layout.embeddings, part_rows)
    starts = np.r_[0, np.cumsum([s.num_rows for s in shards])].astype(np.int64)
    if starts[-1] != len(ids):
        raise SelectionInvariantError(f"{layout.embeddings} holds {starts[-1]} rows, the selection decided on "
                                      f"{len(ids)}; the embeddings changed since select read them")
    out = {sub: layout.selection_table(name, sub) for sub in ("retained", "removed")}
    args = [(layout.embeddings, shard, i, decision.reason[a:b], id_hash(ids.slice(a, b - a)), out["retained"])
            for i, (shard, a, b) in enumerate(zip(shards, starts[:-1], starts[1:]))]
    if len(shards) > 1:
        import ray

        from deldist.runtime import init_ray

        init_ray()
        task = ray.remote(num_cpus=io_cpus, max_retries=3)(retained_part)
        pending = [task.remote(*a) for a in args]
    else:
        pending = [retained_part(*a) for a in args]
    del args
    written = Written()
    removed_paths = []
    for i, (a, b) in enumerate(zip(starts[:-1], starts[1:])):  # while the tasks run, one range in memory
        part = removed_table(ids, decision, stand_in, int(a), int(b))
        path = storage.join(out["removed"], part_name("removed", i))
        storage.write_table(part, path)
        removed_paths.append(storage.resolve(path)[1])
        written.removed += part.num_rows
    retained_paths = []
    for path, rows, counts in (ray.get(pending) if len(shards) > 1 else pending):
        retained_paths.append(path)
        written.retained += rows
        written.add(counts)
    kept = int((decision.reason < 0).sum())
    if (written.retained, written.removed) != (kept, len(ids) - kept):
        raise SelectionInvariantError(f"wrote {written.retained} retained + {written.removed} removed rows for "
                                      f"{kept} kept of {len(ids)} ids")
    for sub, paths, schema, rows in (("retained", retained_paths, RETAINED_SCHEMA, written.retained),
                                     ("removed", removed_paths, REMOVED_SCHEMA, written.removed)):
        storage.publish(out[sub], paths, {"rows": rows, "schema": storage.schema_hex(schema)})
    return written


def publish_selection(layout: RunLayout, name: str, summary: dict[str, Any]) -> None:
    """``selections/<name>/`` after :func:`write_tables`: summary.json, then the selection's own
    manifest and ``_SUCCESS``."""
    storage.write_json(layout.selection_summary(name), summary)
    storage.publish(layout.selection(name), [], {"name": name, "retained": "retained", "removed": "removed",
                                                 "summary": "summary.json"})
