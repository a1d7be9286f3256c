"""Frame decoding and sampling: PyAV for video, Pillow for images, cheap quality statistics.

Decoding is streamed: frames are yielded one at a time and only the sampled ones are
converted (resized in FFmpeg's own scaler, then center-cropped), so memory stays bounded by
one frame however long the video. Videos are cut into segments in frame-index space
(``segment_frames``) so one long video spreads over many tasks; frame indices are derived
from presentation timestamps, so an id is the same whichever segment decodes it.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import IO, Iterator

import av
import numpy as np
from PIL import Image, ImageOps

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".ts")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# PyAV reads through a Python file object in chunks of this size; large chunks mean few
# range requests against object storage.
_AV_BUFFER = 4 << 20

# pixel normalisation of every encoder and training run unless configured otherwise
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DecodeError(Exception):
    """A source (or part of it) could not be decoded; the message says why."""


@dataclass(frozen=True)
class Sampling:
    """Which decoded frames to keep.

    ``fps``: keep frame i when it starts a new 1/fps bucket of the source rate (needs CFR);
    ``stride``: keep every stride-th frame; ``keyframes_only``: decode only keyframes
    (FFmpeg ``skip_frame=NONKEY``) and keep all of them. With none set, every frame is kept.
    """

    fps: float | None = None
    stride: int | None = None
    keyframes_only: bool = False


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    n_frames: int  # estimate from the container (duration x fps when no frame count)
    duration_s: float
    width: int
    height: int
    constant_rate: bool


def is_sampled(frame_index: int, source_fps: float, sampling: Sampling) -> bool:
    """Whether frame ``frame_index`` of a stream at ``source_fps`` is kept (pure, segment-free)."""
    if sampling.stride:
        return frame_index % sampling.stride == 0
    if sampling.fps and source_fps > sampling.fps:
        ratio = sampling.fps / source_fps
        return frame_index == 0 or math.floor(frame_index * ratio + 1e-9) != math.floor((frame_index - 1) * ratio + 1e-9)
    return True


def quality_stats(rgb: np.ndarray) -> dict[str, float]:
    """Cheap per-frame statistics of an RGB uint8 image (H, W, 3).

    brightness / contrast: mean / std of luma in [0, 1]; blur: variance of the 4-neighbour
    Laplacian of luma (0-255 scale; low = blurred); saturated / dark: fraction of pixels with
    luma >= 250 / <= 5.
    """
    luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114  # float64 (H, W)
    lap = (luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - 4 * luma[1:-1, 1:-1])
    return {
        "brightness": float(luma.mean() / 255.0),
        "contrast": float(luma.std() / 255.0),
        "blur": float(lap.var()),
        "saturated": float((luma >= 250).mean()),
        "dark": float((luma <= 5).mean()),
    }


def perceptual_hash(rgb: np.ndarray) -> int:
    """64-bit perceptual hash of an RGB uint8 frame (H, W, 3): ``imagehash.phash`` (the signs
    of the 8 x 8 lowest DCT frequencies of the 32 x 32 grey image against their median),
    bits packed row-major, first bit most significant. Used by deldist's near-copy rule."""
    import imagehash
    from PIL import Image

    bits = imagehash.phash(Image.fromarray(np.ascontiguousarray(rgb))).hash.reshape(-1)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def _scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    scale = short_side / min(width, height)
    return max(short_side, round(width * scale)), max(short_side, round(height * scale))


