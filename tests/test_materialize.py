"""Frame store: a selection's frames decoded once into JPEG Parquet parts; errors; resume."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from deldist import storage
from deldist.frames import Sampling, decode_image, decode_video
from deldist.materialize import Config, plan_tasks, run

SIZE = 64


def write_fake_embeddings(root: str, sample, stride: int) -> list[dict]:
    """A published ``embeddings/`` with the columns materialize reads (id, source, frame_index)
    for every ``stride``-th video frame and every Kvasir image, as the embed stage names them."""
    truth = pq.read_table(sample / "ground_truth.parquet").to_pylist()
    rows = [{"id": f"{r['source_key']}#{r['frame_index']}", "source": str(sample / "videos" / r["source_key"]),
             "frame_index": r["frame_index"]} for r in truth if r["frame_index"] % stride == 0]
    rows += [{"id": f"kvasir/{p.name}#0", "source": str(p), "frame_index": 0}
             for p in sorted((sample / "kvasir" / "images").iterdir())]
    write_published(storage.join(root, "embeddings"), pa.Table.from_pylist(rows))
    return rows


def write_published(dir_uri: str, table: pa.Table) -> None:
    part = storage.join(dir_uri, "part-0.parquet")
    storage.write_table(table, part)
    storage.publish(dir_uri, [storage.resolve(part)[1]], {"rows": table.num_rows})


def write_selection(root: str, name: str, ids: list[str], method: str, input_count: int) -> None:
    """A selection as the select stage publishes it (retained + summary.json)."""
    write_published(storage.join(root, "selections", name, "retained"), pa.table({"id": pa.array(ids, pa.string())}))
    storage.write_json(storage.join(root, "selections", name, "summary.json"),
                       {"name": name, "method": method, "kept_count": len(ids), "input_count": input_count,
                        "ratio": len(ids) / input_count})


def test_plan_tasks_groups_by_source_and_chunks():
    rows = [{"id": f"v.mp4#{i}", "source": "/d/v.mp4", "frame_index": i} for i in (9, 1, 5, 3)]
    rows += [{"id": f"i{i}.jpg#0", "source": f"/d/i{i}.jpg", "frame_index": 0} for i in range(3)]
    tasks = plan_tasks(rows, frames_per_task=3, images_per_task=2)
    assert [t["kind"] for t in tasks] == ["video", "video", "image", "image"]
    assert tasks[0]["frames"] == [[1, "v.mp4#1"], [3, "v.mp4#3"], [5, "v.mp4#5"]]
    assert tasks[1]["frames"] == [[9, "v.mp4#9"]]
    assert [len(t["frames"]) for t in tasks[2:]] == [2, 1]


def test_materialize_selection_errors_and_resume(ray_session, tiny_sample, tmp_path):
    root = str(tmp_path / "run")
    rows = write_fake_embeddings(root, tiny_sample, stride=3)
    # a source that vanished since embedding: its frames become error rows, not a failed job
    ghost = [{"id": f"gone/x.mp4#{i}", "source": str(tmp_path / "gone.mp4"), "frame_index": i} for i in (0, 3)]
    write_published(storage.join(root, "embeddings"), pa.Table.from_pylist(rows + ghost))
    wanted = [r["id"] for r in rows[::2]] + [g["id"] for g in ghost]
    write_selection(root, "half", wanted, "meddel", len(rows) + 2)

    config = Config(output=root, selection="half", size=SIZE, frames_per_task=8, images_per_task=4, rows_per_part=16)
    summary = run(config)
    store = storage.join(root, "frames", "half")
    assert summary["published"] and summary["errors"] == 2 and summary["stored"] == len(wanted) - 2
    table = storage.read_published(store)
    assert table.schema.names == ["id", "jpeg", "width", "height"]
    assert sorted(table.column("id").to_pylist()) == sorted(wanted[:-2])
    assert set(table.column("width").to_pylist()) == {SIZE} == set(table.column("height").to_pylist())
    meta = storage.read_manifest(store)
    assert meta["errors"] == 2 and {e["id"] for e in meta["error_examples"]} == {"gone/x.mp4#0", "gone/x.mp4#3"}

    # the stored pixels are the decoder's frames (JPEG-close) for a video frame and an image
    by_id = dict(zip(table.column("id").to_pylist(), table.column("jpeg").to_pylist()))
    video_row = next(r for r in rows[::2] if r["frame_index"] > 20)
    reference = dict((i, rgb) for i, _, rgb in decode_video(video_row["source"], SIZE, Sampling(),
                                                            only=frozenset([video_row["frame_index"]])))
    image_row = next(r for r in rows[::2] if r["id"].startswith("kvasir/"))
    with open(image_row["source"], "rb") as f:
        image_reference = decode_image(f.read(), SIZE)
    for frame_id, expected in ((video_row["id"], reference[video_row["frame_index"]]),
                               (image_row["id"], image_reference)):
        stored = np.asarray(Image.open(io.BytesIO(by_id[frame_id])).convert("RGB")).astype(np.float64)
        mse = np.mean((stored - expected) ** 2)
        assert 10 * np.log10(255**2 / mse) > 28, frame_id

    # resume: lose one part (a task that died) -> only its ids are decoded again
    fs, _ = storage.resolve(store)
    parts = storage.read_manifest(store)["files"]
    lost = storage.join(store, parts[0])
    lost_rows = pq.read_metadata(lost).num_rows
    fs.delete_file(storage.resolve(lost)[1])
    again = run(config)
    assert again["published"] and again["written_this_run"] == lost_rows
    assert sorted(storage.read_published(store, ["id"]).column("id").to_pylist()) == sorted(wanted[:-2])

    with pytest.raises(ValueError, match="other"):  # the same store with other settings
        run(Config(output=root, selection="half", size=SIZE + 16))
