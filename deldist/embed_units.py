"""What the embed stage still has to do: sources cut into units, and their progress records.

A video is cut into frame-index segments ("units", ``segment_seconds`` long; one open-ended
unit when its frame rate is variable or its length unknown), an image is one unit. Every
decode task writes a record per unit it finished (``PROGRESS_SCHEMA``: how many sampled frames
the unit holds, or why it failed) under ``_progress/embeddings/units/``. A unit is done when
its record exists and all its frames are in the parts, so a rerun decodes only what is missing.
Each source's sha256 is computed once and kept under ``_progress/embeddings/hashes/``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deldist import storage
from deldist.frames import probe_video
from deldist.ids import split_ids
from deldist.io import Source, content_sha256, open_source
from deldist.layout import RunLayout

PROGRESS_SCHEMA = pa.schema(
    [
        ("source", pa.string()),  # source key
        ("unit", pa.int64()),  # segment index (0 for images)
        ("n_units", pa.int64()),  # segments of this source
        ("segment_frames", pa.int64()),  # frames per segment (0 = one open-ended segment)
        ("expected", pa.int64()),  # sampled frames the unit holds (skipped ones included)
        ("decoded", pa.int64()),  # frames decoded to get them (decode cost)
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
)

HASHES_SCHEMA = pa.schema([("source", pa.string()), ("sha256", pa.string())])  # source URI, hex digest


def unit_of(frame_index: int, segment_frames: int) -> int:
    return frame_index // segment_frames if segment_frames > 0 else 0


@dataclass(frozen=True)
class FramesPresent:
    """The frame indices already in the parts, per source key, as arrays: one Python object
    per source, none per frame (the driver of a 100M-frame run would hold ~10 GB of them).

    slots: source key -> slot; starts: (s + 1,) slot boundaries into ``index``; index: (n,)
    int64 frame indices grouped by slot, ascending within each."""

    slots: dict[str, int]
    starts: np.ndarray
    index: np.ndarray

    @classmethod
    def from_ids(cls, chunks: Iterable[pa.Array | pa.ChunkedArray]) -> "FramesPresent":
        """From the id columns of the parts, one part at a time (the driver never holds all
        the id strings at once): each frame is one int64, slot << 32 | frame index, sorted in
        place, so the peak is ~16 bytes per frame and what stays 8."""
        slots: dict[str, int] = {}
        packed = []
        for ids in chunks:
            keys, index = split_ids(ids if len(ids) else pa.array([], pa.string()))
            valid = pc.is_valid(index)
            encoded = pc.dictionary_encode(keys.filter(valid))
            local = np.array([slots.setdefault(k, len(slots)) for k in encoded.dictionary.to_pylist()], np.int64)
            frames = index.filter(valid).to_numpy(zero_copy_only=False).astype(np.int64)
            if len(frames) and (frames.min() < 0 or frames.max() >= 2**32):
                raise ValueError("frame indices must be in [0, 2^32)")
            packed.append((local[encoded.indices.to_numpy(zero_copy_only=False)] << 32 | frames) if len(local)
                          else frames)
        flat = np.concatenate(packed) if packed else np.empty(0, np.int64)
        del packed
        flat.sort()
        starts = np.searchsorted(flat, np.arange(len(slots) + 1, dtype=np.int64) << 32)
        flat &= 0xFFFFFFFF  # what stays: the frame indices, grouped by slot, ascending
        return cls(slots, starts.astype(np.int64), flat)

    def of(self, key: str) -> np.ndarray:
        """(m,) int64 frame indices of source ``key`` in the parts, ascending."""
        slot = self.slots.get(key)
        return self.index[self.starts[slot]:self.starts[slot + 1]] if slot is not None else self.index[:0]


def source_progress(progress: list[dict[str, Any]], present: FramesPresent) -> dict[str, dict[str, Any]]:
    """Per source key: ``done`` (bool), ``units_done`` (set), ``errors``, ``expected`` frames.

    ``progress``: unit records (PROGRESS_SCHEMA rows, possibly repeated across reruns);
    ``present``: the frame indices already in the parts.
    A unit is done when it has a record and all its expected frames are present; a source
    when all its units are, or when it failed before any unit (listing / probe error).
    """
    by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in progress:
        by_source[r["source"]].append(r)
    out = {}
    for key, records in by_source.items():
        errors = [r for r in records if r["error_type"]]
        if any(r["n_units"] == 0 for r in records):  # failed before decoding (probe)
            out[key] = {"done": True, "units_done": set(), "errors": errors, "expected": 0}
            continue
        n_units, seg = records[0]["n_units"], records[0]["segment_frames"]
        expected = {r["unit"]: r["expected"] for r in records}  # reruns record the same number
        frames = present.of(key)
        have = np.bincount(frames // seg if seg > 0 else np.zeros_like(frames))
        units_done = {u for u, n in expected.items() if (have[u] if u < len(have) else 0) >= n}
        out[key] = {"done": len(units_done) == n_units, "units_done": units_done, "errors": errors,
                    "expected": sum(expected.values())}
    return out


def probe_rows(row: dict[str, Any], segment_seconds: float) -> dict[str, Any]:
    """Probe one video source -> its segment layout, or an error."""
    try:
        info = probe_video(open_source(row["uri"]))
        if info.constant_rate and info.n_frames > 0:
            seg = max(1, round(segment_seconds * info.fps))
            n_units = max(1, math.ceil(info.n_frames / seg))
        else:  # variable rate or unknown length: decode in one piece, index by timestamp
            seg, n_units = 0, 1
        return {**row, "n_units": n_units, "segment_frames": seg, "error_type": "", "message": ""}
    except Exception as e:  # a bad file must become an error row, never stop the job
        return {**row, "n_units": 0, "segment_frames": 0, "error_type": type(e).__name__, "message": str(e)}


def hash_row(row: dict[str, Any]) -> dict[str, Any]:
    """sha256 of one source's bytes ("" when it cannot be read: decoding it reports why)."""
    try:
        return {"source": row["source"], "sha256": content_sha256(row["source"])}
    except Exception:  # noqa: BLE001 - a bad file is an error row of the decode step, not a failed job
        return {"source": row["source"], "sha256": ""}