def center_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) with H, W >= size -> (size, size, 3)."""
    h, w = rgb.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(rgb[top : top + size, left : left + size])


def probe_video(file: str | IO[bytes]) -> VideoInfo:
    """Read the container header: rate, length, size. Raises DecodeError when unusable."""
    try:
        with av.open(file, mode="r", buffer_size=_AV_BUFFER) as container:
            if not container.streams.video:
                raise DecodeError("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            if not rate:
                raise DecodeError("video stream has no frame rate")
            fps = float(rate)
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                duration = 0.0
            n_frames = stream.frames or round(duration * fps)
            constant = stream.base_rate is not None and stream.average_rate is not None and \
                abs(float(stream.base_rate) - float(stream.average_rate)) < 1e-3 * fps
            return VideoInfo(fps, int(n_frames), duration, stream.codec_context.width,
                             stream.codec_context.height, constant)
    except DecodeError:
        raise
    except (av.FFmpegError, ValueError, OSError, EOFError) as e:  # includes InvalidDataError
        raise DecodeError(f"cannot open video: {e}") from e


def decode_video(
    file: str | IO[bytes],
    size: int,
    sampling: Sampling,
    start_frame: int = 0,
    end_frame: int | None = None,
    skip: frozenset[int] = frozenset(),
    threads: int = 0,
    stats: dict[str, int] | None = None,
    only: frozenset[int] | None = None,
) -> Iterator[tuple[int, float, np.ndarray]]:
    """Yield ``(frame_index, timestamp_s, rgb (size, size, 3) uint8)`` for the sampled frames
    with ``start_frame <= frame_index < end_frame``, minus ``skip`` (already embedded).
    ``only`` replaces the sampling by an explicit set of frame indices (decoding stops after
    the last one), for re-decoding the frames of a selection.

    Seeks to the keyframe before ``start_frame``. ``stats`` (if given) counts ``decoded`` and
    ``kept`` frames, for the decode-cost figure. On a decoding failure mid-stream the frames
    decoded so far have been yielded, then DecodeError is raised.
    """
    stats = stats if stats is not None else {}
    for counter in ("decoded", "sampled", "kept"):
        stats.setdefault(counter, 0)
    try:
        container = av.open(file, mode="r", buffer_size=_AV_BUFFER)
    except (av.FFmpegError, ValueError, OSError, EOFError) as e:
        raise DecodeError(f"cannot open video: {e}") from e
    with container:
        if not container.streams.video:
            raise DecodeError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame + slice threading inside FFmpeg
        stream.codec_context.thread_count = threads
        if sampling.keyframes_only:
            stream.codec_context.skip_frame = "NONKEY"
        fps = float(stream.average_rate or stream.guessed_rate)
        tb = stream.time_base
        t0 = float(stream.start_time * tb) if stream.start_time is not None else 0.0
        if start_frame > 0:
            container.seek(int((t0 + start_frame / fps) / tb), stream=stream, backward=True, any_frame=False)
        sequential = start_frame  # fallback index for frames without a timestamp
        last_wanted = max(only) if only else -1
        # fps sampling keeps the first frame of each 1/fps slot (is_sampled() when no index is missing)
        ratio = sampling.fps / fps if sampling.fps and not sampling.stride and fps > sampling.fps else None
        last_slot = math.floor((start_frame - 1) * ratio + 1e-9) if ratio and start_frame > 0 else None
        previous = -1
        try:
            for frame in container.decode(stream):
                stats["decoded"] += 1
                if frame.pts is not None:
                    ts = float(frame.pts * tb) - t0
                    # variable rate: frames closer than 1/fps must not share an index (an id)
                    index = max(round(ts * fps), previous + 1)
                else:
                    index, ts = sequential, sequential / fps
                previous, sequential = index, index + 1
                if index < start_frame:
                    continue
                if end_frame is not None and index >= end_frame or only is not None and index > last_wanted:
                    break
                if only is not None:
                    if index not in only:
                        continue
                elif ratio is not None and not sampling.keyframes_only:
                    slot = math.floor(index * ratio + 1e-9)
                    if slot == last_slot:
                        continue
                    last_slot = slot
                elif not (sampling.keyframes_only or is_sampled(index, fps, sampling)):
                    continue
                stats["sampled"] += 1
                if index in skip:
                    continue
                w, h = _scaled_size(frame.width, frame.height, size)
                rgb = frame.to_ndarray(width=w, height=h, format="rgb24", interpolation="BILINEAR")
                stats["kept"] += 1
                yield index, ts, center_crop(rgb, size)
        except (av.FFmpegError, ValueError, OSError, EOFError) as e:
            raise DecodeError(f"decoding stopped at frame ~{sequential}: {e}") from e


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Decode an image file's bytes -> RGB uint8 (size, size, 3), resized (short side) and
    center-cropped. EXIF orientation applied; grayscale, 16-bit, palette and alpha handled."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # Pillow raises many types for bad files (UnidentifiedImageError, OSError, SyntaxError ...)
        raise DecodeError(f"cannot decode image: {e}") from e
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))  # black, like the endoscope's border
        img = Image.alpha_composite(background, rgba)
    img = img.convert("RGB")
    w, h = _scaled_size(img.width, img.height, size)
    img = img.resize((w, h), Image.BILINEAR)
    return center_crop(np.asarray(img), size)
