"""Labelled image sets for finetuning, as ``deldist finetune`` reads them: a Kvasir-SEG layout
(``images/`` and ``masks/`` with the same stems, masks 0/255) for segmentation, and the
loaders and augmentation its training loop applies."""

from __future__ import annotations

import io
import posixpath

import numpy as np

from deldist import storage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def file_stem(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path))[0]


def list_images(root: str) -> dict[str, str]:
    """stem -> URI of every image file directly under ``root``."""
    return {file_stem(p): storage.to_uri(root, p) for p in storage.list_files(root, recursive=False)
            if p.lower().endswith(IMAGE_EXTENSIONS)}


def segmentation_pairs(data: str) -> list[tuple[str, str, str]]:
    """(name, image URI, mask URI) for the stems present in both ``images/`` and ``masks/``."""
    images = list_images(storage.join(data, "images"))
    masks = list_images(storage.join(data, "masks"))
    names = sorted(set(images) & set(masks))
    if not names:
        raise FileNotFoundError(f"no image/mask pairs under {data} (expected images/ and masks/ with the same names)")
    return [(n, images[n], masks[n]) for n in names]


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test split of range(n) -> (train, test) sorted; each side non-empty when n >= 2."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = min(max(1, round(n * test_fraction)), n - 1)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def load_image(data: bytes, size: int) -> np.ndarray:
    """Image bytes -> uint8 (3, size, size), the whole image resized (bilinear)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.BILINEAR)
    return np.asarray(img).transpose(2, 0, 1).copy()


def load_mask(data: bytes, size: int) -> np.ndarray:
    """Mask bytes (0/255, any mode) -> uint8 (size, size) in {0, 1} (nearest resize, > 127)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("L").resize((size, size), Image.NEAREST)
    return (np.asarray(img) > 127).astype(np.uint8)


def load_pairs(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Ray Data: {image_uri, mask_uri[, index]} -> {"image": uint8 (B, 3, S, S), "mask": uint8
    (B, S, S)[, "index": int64 (B,), the pair's row, passed through]}."""
    images = [load_image(storage.read_bytes(str(u)), size) for u in batch["image_uri"]]
    masks = [load_mask(storage.read_bytes(str(u)), size) for u in batch["mask_uri"]]
    index = {"index": np.asarray(batch["index"], np.int64)} if "index" in batch else {}
    return {"image": np.stack(images), "mask": np.stack(masks), **index}


def selection_subset(output: str, selection: str, ids: list[str], train_idx: np.ndarray,
                     test_idx: np.ndarray) -> np.ndarray:
    """The training rows a selection of the labelled set retains: ``train_idx`` restricted to the
    ids in ``<output>/selections/<selection>/retained``. ids: every pair's id, by row. A
    selection that retains a test image, or ids that are not labelled pairs, is refused."""
    from deldist.layout import RunLayout

    retained = set(storage.read_published(RunLayout(output).selection_table(selection, "retained"),
                                          columns=["id"]).column("id").to_pylist())
    unknown = retained - set(ids)
    if unknown:
        raise ValueError(f"selection {selection!r} retains {len(unknown)} ids that are no image/mask pair here, "
                         f"e.g. {sorted(unknown)[:3]}")
    leaked = [ids[i] for i in test_idx if ids[i] in retained]
    if leaked:
        raise ValueError(f"selection {selection!r} retains {len(leaked)} images of the test split, e.g. {leaked[:3]}: "
                         "prune with the finetune's test_fraction and split_seed")
    kept = np.asarray([i for i in train_idx if ids[i] in retained], dtype=np.int64)
    if len(kept) == 0:
        raise ValueError(f"selection {selection!r} retains no training image")
    return kept


