"""Frame store: the frames of a selection (or of every embedded frame) as JPEG in Parquet.

``deldist materialize`` decodes each wanted frame once from its original source, so
multi-epoch training reads small JPEG rows instead of decoding video again. Output
``<output>/frames/<selection or "all">/`` (published like every stage): Parquet parts with

| column | type | meaning |
|---|---|---|
| id | string | the frame id of ``embeddings/`` (``<source key>#<frame_index>``) |
| jpeg | binary | the frame, resized (short side ``size``) and center-cropped to ``size`` x ``size`` |
| width, height | int32 | of the stored JPEG |

Ray Data: the wanted ids are grouped by source; one decode task per video chunk of at most
``frames_per_task`` wanted frames (decoding seeks to the chunk's first frame and stops after
its last) or per pack of ``images_per_task`` images. Each task writes its own parts and an
error part (ids it could not produce, and why), so a rerun only decodes the ids that are in
neither; the manifest is published once every wanted id is stored or recorded as an error.
"""

from __future__ import annotations

import io
import json
import time
from collections import defaultdict
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

import deldist
from deldist import storage
from deldist.config import StageConfig
from deldist.layout import RunLayout, progress_of, run_file_of

FRAMES_SCHEMA = pa.schema([("id", pa.string()), ("jpeg", pa.binary()), ("width", pa.int32()),
                           ("height", pa.int32())])
FRAME_ERRORS_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("error_type", pa.string()),
                                 ("message", pa.string())])


class Config(StageConfig):
    """``deldist materialize`` settings."""

    output: str = Field(description="run root URI")
    selection: str | None = Field(None, description="selection name (its retained ids); none = all embedded frames")
    embeddings: str | None = Field(None, description="default <output>/embeddings")
    frames: str | None = Field(None, description="store URI; default <output>/frames/<selection or all>")
    size: int = Field(256, ge=16, description="short side resize, then center crop to size x size")
    jpeg_quality: int = Field(90, ge=1, le=100)
    frames_per_task: int = Field(256, ge=1, description="wanted frames of one video per decode task")
    images_per_task: int = Field(64, ge=1)
    decode_cpus: float = Field(0.5, gt=0)
    decode_threads: int = Field(1, ge=0, description="FFmpeg threads per task (0 = FFmpeg's choice)")
    rows_per_part: int = Field(1024, ge=1)


# ------------------------------------------------------------------ planning (pure)


def plan_tasks(rows: list[dict[str, Any]], frames_per_task: int, images_per_task: int) -> list[dict[str, Any]]:
    """Group wanted frames into decode tasks.

    rows: dicts with id, source (full URI), frame_index. Returns tasks ``{"kind": "video",
    "source": uri, "frames": [[index, id], ...]}`` (sorted by index, at most
    ``frames_per_task``) and ``{"kind": "image", "frames": [[source, id], ...]}`` packs.
    """
    from deldist.io import media_kind

    by_source: dict[str, list[tuple[int, str]]] = defaultdict(list)
    images: list[list[str]] = []
    for r in rows:
        if media_kind(r["source"]) == "video":
            by_source[r["source"]].append((int(r["frame_index"]), r["id"]))
        else:
            images.append([r["source"], r["id"]])
    tasks: list[dict[str, Any]] = []
    for source in sorted(by_source):
        frames = sorted(by_source[source])
        for i in range(0, len(frames), frames_per_task):
            tasks.append({"kind": "video", "source": source, "frames": [list(f) for f in frames[i:i + frames_per_task]]})
    images.sort()
    for i in range(0, len(images), images_per_task):
        tasks.append({"kind": "image", "frames": images[i:i + images_per_task]})
    return tasks


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """RGB uint8 (H, W, 3) -> JPEG bytes (4:2:0, optimised Huffman tables)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


# ------------------------------------------------------------------ Ray Data task


def _decoded_frames(task: dict[str, Any], cfg: Config, errors: list[dict[str, Any]]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (id, rgb (size, size, 3)) for the task's frames; append an error row per id missed."""
    from deldist.frames import Sampling, decode_image, decode_video
    from deldist.io import open_source

    if task["kind"] == "image":
        for source, frame_id in task["frames"]:
            try:
                yield frame_id, decode_image(storage.read_bytes(source), cfg.size)
            except Exception as e:  # one bad image is an error row, never a failed job
                errors.append({"id": frame_id, "source": source, "error_type": type(e).__name__, "message": str(e)})
        return
    source = task["source"]
    wanted = {int(index): frame_id for index, frame_id in task["frames"]}
    done: set[int] = set()
    error_type, message = "FrameNotFound", "frame index not in the decoded stream"
    try:
        for index, _, rgb in decode_video(open_source(source), cfg.size, Sampling(), start_frame=min(wanted),
                                          threads=cfg.decode_threads, only=frozenset(wanted)):
            done.add(index)
            yield wanted[index], rgb
    except Exception as e:  # decoding stopped: the frames not yielded yet become errors
        error_type, message = type(e).__name__, str(e)
    for index in sorted(set(wanted) - done):
        errors.append({"id": wanted[index], "source": source, "error_type": error_type, "message": message})


