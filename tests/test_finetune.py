"""Downstream finetuning: segmentation on Ray Train beats an all-background predictor on the
sample's Kvasir-style set; MedFMC few-shot classification runs (multi-class and multi-label)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from deldist import augment, finetune, labelled, storage
from deldist.layout import RunLayout
from deldist.metrics import confusion_counts, segmentation_scores

MODEL = "deldist_vit_micro_patch16"
SIZE = 64


def _config(root: str, data: str, **extra) -> finetune.Config:
    settings = {"output": root, "model": MODEL, "image_size": SIZE, "random_init": True,
                "cpus_per_worker": 1.0, "torch_threads": 2, **extra}
    return finetune.Config.model_validate(settings)


def test_split_and_pairs(tiny_sample):
    pairs = labelled.segmentation_pairs(str(tiny_sample / "kvasir"))
    assert len(pairs) == 12 and all(p[1].endswith(".jpg") and p[2].endswith(".png") for p in pairs)
    train, test = labelled.split_indices(12, 0.25, 0)
    assert len(test) == 3 and sorted(np.r_[train, test].tolist()) == list(range(12))
    mask = labelled.load_mask(storage.read_bytes(pairs[0][2]), SIZE)
    assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, 1}


def test_segmentation_beats_all_background(ray_session, tiny_sample, tmp_path):
    data = str(tiny_sample / "kvasir")
    config = _config(str(tmp_path), data, name="seg", tasks=["segmentation"],
                     segmentation={"data": data, "epochs": 10, "batch_size": 3, "lr": 3e-4, "test_fraction": 0.25})
    summary = finetune.run(config)
    seg = summary["segmentation"]
    # the all-background predictor on the same held-out images
    pairs = labelled.segmentation_pairs(data)
    _, test = labelled.split_indices(len(pairs), 0.25, 0)
    masks = np.stack([labelled.load_mask(storage.read_bytes(pairs[i][2]), SIZE) for i in test])
    background = segmentation_scores(confusion_counts(np.zeros_like(masks), masks))
    assert masks.any() and seg["test_images"] == len(test)
    assert seg["miou_fg_bg"] > background["miou_fg_bg"] + 0.05, (seg, background)
    assert seg["iou_fg"] > 0.1 and seg["miou"] == seg["iou_fg"]
    out = RunLayout(str(tmp_path)).finetune("seg")
    assert storage.is_published(out)
    assert [h["epoch"] for h in storage.read_json(storage.join(out, "segmentation_metrics.json"))] == list(range(1, 11))


def test_few_shot_classification(ray_session, tiny_sample, tmp_path):
    data = str(tiny_sample / "kvasir")
    quick = {"data": data, "n_shots": [1], "runs": 2, "linear_steps": 30, "full_steps": 3, "batch_size": 4,
             "cpus_per_run": 1.0}
    summary = finetune.run(_config(str(tmp_path), data, name="cls", tasks=["classification"], classification=quick))
    cls = summary["classification"]
    assert cls["task"] == "multiclass" and cls["classes"] == ["inflamed", "normal", "polyp"]
    assert [(r["mode"], r["shot"], r["runs"]) for r in cls["table"]] == [("linear", 1, 2), ("full", 1, 2)]
    for row in cls["table"]:
        assert 0 <= row["acc"] <= 1 and 0 <= row["auc"] <= 1
    runs = storage.list_files(storage.join(RunLayout(str(tmp_path)).finetune("cls"), "classification", "runs"))
    assert len(runs) == 4

    # multi-label: 0/1 columns; mAP and AUC
    with open(tiny_sample / "kvasir" / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    labels = tmp_path / "multilabel.csv"
    with open(labels, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["name", "polyp", "inflamed"])
        w.writeheader()
        w.writerows({"name": r["name"], "polyp": r["polyp"], "inflamed": int(r["label"] == "inflamed")} for r in rows)
    multi = {**quick, "labels": str(labels),
             "label_columns": ["polyp", "inflamed"], "runs": 1, "modes": ["linear"]}
    summary = finetune.run(_config(str(tmp_path), data, name="ml", tasks=["classification"], classification=multi))
    row = summary["classification"]["table"][0]
    assert summary["classification"]["metrics"] == ["map", "auc"] and 0 <= row["map"] <= 1


def separable_set(root, per_class: int = 12, size: int = 64) -> str:
    """Three classes told apart by colour (red, green, blue-dominant) under random textures,
    written as images/ + labels.csv: a linear probe on any encoder that sees colour separates them."""
    from PIL import Image

    rng = np.random.default_rng(7)
    (root / "images").mkdir(parents=True)
    rows = []
    for k, name in enumerate(("red", "green", "blue")):
        for i in range(per_class):
            pixels = rng.integers(0, 90, (size, size, 3))
            pixels[..., k] += 140 + rng.integers(0, 20)
            stem = f"{name}_{i:02d}"
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / "images" / f"{stem}.png")
            rows.append({"name": stem, "label": name})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["name", "label"])
        w.writeheader()
        w.writerows(rows)
    return str(root)


def test_classification_beats_chance_on_a_separable_set(ray_session, tmp_path):
    """5-shot linear probe on a random-initialised encoder: chance is 1/3 accuracy and 0.5 AUC."""
    data = separable_set(tmp_path / "colours")
    quick = {"data": data, "n_shots": [5], "runs": 2, "linear_steps": 60, "batch_size": 8, "cpus_per_run": 1.0,
             "modes": ["linear"], "pooling": "mean"}
    summary = finetune.run(_config(str(tmp_path), data, name="colours", tasks=["classification"],
                                   classification=quick))
    row = summary["classification"]["table"][0]
    assert row["runs"] == 2 and row["acc"] >= 0.9 and row["auc"] >= 0.95, row


def test_needs_weights_or_random_init(tmp_path):
    with pytest.raises(ValueError, match="random_init"):
        finetune.run(finetune.Config(output=str(tmp_path)))


def test_flip_pairs_keeps_image_and_mask_aligned():
    import torch

    b, h, w = 64, 6, 8
    base = torch.arange(h * w).view(h, w)
    masks = base.expand(b, h, w).clone()
    images = torch.stack([base, base + 1000, base + 2000]).expand(b, 3, h, w).clone()
    out_images, out_masks = augment.flip_pairs(images, masks, torch.Generator().manual_seed(0))
    assert torch.equal(out_images[:, 0], out_masks) and torch.equal(out_images[:, 2], out_masks + 2000)
    flips = {(False, False): base, (True, False): base.flip(-1), (False, True): base.flip(-2),
             (True, True): base.flip(-1).flip(-2)}
    kinds = [next(k for k, f in flips.items() if torch.equal(m, f)) for m in out_masks]  # StopIteration: no flip
    assert set(kinds) == set(flips)  # all four occur in 64 draws
