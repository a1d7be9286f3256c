"""Thumbnails of a bounded set of frames for the HTML report: from a published frame store
when one holds the frame, else decoded from the source video (one seek per run of nearby
frames) or image. A frame that cannot be read gets a reason instead of a thumbnail."""

from __future__ import annotations

import concurrent.futures
import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deldist import storage
from deldist.layout import RunLayout

# wanted frames of one video further apart than this are decoded in separate seeks, so a
# gallery spread over an hour of video costs a few GOPs per frame, not the whole stream
_SEEK_GAP_FRAMES = 250


def decode_chunks(rows: list[dict[str, Any]], max_gap: int = _SEEK_GAP_FRAMES) -> list[dict[str, Any]]:
    """Group frames (dicts with id, source, frame_index) into decode jobs: per video, runs of
    wanted indices at most ``max_gap`` frames apart (one seek each); one job per image."""
    from deldist.io import media_kind

    by_video: dict[str, list[tuple[int, str]]] = {}
    jobs: list[dict[str, Any]] = []
    for r in rows:
        if media_kind(r["source"]) == "video":
            by_video.setdefault(r["source"], []).append((int(r["frame_index"]), r["id"]))
        else:
            jobs.append({"kind": "image", "source": r["source"], "frames": [(0, r["id"])]})
    for source in sorted(by_video):
        frames = sorted(by_video[source])
        chunk = [frames[0]]
        for f in frames[1:]:
            if f[0] - chunk[-1][0] > max_gap:
                jobs.append({"kind": "video", "source": source, "frames": chunk})
                chunk = []
            chunk.append(f)
        jobs.append({"kind": "video", "source": source, "frames": chunk})
    return jobs


def _decode_job(job: dict[str, Any], size: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Decode one job -> (id -> rgb (size, size, 3), id -> why it failed). Never raises: a
    frame that cannot be read becomes a placeholder, not a failed report."""
    from deldist.frames import Sampling, decode_image, decode_video
    from deldist.io import open_source

    images: dict[str, np.ndarray] = {}
    try:
        if job["kind"] == "image":
            frame_id = job["frames"][0][1]
            images[frame_id] = decode_image(storage.read_bytes(job["source"]), size)
        else:
            wanted = {index: frame_id for index, frame_id in job["frames"]}
            source = open_source(job["source"])  # a path, or an open object-store file
            try:
                for index, _, rgb in decode_video(source, size, Sampling(), start_frame=min(wanted), threads=1,
                                                  only=frozenset(wanted)):
                    images[wanted[index]] = rgb
            finally:
                if not isinstance(source, str):
                    source.close()
    except Exception as e:  # noqa: BLE001 - any unreadable source is a placeholder
        reason = f"{type(e).__name__}: {e}"
    else:
        reason = "frame not in the decoded stream"
    return images, {frame_id: reason[:200] for _, frame_id in job["frames"] if frame_id not in images}


def read_rows(dir_uri: str, ids: list[str], columns: list[str]) -> pa.Table:
    """Rows of a published table whose id is in ``ids`` (only the listed columns present)."""
    fs, paths = storage.published_paths(dir_uri)
    if not paths or not ids:
        return pa.table({"id": pa.array([], pa.string())})
    dataset = pq.ParquetDataset(paths, filesystem=fs, filters=[("id", "in", ids)])
    present = [c for c in columns if c in dataset.schema.names]
    return dataset.read(columns=present)


def _thumbnail_jpeg(image: np.ndarray | bytes, size: int) -> bytes:
    """RGB array or encoded image -> square JPEG ``size`` px (center crop)."""
    from PIL import Image, ImageOps

    from deldist.materialize import encode_jpeg

    if isinstance(image, bytes):
        picture = ImageOps.fit(Image.open(io.BytesIO(image)).convert("RGB"), (size, size))
        image = np.asarray(picture)
    elif image.shape[0] != size or image.shape[1] != size:
        image = np.asarray(ImageOps.fit(Image.fromarray(image), (size, size)))
    return encode_jpeg(image, quality=85)


def frame_stores(output: str, selections: list[str]) -> list[str]:
    """Published frame stores of the run: the full one (``frames/all``) and each selection's."""
    layout = RunLayout(output)
    candidates = [layout.frames(), *(layout.frames(s) for s in selections)]
    return [s for s in dict.fromkeys(candidates) if storage.is_published(s)]


def make_thumbnails(ids: list[str], locations: pa.Table, thumbs_dir: str, size: int,
                    stores: list[str], workers: int = 2) -> tuple[dict[str, str], dict[str, str], dict[str, int]]:
    """Write ``thumbs_dir/<n>.jpg`` for ``ids`` (n = position in ``ids``).

    Frames come from the first published store in ``stores`` that holds them, the rest are
    decoded from their source (``locations``: id, source, frame_index). Returns (id -> file
    name, id -> why there is no thumbnail, counts by origin).
    """
    encoded: dict[str, bytes] = {}
    for store in stores:
        pending = [i for i in ids if i not in encoded]
        if not pending:
            break
        table = read_rows(store, pending, ["id", "jpeg"])
        if table.num_rows:
            encoded.update(zip(table.column("id").to_pylist(), table.column("jpeg").to_pylist()))
    located = {r["id"]: r for r in locations.to_pylist()}
    missing = {i: "not in embeddings/" for i in ids if i not in encoded and i not in located}
    to_decode = [located[i] for i in ids if i not in encoded and i in located]
    decoded: dict[str, np.ndarray] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # PyAV and Pillow release the GIL while decoding: threads overlap the sources
        for images, failed in pool.map(lambda job: _decode_job(job, size), decode_chunks(to_decode)):
            decoded.update(images)
            missing.update(failed)

        def write(item: tuple[int, str]) -> tuple[str, str | None, str | None]:
            n, frame_id = item
            name = f"{n}.jpg"
            try:
                source = encoded[frame_id] if frame_id in encoded else decoded[frame_id]
                storage.write_bytes(storage.join(thumbs_dir, name), _thumbnail_jpeg(source, size))
            except Exception as e:  # noqa: BLE001 - a corrupt stored JPEG is a placeholder too
                return frame_id, None, f"{type(e).__name__}: {e}"[:200]
            return frame_id, name, None

        written: dict[str, str] = {}
        wanted = [(n, i) for n, i in enumerate(ids) if i in encoded or i in decoded]
        for frame_id, name, error in pool.map(write, wanted):
            if name:
                written[frame_id] = name
            else:
                missing[frame_id] = error or "not written"
    stats = {"shown": len(ids), "from_store": sum(1 for i in written if i in encoded),
             "decoded": sum(1 for i in written if i not in encoded), "missing": len(missing)}
    return written, missing, stats
