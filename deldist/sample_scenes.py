"""The sample's videos as plans and pixels, with no I/O: what :mod:`deldist.sample` encodes.

A :class:`VideoPlan` is a sequence of scenes (mucosa-like textures, :func:`mucosa_canvas`);
within a scene the camera (:func:`camera_path`) alternates between motion segments and long
near-static runs, with short runs of invalid frames (``INVALID_KINDS``) and polyp-like lesions
in some scenes. Everything derives from ``numpy.random.default_rng`` seeded by the plan's
seed: the same seed gives the same pixel arrays (:func:`iter_video_frames`) and the same
frame labels (:func:`frame_labels`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

FPS = 15
WIDTH, HEIGHT = 320, 256  # non-square on purpose: downstream center-crops
INVALID_KINDS: tuple[str, ...] = ("black", "overexposed", "blur", "colorbars")
NOISE_STD = 0.006  # sensor noise, in [0, 1] intensity units


@dataclass(frozen=True)
class SizeSpec:
    """Dataset shape for one ``size``; ranges are inclusive (lo, hi)."""

    n_videos: int
    centers: tuple[str, ...]
    video_frames: tuple[int, int]  # scene frames per video, before invalid runs are inserted
    scenes: tuple[int, int]
    static_len: tuple[int, int]
    motion_len: tuple[int, int]
    invalid_runs: tuple[int, int]  # per video
    invalid_len: tuple[int, int]
    kvasir_n: int
    kvasir_px: int
    scene_balance: float = 5.0  # Dirichlet concentration of scene lengths: low = very uneven


SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec(3, ("center_a", "center_b"), (56, 80), (2, 3), (10, 16), (6, 10),
                     (2, 2), (2, 4), 12, 128),
    # "small": many scenes of very uneven length (short ones are what uniform sampling
    # misses), for selection-quality tests in seconds
    "small": SizeSpec(4, ("center_a", "center_b"), (150, 190), (6, 8), (12, 30), (6, 12),
                      (2, 3), (2, 4), 12, 128, scene_balance=0.8),
    "demo": SizeSpec(9, ("center_a", "center_b", "center_c"), (500, 620), (4, 7), (20, 60),
                     (10, 30), (3, 6), (3, 8), 150, 224),
}


@dataclass(frozen=True)
class Segment:
    """A run of frames: ``kind`` is "motion", "static" or "invalid" (then ``invalid_kind``)."""

    kind: str
    n: int
    invalid_kind: str = ""


@dataclass(frozen=True)
class Polyp:
    """An elliptic lesion in canvas pixel coordinates."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float


@dataclass(frozen=True)
class ScenePlan:
    """One scene: its own texture (from ``seed``), tone, optional lesion and segment list."""

    seed: int  # texture and camera-path seed
    tone: tuple[float, float, float]  # base RGB in [0, 1]
    polyp: Polyp | None
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class VideoPlan:
    """Everything needed to render one video deterministically (no pixels held)."""

    center: str
    name: str
    seed: int  # sensor-noise seed
    scenes: tuple[ScenePlan, ...]
    width: int = WIDTH
    height: int = HEIGHT

    @property
    def source_key(self) -> str:
        return f"{self.center}/{self.name}.mp4"

    @property
    def n_frames(self) -> int:
        return sum(seg.n for sc in self.scenes for seg in sc.segments)


def canvas_size(width: int, height: int) -> int:
    """Side of the square texture canvas a scene is filmed from (room for pan/zoom/rotation)."""
    return int(math.ceil(2.4 * max(width, height) / 32) * 32)


def _rand(rng: np.random.Generator, lo_hi: tuple[int, int]) -> int:
    return int(rng.integers(lo_hi[0], lo_hi[1] + 1))


def random_tone(rng: np.random.Generator) -> tuple[float, float, float]:
    """Base RGB of a mucosa: pink / red / orange (red high; green kept below ~0.6 red so the
    orange variant never drifts to olive)."""
    r = rng.uniform(0.78, 0.95)
    return (round(r, 4), round(r * rng.uniform(0.36, 0.56), 4), round(rng.uniform(0.25, 0.45), 4))


