"""Few-shot classification of an encoder (the MedFMC protocol), the classification half of
``deldist finetune``.

N-shot training sets (``n_shots``, default 1, 5, 10) drawn with ``runs`` seeds (default 5), the
rest is the test set; linear probe (frozen encoder) and full finetuning; multi-class -> Acc, AUC;
multi-label -> mAP, AUC; averaged over the seeds. Each (mode, shot, seed) run is a single-process
Ray task (dozens of runs on a few images each: DDP would only add start-up cost); its result is
stored as it finishes, so a rerun only runs the missing ones.

Output under ``<output>/finetune/<name>/``: ``classification/runs/*.json`` and
``classification.json``.
"""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING, Any, Iterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from deldist import storage
from deldist.labelled import file_stem, list_images, load_image
from deldist.layout import RunLayout

if TYPE_CHECKING:
    from deldist.finetune import Config


class Classification(BaseModel):
    """MedFMC-style few-shot classification settings (``classification.<key>``)."""

    model_config = ConfigDict(extra="forbid")
    data: str | None = Field(None, description="root with images/ and a labels CSV")
    labels: str = Field("labels.csv", description="CSV (name + label column(s)): a URI, or relative to data")
    label_column: str = Field("label", description="multi-class: the class name column")
    label_columns: list[str] | None = Field(None, description="multi-label: 0/1 columns, one per class")
    n_shots: list[int] = Field(default_factory=lambda: [1, 5, 10])
    runs: int = Field(5, ge=1, description="seeded splits per shot count")
    modes: list[Literal["linear", "full"]] = Field(default_factory=lambda: ["linear", "full"])
    pooling: Literal["cls", "mean"] = "cls"
    linear_steps: int = Field(300, ge=1)
    linear_lr: float = Field(1e-2, gt=0)
    full_steps: int = Field(100, ge=1)
    full_lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(16, ge=1)
    cpus_per_run: float = Field(1.0, gt=0)


def read_labels(config: Classification) -> tuple[list[str], np.ndarray, list[str], bool]:
    """(image names, targets, class names, multilabel) from the labels CSV; targets (N,) int
    (multi-class) or (N, C) 0/1 (multi-label)."""
    uri = config.labels if "://" in config.labels or config.labels.startswith("/") else \
        storage.join(config.data, config.labels)
    text = storage.read_bytes(uri).decode("utf-8-sig")
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        raise ValueError(f"{config.labels} under {config.data} has no rows")
    names = [r["name"] for r in rows]
    if config.label_columns:
        targets = np.array([[int(float(r[c])) for c in config.label_columns] for r in rows], dtype=np.int64)
        return names, targets, list(config.label_columns), True
    classes = sorted({r[config.label_column] for r in rows})
    return names, np.array([classes.index(r[config.label_column]) for r in rows], dtype=np.int64), classes, False


def labelled_images(cls: Classification, image_size: int) -> tuple[np.ndarray, np.ndarray, list[str], bool]:
    """All labelled images as uint8 (N, 3, S, S) plus targets, classes, multilabel."""
    names, targets, classes, multilabel = read_labels(cls)
    files = list_images(storage.join(cls.data, "images"))
    missing = [n for n in names if file_stem(n) not in files]
    if missing:
        raise FileNotFoundError(f"{len(missing)} labelled images are missing under images/: {missing[:5]}")
    images = np.stack([load_image(storage.read_bytes(files[file_stem(n)]), image_size) for n in names])
    return images, targets, classes, multilabel


