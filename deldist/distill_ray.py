"""``deldist distill``: dataset distillation of a labelled classification set (DM first; DC and
DSA by ``method``), evaluated as the DM paper does, on Ray. The math is :mod:`deldist.distill`.

layout -> plan -> execute -> publish:

- read the labelled set the way ``deldist finetune`` reads its classification data (``images/``
  and a labels CSV, multi-class), resize to ``image_size``, split it per class into train / test
  (``test_fraction``, ``split_seed``; every class on both sides) and normalise with the train
  split's per-channel mean / std;
- one Ray task per seed (``seeds`` of them, ``task_cpus`` each, ``torch_threads`` each): learn
  ``images_per_class`` synthetic images per class from the train split, then train fresh
  ConvNets (``EvalSettings``) on (a) the synthetic set, (b) a random real subset of the same
  size (the same number per class, drawn with the seed: the paper's indicator), (c) the whole
  train split, and test each on the test split;
- write each seed's synthetic set as ``images/<id>.png`` and ``labels.csv`` (``name,label``),
  the layout ``deldist finetune``'s classification path reads (``classification.data`` =
  ``synthetic/seed<k>``), and as a frame store ``synthetic/seed<k>/frames/`` (``materialize``'s
  ``FRAMES_SCHEMA``: id, JPEG, width, height; published), then ``summary.json``.

Output ``<output>/distill/<name>/``: ``synthetic/seed<k>/``, ``losses.json`` (the matching loss
per iteration and seed) and ``summary.json``, published last (its manifest lists the summary,
the losses and every PNG / CSV; each frame store has its own): per seed the accuracies,
the matching loss at the start and end, how far the images moved; mean and spread (sample
standard deviation) over seeds; the fraction of full-data accuracy each recovers.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

import deldist
from deldist import storage
from deldist.config import StageConfig
from deldist.layout import RunLayout, summary_of
from deldist.report_plot import CLASSIFY_SET

log = logging.getLogger(__name__)


class Config(StageConfig):
    """``deldist distill`` settings."""

    output: str = Field(description="run root URI; writes <output>/distill/<name>/")
    name: str = "dm"
    method: Literal["dm", "dc", "dsa"] = Field("dm", description="dm: distribution matching; dc: gradient "
                                                                 "matching; dsa: gradient matching + DSA")
    data: str = Field(description="labelled set: images/ + a labels CSV (as finetune's classification.data)")
    labels: str = Field("labels.csv", description="CSV (name + label column): a URI, or relative to data")
    label_column: str = "label"
    image_size: int = Field(32, ge=8, description="images are resized to this square side")
    images_per_class: int = Field(10, ge=1)
    test_fraction: float = Field(0.4, gt=0, lt=1, description="per class")
    split_seed: int = 0
    seeds: int = Field(5, ge=1, description="seeded runs (seed, seed + 1, ...), one Ray task each")
    seed: int = 0
    iterations: int = Field(200, ge=1, description="updates of the synthetic images")
    image_lr: float = Field(1.0, gt=0, description="SGD lr on the images (DM: 1.0; DC / DSA: 0.1)")
    momentum: float = Field(0.5, ge=0, lt=1)
    real_batch: int = Field(64, ge=1, description="real images per class per iteration")
    width: int = Field(128, ge=1, description="ConvNet channels")
    depth: int = Field(3, ge=1, description="ConvNet blocks")
    strategy: str = Field("color_crop_cutout_flip_scale_rotate", description="DSA transforms ('' = none)")
    net_steps: int = Field(1, ge=0, description="dc / dsa: network SGD steps per iteration")
    net_lr: float = Field(0.01, gt=0)
    eval_epochs: int = Field(100, ge=1, description="epochs of each evaluation ConvNet")
    eval_lr: float = Field(0.01, gt=0)
    eval_batch: int = Field(256, ge=1)
    full_data: bool = Field(True, description="also train on the whole train split (the fraction's denominator)")
    task_cpus: float = Field(0.5, gt=0, description="Ray CPUs per seed task")
    torch_threads: int = Field(1, ge=1)
    jpeg_quality: int = Field(95, ge=1, le=100)


# ------------------------------------------------------------------ plan (pure)


def split_per_class(targets: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices, sorted: per class a seeded ``test_fraction`` (at least one image)
    goes to test, at least one stays in train. targets (N,) int."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        if len(idx) < 2:
            raise ValueError(f"class {c} has {len(idx)} image(s): need 2 (one to train on, one to test)")
        n_test = min(max(1, round(len(idx) * test_fraction)), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def random_subset(targets: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Seeded indices of ``per_class`` items of each class (all of a class that has fewer)."""
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(targets == c))[:per_class]
                                   for c in np.unique(targets)]))


def mean_spread(values: list[float]) -> dict[str, float]:
    """{"mean", "std" (sample standard deviation, 0 for one value), "min", "max"}."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max())}


def to_uint8(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Normalised float (N, C, H, W) -> uint8 (N, H, W, C), clipped to [0, 255]."""
    pixels = (images * std.reshape(1, -1, 1, 1) + mean.reshape(1, -1, 1, 1)) * 255
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