def source_hashes(hashes_dir: str, uris: list[str], task_cpus: float) -> dict[str, str]:
    """URI -> sha256 of its bytes: read from the cache in ``hashes_dir``, the rest computed in
    Ray tasks (one read of each file) and added to the cache."""
    import ray

    cached = _read_parquet_files(hashes_dir, None, HASHES_SCHEMA)
    known = dict(zip(cached.column("source").to_pylist(), cached.column("sha256").to_pylist()))
    missing = sorted(set(uris) - set(known))
    if missing:
        rows = (ray.data.from_items([{"source": u} for u in missing], override_num_blocks=min(len(missing), 200))
                .map(hash_row, num_cpus=task_cpus).take_all())
        hashed = [r for r in rows if r["sha256"]]
        if hashed:
            storage.write_table(pa.Table.from_pylist(hashed, schema=HASHES_SCHEMA),
                                storage.join(hashes_dir, storage.new_part_name("hashes")))
        known.update({r["source"]: r["sha256"] for r in rows})
    return {u: known[u] for u in uris}


def _read_parquet_files(uri: str, columns: list[str] | None, schema: pa.Schema | None = None) -> pa.Table:
    fs, _ = storage.resolve(uri)
    paths = [p for p in storage.list_files(uri) if p.endswith(".parquet")]
    if not paths:
        return schema.empty_table() if schema is not None else pa.table({c: [] for c in columns or []})
    return pq.ParquetDataset(paths, filesystem=fs).read(columns=columns)


def load_state(layout: RunLayout) -> tuple[list[dict[str, Any]], FramesPresent]:
    """(progress records, the frame indices already in the parts), published or not."""
    progress = _read_parquet_files(layout.embed_progress, None, PROGRESS_SCHEMA).to_pylist()
    fs, _ = storage.resolve(layout.embedding_parts)
    paths = [p for p in storage.list_files(layout.embedding_parts) if p.endswith(".parquet")]
    return progress, FramesPresent.from_ids(pq.read_table(p, columns=["id"], filesystem=fs).column("id") for p in paths)


def plan_units(pending: list[Source], done_units: dict[str, set[int]], present: FramesPresent,
               segment_seconds: float, probe_cpus: float, progress_dir: str) -> list[dict[str, Any]]:
    """Probe pending videos (in Ray tasks) and list the units still to decode; a video that
    cannot be probed gets its failure record in ``progress_dir``."""
    import ray

    units: list[dict[str, Any]] = []
    base = lambda s: {"uri": s.uri, "key": s.key, "dataset": s.dataset, "kind": s.kind,  # noqa: E731
                      "skip": present.of(s.key).tolist()}
    for s in pending:
        if s.kind == "image":
            units.append({**base(s), "unit": 0, "n_units": 1, "segment_frames": 0})
    videos = [base(s) for s in pending if s.kind == "video"]
    if videos:
        probed = (ray.data.from_items(videos, override_num_blocks=min(len(videos), 200))
                  .map(probe_rows, fn_kwargs={"segment_seconds": segment_seconds}, num_cpus=probe_cpus)
                  .take_all())
        failures = []
        for v in probed:
            if v["n_units"] == 0:
                failures.append({"source": v["key"], "unit": 0, "n_units": 0, "segment_frames": 0, "expected": 0,
                                 "decoded": 0, "stage": "probe", "error_type": v["error_type"],
                                 "message": v["message"]})
                continue
            for u in range(v["n_units"]):
                if u not in done_units.get(v["key"], set()):
                    units.append({**{k: v[k] for k in ("uri", "key", "dataset", "kind", "n_units",
                                                       "segment_frames")},
                                  "unit": u, "skip": _skip_for_unit(v["skip"], u, v["segment_frames"])})
        if failures:
            storage.write_table(pa.Table.from_pylist(failures, schema=PROGRESS_SCHEMA),
                                storage.join(progress_dir, storage.new_part_name("units")))
    return units


def _skip_for_unit(present: list[int], unit: int, segment_frames: int) -> list[int]:
    return [i for i in present if unit_of(i, segment_frames) == unit]


def pack_tasks(units: list[dict[str, Any]], images_per_task: int) -> list[str]:
    """One task per video segment; images packed ``images_per_task`` to a task."""
    tasks = [[u] for u in units if u["kind"] == "video"]
    images = [u for u in units if u["kind"] == "image"]
    tasks += [images[i : i + images_per_task] for i in range(0, len(images), images_per_task)]
    return [json.dumps({"units": t}) for t in tasks]
