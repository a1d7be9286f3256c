"""Deterministic synthetic endoscopy-like data with frame-level ground truth.

``generate(out, size, seed)`` writes, under the local directory ``out``:

- ``videos/<center>/<name>.mp4``: H.264 (libx264, else MPEG-4 Part 2), yuv420p, constant
  ``FPS``, ``WIDTH`` x ``HEIGHT``: the scenes, camera paths, invalid frames and polyps that
  :mod:`deldist.sample_scenes` plans and renders.
- ``masks/<center>/<name>.npz``: ``masks`` bool (n_frames, HEIGHT, WIDTH), polyp mask per frame.
- ``ground_truth.parquet``: one row per frame of every video (``GROUND_TRUTH_SCHEMA``).
- ``videos.json``: per video source_key, dataset, fps, n_frames, width, height, duration_s.
- ``kvasir/images/<name>.jpg``, ``kvasir/masks/<name>.png`` (0/255, one channel) and
  ``kvasir/labels.csv`` (``name,label,polyp``; label in ``KVASIR_LABELS``).

Everything derives from ``numpy.random.default_rng`` seeded by ``seed``: the same seed gives the
same ground truth and the same pixel arrays before encoding; the encoder runs single-threaded
so the mp4 bytes are reproducible for a given PyAV / FFmpeg build too.

CLI: ``python -m deldist.sample --out DIR [--size tiny|demo] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deldist.sample_scenes import (
    FPS,
    INVALID_KINDS,
    NOISE_STD,
    SIZES,
    Polyp,
    VideoPlan,
    frame_grid,
    frame_labels,
    iter_video_frames,
    mucosa_canvas,
    plan_dataset,
    random_tone,
    sample_view,
    to_uint8,
)

KVASIR_LABELS: tuple[str, ...] = ("polyp", "normal", "inflamed")

# ground_truth.parquet: one row per frame; source_key is the path relative to out/videos
GROUND_TRUTH_SCHEMA = pa.schema(
    [(name, pa.string()) for name in ("source_key", "dataset")]
    + [("frame_index", pa.int64()), ("timestamp_s", pa.float64())]
    + [(name, pa.string()) for name in ("scene_id", "segment_id")]
    + [("static", pa.bool_()), ("invalid", pa.bool_()), ("invalid_kind", pa.string()), ("polyp", pa.bool_())]
)


# ----------------------------------------------------------------------------- planning


# ----------------------------------------------------------------------------- textures


# ----------------------------------------------------------------------------- invalid frames


# ----------------------------------------------------------------------------- rendering


def video_codec() -> str:
    """libx264 when this PyAV build has it, else FFmpeg's native MPEG-4 Part 2 encoder."""
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def encode_video(path: Path, frames: Iterable[np.ndarray], width: int, height: int,
                 fps: int = FPS, codec: str | None = None) -> int:
    """Encode RGB uint8 (H, W, 3) frames as a constant-rate yuv420p mp4; returns the count.
    Single-threaded and keyframes every 2 s, so bytes are reproducible and seeking is cheap."""
    import av

    codec = codec or video_codec()
    n = 0
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.codec_context.gop_size = 2 * fps
        if codec == "libx264":
            # bframes=0: with B-frames this x264 build's output varies run to run even
            # single-threaded (checked: identical input, different packets); without, it is stable
            stream.codec_context.options = {"crf": "18", "preset": "veryfast", "threads": "1",
                                            "x264-params": "bframes=0"}
        else:
            stream.codec_context.bit_rate = 4_000_000
        for frame in frames:
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts, vf.time_base = n, Fraction(1, fps)
            container.mux(stream.encode(vf))
            n += 1
        container.mux(stream.encode(None))
    return n


# ----------------------------------------------------------------------------- kvasir-style set