def _scene_segments(rng: np.random.Generator, spec: SizeSpec, n: int) -> list[Segment]:
    """Alternate motion / static segments filling ``n`` frames (tail merged if too short)."""
    segs: list[Segment] = []
    kind = "static" if rng.random() < 0.5 else "motion"
    left = n
    while left > 0:
        lo_hi = spec.static_len if kind == "static" else spec.motion_len
        m = min(left, _rand(rng, lo_hi))
        if m < lo_hi[0] and segs:  # a short tail joins the previous segment: static runs stay long
            segs[-1] = Segment(segs[-1].kind, segs[-1].n + m)
        else:
            segs.append(Segment(kind, m))
        left -= m
        kind = "motion" if kind == "static" else "static"
    return segs


def plan_dataset(size: str = "tiny", seed: int = 0) -> list[VideoPlan]:
    """All video plans for ``size``; guarantees per video >= 1 static run, >= 1 invalid run,
    >= 1 polyp scene, and every invalid kind at least once overall when there are >= 4 runs."""
    spec = SIZES[size]
    rng = np.random.default_rng(seed)
    n_runs = [_rand(rng, spec.invalid_runs) for _ in range(spec.n_videos)]
    kinds: list[str] = []
    while len(kinds) < sum(n_runs):  # shuffled rounds over all kinds = every kind appears
        kinds += [INVALID_KINDS[i] for i in rng.permutation(len(INVALID_KINDS))]
    c = canvas_size(WIDTH, HEIGHT)
    plans = []
    for v in range(spec.n_videos):
        n_scenes = _rand(rng, spec.scenes)
        cuts = np.cumsum(rng.dirichlet(np.full(n_scenes, spec.scene_balance)))  # scene lengths
        bounds = np.r_[0, np.round(cuts * _rand(rng, spec.video_frames))].astype(int)
        seg_lists = [_scene_segments(rng, spec, int(m)) for m in np.diff(bounds)]
        if not any(s.kind == "static" for segs in seg_lists for s in segs):
            segs = seg_lists[0]
            i = max(range(len(segs)), key=lambda j: segs[j].n)
            segs[i] = Segment("static", segs[i].n)
        for _ in range(n_runs[v]):  # insert invalid runs at segment boundaries (never first)
            segs = seg_lists[int(rng.integers(n_scenes))]
            segs.insert(int(rng.integers(1, len(segs) + 1)),
                        Segment("invalid", _rand(rng, spec.invalid_len), kinds.pop(0)))
        has_polyp = rng.random(n_scenes) < 0.35
        has_polyp[rng.integers(n_scenes)] = True
        scenes = []
        for s in range(n_scenes):
            tone = random_tone(rng)
            polyp = None
            if has_polyp[s]:
                r = rng.uniform(22, 45)
                polyp = Polyp(c / 2 + rng.uniform(-40, 40), c / 2 + rng.uniform(-40, 40),
                              r * rng.uniform(0.9, 1.3), r * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi))
            scenes.append(ScenePlan(int(rng.integers(2**62)), tone,
                                    polyp, tuple(seg_lists[s])))
        center = spec.centers[v % len(spec.centers)]
        plans.append(VideoPlan(center, f"vid_{v:03d}", int(rng.integers(2**62)), tuple(scenes)))
    return plans


def frame_labels(plan: VideoPlan) -> dict[str, list]:
    """Per-frame ground truth columns of one video, except ``polyp`` (that comes from masks)."""
    cols: dict[str, list] = {k: [] for k in ("scene_id", "segment_id", "static", "invalid", "invalid_kind")}
    for s, scene in enumerate(plan.scenes):
        scene_id = f"{plan.center}/{plan.name}/s{s}"
        for g, seg in enumerate(scene.segments):
            cols["scene_id"] += [scene_id] * seg.n
            cols["segment_id"] += [f"{scene_id}/{seg.kind}{g}"] * seg.n
            cols["static"] += [seg.kind == "static"] * seg.n
            cols["invalid"] += [seg.kind == "invalid"] * seg.n
            cols["invalid_kind"] += [seg.invalid_kind] * seg.n
    return cols


