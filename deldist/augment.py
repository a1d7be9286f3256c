"""Image augmentation for training: MAE's RandomResizedCrop + flip on the frame store's JPEGs
(:class:`AugmentParts`, a Ray Data actor-pool stage) and the paired image/mask flips of
segmentation finetuning (:func:`flip_pairs`, on the worker's device)."""

from __future__ import annotations

import io
import math
import os
from typing import Any, Iterator

import numpy as np

from deldist import storage


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale: tuple[float, float] = (0.2, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box -> (left, top, crop_w, crop_h): area a uniform
    fraction in ``scale`` of the image, aspect log-uniform in ``ratio``; 10 tries, then the
    largest central crop with an aspect inside ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def augment_jpegs(jpegs: list[bytes], size: int, scale: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """JPEG bytes -> uint8 (B, 3, size, size): RandomResizedCrop (bicubic) + horizontal flip p=0.5."""
    from PIL import Image

    out = np.empty((len(jpegs), 3, size, size), dtype=np.uint8)
    for i, data in enumerate(jpegs):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        left, top, w, h = random_resized_crop_box(rng, img.width, img.height, scale)
        arr = np.asarray(img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h)))
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
        out[i] = arr.transpose(2, 0, 1)
    return out


class AugmentParts:
    """Ray Data actor-pool stage over frame-store part URIs (one per row): reads each part's
    (id, jpeg), drops ids outside the selection and yields {"image": uint8 (<= rows, 3, size,
    size)} batches, augmented with fresh randomness (a new crop every epoch).

    An actor pool, not tasks: the pool's processes live as long as the stream. Short
    fractional-CPU tasks made Ray start a new worker process (imports: ~1.5 s of CPU) for many
    of them once the cluster's workers outnumber its CPUs, which a Train run's actors always
    do: 4.7 ms of CPU per 112 px image against 0.5 ms in a pool (bench/RESULTS.md). ``nice``
    lowers the actor's CPU priority, so on CPU-bound nodes training runs first and the data
    work fills the gaps (the trainers wait for each other in every all-reduce)."""

    def __init__(self, size: int, scale: tuple[float, float], rows: int, keep_ids: Any = None, nice: int = 0):
        import ray

        self.size, self.scale, self.rows = size, tuple(scale), rows
        if nice:
            os.nice(nice)
        # keep_ids: ObjectRef of the selection's id list, or None = keep all
        self.keep = set(ray.get(keep_ids)) if keep_ids is not None else None
        self.rng = np.random.default_rng()

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        import pyarrow.parquet as pq

        for uri in batch["uri"]:
            fs, path = storage.resolve(str(uri))
            parquet = pq.ParquetFile(fs.open_input_file(path))
            for record_batch in parquet.iter_batches(batch_size=self.rows, columns=["id", "jpeg"]):
                jpegs = record_batch.column(1).to_pylist()
                if self.keep is not None:
                    jpegs = [j for i, j in zip(record_batch.column(0).to_pylist(), jpegs) if i in self.keep]
                if jpegs:
                    yield {"image": augment_jpegs(jpegs, self.size, self.scale, self.rng)}


def flip_pairs(images: Any, masks: Any, generator: Any) -> tuple[Any, Any]:
    """Random horizontal and vertical flips, each with p = 0.5 per sample, the same for an image
    (B, 3, H, W) and its mask (B, H, W); draws from ``generator`` (a CPU torch.Generator). Done
    on the worker's device: a Ray Data stage for it started new tasks every epoch."""
    import torch

    for dim, draws in ((-1, torch.rand(len(images), generator=generator)),
                       (-2, torch.rand(len(images), generator=generator))):
        flip = (draws < 0.5).to(images.device)
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(dim), images)
        masks = torch.where(flip.view(-1, 1, 1), masks.flip(dim), masks)
    return images, masks
