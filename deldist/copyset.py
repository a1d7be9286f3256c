"""A near-duplicate evaluation set built from real images, with known groups.

Sources: the photographs and medical images that ship inside scikit-image's wheel
(``skimage.data``: astronaut, coffee, chelsea, hubble deep field, retina, immunohistochemistry,
cells, the left view of the stereo motorcycle, ...), scikit-learn's two sample photographs and
matplotlib's portrait of Grace Hopper; nothing is downloaded. Images of
400 px or more on both sides are cut into 2 x 2 disjoint tiles, each its own group (more
groups, and groups that look alike: tiles of one photograph); textures (brick, grass, cells,
the deep field, ...) stay whole, since their quadrants show the same thing and any encoder
would rightly call them duplicates. Every group holds its original
and copies made the way uploads get copied: JPEG re-encodes, a half-resolution re-export,
brightness and gamma changes, sensor noise, a 1 % crop and a 1 degree rotation.

Layout under ``out``: ``images/g<NNN>_<source>/<variant>.png`` and ``groups.parquet``
(key relative to ``images/``, group, source, variant). scikit-image is a test dependency.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageEnhance

SKIMAGE_SOURCES = ("astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field", "rocket", "brick",
                   "grass", "gravel", "moon", "retina", "immunohistochemistry", "cell")
SKLEARN_SOURCES = ("china.jpg", "flower.jpg")
TILE_FROM = 400  # px: photographs at least this large on both sides become 2 x 2 tiles
# textures: their quadrants show the same thing (any encoder calls them duplicates), so each
# stays one group
TEXTURES = ("brick", "grass", "gravel", "moon", "hubble_deep_field", "immunohistochemistry", "cell")
MAX_SIDE = 384  # px: groups are scaled down to this (deldist embeds at 224 px)


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _noise(image: Image.Image, sigma: float, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.asarray(image, np.float64) + rng.normal(0.0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _crop(image: Image.Image, fraction: float) -> Image.Image:
    w, h = image.size
    dx, dy = round(fraction * w), round(fraction * h)
    return image.crop((dx, dy, w - dx, h - dy))


def _gamma(image: Image.Image, gamma: float) -> Image.Image:
    return Image.fromarray((255.0 * (np.asarray(image) / 255.0) ** gamma).astype(np.uint8))


# variant name -> transform(image, seed); every file is written as PNG (JPEG variants carry
# their compression artefacts, decoded)
VARIANTS: dict[str, Callable[[Image.Image, int], Image.Image]] = {
    "original": lambda im, s: im,
    "jpeg_q40": lambda im, s: _jpeg(im, 40),
    "jpeg_q20_brighter": lambda im, s: _jpeg(ImageEnhance.Brightness(im).enhance(1.1), 20),
    "half_resolution": lambda im, s: im.resize((im.width // 2, im.height // 2), Image.BILINEAR),
    "brighter": lambda im, s: ImageEnhance.Brightness(im).enhance(1.15),
    "darker": lambda im, s: ImageEnhance.Brightness(im).enhance(0.85),
    "gamma_0.8": lambda im, s: _gamma(im, 0.8),
    "noise_6": lambda im, s: _noise(im, 6.0, s),
    "crop_1pct": lambda im, s: _crop(im, 0.01),
    "rotate_1deg": lambda im, s: im.rotate(1, resample=Image.BILINEAR),
}


def _as_rgb(array: np.ndarray) -> Image.Image:
    a = np.asarray(array)
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        a = (255.0 * (a - a.min()) / max(np.ptp(a), 1e-9)).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(a[..., :3]))


def source_images() -> Iterator[tuple[str, Image.Image]]:
    """(name, RGB image) of every source, from the installed scikit-image / scikit-learn."""
    import matplotlib.cbook
    import skimage.data
    from sklearn.datasets import load_sample_image

    for name in SKIMAGE_SOURCES:
        yield name, _as_rgb(getattr(skimage.data, name)())
    yield "motorcycle", _as_rgb(skimage.data.stereo_motorcycle()[0])  # the left view only
    for name in SKLEARN_SOURCES:
        yield name.split(".")[0], _as_rgb(load_sample_image(name))
    yield "grace_hopper", _as_rgb(np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg"))))


def groups() -> Iterator[tuple[str, Image.Image]]:
    """(group source name, image): large photographs as 2 x 2 disjoint tiles."""
    for name, image in source_images():
        w, h = image.size
        if min(w, h) >= TILE_FROM and name not in TEXTURES:
            tiles = [(f"{name}_t{2 * i + j}", image.crop((j * w // 2, i * h // 2, (j + 1) * w // 2, (i + 1) * h // 2)))
                     for i in range(2) for j in range(2)]
        else:
            tiles = [(name, image)]
        for tile_name, tile in tiles:
            tile.thumbnail((MAX_SIDE, MAX_SIDE), Image.LANCZOS)
            yield tile_name, tile


def write_set(out: str | Path, seed: int = 0) -> pa.Table:
    """Write the set under ``out`` (see the module doc) -> the groups table."""
    out = Path(out)
    rows: dict[str, list] = {"key": [], "group": [], "source": [], "variant": []}
    for g, (name, image) in enumerate(groups()):
        folder = out / "images" / f"g{g:03d}_{name}"
        folder.mkdir(parents=True, exist_ok=True)
        for v, (variant, transform) in enumerate(VARIANTS.items()):
            path = folder / f"{variant}.png"
            transform(image, seed * 1000 + g * 16 + v).save(path)
            rows["key"].append(f"{folder.name}/{path.name}")
            rows["group"].append(g)
            rows["source"].append(name)
            rows["variant"].append(variant)
    table = pa.table(rows)
    pq.write_table(table, out / "groups.parquet")
    return table


def group_figures(kept_keys: list[str], table: pa.Table) -> dict[str, int]:
    """Groups kept (>= 1 frame), groups lost, redundant frames kept (kept - groups kept)."""
    group_of = dict(zip(table.column("key").to_pylist(), table.column("group").to_pylist()))
    kept_groups = {group_of[k] for k in kept_keys}
    n_groups = len(set(group_of.values()))
    return {"groups": n_groups, "groups_kept": len(kept_groups), "groups_lost": n_groups - len(kept_groups),
            "frames_kept": len(kept_keys), "redundant_kept": len(kept_keys) - len(kept_groups)}


def evaluate(root: str, table: pa.Table, max_hamming: int | None = None) -> dict[str, dict[str, int]]:
    """The near-copy figures on a curated copy of the set (``root``: a run root with embeddings,
    clusters and dedup scores of ``images/``), each as :func:`group_figures`:

    - ``near_copy``: deldist's near-copy pass alone at ``max_hamming`` (default: its default);
    - ``budget``: near-copy pass + MedDEL dedup with ``target_ratio`` = groups / frames;
    - ``hash_only``: perceptual hashes alone at the same budget: the smallest Hamming bound that
      keeps at most one frame per group on average (the hash-only baseline).
    """
    from deldist import select, storage
    from deldist.layout import RunLayout

    n_groups = len(set(table.column("group").to_pylist()))
    rule = {} if max_hamming is None else {"max_hamming": max_hamming}
    layout = RunLayout(root)
    ids = storage.read_published(layout.embeddings, ["id"]).column("id").to_pylist()

    def kept_keys(name: str, **settings: object) -> list[str]:
        select.run(select.Config.model_validate({"output": root, "name": name, **settings}))
        kept = storage.read_published(layout.selection_table(name, "retained")).column("id").to_pylist()
        return [k.split("#")[0].split("images/", 1)[-1] for k in kept]

    out = {"near_copy": group_figures(kept_keys("copies_near", outlier_distance=None,
                                                deldist_rules={"near_copy": rule}), table),
           "budget": group_figures(kept_keys("copies_budget", target_ratio=n_groups / len(ids),
                                             deldist_rules={"near_copy": rule}), table)}
    for bound in range(0, 33, 2):  # pHash distances are even
        figures = group_figures(kept_keys("copies_hash", outlier_distance=None,
                                          deldist_rules={"near_copy": {"max_hamming": bound}}), table)
        if figures["frames_kept"] <= n_groups:
            out["hash_only"] = {**figures, "max_hamming": bound}
            break
    return out