# ------------------------------------------------------------------ one seed (a Ray task)


def seed_run(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
             n_classes: int, config: Config, seed: int) -> dict[str, Any]:
    """Distil, then evaluate the synthetic set, a random subset of the same size and the full
    train split. Images float32 (N, C, S, S) normalised; labels int64 (N,)."""
    import torch

    from deldist import distill

    torch.set_num_threads(config.torch_threads)
    started = time.perf_counter()
    x, y = torch.from_numpy(np.array(train_x)), torch.from_numpy(np.array(train_y))  # Ray's arrays are read-only
    real = [x[y == c] for c in range(n_classes)]
    settings = distill.DistillSettings(config.iterations, config.image_lr, config.momentum, config.real_batch,
                                       config.width, config.depth, config.strategy, config.net_steps, config.net_lr)
    if config.method == "dm":
        result = distill.distill_dm(real, config.images_per_class, settings, seed)
    else:
        result = distill.distill_dc(real, config.images_per_class, settings, seed, augment=config.method == "dsa")
    init = torch.cat(distill.init_synthetic(real, config.images_per_class, torch.Generator().manual_seed(seed)))
    distill_seconds = time.perf_counter() - started
    ev = distill.EvalSettings(config.eval_epochs, config.eval_lr, config.eval_batch, 5e-4, config.width,
                              config.depth, config.strategy)
    tx, ty = torch.from_numpy(np.array(test_x)), torch.from_numpy(np.array(test_y))
    accuracy = {"distilled": distill.train_and_test(result.images, result.labels, tx, ty, n_classes, ev, seed)}
    subset = torch.from_numpy(random_subset(train_y, config.images_per_class, seed))
    accuracy["random"] = distill.train_and_test(x[subset], y[subset], tx, ty, n_classes, ev, seed)
    accuracy["initial"] = distill.train_and_test(init, result.labels, tx, ty, n_classes, ev, seed)
    if config.full_data:
        accuracy["full"] = distill.train_and_test(x, y, tx, ty, n_classes, ev, seed)
    k = max(1, len(result.losses) // 10)
    return {
        "seed": seed, "accuracy": accuracy,
        "loss_first": float(np.mean(result.losses[:k])), "loss_last": float(np.mean(result.losses[-k:])),
        "losses": [round(v, 6) for v in result.losses],
        "moved_rms": float((result.images - init).pow(2).mean().sqrt()),
        "images": result.images.numpy(), "labels": result.labels.numpy(),
        "distill_seconds": round(distill_seconds, 1), "seconds": round(time.perf_counter() - started, 1),
    }


# ------------------------------------------------------------------ output


def write_synthetic(root: str, images: np.ndarray, labels: np.ndarray, classes: list[str], quality: int,
                    meta: dict[str, Any]) -> list[str]:
    """Write a synthetic set under ``root``: ``images/<id>.png`` and ``labels.csv`` (name,label),
    the layout finetune's classification path reads, then publish ``root/frames/`` as a frame
    store (``data/`` parts in FRAMES_SCHEMA, id = ``<class>_<k>``, JPEG). images uint8
    (N, H, W, C). Returns the paths of the PNGs and the CSV (for the run's manifest)."""
    import io

    from PIL import Image

    from deldist.materialize import FRAMES_SCHEMA, encode_jpeg

    rows, files, label_rows = [], [], []
    counts: dict[int, int] = {}
    for rgb, label in zip(images, labels):
        k = counts[int(label)] = counts.get(int(label), -1) + 1
        name = f"{classes[int(label)]}_{k:03d}"
        rows.append({"id": name, "jpeg": encode_jpeg(rgb, quality), "width": int(rgb.shape[1]),
                     "height": int(rgb.shape[0])})
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG")
        files.append(storage.join(root, "images", f"{name}.png"))
        storage.write_bytes(files[-1], buf.getvalue())
        label_rows.append({"name": name, "label": classes[int(label)]})
    files.append(storage.join(root, "labels.csv"))
    storage.write_csv(files[-1], label_rows)
    store = storage.join(root, "frames")
    part = storage.join(store, "data", storage.new_part_name())
    storage.write_table(pa.Table.from_pylist(rows, schema=FRAMES_SCHEMA), part)
    storage.publish(store, [storage.resolve(part)[1]], {
        **meta, "rows": len(rows), "classes": classes, "labels": storage.join(root, "labels.csv"),
        "deldist_version": deldist.__version__, "schema": storage.schema_hex(FRAMES_SCHEMA)})
    return [storage.resolve(f)[1] for f in files]


def summarise(runs: list[dict[str, Any]], config: Config, sizes: dict[str, Any]) -> dict[str, Any]:
    """The summary.json body from the per-seed results (images left out)."""
    per_seed = [{k: v for k, v in r.items() if k not in ("images", "labels", "losses")} for r in runs]
    acc = {m: mean_spread([r["accuracy"][m] for r in runs]) for m in runs[0]["accuracy"]}
    out: dict[str, Any] = {
        "method": config.method, "name": config.name, **sizes, "seeds": [r["seed"] for r in runs],
        "accuracy": acc, "per_seed": per_seed,
        "distilled_beats_random": acc["distilled"]["mean"] > acc["random"]["mean"],
        "seeds_distilled_above_random": sum(r["accuracy"]["distilled"] > r["accuracy"]["random"] for r in runs),
        "loss_falls_every_seed": all(r["loss_last"] < r["loss_first"] for r in runs),
    }
    if "full" in acc:
        out["fraction_of_full"] = {m: acc[m]["mean"] / acc["full"]["mean"] for m in ("distilled", "random")}
    out["settings"] = config.model_dump(exclude={"inject_fault"})
    return out


def read_set(config: Config) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 (N, 3, S, S) images, int64 (N,) targets and class names, read as finetune reads them."""
    from deldist.few_shot import Classification, labelled_images

    cls = Classification(data=config.data, labels=config.labels, label_column=config.label_column)
    images, targets, classes, multilabel = labelled_images(cls, config.image_size)
    if multilabel:
        raise ValueError("distill needs a multi-class labels CSV (one label column)")
    return images, targets, classes


def run(config: Config) -> dict[str, Any]:
    """Distil ``config.seeds`` times on Ray, write the synthetic sets and the summary, publish."""
    import ray

    from deldist.runtime import init_ray

    started = time.time()
    out = RunLayout(config.output).distill(config.name)
    images, targets, classes = read_set(config)
    train, test = split_per_class(targets, config.test_fraction, config.split_seed)
    x = images.astype(np.float32) / 255
    mean = x[train].mean(axis=(0, 2, 3))
    std = x[train].std(axis=(0, 2, 3)) + 1e-6
    x = (x - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)
    sizes = {"classes": classes, "image_size": config.image_size, "images_per_class": config.images_per_class,
             "train_images": len(train), "test_images": len(test),
             "train_per_class": {c: int((targets[train] == i).sum()) for i, c in enumerate(classes)},
             "synthetic_images": config.images_per_class * len(classes),
             "size_fraction": config.images_per_class * len(classes) / len(train)}
    log.info(f"distill {config.method}: {len(classes)} classes, {len(train)} train / {len(test)} test images, "
             f"{config.images_per_class} per class, {config.seeds} seeds")
    init_ray()
    refs = [ray.put(a) for a in (x[train], targets[train], x[test], targets[test])]
    remote = ray.remote(num_cpus=config.task_cpus, max_retries=2)(seed_run)
    pending = [remote.remote(*refs, len(classes), config, config.seed + k) for k in range(config.seeds)]
    runs = sorted(ray.get(pending), key=lambda r: r["seed"])
    files = []
    for r in runs:
        root = storage.join(out, "synthetic", f"seed{r['seed']}")
        files += write_synthetic(root, to_uint8(r["images"], mean, std), r["labels"], classes, config.jpeg_quality,
                        {"method": config.method, "seed": r["seed"], "image_size": config.image_size})
        r["synthetic"] = root
        log.info(f"  seed {r['seed']}: " + ", ".join(f"{m} {a:.3f}" for m, a in r["accuracy"].items())
                 + f"; loss {r['loss_first']:.3g} -> {r['loss_last']:.3g}")
    summary = summarise(runs, config, sizes)
    summary["seconds"] = round(time.time() - started, 1)
    storage.write_json(summary_of(out), summary)
    storage.write_json(storage.join(out, "losses.json"), {str(r["seed"]): r["losses"] for r in runs})
    files += [storage.resolve(summary_of(out))[1], storage.resolve(storage.join(out, "losses.json"))[1]]
    storage.publish(out, files, {"method": config.method, "seeds": summary["seeds"]})
    return {k: summary[k] for k in ("method", "accuracy", "fraction_of_full", "distilled_beats_random")
            if k in summary} | {"summary": summary_of(out)}


def report_rows(output: str, name: str) -> list[dict[str, Any]]:
    """``deldist report``'s classification rows of distillation run ``name``: the synthetic set
    (its method, e.g. ``dm``), the random real subset of the same size and the full train split,
    each with its accuracy on the real test split (mean and spread over the seeds) and R = its
    size over the train split's (the paper's indicator: the synthetic set against a random
    real subset of the same size)."""
    summary = storage.read_json(summary_of(RunLayout(output).distill(name)))
    rows = []
    for method, key in ((summary["method"], "distilled"), ("random", "random"), ("full", "full")):
        if key not in summary["accuracy"]:
            continue
        acc = summary["accuracy"][key]
        full = key == "full"
        rows.append({"selection": f"{name}:{key}", "method": method, "pruned": CLASSIFY_SET,
                     "retained": 1.0 if full else summary["size_fraction"],
                     "frames": summary["train_images"] if full else summary["synthetic_images"],
                     "accuracy": acc["mean"], "accuracy_spread": acc.get("std"), "seeds": len(summary["seeds"]),
                     "miou": None})
    return rows
