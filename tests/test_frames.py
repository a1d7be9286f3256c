"""Frame decoding, sampling and quality statistics (PyAV / Pillow, no Ray)."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from PIL import Image

from deldist.frames import DecodeError, Sampling, decode_image, decode_video, is_sampled, probe_video, quality_stats


def _write_video(path, n_frames: int, fps: int = 15, w: int = 96, h: int = 64, gop: int = 10) -> np.ndarray:
    """Encode frames whose mean grey level encodes their index; returns them (n, h, w, 3)."""
    frames = np.zeros((n_frames, h, w, 3), np.uint8)
    for i in range(n_frames):
        frames[i] = (i * 7) % 200 + 20
        frames[i, : h // 2, : w // 3] = 255 - frames[i, 0, 0]  # some structure
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"g": str(gop), "crf": "10"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return frames


def test_is_sampled_counts():
    # stride: exactly every k-th frame
    assert [i for i in range(20) if is_sampled(i, 30.0, Sampling(stride=6))] == [0, 6, 12, 18]
    # fps 5 of a 30 fps stream: one frame per 6, starting at 0
    assert [i for i in range(30) if is_sampled(i, 30.0, Sampling(fps=5.0))] == [0, 6, 12, 18, 24]
    # fps 2 of 25 fps: 2 per second over 10 s
    assert sum(is_sampled(i, 25.0, Sampling(fps=2.0)) for i in range(250)) == 20
    # asking for more than the source rate keeps every frame
    assert all(is_sampled(i, 10.0, Sampling(fps=30.0)) for i in range(10))


def test_quality_stats_values():
    black = np.zeros((32, 32, 3), np.uint8)
    white = np.full((32, 32, 3), 255, np.uint8)
    checker = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)
    s_black, s_white, s_checker = quality_stats(black), quality_stats(white), quality_stats(checker)
    assert s_black["brightness"] == 0.0 and s_black["dark"] == 1.0 and s_black["blur"] == 0.0
    assert s_white["brightness"] == pytest.approx(1.0) and s_white["saturated"] == 1.0
    assert s_checker["contrast"] == pytest.approx(0.5, abs=1e-3)
    # Laplacian of a +-1 checkerboard (0/255) is +-4*255 everywhere: variance (4*255)^2
    assert s_checker["blur"] == pytest.approx((4 * 255) ** 2, rel=1e-6)


def test_video_segments_decode_same_frames_as_whole(tmp_path):
    path = tmp_path / "v.mp4"
    truth = _write_video(path, 47)
    info = probe_video(str(path))
    assert info.n_frames == 47 and info.fps == 15.0 and info.constant_rate
    sampling = Sampling(stride=2)
    whole = list(decode_video(str(path), 32, sampling))
    assert [i for i, _, _ in whole] == list(range(0, 47, 2))
    pieces = []
    for start in range(0, 47, 12):  # segments not aligned with keyframes (gop 10)
        end = start + 12 if start + 12 < 47 else None
        pieces += list(decode_video(str(path), 32, sampling, start_frame=start, end_frame=end))
    assert [i for i, _, _ in pieces] == [i for i, _, _ in whole]
    for (i, ts, a), (_, ts2, b) in zip(whole, pieces):
        assert ts == pytest.approx(i / 15.0) and ts2 == pytest.approx(ts)
        np.testing.assert_array_equal(a, b)
        assert a.shape == (32, 32, 3)
        # right frame: its mean grey level matches the encoded one (lossy, tolerant)
        assert abs(float(a[20:, 20:].mean()) - float(truth[i][20:, 40:].mean())) < 8


def test_skip_set_and_stats(tmp_path):
    path = tmp_path / "v.mp4"
    _write_video(path, 30)
    stats: dict[str, int] = {}
    got = [i for i, _, _ in decode_video(str(path), 32, Sampling(stride=3), skip=frozenset({0, 9}), stats=stats)]
    assert got == [3, 6, 12, 15, 18, 21, 24, 27]
    assert stats == {"decoded": 30, "sampled": 10, "kept": 8}


def test_only_explicit_indices(tmp_path):
    path = tmp_path / "v.mp4"
    _write_video(path, 30)
    stats: dict[str, int] = {}
    got = [i for i, _, _ in decode_video(str(path), 32, Sampling(stride=5), only=frozenset({2, 7, 11}), stats=stats)]
    assert got == [2, 7, 11] and stats["decoded"] <= 13  # stopped after the last wanted frame


def test_keyframes_only_decodes_only_keyframes(tmp_path):
    path = tmp_path / "v.mp4"
    _write_video(path, 40, gop=10)
    stats: dict[str, int] = {}
    got = [i for i, _, _ in decode_video(str(path), 32, Sampling(keyframes_only=True), stats=stats)]
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        keys = sorted(round(float(p.pts * s.time_base) * 15) for p in c.demux(s) if p.is_keyframe and p.pts is not None)
    assert 0 in keys and len(keys) < 10  # x264 places keyframes by gop and scene cuts
    assert got == keys
    assert stats["decoded"] == len(keys)  # FFmpeg skipped the other frames entirely


def test_bad_videos(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(DecodeError):
        probe_video(str(empty))
    good = tmp_path / "good.mp4"
    _write_video(good, 20)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DecodeError):
        list(decode_video(str(truncated), 32, Sampling(stride=1)))


def test_decode_image_modes_and_exif():
    rng = np.random.default_rng(0)
    rgb = (rng.random((40, 60, 3)) * 255).astype(np.uint8)

    def roundtrip(img: Image.Image, fmt: str = "PNG", **kw) -> np.ndarray:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return decode_image(buf.getvalue(), 20)

    out = roundtrip(Image.fromarray(rgb))
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    # 16-bit grayscale is rescaled to the full 8-bit range, then to RGB
    g16 = Image.fromarray((np.arange(40 * 60).reshape(40, 60) * 27).astype(np.uint16))
    out16 = roundtrip(g16)
    assert out16.shape == (20, 20, 3) and out16.max() > 200 and (out16[..., 0] == out16[..., 2]).all()
    # RGBA: fully transparent pixels become black
    rgba = np.concatenate([rgb, np.zeros((40, 60, 1), np.uint8)], axis=-1)
    assert roundtrip(Image.fromarray(rgba, "RGBA")).max() == 0
    # EXIF orientation 6 (rotate 90 CW): a wide image comes out tall before the crop
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, :30] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6
    out_rot = roundtrip(Image.fromarray(wide), "JPEG", exif=exif.tobytes(), quality=95)
    # after rotating CW the white half is on top: the crop's top rows are white
    assert out_rot[:5].mean() > 200 and out_rot[-5:].mean() < 50
    with pytest.raises(DecodeError):
        decode_image(b"this is text, not a jpeg", 20)


def test_variable_rate_video_gets_unique_ids_and_every_fps_slot(tmp_path):
    """Frames 20-150 ms apart (variable rate): no two frames share an index, and fps sampling
    keeps one frame per 1/fps slot that has frames (the first), not only slots whose first
    index is present."""
    from fractions import Fraction

    gaps = np.random.default_rng(0).integers(20, 150, size=40)
    pts = np.cumsum(gaps) - gaps[0]
    path = tmp_path / "vfr.mkv"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=15)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        for i, t in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(np.full((64, 96, 3), (i * 5) % 250, np.uint8), format="rgb24")
            frame.pts, frame.time_base = int(t), Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    every = [i for i, _, _ in decode_video(str(path), 16, Sampling(stride=1))]
    assert len(every) == 40 and len(set(every)) == 40 and every == sorted(every)
    kept = [(i, t) for i, t, _ in decode_video(str(path), 16, Sampling(fps=5))]
    slots_with_frames = len({int(t * 5 + 1e-9) for t in pts / 1000})
    assert len({i for i, _ in kept}) == len(kept)
    assert abs(len(kept) - slots_with_frames) <= 2  # index drift after bursts may shift a slot
    assert len(kept) > 0.8 * (pts[-1] / 1000 * 5)
