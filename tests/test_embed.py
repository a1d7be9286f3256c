"""End to end: sample videos and images on a moto S3 server -> Ray Data embed stage -> Parquet.

Uses a random-initialised ViT-Ti (``random_init: true``, recorded in the manifest): the test
checks plumbing, ids, schema and determinism, not embedding quality.
"""

from __future__ import annotations

import shutil
import struct

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deldist import storage
from deldist.config import load_config
from deldist.embed import Config, run
from deldist.schema import embeddings_schema
from deldist.shards import embedding_matrix, table_matrix

STRIDE = 3
BAD = {"bad/zero.mp4": "zero-byte", "bad/truncated.mp4": "truncated", "bad/text.jpg": "text",
       "bad/noframes.mp4": "no decodable frames"}


def _no_frames_video(good: bytes) -> bytes:
    """A valid MP4 container whose every H.264 packet is zeroed: header fine, no frame decodes."""
    data = bytearray(good)
    at = data.find(b"mdat")
    size = struct.unpack(">I", data[at - 4 : at])[0]
    data[at + 4 : at - 4 + size] = bytes(size - 8)
    return bytes(data)


@pytest.fixture(scope="module")
def s3_input(tiny_sample, s3_bucket, tmp_path_factory):
    """Upload the tiny videos (under their center dirs), Kvasir images, one byte-identical image
    copy and the bad inputs; returns (input URI, ground truth table, image names)."""
    local = tmp_path_factory.mktemp("input")
    shutil.copytree(tiny_sample / "videos", local, dirs_exist_ok=True)
    images = sorted(p.name for p in (tiny_sample / "kvasir" / "images").iterdir())
    shutil.copytree(tiny_sample / "kvasir" / "images", local / "kvasir")
    (local / "dups").mkdir()
    shutil.copy(tiny_sample / "kvasir" / "images" / images[0], local / "dups" / "copy_of_first.jpg")
    good = next((tiny_sample / "videos").rglob("*.mp4")).read_bytes()
    (local / "bad").mkdir()
    (local / "bad" / "zero.mp4").write_bytes(b"")
    (local / "bad" / "truncated.mp4").write_bytes(good[: len(good) // 3])
    (local / "bad" / "text.jpg").write_text("this is not a jpeg")
    (local / "bad" / "noframes.mp4").write_bytes(_no_frames_video(good))
    (local / "notes.txt").write_text("not media")
    s3 = boto3.client("s3")
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        s3.upload_file(str(path), s3_bucket, f"e2e/input/{path.relative_to(local)}")
    truth = pq.read_table(tiny_sample / "ground_truth.parquet")
    return f"s3://{s3_bucket}/e2e/input", truth, images


def _config(input_uri: str, output: str, **extra) -> Config:
    overrides = [f"input={input_uri}", f"output={output}", "model=vit_tiny_patch16_224", "random_init=true",
                 f"stride={STRIDE}", "segment_seconds=2", "batch_size=16", "actors_max=2",
                 "rows_per_part=48", *[f"{k}={v}" for k, v in extra.items()]]
    return load_config(Config, None, overrides)


def _expected_ids(truth: pa.Table, images: list[str]) -> set[str]:
    rows = truth.select(["source_key", "frame_index"]).to_pylist()
    ids = {f"{r['source_key']}#{r['frame_index']}" for r in rows if r["frame_index"] % STRIDE == 0}
    return ids | {f"kvasir/{n}#0" for n in images} | {"dups/copy_of_first.jpg#0"}


@pytest.fixture(scope="module")
def first_run(ray_session, s3_input, s3_bucket):
    input_uri, truth, images = s3_input
    output = f"s3://{s3_bucket}/e2e/run1"
    summary = run(_config(input_uri, output))
    return output, summary


def test_ids_schema_and_norms(first_run, s3_input):
    output, summary = first_run
    _, truth, images = s3_input
    table = storage.read_published(storage.join(output, "embeddings"))
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an id appears twice"
    expected = _expected_ids(truth, images)
    assert set(ids) == expected  # nothing from the bad inputs, every good frame present
    # frames per video = ceil(n_frames / stride), from the generator's ground truth
    per_video = {}
    for r in truth.select(["source_key"]).to_pylist():
        per_video[r["source_key"]] = per_video.get(r["source_key"], 0) + 1
    for key, n_frames in per_video.items():
        assert sum(i.startswith(key + "#") for i in ids) == -(-n_frames // STRIDE)
    assert table.schema.equals(embeddings_schema(192))
    emb = embedding_matrix(table.column("embedding"))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    rows = {r["id"]: r for r in table.select(["id", "source", "dataset", "timestamp_s", "frame_index"]).to_pylist()}
    some_video = next(iter(per_video))
    r = rows[f"{some_video}#{STRIDE}"]
    assert r["source"].endswith(f"/e2e/input/{some_video}") and r["source"].startswith("s3://")
    assert r["dataset"] == some_video.split("/")[0] and r["timestamp_s"] == pytest.approx(STRIDE / 15.0)
    assert rows["dups/copy_of_first.jpg#0"]["dataset"] == "dups"
    manifest = storage.read_manifest(storage.join(output, "embeddings"))
    assert manifest["random_init"] is True and manifest["dim"] == 192 and manifest["rows"] == len(ids)
    assert manifest["model"] == "vit_tiny_patch16_224" and manifest["sampling"]["stride"] == STRIDE
    assert manifest["frames_decoded_per_frame_kept"] >= 1.0
    assert summary["published"] and summary["frames"] == len(ids)


def test_bad_inputs_in_errors_table(first_run, s3_input):
    output, _ = first_run
    errors = storage.read_published(storage.join(output, "errors")).to_pylist()
    by_source = {e["source"].split("/e2e/input/")[1]: e for e in errors}
    assert set(by_source) == set(BAD) | {"notes.txt"}
    for key in BAD:
        assert by_source[key]["message"] and by_source[key]["error_type"]
    assert by_source["notes.txt"]["error_type"] == "UnsupportedType"
    assert by_source["bad/noframes.mp4"]["stage"] == "decode"


def test_identical_frames_identical_embeddings(first_run, s3_input):
    output, _ = first_run
    _, _, images = s3_input
    table = storage.read_published(storage.join(output, "embeddings"), columns=["id", "embedding"])
    emb = dict(zip(table.column("id").to_pylist(), embedding_matrix(table.column("embedding")).astype(np.float64)))
    a, b = emb[f"kvasir/{images[0]}#0"], emb["dups/copy_of_first.jpg#0"]
    np.testing.assert_allclose(a, b, atol=1e-5)
    # clearly different content: a colour-bar (invalid) frame vs a mucosa frame of a video
    others = [v for k, v in emb.items() if k != f"kvasir/{images[0]}#0" and k != "dups/copy_of_first.jpg#0"]
    sims = np.array([a @ o for o in others])
    assert a @ b > 0.99999
    assert sims.max() < 0.9999, "a different frame has the same embedding"


def test_rerun_is_a_no_op(first_run, s3_input):
    output, _ = first_run
    input_uri, _, _ = s3_input
    before = storage.read_manifest(storage.join(output, "embeddings"))
    summary = run(_config(input_uri, output))
    after = storage.read_manifest(storage.join(output, "embeddings"))
    assert summary["frames_written_this_run"] == 0
    assert after["files"] == before["files"] and after["rows"] == before["rows"]


def test_other_settings_into_same_output_refused(first_run, s3_input):
    output, _ = first_run
    input_uri, _, _ = s3_input
    with pytest.raises(ValueError, match="other settings"):
        run(_config(input_uri, output, pooling="mean"))


def test_float16_embeddings_halve_the_vectors_and_match_float32(first_run, s3_input, s3_bucket):
    """``embedding_dtype: float16``: 2 D bytes per row, the float32 run's vectors within float16
    rounding, recorded in the manifest and the run file (a float32 rerun into it is refused)."""
    output, _ = first_run
    input_uri, _, _ = s3_input
    half = f"s3://{s3_bucket}/e2e/float16"
    run(_config(f"{input_uri}/kvasir", half, embedding_dtype="float16"))
    manifest = storage.read_manifest(storage.join(half, "embeddings"))
    assert manifest["embedding_dtype"] == "float16" and manifest["dim"] == 192
    table = storage.read_published(storage.join(half, "embeddings"), ["source", "embedding"])
    assert table.schema.field("embedding").type == pa.binary(2 * 192)
    assert table.schema.field("embedding").metadata == {b"dtype": b"float16"}  # 2 D bytes could be float32 x D / 2
    full = storage.read_published(storage.join(output, "embeddings"), ["source", "embedding"])
    full_by_source = dict(zip(full.column("source").to_pylist(), embedding_matrix(full.column("embedding"), 192)))
    x16 = table_matrix(table, 192)
    assert x16.dtype == np.float32 and len(x16) == len(full_by_source.keys() & set(table.column("source").to_pylist()))
    x32 = np.stack([full_by_source[s] for s in table.column("source").to_pylist()])
    assert np.abs(x16 - x32).max() <= 2.0**-11 + 1e-6  # float16's rounding of values in [-1, 1]
    with pytest.raises(ValueError, match="embedding_dtype"):
        run(_config(f"{input_uri}/kvasir", half))


def test_resume_after_interruption(first_run, s3_input, s3_bucket):
    """Interrupt after some sources, lose a written part (as a crash between a decode task's
    progress record and the write of its frames would), rerun: same ids, none twice."""
    input_uri, truth, images = s3_input
    output = f"s3://{s3_bucket}/e2e/run2"
    partial = run(_config(input_uri, output, max_sources=7))  # 4 bad files sort first
    assert partial["published"] is False and partial["pending_sources"] > 0
    assert not storage.is_published(storage.join(output, "embeddings"))
    data = storage.join(output, "embeddings", "data")
    parts = storage.list_files(data)
    assert len(parts) >= 2
    fs, _ = storage.resolve(data)
    lost = pq.read_table(parts[0], columns=["id"], filesystem=fs).column("id").to_pylist()
    fs.delete_file(parts[0])
    resumed = run(_config(input_uri, output))
    assert resumed["published"] and resumed["frames_written_this_run"] >= len(lost)
    table = storage.read_published(storage.join(output, "embeddings"), columns=["id", "embedding"])
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == _expected_ids(truth, images)
    # same frames, same embeddings as the uninterrupted run
    ref = storage.read_published(storage.join(first_run[0], "embeddings"), columns=["id", "embedding"])
    ref_emb = dict(zip(ref.column("id").to_pylist(), embedding_matrix(ref.column("embedding"))))
    for i, e in zip(ids, embedding_matrix(table.column("embedding"))):
        np.testing.assert_allclose(e, ref_emb[i], atol=1e-4)


def test_frames_present_matches_a_dict_of_frame_lists():
    """embed's resume state from the parts' id columns, part by part: each source's frame
    indices, sorted (keys may hold '#'; an empty part changes nothing)."""
    from collections import defaultdict

    from deldist.embed_units import FramesPresent
    from deldist.ids import split_id

    rng = np.random.default_rng(4)
    keys = ["a/x.mp4", "b#c.mp4", "img.jpg", "v2/site/y.mp4"]
    ids = [f"{keys[k]}#{i}" for k, i in zip(rng.integers(0, 4, 3000), rng.permutation(3000))]
    chunks = [pa.array(ids[:1000]), pa.array([], pa.string()), pa.chunked_array([ids[1000:2500]]), pa.array(ids[2500:])]
    present = FramesPresent.from_ids(chunks)
    expected = defaultdict(list)
    for i in ids:
        key, index = split_id(i)
        expected[key].append(index)
    assert set(present.slots) == set(expected)
    for key, frames in expected.items():
        assert present.of(key).tolist() == sorted(frames)
    assert present.of("missing.mp4").tolist() == [] and len(present.index) == 3000