def materialize_task(batch: dict[str, np.ndarray], config: Config, data_dir: str, errors_dir: str) -> dict[str, np.ndarray]:
    """One decode task (a JSON spec per row): decode, JPEG-encode, write parts; returns counts."""
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    written = 0

    def flush() -> None:
        nonlocal rows, written
        if rows:
            storage.write_table(pa.Table.from_pylist(rows, schema=FRAMES_SCHEMA),
                                storage.join(data_dir, storage.new_part_name()))
            written += len(rows)
            rows = []

    for spec in batch["task"]:
        for frame_id, rgb in _decoded_frames(json.loads(spec), config, errors):
            rows.append({"id": frame_id, "jpeg": encode_jpeg(rgb, config.jpeg_quality),
                         "width": int(rgb.shape[1]), "height": int(rgb.shape[0])})
            if len(rows) >= config.rows_per_part:
                flush()
    flush()
    if errors:
        storage.write_table(pa.Table.from_pylist(errors, schema=FRAME_ERRORS_SCHEMA),
                            storage.join(errors_dir, storage.new_part_name("errors")))
    return {"written": np.array([written]), "errors": np.array([len(errors)])}


# ------------------------------------------------------------------ driver


def _read_files(uri: str, columns: list[str], schema: pa.Schema) -> pa.Table:
    paths = [p for p in storage.list_files(uri) if p.endswith(".parquet")]
    if not paths:
        return schema.empty_table().select(columns)
    fs, _ = storage.resolve(uri)
    return pq.ParquetDataset(paths, filesystem=fs).read(columns=columns)


def wanted_frames(config: Config) -> pa.Table:
    """(id, source, frame_index) of the frames to store: the selection's retained ids, or all."""
    embeddings = RunLayout.of(config).embeddings
    table = storage.read_published(embeddings, columns=["id", "source", "frame_index"])
    if config.selection:
        retained = storage.read_published(RunLayout(config.output).selection_table(config.selection, "retained"),
                                          columns=["id"]).column("id")
        table = table.filter(pc.is_in(table.column("id"), value_set=retained.combine_chunks()))
        if table.num_rows != len(retained):
            raise ValueError(f"selection {config.selection!r} lists {len(retained)} ids, "
                             f"{table.num_rows} of them are in {embeddings}")
    return table


def run(config: Config) -> dict[str, Any]:
    """Store the wanted frames not stored yet; publish the frame store when all are done."""
    import ray

    from deldist.runtime import init_ray

    started = time.time()
    init_ray()
    root = config.frames or RunLayout(config.output).frames(config.selection)
    data_dir, errors_dir = storage.join(root, "data"), storage.join(progress_of(root), "errors")
    run_file = run_file_of(root)
    fingerprint = {"size": config.size, "jpeg_quality": config.jpeg_quality, "selection": config.selection}
    if storage.exists(run_file):
        previous = storage.read_json(run_file)
        if previous != fingerprint:
            raise ValueError(f"{root} holds frames stored with {previous}; use another `frames` URI for {fingerprint}")
    else:
        storage.write_json(run_file, fingerprint)

    wanted = wanted_frames(config)
    present = set(_read_files(data_dir, ["id"], FRAMES_SCHEMA).column("id").to_pylist())
    failed = set(_read_files(errors_dir, ["id"], FRAME_ERRORS_SCHEMA).column("id").to_pylist())
    pending = [r for r in wanted.to_pylist() if r["id"] not in present and r["id"] not in failed]
    written = 0
    if pending:
        tasks = plan_tasks(pending, config.frames_per_task, config.images_per_task)
        ds = ray.data.from_items([{"task": json.dumps(t)} for t in tasks], override_num_blocks=len(tasks))
        ds = ds.map_batches(materialize_task, batch_size=1, num_cpus=config.decode_cpus,
                            fn_kwargs={"config": config, "data_dir": data_dir, "errors_dir": errors_dir})
        written = int(sum(int(b["written"].sum()) for b in ds.iter_batches(batch_size=None, batch_format="numpy")))
    duplicates = storage.drop_repeated_ids(data_dir) if written else 0

    stored = _read_files(data_dir, ["id"], FRAMES_SCHEMA).column("id")
    errors = _read_files(errors_dir, ["id", "source", "error_type", "message"], FRAME_ERRORS_SCHEMA)
    missing = set(wanted.column("id").to_pylist()) - set(stored.to_pylist()) - set(errors.column("id").to_pylist())
    summary: dict[str, Any] = {"frames": root, "wanted": wanted.num_rows, "stored": len(stored),
                               "errors": errors.num_rows, "written_this_run": written,
                               "duplicates_dropped": duplicates, "seconds": round(time.time() - started, 1)}
    if missing:  # a task died without writing its error part: a rerun retries those ids
        summary.update(published=False, missing=len(missing))
        return summary
    parts = [p for p in storage.list_files(data_dir) if p.endswith(".parquet")]
    fs, _ = storage.resolve(data_dir)
    nbytes = sum(fs.get_file_info(p).size for p in parts)
    storage.publish(root, parts, {**fingerprint, "rows": len(stored), "errors": errors.num_rows,
                                  "bytes": nbytes, "deldist_version": deldist.__version__,
                                  "error_examples": errors.slice(0, 20).to_pylist(),
                                  "schema": storage.schema_hex(FRAMES_SCHEMA)})
    summary.update(published=True, bytes=nbytes, frames_per_s=round(written / max(time.time() - started, 1e-9), 1))
    return summary