def _noise_bands(rng: np.random.Generator, n: int, scales: Iterable[float]) -> list[np.ndarray]:
    """Band-limited Gaussian noise from one white field: one (n, n) float32 per scale
    (correlation length ~ scale px), zero mean, unit std. Periodic (FFT filtering)."""
    import scipy.fft

    # single precision: half the time of NumPy's float64 FFT, and the fields are normalised anyway
    spec = scipy.fft.rfft2(rng.standard_normal((n, n), dtype=np.float32))
    k2 = (np.fft.fftfreq(n)[:, None] ** 2 + np.fft.rfftfreq(n)[None, :] ** 2).astype(np.float32)
    out = []
    for s in scales:
        f = scipy.fft.irfft2(spec * np.exp(np.float32(-2.0 * (np.pi * s) ** 2) * k2), s=(n, n))
        out.append(((f - f.mean()) / (f.std() + 1e-12)).astype(np.float32))
    return out


def _smooth(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def mucosa_canvas(rng: np.random.Generator, n: int, tone: tuple[float, float, float],
                  polyp: Polyp | None = None, scale: float = 1.0, inflamed: bool = False) -> np.ndarray:
    """An (n, n, 4) float32 canvas: RGB in [0, 1] and polyp alpha (soft, > 0.5 = lesion).
    ``scale`` multiplies feature sizes (1.0 for a 256 px high frame)."""
    k = scale
    b0, b1, b2, mix_f = _noise_bands(rng, n, (48 * k, 14 * k, 3 * k, 70 * k))
    v1, = _noise_bands(rng, n, (40 * k,))
    v2, region = _noise_bands(rng, n, (16 * k, 90 * k))
    sp1, sp2 = _noise_bands(rng, n, (2.0 * k, 6 * k))
    base = np.asarray(tone, np.float32)
    alt = np.clip(base * np.array([1.04, 1.15, 0.8], np.float32), 0, 1)  # more orange
    tex = 0.6 * b0 + 0.3 * b1 + 0.22 * b2
    mix = _smooth(mix_f, -1.0, 1.0)[..., None]
    rgb = (base * (1 - mix) + alt * mix) * (0.82 + 0.1 * tex)[..., None]
    if inflamed:  # redder, with darker erythematous patches
        rgb = rgb * np.array([1.08, 0.7, 0.75], np.float32)
        patch = _smooth(b1 + 0.5 * mix_f, 0.6, 1.4)[..., None]
        rgb = rgb * (1 - 0.45 * patch * np.array([0.15, 0.8, 0.6], np.float32))
    # vessels: thin lines along the zero crossings of smooth fields, fading in and out by region
    vessel = np.maximum(0.85 * np.exp(-(v1 / 0.08) ** 2), 0.55 * np.exp(-(v2 / 0.06) ** 2))
    vessel *= _smooth(region, -0.8, 0.6)
    rgb = rgb * (1 - vessel[..., None] * np.array([0.35, 0.65, 0.5], np.float32))
    # wet-surface specular highlights: sparse small blobs, clustered where the region field is high
    spec = np.maximum(_smooth(sp1 + 0.4 * region, 2.8, 3.4), _smooth(sp2 + 0.3 * region, 3.0, 3.5))
    rgb = rgb + spec[..., None] * (1 - rgb)
    alpha = np.zeros((n, n), np.float32)
    if polyp is not None:
        y, x = np.mgrid[0:n, 0:n].astype(np.float32)
        dx, dy = x - polyp.cx, y - polyp.cy
        ca, sa = math.cos(polyp.angle), math.sin(polyp.angle)
        xr, yr = (ca * dx + sa * dy) / polyp.rx, (-sa * dx + ca * dy) / polyp.ry
        d = np.sqrt(xr**2 + yr**2) * (1 + 0.07 * b1)  # slightly irregular outline
        h = np.sqrt(np.clip(1 - d**2, 0, 1))  # dome height
        # coaxial light: top of the dome bright, flanks darker; plus a light-from-top-left term
        shade = 0.6 + 0.45 * h - 0.15 * np.clip(0.6 * dx / polyp.rx + 0.8 * dy / polyp.ry, -1.5, 1.5)
        ptone = np.clip(base * np.array([1.04, 1.2, 1.12], np.float32), 0, 1)
        prgb = ptone * (shade * (0.93 + 0.05 * b2))[..., None]
        glint = np.exp(-((dx / polyp.rx + 0.35) ** 2 + (dy / polyp.ry + 0.35) ** 2) / 0.02)
        prgb = prgb + 0.9 * glint[..., None] * (1 - prgb)
        ring = np.exp(-((d - 1) / 0.12) ** 2) * (d > 1)  # shadow around a raised lesion
        rgb = rgb * (1 - 0.35 * ring[..., None])
        alpha = np.clip((1 - d) / 0.06, 0, 1).astype(np.float32)
        rgb = rgb * (1 - alpha[..., None]) + prgb * alpha[..., None]
    return np.concatenate([np.clip(rgb, 0, 1), alpha[..., None]], axis=-1).astype(np.float32)


def frame_grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centered pixel coordinates u, v (height, width) and the endoscope-light vignette."""
    v, u = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = u - width / 2 + 0.5, v - height / 2 + 0.5
    r = np.sqrt(u**2 + v**2) / math.hypot(width / 2, height / 2)
    return u, v, (1.05 - 0.72 * r**2.5).astype(np.float32)


def sample_view(canvas: np.ndarray, cam: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear view of ``canvas`` (n, n, C) by camera ``cam`` = (cx, cy, zoom, theta):
    returns (H, W, C) for frame coordinates u, v (H, W). zoom = canvas px per frame px."""
    cx, cy, s, th = (float(c) for c in cam)
    c, sn = math.cos(th) * s, math.sin(th) * s
    x, y = cx + c * u - sn * v, cy + sn * u + c * v
    n, ch = canvas.shape[0], canvas.shape[2]
    x0, y0 = np.clip(np.floor(x), 0, n - 2), np.clip(np.floor(y), 0, n - 2)
    fx, fy = np.clip(x - x0, 0, 1).reshape(-1, 1), np.clip(y - y0, 0, 1).reshape(-1, 1)
    # gathers on the flattened canvas: ~4x faster than 2-D fancy indexing
    idx, flat = (y0 * n + x0).astype(np.intp).ravel(), canvas.reshape(-1, ch)
    a, b = flat.take(idx, axis=0), flat.take(idx + 1, axis=0)
    c_, d = flat.take(idx + n, axis=0), flat.take(idx + n + 1, axis=0)
    top, bot = a + (b - a) * fx, c_ + (d - c_) * fx
    return (top + (bot - top) * fy).reshape(u.shape + (ch,))


def camera_path(rng: np.random.Generator, segments: Iterable[Segment], n: int,
                width: int, height: int) -> np.ndarray:
    """(n_frames, 4) camera states (cx, cy, zoom, theta) over a canvas of side ``n``."""
    zlo, zhi = 0.75, 1.2
    margin = n / 2 - zhi * math.hypot(width / 2, height / 2) - 4
    lo = np.array([n / 2 - margin, n / 2 - margin, zlo, -0.6])
    hi = np.array([n / 2 + margin, n / 2 + margin, zhi, 0.6])
    state = np.array([n / 2 + rng.uniform(-30, 30), n / 2 + rng.uniform(-30, 30),
                      rng.uniform(0.85, 1.05), rng.uniform(-0.2, 0.2)])
    out = []
    for seg in segments:
        if seg.kind == "motion":
            a, dist = rng.uniform(0, 2 * np.pi), rng.uniform(40, 120)
            step = [dist * math.cos(a), dist * math.sin(a), rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15)]
            target = np.clip(state + step, lo, hi)
            t = np.arange(1, seg.n + 1) / seg.n
            ease = (t * t * (3 - 2 * t))[:, None]
            path = state + ease * (target - state) + rng.normal(0, 1, (seg.n, 4)) * [0.5, 0.5, 0.002, 0.002]
        elif seg.kind == "static":  # almost still: sub-pixel drift only
            path = state + np.arange(seg.n)[:, None] * np.r_[rng.normal(0, 0.03, 2), 0, 0]
        else:  # invalid run: the camera waits, the scene continues after it
            path = np.repeat(state[None], seg.n, axis=0)
        state = np.clip(path[-1], lo, hi)
        out.append(path)
    return np.concatenate(out)