def few_shot_run(images: np.ndarray, targets: np.ndarray, train_idx: np.ndarray, test_idx: np.ndarray,
                       mode: str, multilabel: bool, cfg: dict[str, Any]) -> dict[str, float]:
    """One few-shot run: train on ``train_idx``, score ``test_idx``. images uint8 (N, 3, S, S)."""
    import torch
    import torch.nn.functional as F

    from deldist.encoders import encoder_with_weights
    from deldist.metrics import classification_scores
    from deldist.models import ClassifierViT

    torch.manual_seed(cfg["run_seed"])
    torch.set_num_threads(cfg["torch_threads"])
    cls = cfg["classification"]
    n_classes = targets.shape[1] if multilabel else int(targets.max()) + 1
    model = ClassifierViT(encoder_with_weights(cfg["model"], cfg["image_size"], cfg["seed"], cfg["weights"], cfg["random_init"]),
                          n_classes, cls["pooling"])
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1) * 255
    x_all = torch.from_numpy(images)
    y_all = torch.from_numpy(targets).float() if multilabel else torch.from_numpy(targets)

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, y) if multilabel else F.cross_entropy(logits, y)

    def batches(idx: np.ndarray, size: int) -> Iterator[np.ndarray]:
        for i in range(0, len(idx), size):
            yield idx[i:i + size]

    if mode == "linear":
        model.eval()
        with torch.inference_mode():
            feats = torch.cat([model.features((x_all[b].float() - mean) / std) for b in batches(np.arange(len(x_all)), 64)])
        head = torch.nn.Linear(feats.shape[1], n_classes)
        opt = torch.optim.AdamW(head.parameters(), lr=cls["linear_lr"], weight_decay=1e-4)
        xf = feats[train_idx]
        for _ in range(cls["linear_steps"]):
            opt.zero_grad()
            loss_fn(head(xf), y_all[train_idx]).backward()
            opt.step()
        with torch.inference_mode():
            logits = head(feats[test_idx])
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=cls["full_lr"], weight_decay=0.05)
        rng = np.random.default_rng(cfg["run_seed"])
        bs = min(cls["batch_size"], len(train_idx))
        for _ in range(cls["full_steps"]):
            b = rng.choice(train_idx, size=bs, replace=False)
            x = x_all[b].float()
            flip = torch.from_numpy(rng.random(bs) < 0.5)
            x[flip] = x[flip].flip(-1)
            opt.zero_grad()
            loss_fn(model((x - mean) / std), y_all[b]).backward()
            opt.step()
        model.eval()
        with torch.inference_mode():
            logits = torch.cat([model((x_all[b].float() - mean) / std) for b in batches(test_idx, 64)])
    scores = torch.sigmoid(logits) if multilabel else logits.softmax(dim=1)
    return classification_scores(scores.numpy(), targets[test_idx], multilabel)


def run_classification(config: Config, use_gpu: bool) -> dict[str, Any]:
    """Every (mode, shot, seed) run not stored yet, as Ray tasks; the table averaged over seeds."""
    import ray

    from deldist.metrics import few_shot_split, mean_over_runs

    cls = config.classification
    if not cls.data:
        raise ValueError("classification.data is not set (images/ + a labels CSV)")
    images, targets, classes, multilabel = labelled_images(cls, config.image_size)
    runs_dir = storage.join(RunLayout(config.output).finetune(config.name), "classification", "runs")
    images_ref = ray.put(images)
    remote = ray.remote(num_cpus=cls.cpus_per_run, num_gpus=1 if use_gpu else 0, max_retries=2)(few_shot_run)
    pending, results = {}, {}
    for shot in cls.n_shots:
        for r in range(cls.runs):
            seed = config.seed + r
            train_idx, test_idx = few_shot_split(targets, shot, seed)
            for mode in cls.modes:
                key = f"{mode}-{shot}shot-seed{seed}"
                uri = storage.join(runs_dir, f"{key}.json")
                if storage.exists(uri):
                    results[key] = storage.read_json(uri)
                    continue
                cfg = {**config.model_dump(), "run_seed": seed,
                       "torch_threads": config.torch_threads or max(1, int(cls.cpus_per_run))}
                pending[remote.remote(images_ref, targets, train_idx, test_idx, mode, multilabel, cfg)] = (
                    key, uri, {"mode": mode, "shot": shot, "seed": seed, "train": len(train_idx), "test": len(test_idx)})
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        key, uri, meta = pending.pop(done[0])
        results[key] = {**meta, **ray.get(done[0])}
        storage.write_json(uri, results[key])
    table = []
    for mode in cls.modes:
        for shot in cls.n_shots:
            runs = [{k: v for k, v in r.items() if k in ("acc", "auc", "map")}
                    for r in results.values() if r["mode"] == mode and r["shot"] == shot]
            table.append({"mode": mode, "shot": shot, "runs": len(runs), **mean_over_runs(runs)})
    summary = {"task": "multilabel" if multilabel else "multiclass", "classes": classes,
               "metrics": ["map", "auc"] if multilabel else ["acc", "auc"], "table": table}
    storage.write_json(storage.join(RunLayout(config.output).finetune(config.name), "classification.json"), summary)
    return summary
