"""A corpus of bad and odd inputs, generated here (no committed binaries), through the whole
chain (embed -> cluster -> dedup -> select, ``deldist curate``) on the session's Ray cluster.

Every file ends as frames in ``embeddings/`` or as a row in ``errors/`` naming it and the
cause; no id is lost or doubled (``deldist verify`` on the run root); nothing is written
outside the run root. The encoder is a random-initialised ViT-Ti (plumbing, not quality).
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from deldist import cli, curate, embed, storage, verify
from deldist.config import load_config
from deldist.ids import split_id
from deldist.layout import RunLayout
from invariants import assert_nothing_lost

FPS = 5  # embed's sampling: 3 frames of every 15


def write_video(path: Path, n: int, fps: int = 15, codec: str = "libx264", fmt: str | None = None,
                options: dict | None = None, pts_ms: list[int] | None = None) -> None:
    """n frames of 96 x 64 whose grey level encodes the index; ``pts_ms`` for a variable rate."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=fmt, options=options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        if pts_ms is not None:
            stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        for i in range(n):
            a = np.full((64, 96, 3), (i * 7) % 200 + 20, np.uint8)
            a[:32, :32] = 255 - a[0, 0]
            frame = av.VideoFrame.from_ndarray(a, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def audio_only(path: Path) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height (a decompression bomb's header): a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def image_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def texture(w: int = 80, h: int = 60, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def build_corpus(root: Path) -> dict[str, tuple[str, object]]:
    """Write the corpus under ``root``; returns key -> expected outcome (>= 25 kinds):
    ("frames", n) embedded with n frames (None: checked elsewhere), ("error", cause) a row in
    errors/ whose type or message contains ``cause``, ("partial", cause) both."""
    expect: dict[str, tuple[str, object]] = {}

    def put(key: str, data: bytes, outcome: tuple[str, object]) -> None:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        expect[key] = outcome

    good = root / "good" / "clip.mp4"
    write_video(good, 45)  # 3 s at 15 fps -> 15 frames at 5 fps
    expect["good/clip.mp4"] = ("frames", 15)
    write_video(root / "good" / "clip.avi", 30, codec="mpeg4")  # AVI / MPEG-4 part 2
    expect["good/clip.avi"] = ("frames", 10)
    faststart = root / "tmp_faststart.mp4"
    write_video(faststart, 60, options={"movflags": "faststart"})
    whole = faststart.read_bytes()
    faststart.unlink()
    gaps = np.random.default_rng(0).integers(20, 150, size=40)
    write_video(root / "odd" / "variable_rate.mkv", 40, pts_ms=(np.cumsum(gaps) - gaps[0]).tolist())
    expect["odd/variable_rate.mkv"] = ("frames", None)  # checked separately: unique, ~duration x fps
    data = good.read_bytes()
    avi = (root / "good" / "clip.avi").read_bytes()

    # containers and streams that are broken
    put("bad/zero_bytes.mp4", b"", ("error", "cannot open"))
    put("bad/truncated.mp4", data[: len(data) // 3], ("error", "Decode"))
    put("bad/truncated.avi", avi[: len(avi) // 4], ("error", "Decode"))
    put("bad/breaks_midway.mp4", whole[: int(len(whole) * 0.6)], ("partial", "decoding stopped"))
    put("bad/text_named.mp4", b"this is not a video at all" * 10, ("error", "cannot open"))
    put("bad/video_named.jpg", data, ("error", "cannot decode image"))
    put("bad/corrupt.jpg", image_bytes(Image.fromarray(texture()), "JPEG")[:300], ("error", "cannot decode image"))
    put("bad/corrupt.png", image_bytes(Image.fromarray(texture()), "PNG")[:200], ("error", "cannot decode image"))
    put("bad/bomb.png", png_header_only(30000, 30000), ("error", "decompression bomb"))
    audio_only(root / "bad" / "audio_only.mp4")
    expect["bad/audio_only.mp4"] = ("error", "no video stream")
    put("bad/subtitles_only.mkv", b"WEBVTT\n\n00:00.000 --> 00:01.000\nhello\n", ("error", ""))
    put("notes.txt", b"not media", ("error", "not a video or image extension"))

    # images in every mode Pillow hands us
    rgb = texture()
    put("images/jpeg_named.png", image_bytes(Image.fromarray(rgb), "JPEG"), ("frames", 1))
    put("images/sixteen_bit.png", image_bytes(Image.fromarray((rgb[..., 0].astype(np.uint16) * 250)), "PNG"),
        ("frames", 1))
    put("images/grayscale.png", image_bytes(Image.fromarray(rgb[..., 1]), "PNG"), ("frames", 1))
    put("images/rgba.png", image_bytes(Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA"), "PNG"), ("frames", 1))
    put("images/cmyk.jpg", image_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG"), ("frames", 1))
    put("images/palette.png", image_bytes(Image.fromarray(rgb).convert("P"), "PNG"), ("frames", 1))
    put("images/one_pixel.png", image_bytes(Image.fromarray(rgb[:1, :1]), "PNG"), ("frames", 1))
    put("images/tiny.bmp", image_bytes(Image.fromarray(texture(7, 5, 1)), "BMP"), ("frames", 1))

    # keys that stress the id format and paths
    put("odd names/with space.png", image_bytes(Image.fromarray(texture(seed=2)), "PNG"), ("frames", 1))
    put("odd names/内視鏡_ünïcode.png", image_bytes(Image.fromarray(texture(seed=3)), "PNG"), ("frames", 1))
    put("odd names/frame#12.png", image_bytes(Image.fromarray(texture(seed=4)), "PNG"), ("frames", 1))
    put("odd names/a..b.png", image_bytes(Image.fromarray(texture(seed=5)), "PNG"), ("frames", 1))
    put("odd names/<script>alert(1)</script>.png", image_bytes(Image.fromarray(texture(seed=6)), "PNG"),
        ("frames", 1))
    put("looks_like_a_video.mp4/inside.png", image_bytes(Image.fromarray(texture(seed=7)), "PNG"), ("frames", 1))

    # links: a loop back to the root (entered once), a dangling one (reported, not lost)
    os.symlink("..", root / "odd" / "loop_to_root")
    os.symlink(str(root / "nowhere.mp4"), root / "odd" / "dangling.mp4")
    expect["odd/dangling.mp4"] = ("error", "No such file")
    return expect


def curate_config(corpus: Path, root: Path, html: bool) -> curate.Config:
    """The bad-input run's curate settings (the rerun test repeats them exactly)."""
    return curate.Config(
        input=str(corpus), output=str(root), html=html,
        embed={"model": "vit_tiny_patch16_224", "random_init": True, "fps": FPS, "batch_size": 16,
               "segment_seconds": 2},
        cluster={"k": 3, "max_iter": 10, "task_cpus": 0.5},
        dedup={"task_cpus": 0.5},
        select=[{"name": "meddel", "target_ratio": 0.6,
                 "deldist_rules": {"quality": {}, "outlier_quantile": 0.95, "near_copy": {}}},
                {"name": "random", "method": "random", "target_ratio": 0.5}])


@pytest.fixture(scope="module")
def bad_run(ray_session, tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_inputs")
    corpus = base / "corpus"
    corpus.mkdir()
    expect = build_corpus(corpus)
    root = base / "run"
    result = curate.run(curate_config(corpus, root, html=True))
    return corpus, root, expect, result


def _outcomes(root: Path) -> tuple[dict[str, int], dict[str, list[dict]]]:
    layout = RunLayout(str(root))
    frames: dict[str, int] = {}
    for frame_id in storage.read_published(layout.embeddings, columns=["id"]).column("id").to_pylist():
        key, _ = split_id(frame_id)
        frames[key] = frames.get(key, 0) + 1
    errors: dict[str, list[dict]] = {}
    for row in storage.read_published(layout.errors).to_pylist():
        errors.setdefault(storage.relative_key(row["source"], str(root.parent / "corpus")), []).append(row)
    return frames, errors


def test_every_input_is_embedded_or_reported_with_its_cause(bad_run):
    corpus, root, expect, _ = bad_run
    assert len(expect) >= 25
    frames, errors = _outcomes(root)
    for key, (outcome, detail) in expect.items():
        if outcome == "frames":
            assert key not in errors, (key, errors.get(key))
            if detail is not None:
                assert frames.get(key) == detail, (key, frames.get(key))
        elif outcome == "error":
            assert key in errors and key not in frames, (key, frames.get(key))
            text = " ".join(f"{e['error_type']} {e['message']}" for e in errors[key])
            assert str(detail).lower() in text.lower(), (key, text)
        else:  # partial: the frames before the break are kept, the break is reported
            assert 0 < frames.get(key, 0) < 20 and key in errors, (key, frames.get(key), errors.get(key))
            assert str(detail) in errors[key][0]["message"]
    # nothing else: no key embedded twice through the symlink loop, none invented
    assert set(frames) | set(errors) == set(expect)


def test_variable_rate_video_sampled_by_time(bad_run):
    _, root, _, _ = bad_run
    rows = storage.read_published(RunLayout(str(root)).embeddings, columns=["id", "timestamp_s"]).to_pylist()
    vfr = sorted(r["timestamp_s"] for r in rows if r["id"].startswith("odd/variable_rate.mkv#"))
    assert len(vfr) == len(set(vfr)) and abs(len(vfr) - vfr[-1] * FPS) <= 3


def test_the_run_root_verifies_and_no_id_is_lost(bad_run):
    _, root, _, result = bad_run
    report = verify.verify_run(str(root))
    assert report.ok, report.failures
    assert {"published", "sources", "embeddings", "clusters", "scores", "selections/meddel"} <= set(report.checked)
    ids = storage.read_published(RunLayout(str(root)).embeddings, columns=["id"]).column("id").to_pylist()
    for name in ("meddel", "random"):
        assert_nothing_lost(str(root / "selections" / name), ids)


def test_nothing_written_outside_the_run_root(bad_run):
    corpus, root, _, _ = bad_run
    outside = {p for p in root.parent.rglob("*") if not p.is_relative_to(root) and not p.is_relative_to(corpus)}
    assert outside == set()


def test_html_report_escapes_the_script_key(bad_run):
    _, _, _, result = bad_run
    page = Path(result["html_report"]).read_text()
    assert "<script>alert(1)</script>" not in page


def test_manifest_rows_missing_duplicate_and_outside_the_root(ray_session, bad_run, tmp_path):
    """A manifest naming a missing object, the same file twice, and a file by a ``..`` path:
    one source per file, the missing one reported, ids made from the path relative to the
    manifest's directory (never a path out of the run root)."""
    corpus, _, _, _ = bad_run
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(corpus / "images" / "rgba.png", elsewhere / "grayscale.png")  # same file name, other file
    manifest = tmp_path / "list.csv"
    manifest.write_text("uri,dataset\n"
                        f"{corpus}/good/clip.mp4,a\n"
                        f"{corpus}/good/clip.mp4,a\n"
                        f"{corpus}/gone/missing.mp4,a\n"
                        f"{corpus}/good/../images/grayscale.png,b\n"
                        f"{elsewhere}/grayscale.png,c\n")
    out = tmp_path / "run"
    summary = embed.run(load_config(embed.Config, None, [
        f"input={corpus}", f"manifest={manifest}", f"output={out}", "model=vit_tiny_patch16_224",
        "random_init=true", f"fps={FPS}", "batch_size=16"]))
    assert summary["published"] and summary["sources"] == 4
    errors = storage.read_published(str(out / "errors")).to_pylist()
    assert [e["source"].endswith("gone/missing.mp4") for e in errors] == [True]
    keys = {split_id(i)[0] for i in storage.read_published(str(out / "embeddings"), columns=["id"]).column("id")
            .to_pylist()}
    # outside the input root the key is the whole path: two files of one name stay two sources
    assert keys == {"good/clip.mp4", "images/grayscale.png", str(elsewhere / "grayscale.png").lstrip("/")}
    assert verify.verify_run(str(out)).ok
    assert {p for p in tmp_path.rglob("*") if not p.is_relative_to(out)} == {
        manifest, elsewhere, elsewhere / "grayscale.png"}


def test_object_deleted_between_listing_and_reading(ray_session, tmp_path, monkeypatch):
    """A fault, not a mock: the real listing runs, then a listed file is deleted before any
    task reads it. It becomes an error row naming it; the rest is embedded."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_video(corpus / "stays.mp4", 30)
    write_video(corpus / "deleted.mp4", 30)
    real_listing = embed.list_sources

    def list_then_delete(*args, **kwargs):
        listed = real_listing(*args, **kwargs)
        (corpus / "deleted.mp4").unlink()
        return listed

    monkeypatch.setattr(embed, "list_sources", list_then_delete)
    out = tmp_path / "run"
    embed.run(load_config(embed.Config, None, [f"input={corpus}", f"output={out}", "model=vit_tiny_patch16_224",
                                               "random_init=true", f"fps={FPS}"]))
    errors = storage.read_published(str(out / "errors")).to_pylist()
    assert len(errors) == 1 and errors[0]["source"].endswith("deleted.mp4")
    assert verify.verify_run(str(out)).ok


def test_weights_that_are_a_pickle_with_code_are_refused(tmp_path):
    """torch.load(weights_only=True): a pickle that would run code on load is an error, and
    the code does not run."""
    import pickle

    from deldist.encoders import build_encoder

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"model": Payload()}))
    with pytest.raises(Exception, match="(?i)weights|unpickl|load"):
        build_encoder("vit_tiny_patch16_224", weights=str(path))
    assert not marker.exists()


@pytest.mark.parametrize("override, key", [("fps=fast", "fps"), ("batch_sise=16", "batch_sise"),
                                           ("cluster.k=-3", "k")])
def test_config_errors_name_the_key(override, key, tmp_path):
    stage = "curate" if override.startswith("cluster.") else "embed"
    with pytest.raises(Exception) as raised:
        cli.main([stage, f"input={tmp_path}", f"output={tmp_path / 'out'}", override])
    assert key in str(raised.value)


def test_verify_finds_each_broken_invariant(bad_run, tmp_path):
    """Each tampering of a copy of the run root is named by verify; the CLI exits non-zero."""
    _, root, _, _ = bad_run

    def broken(name: str) -> Path:
        copy = tmp_path / name
        shutil.copytree(root, copy, symlinks=True)
        return copy

    def failures(copy: Path) -> str:
        report = verify.verify_run(str(copy))
        assert not report.ok
        return "\n".join(report.failures)

    def rewrite(table_dir: Path, change) -> None:
        part = next(p for p in table_dir.glob("*.parquet"))
        pq.write_table(change(pq.read_table(part)), part)

    # a removed row vanishes: an id is lost
    copy = broken("lost")
    rewrite(copy / "selections" / "meddel" / "removed", lambda t: t.slice(1))
    assert "missing from retained + removed" in failures(copy)
    # a retained id appears twice
    copy = broken("twice")
    rewrite(copy / "selections" / "meddel" / "retained", lambda t: pa.concat_tables([t, t.slice(0, 1)]))
    assert "more than once" in failures(copy)
    # a duplicate points at a removed frame
    copy = broken("pointer")
    removed_dir = copy / "selections" / "meddel" / "removed"
    table = storage.read_published(str(removed_dir))
    dup = [i for i, r in enumerate(table.column("duplicate_of").to_pylist()) if r]
    assert dup, "the selection removed no duplicate"
    other_removed = table.column("id")[(dup[0] + 1) % table.num_rows].as_py()
    rewrite(removed_dir, lambda t: t.set_column(t.schema.get_field_index("duplicate_of"), "duplicate_of",
                                                pa.array([other_removed if i == dup[0] else v for i, v in
                                                          enumerate(t.column("duplicate_of").to_pylist())])))
    assert "not retained" in failures(copy)
    # half published: a manifest without _SUCCESS; a listed file missing; a stray part
    copy = broken("half")
    (copy / "dedup" / "scores" / "_SUCCESS").unlink()
    text = failures(copy)
    assert "half published" in text
    copy = broken("missing_file")
    next((copy / "clusters" / "assignments").glob("*.parquet")).unlink()
    assert "does not exist" in failures(copy)
    copy = broken("stray")
    (copy / "selections" / "unpublished" / "retained").mkdir(parents=True)
    shutil.copy(next((copy / "selections" / "meddel" / "retained").glob("*.parquet")),
                copy / "selections" / "unpublished" / "retained" / "part-x.parquet")
    assert "no published directory" in failures(copy)
    # a source with neither frames nor an error row
    copy = broken("silent_source")
    errors_dir = copy / "errors"
    rewrite(errors_dir, lambda t: t.filter(pa.array([not s.endswith("bomb.png") for s in
                                                     t.column("source").to_pylist()])))
    assert "neither frames nor an error row" in failures(copy)
    # the CLI: exit status 1 and one line per failure
    assert cli.main(["verify", str(copy)]) == 1
    assert cli.main(["verify", str(root)]) == 0


def test_curate_rerun_skips_unchanged_stages(bad_run):
    """Rerunning the same curate: embed finds nothing to do, cluster and dedup are skipped
    (their manifests' fingerprints match), the selections are rebuilt identical."""
    corpus, root, _, result = bad_run
    before = storage.read_published(str(root / "selections" / "meddel" / "retained")).sort_by("id")
    again = curate.run(curate_config(corpus, root, html=False))
    assert again["embed"]["frames_written_this_run"] == 0
    assert "skipped" in again["cluster"] and "skipped" in again["dedup"]
    after = storage.read_published(str(root / "selections" / "meddel" / "retained")).sort_by("id")
    assert after.equals(before)
    assert verify.verify_run(str(root)).ok
    # a reader that ignores manifests sees the same table: the rerun left no stale part behind
    import pandas as pd

    frame = pd.read_parquet(root / "selections" / "meddel" / "retained")
    assert sorted(frame["id"]) == after.column("id").to_pylist()
    assert list(frame.columns) == ["id", "source", "frame_index", "timestamp_s", "dataset"]
    embedded = storage.read_published(str(root / "embeddings"), columns=["id", "timestamp_s"]).to_pandas()
    merged = frame.merge(embedded, on="id", suffixes=("", "_embedded"))
    assert len(merged) == len(frame) and (merged["timestamp_s"] == merged["timestamp_s_embedded"]).all()
