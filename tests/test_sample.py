"""deldist.sample: the synthetic data generator and its ground truth (no Ray needed).

One ``tiny`` dataset is generated per module and decoded once; the determinism tests
generate two more (same seed through the CLI, and a different seed).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from deldist import sample, sample_scenes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("tiny")
    return root, sample.generate(str(root), "tiny", seed=0)


@pytest.fixture(scope="module")
def gt(tiny: tuple[Path, dict]) -> list[dict]:
    return pq.read_table(tiny[0] / "ground_truth.parquet").to_pylist()


@pytest.fixture(scope="module")
def decoded(tiny: tuple[Path, dict]) -> dict[str, np.ndarray]:
    """source_key -> decoded RGB frames, float32 (n, H, W, 3) in [0, 1]."""
    out = {}
    for path in sorted((tiny[0] / "videos").rglob("*.mp4")):
        with av.open(str(path)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        out[path.relative_to(tiny[0] / "videos").as_posix()] = np.stack(frames).astype(np.float32) / 255
    return out


def _segments(gt: list[dict]) -> dict[str, list[dict]]:
    segs: dict[str, list[dict]] = defaultdict(list)
    for r in gt:
        segs[r["segment_id"]].append(r)
    return segs


def _laplacian_var(rgb: np.ndarray) -> float:
    g = rgb.mean(-1)
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float(lap.var())


def test_layout_and_structure(tiny: tuple[Path, dict], gt: list[dict]) -> None:
    root, summary = tiny
    videos = json.loads((root / "videos.json").read_text())
    assert summary["n_videos"] == len(videos) == 3
    assert summary["n_frames"] == len(gt) == sum(v["n_frames"] for v in videos)
    assert summary["codec"] in ("libx264", "mpeg4")
    assert {v["dataset"] for v in videos} == {"center_a", "center_b"}
    for v in videos:
        rows = [r for r in gt if r["source_key"] == v["source_key"]]
        assert 60 <= v["n_frames"] <= 90 and len(rows) == v["n_frames"]
        assert v["source_key"].split("/")[0] == v["dataset"] and all(r["dataset"] == v["dataset"] for r in rows)
        assert v["fps"] == 15 and (v["width"], v["height"]) == (320, 256)
        assert v["duration_s"] == pytest.approx(v["n_frames"] / 15)
        assert 2 <= len({r["scene_id"] for r in rows}) <= 3
        assert any(r["static"] for r in rows) and any(r["invalid"] for r in rows) and any(r["polyp"] for r in rows)
        # frame-level flags are consistent with each other
        for r in rows:
            assert r["invalid"] == (r["invalid_kind"] != "")
            assert not (r["invalid"] and (r["static"] or r["polyp"]))
            assert r["segment_id"].startswith(r["scene_id"] + "/")
    assert summary["n_invalid"] == sum(r["invalid"] for r in gt)
    assert summary["n_static"] == sum(r["static"] for r in gt)
    assert summary["n_polyp"] == sum(r["polyp"] for r in gt)


def test_ground_truth_matches_decoder(tiny: tuple[Path, dict], gt: list[dict]) -> None:
    root, _ = tiny
    table = pq.read_table(root / "ground_truth.parquet")
    assert table.schema.equals(sample.GROUND_TRUTH_SCHEMA)
    for v in json.loads((root / "videos.json").read_text()):
        rows = [r for r in gt if r["source_key"] == v["source_key"]]
        with av.open(str(root / "videos" / v["source_key"])) as c:
            stream = c.streams.video[0]
            assert stream.average_rate == 15 and stream.codec_context.pix_fmt == "yuv420p"
            frames = list(c.decode(stream))
        assert len(frames) == len(rows) == v["n_frames"]
        assert all((f.width, f.height) == (320, 256) for f in frames)
        assert [r["frame_index"] for r in rows] == list(range(len(rows)))
        for f, r in zip(frames, rows):
            assert r["timestamp_s"] == r["frame_index"] / 15
            assert f.time == pytest.approx(r["timestamp_s"], abs=1e-3)


def test_cli_same_seed_is_identical_other_seed_differs(
    tiny: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, summary = tiny
    again = tmp_path / "again"
    assert sample.main(["--out", str(again), "--size", "tiny", "--seed", "0"]) == 0
    printed = json.loads(capsys.readouterr().out)
    for key in ("n_videos", "n_frames", "n_static", "n_invalid", "n_polyp", "invalid_kinds"):
        assert printed[key] == summary[key]
    assert pq.read_table(again / "ground_truth.parquet").equals(pq.read_table(root / "ground_truth.parquet"))
    for path in sorted((root / "masks").rglob("*.npz")):
        other = again / path.relative_to(root)
        assert np.array_equal(np.load(path)["masks"], np.load(other)["masks"])
    for path in sorted((root / "videos").rglob("*.mp4")):  # single-threaded encoder: same bytes
        assert path.read_bytes() == (again / path.relative_to(root)).read_bytes()
    assert (root / "kvasir/labels.csv").read_text() == (again / "kvasir/labels.csv").read_text()

    other_seed = tmp_path / "seed1"
    sample.generate(str(other_seed), "tiny", seed=1)
    assert not pq.read_table(other_seed / "ground_truth.parquet").equals(pq.read_table(root / "ground_truth.parquet"))


def test_render_matches_encoded_video_and_stored_masks(
    tiny: tuple[Path, dict], decoded: dict[str, np.ndarray]
) -> None:
    root, _ = tiny
    plan = sample_scenes.plan_dataset("tiny", 0)[1]
    frames, masks = sample_scenes.render_video_frames(plan)
    assert frames.shape == (plan.n_frames, 256, 320, 3) and frames.dtype == np.uint8
    assert masks.shape == (plan.n_frames, 256, 320) and masks.dtype == bool
    assert np.array_equal(masks, np.load(root / "masks" / plan.center / f"{plan.name}.npz")["masks"])
    # the encoded video is these pixels up to compression loss (byte-identical mp4s across runs,
    # checked above, mean the pixel arrays themselves are reproducible)
    err = np.abs(decoded[plan.source_key] - frames.astype(np.float32) / 255).mean(axis=(1, 2, 3))
    assert err.max() < 0.03
    assert sample_scenes.plan_dataset("tiny", 1)[1].scenes[0].seed != plan.scenes[0].seed


def test_invalid_frames_look_like_their_kind(gt: list[dict], decoded: dict[str, np.ndarray]) -> None:
    kinds = {r["invalid_kind"] for r in gt if r["invalid"]}
    assert kinds == set(sample_scenes.INVALID_KINDS)
    checked = defaultdict(int)
    for seg in _segments(gt).values():
        kind = seg[0]["invalid_kind"]
        if not kind:
            continue
        video = decoded[seg[0]["source_key"]]
        for r in seg:
            f = video[r["frame_index"]]
            if kind == "black":
                assert f.mean() < 0.1
            elif kind == "overexposed":
                assert f.mean() > 0.85 or (f.min(-1) > 0.95).mean() > 0.5
            elif kind == "colorbars":
                row = f[: int(256 * 0.6)]
                bars = np.stack([row[:, int((i + 0.5) * 320 / 7)].mean(0) for i in range(7)])  # (7, 3)
                dist = np.linalg.norm(bars[:, None] - bars[None], axis=-1)
                assert dist[np.triu_indices(7, 1)].min() > 0.3  # seven clearly distinct colours
                edges = [round(i * 320 / 7) for i in range(1, 7)]
                assert min(np.abs(row[:, e + 2] - row[:, e - 3]).mean() for e in edges) > 0.2
            elif kind == "blur":
                sharp = [q for q in gt if q["scene_id"] == r["scene_id"] and not q["invalid"]]
                nearest = min(sharp, key=lambda q: abs(q["frame_index"] - r["frame_index"]))
                assert _laplacian_var(f) < 0.5 * _laplacian_var(video[nearest["frame_index"]])
            checked[kind] += 1
    assert set(checked) == set(sample_scenes.INVALID_KINDS)


def test_static_runs_are_near_duplicates(gt: list[dict], decoded: dict[str, np.ndarray]) -> None:
    static_diffs, first_static = [], {}
    for seg in _segments(gt).values():
        if not seg[0]["static"]:
            continue
        frames = decoded[seg[0]["source_key"]][[r["frame_index"] for r in seg]]
        assert len(seg) >= 8  # runs are long, like a camera resting on the mucosa
        static_diffs.append(np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3)).max())
        first_static.setdefault(seg[0]["scene_id"], frames[0])
    scene_frames = list(first_static.values())
    scene_diffs = [np.abs(a - b).mean() for i, a in enumerate(scene_frames) for b in scene_frames[i + 1:]]
    assert len(scene_frames) >= 4
    assert max(static_diffs) < 0.015
    assert min(scene_diffs) > 0.04 and min(scene_diffs) > 4 * max(static_diffs)


def test_masks_match_polyp_flags(tiny: tuple[Path, dict], gt: list[dict]) -> None:
    root, _ = tiny
    for v in json.loads((root / "videos.json").read_text()):
        masks = np.load(root / "masks" / v["source_key"].replace(".mp4", ".npz"))["masks"]
        assert masks.dtype == bool and masks.shape == (v["n_frames"], 256, 320)
        flags = [r["polyp"] for r in gt if r["source_key"] == v["source_key"]]
        assert masks.any(axis=(1, 2)).tolist() == flags
        areas = masks.sum(axis=(1, 2))[np.array(flags)]
        assert areas.min() > 0 and areas.max() > 1000  # a visible lesion, not a stray pixel


def test_kvasir_set(tiny: tuple[Path, dict]) -> None:
    kv = tiny[0] / "kvasir"
    rows = list(csv.DictReader((kv / "labels.csv").open()))
    assert len(rows) == tiny[1]["n_kvasir"] == 12
    assert list(rows[0]) == ["name", "label", "polyp"]
    assert {r["label"] for r in rows} == set(sample.KVASIR_LABELS)
    names = {r["name"] for r in rows}
    assert {p.stem for p in (kv / "images").glob("*.jpg")} == names == {p.stem for p in (kv / "masks").glob("*.png")}
    for r in rows:
        img = Image.open(kv / "images" / f"{r['name']}.jpg")
        mask = np.asarray(Image.open(kv / "masks" / f"{r['name']}.png"))
        assert img.size == (128, 128) and img.mode == "RGB"
        assert mask.shape == (128, 128) and set(np.unique(mask)) <= {0, 255}
        assert r["polyp"] == str(int(mask.any())) and (r["label"] == "polyp") == mask.any()


def test_rejects_unknown_size_and_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown size"):
        sample.generate(str(tmp_path), "huge")
    with pytest.raises(ValueError, match="unknown invalid kind"):
        sample_scenes.make_invalid("smoke", np.zeros((4, 4, 3), np.float32), 0)


def test_cli_kvasir_only_writes_just_the_labelled_stills(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert sample.main(["--out", str(tmp_path), "--size", "tiny", "--kvasir-only", "12"]) == 0
    assert json.loads(capsys.readouterr().out) == {"kvasir": str(tmp_path / "kvasir"), "images": 12}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kvasir"]
    with open(tmp_path / "kvasir/labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    labels = [r["label"] for r in rows]
    assert (labels.count("polyp"), labels.count("normal"), labels.count("inflamed")) == (8, 2, 2)
    px = sample.SIZES["tiny"].kvasir_px
    for r in rows:
        assert Image.open(tmp_path / "kvasir/images" / f"{r['name']}.jpg").size == (px, px)
        mask = np.asarray(Image.open(tmp_path / "kvasir/masks" / f"{r['name']}.png"))
        assert mask.any() == (r["polyp"] == "1")