def _box(a: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Centered box filter of odd width ``k`` along ``axis`` (edge padded), via cumsum."""
    a = np.moveaxis(a, axis, 0)
    c = np.cumsum(np.pad(a, [(k // 2 + 1, k // 2)] + [(0, 0)] * (a.ndim - 1), mode="edge"), axis=0)
    return np.moveaxis((c[k:] - c[:-k]) / k, 0, axis)


def color_bars(width: int, height: int) -> np.ndarray:
    """SMPTE-like 75% colour bars, (height, width, 3) float32."""
    top = np.array([[.75, .75, .75], [.75, .75, 0], [0, .75, .75], [0, .75, 0],
                    [.75, 0, .75], [.75, 0, 0], [0, 0, .75]], np.float32)
    mid = np.array([[0, 0, .75], [0, 0, 0], [.75, 0, .75], [0, 0, 0],
                    [0, .75, .75], [0, 0, 0], [.75, .75, .75]], np.float32)
    low = np.array([[0, .13, .3], [1, 1, 1], [.2, 0, .42], [0, 0, 0]], np.float32)
    x = np.arange(width)
    img = np.empty((height, width, 3), np.float32)
    h1, h2 = int(height * 0.67), int(height * 0.75)
    img[:h1] = top[x * 7 // width]
    img[h1:h2] = mid[x * 7 // width]
    img[h2:] = low[np.minimum(x * 5 // width, 3)]
    return img


def make_invalid(kind: str, rgb: np.ndarray, variant: int = 0) -> np.ndarray:
    """Turn a rendered (H, W, 3) scene frame into an invalid frame of ``kind``."""
    if kind == "black":  # lens covered / light off: a faint trace of the scene
        return rgb * 0.04
    if kind == "overexposed":  # lens against the wall: saturated, slightly tinted white
        return np.clip(1.08 - (1 - rgb) * 0.15, 0, 1)
    if kind == "blur":  # fast camera motion: long box blur in a run-dependent direction
        long_axis = variant % 2
        return _box(_box(rgb, 41, long_axis), 13, 1 - long_axis)
    if kind == "colorbars":  # out of body / test pattern
        return color_bars(rgb.shape[1], rgb.shape[0])
    raise ValueError(f"unknown invalid kind {kind!r}; expected one of {INVALID_KINDS}")


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def iter_video_frames(plan: VideoPlan) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (frame uint8 (H, W, 3) RGB, polyp mask bool (H, W)) for each frame of ``plan``.
    Invalid frames carry an empty mask: a polyp is annotated only where it is visible."""
    n = canvas_size(plan.width, plan.height)
    u, v, vig = frame_grid(plan.width, plan.height)
    noise_rng = np.random.default_rng([plan.seed, 1])
    # sensor noise: random crops of one noise bank per video (drawing fresh noise per frame
    # costs more than rendering the frame; offsets still decorrelate consecutive frames)
    pad = 64
    bank = noise_rng.standard_normal((plan.height + pad, plan.width + pad, 3), dtype=np.float32) * NOISE_STD
    for scene in plan.scenes:
        canvas = mucosa_canvas(np.random.default_rng([scene.seed, 0]), n, scene.tone, scene.polyp,
                               scale=plan.height / 256)
        cams = camera_path(np.random.default_rng([scene.seed, 1]), scene.segments, n, plan.width, plan.height)
        i = 0
        for g, seg in enumerate(scene.segments):
            for _ in range(seg.n):
                view = sample_view(canvas, cams[i], u, v)
                rgb, mask = view[..., :3] * vig[..., None], view[..., 3] > 0.5
                if seg.kind == "invalid":
                    rgb, mask = make_invalid(seg.invalid_kind, rgb, g), np.zeros_like(mask)
                oy, ox = noise_rng.integers(0, pad, 2)
                rgb = rgb + bank[oy:oy + plan.height, ox:ox + plan.width]
                i += 1
                yield to_uint8(rgb), mask


def render_video_frames(plan: VideoPlan) -> tuple[np.ndarray, np.ndarray]:
    """All frames of ``plan`` without encoding: uint8 (n, H, W, 3) and bool masks (n, H, W)."""
    frames, masks = zip(*iter_video_frames(plan))
    return np.stack(frames), np.stack(masks)