def write_kvasir(root: Path, rng: np.random.Generator, n: int, px: int) -> list[dict]:
    """Write ``n`` px x px stills (jpg) with masks (png 0/255) and labels.csv under ``root``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    from PIL import Image

    n_other = max(1, n // 6)
    labels = ["polyp"] * (n - 2 * n_other) + ["normal"] * n_other + ["inflamed"] * n_other
    labels = [labels[i] for i in rng.permutation(n)]
    c = int(math.ceil(2 * px / 32) * 32)
    u, v, vig = frame_grid(px, px)
    rows = []
    for i, label in enumerate(labels):
        img_rng = np.random.default_rng([int(rng.integers(2**62)), 2])
        tone = random_tone(img_rng)
        polyp = None
        if label == "polyp":
            r = img_rng.uniform(0.1, 0.25) * px
            polyp = Polyp(c / 2 + img_rng.uniform(-0.1, 0.1) * px, c / 2 + img_rng.uniform(-0.1, 0.1) * px,
                          r * img_rng.uniform(0.9, 1.3), r * img_rng.uniform(0.7, 1.0), img_rng.uniform(0, np.pi))
        canvas = mucosa_canvas(img_rng, c, tone, polyp, scale=px / 256, inflamed=label == "inflamed")
        cam = np.array([c / 2 + img_rng.uniform(-0.1, 0.1) * px, c / 2 + img_rng.uniform(-0.1, 0.1) * px,
                        img_rng.uniform(0.85, 1.1), img_rng.uniform(-np.pi, np.pi)])
        view = sample_view(canvas, cam, u, v)
        rgb = view[..., :3] * vig[..., None] + img_rng.normal(0, NOISE_STD, (px, px, 3))
        mask = view[..., 3] > 0.5
        name = f"img_{i:04d}"
        Image.fromarray(to_uint8(rgb)).save(root / "images" / f"{name}.jpg", quality=92)
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(root / "masks" / f"{name}.png")
        rows.append({"name": name, "label": label, "polyp": bool(mask.any())})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["name", "label", "polyp"])
        w.writeheader()
        w.writerows({**r, "polyp": int(r["polyp"])} for r in rows)
    return rows


# ----------------------------------------------------------------------------- entry points


def _write_video(root: Path, plan: "VideoPlan", codec: str) -> tuple[dict[str, list], dict[str, Any]]:
    """Render, encode and label one video (a process of its own) -> (its ground-truth columns,
    its videos.json row)."""
    vpath = root / "videos" / plan.center / f"{plan.name}.mp4"
    mpath = root / "masks" / plan.center / f"{plan.name}.npz"
    vpath.parent.mkdir(parents=True, exist_ok=True)
    mpath.parent.mkdir(parents=True, exist_ok=True)
    masks = np.zeros((plan.n_frames, plan.height, plan.width), bool)

    def frames() -> Iterator[np.ndarray]:
        for i, (frame, mask) in enumerate(iter_video_frames(plan)):
            masks[i] = mask
            yield frame

    n = encode_video(vpath, frames(), plan.width, plan.height, FPS, codec)
    np.savez_compressed(mpath, masks=masks)
    idx = np.arange(n)
    cols: dict[str, list] = {"source_key": [plan.source_key] * n, "dataset": [plan.center] * n,
                             "frame_index": idx.tolist(), "timestamp_s": (idx / FPS).tolist(),
                             **{k: list(v) for k, v in frame_labels(plan).items()},
                             "polyp": masks.any(axis=(1, 2)).tolist()}
    return cols, {"source_key": plan.source_key, "dataset": plan.center, "fps": FPS, "n_frames": n,
                  "width": plan.width, "height": plan.height, "duration_s": n / FPS}


def generate(out: str, size: str = "tiny", seed: int = 0, workers: int | None = None) -> dict:
    """Write the synthetic dataset for ``size`` ("tiny" | "small" | "demo") under the local dir
    ``out`` (existing files of the same names are overwritten), the videos and the stills
    rendered in ``workers`` processes (default: the machine's CPUs); the output does not depend
    on it. Returns a JSON-able summary."""
    from concurrent.futures import ProcessPoolExecutor

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    t0 = time.perf_counter()
    root = Path(out)
    codec = video_codec()
    spec = SIZES[size]
    plans = plan_dataset(size, seed)
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        # longest first, so the processes finish together
        futures = {id(p): pool.submit(_write_video, root, p, codec)
                   for p in sorted(plans, key=lambda p: -p.n_frames)[:2]}
        stills = pool.submit(write_kvasir, root / "kvasir", np.random.default_rng([seed, 3]), spec.kvasir_n,
                             spec.kvasir_px)
        futures.update({id(p): pool.submit(_write_video, root, p, codec)
                        for p in sorted(plans, key=lambda p: -p.n_frames)[2:]})
        rendered = [futures[id(p)].result() for p in plans]
        kv = stills.result()
    cols: dict[str, list] = {f.name: [] for f in GROUND_TRUTH_SCHEMA}
    for video_cols, _ in rendered:
        for k, vals in video_cols.items():
            cols[k] += vals
    videos = [row for _, row in rendered]
    table = pa.table(cols, schema=GROUND_TRUTH_SCHEMA)
    pq.write_table(table, root / "ground_truth.parquet")
    (root / "videos.json").write_text(json.dumps(videos, indent=1))
    kinds = table.column("invalid_kind").to_pylist()
    return {
        "out": str(root), "size": size, "seed": seed, "codec": codec,
        "n_videos": len(videos), "n_frames": table.num_rows,
        "n_scenes": len(set(cols["scene_id"])), "n_static": int(sum(cols["static"])),
        "n_invalid": int(sum(cols["invalid"])), "invalid_kinds": {k: kinds.count(k) for k in INVALID_KINDS},
        "n_polyp": int(sum(cols["polyp"])), "n_kvasir": len(kv),
        "kvasir_labels": {k: sum(r["label"] == k for r in kv) for k in KVASIR_LABELS},
        "videos": str(root / "videos"), "masks": str(root / "masks"),
        "ground_truth": str(root / "ground_truth.parquet"), "videos_json": str(root / "videos.json"),
        "kvasir": str(root / "kvasir"), "seconds": round(time.perf_counter() - t0, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deldist.sample", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="local output directory")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kvasir-only", type=int, default=None, metavar="N",
                   help="write only the Kvasir-style labelled stills, N of them, to <out>/kvasir (the larger "
                        "classification set `make distill-large` distills at 1-5 %%)")
    a = p.parse_args(argv)
    if a.kvasir_only is not None:
        rows = write_kvasir(Path(a.out) / "kvasir", np.random.default_rng([a.seed, 3]), a.kvasir_only,
                            SIZES[a.size].kvasir_px)
        print(json.dumps({"kvasir": str(Path(a.out) / "kvasir"), "images": len(rows)}))
        return 0
    print(json.dumps(generate(a.out, a.size, a.seed), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
