"""Downstream evaluation of an encoder (a pretraining export, any checkpoint ``deldist embed``
loads, or random init as the control).

Segmentation (the MedDEL paper's protocol): ViT encoder + a light per-token MLP head,
bilinearly upsampled to the mask, Dice + cross-entropy, on a Kvasir-SEG layout (``images/``
and ``masks/`` with the same stems; masks 0/255). Trained on Ray Train (``TorchTrainer``, DDP,
checkpoint every epoch, resumable like ``deldist pretrain``); rank 0 evaluates the held-out
split. Reports ``iou_fg`` (what the report calls mIoU), ``iou_bg``, ``miou_fg_bg``,
``iou_fg_per_image``, ``dice_fg`` (see :mod:`deldist.metrics`), computed at ``image_size``.

Classification (MedFMC protocol): N-shot training sets (``n_shots``, default 1, 5, 10) drawn
with ``runs`` seeds (default 5), the rest is the test set; linear probe (frozen encoder) and
full finetuning; multi-class -> Acc, AUC; multi-label -> mAP, AUC; averaged over the seeds.
Each (mode, shot, seed) run is a single-process Ray task (dozens of runs on a few images each:
DDP would only add start-up cost); its result is stored as it finishes, so a rerun only runs
the missing ones.

Output ``<output>/finetune/<name>/``: ``segmentation.json`` (+ per-epoch ``segmentation_metrics.csv/json``),
``classification/runs/*.json`` and ``classification.json``, ``summary.json``, published.
"""

from __future__ import annotations

import csv
import io
import math
import posixpath
import time
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from deldist import storage
from deldist.augment import flip_pairs
from deldist.config import StageConfig
from deldist.dynamics import PassRecorder, write_dynamics
from deldist.frames import IMAGENET_MEAN, IMAGENET_STD
from deldist.ids import frame_id
from deldist.labelled import file_stem, list_images, load_image, load_pairs, segmentation_pairs, split_indices
from deldist.layout import RunLayout, summary_of
from deldist.trainer import LocalSession, LoopSettings, RayTrainSession, Training, all_reduce_sum, ray_run_config


class Segmentation(BaseModel):
    """Segmentation finetuning settings (``segmentation.<key>``)."""

    model_config = ConfigDict(extra="forbid")
    data: str | None = Field(None, description="Kvasir-SEG layout root: images/ + masks/")
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0
    epochs: int = Field(30, ge=1)
    warmup_epochs: float = Field(2, ge=0)
    batch_size: int = Field(8, ge=1, description="per worker")
    lr: float = Field(1e-4, gt=0, description="encoder peak lr (the head gets lr * head_lr_scale)")
    head_lr_scale: float = Field(10.0, gt=0)
    layer_decay: float | None = Field(0.75, gt=0, le=1, description="layer-wise lr decay of the encoder (MAE "
                                                                    "finetuning recipe); null: one lr for all blocks")
    weight_decay: float = Field(0.05, ge=0)
    hidden: int = Field(256, ge=1, description="MLP head width")
    dice_weight: float = Field(1.0, ge=0)
    selection: str | None = Field(None, description="train on this selection's retained ids only (a pruning of the "
                                                    "labelled set, `deldist prune`); the test split stays whole")
    record_dynamics: bool = Field(False, description="record each sample's Dice and EL2N at every training pass "
                                                     "-> finetune/<name>/dynamics/ (what `deldist prune` scores)")


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


class Config(StageConfig):
    """``deldist finetune`` settings."""

    output: str = Field(description="run root URI; writes <output>/finetune/<name>/")
    name: str = "finetune"
    tasks: list[Literal["segmentation", "classification"]] = Field(default_factory=lambda: ["segmentation"])
    weights: str | None = Field(None, description="encoder weights (e.g. <output>/pretrain/<run>/encoder.safetensors)")
    random_init: bool = Field(False, description="the control: a random-initialised encoder")
    model: str = "vit_base_patch16_224"
    image_size: int = Field(224, ge=16)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    seed: int = 0
    segmentation: Segmentation = Field(default_factory=Segmentation)
    classification: Classification = Field(default_factory=Classification)
    # Ray wiring
    num_workers: int = Field(1, ge=1)
    use_gpu: bool | None = None
    cpus_per_worker: float = Field(1.0, gt=0)
    torch_threads: int | None = Field(None, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    storage_path: str | None = Field(None, description="Ray Train checkpoints; default <output>/finetune/_ray")
    max_failures: int = Field(3, ge=-1)
    engine: Literal["ray_train", "local"] = Field(
        "ray_train", description="segmentation: local runs the same loop in the driver (small demos)")
    load_cpus: float = Field(0.25, gt=0)


# ------------------------------------------------------------------ segmentation (Ray Train worker)


def _encoder(model: str, image_size: int, seed: int, weights: str | None, random_init: bool) -> Any:
    from deldist.encoders import build_encoder, load_weights

    encoder = build_encoder(model, image_size, seed)
    load_weights(encoder, weights, random_init)
    return encoder


@dataclass(frozen=True)
class SegLoop:
    """The segmentation loop's configuration (typed)."""

    settings: LoopSettings
    model: str
    image_size: int
    weights: str | None
    random_init: bool
    segmentation: Segmentation
    steps_per_epoch: int
    n_train: int
    ids: tuple[str, ...] = ()  # every labelled pair's id, by row index (recorded dynamics name them)
    train_index: tuple[int, ...] = ()


def segmentation_loop(config: dict[str, Any], session: Any = None) -> None:
    """Ray Train worker (or ``LocalSession``): finetune encoder + MLP head; rank 0 evaluates
    the test split at the end. config: ``{"loop": SegLoop}``."""
    import torch

    from deldist.models import SegmentationViT, dice_ce_loss, lr_lambda, param_groups

    loop: SegLoop = config["loop"]
    seg = loop.segmentation
    session = session or RayTrainSession()
    model = SegmentationViT(_encoder(loop.model, loop.image_size, loop.settings.seed, loop.weights, loop.random_init),
                            num_classes=2, hidden=seg.hidden)
    groups = [dict(g, lr=seg.lr * g.pop("lr_scale", 1.0))
              for g in param_groups(model.encoder, seg.weight_decay, seg.layer_decay)]
    groups += [dict(g, lr=seg.lr * seg.head_lr_scale, head=True) for g in param_groups(model.head, seg.weight_decay)]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(
        loop.steps_per_epoch * seg.epochs, round(seg.warmup_epochs * loop.steps_per_epoch), 1.0, 0.0))
    run = Training.start(session, model, optimizer, scheduler, loop.settings)
    train = session.dataset("train")
    # a resumed run draws other flips than the run it resumes
    flips = torch.Generator().manual_seed(loop.settings.seed * 7919 + session.rank * 104729 + run.state["step"])
    recorder = PassRecorder(session.rank) if seg.record_dynamics else None
    while run.state["epoch"] < seg.epochs:
        run.model.train()
        loss_sum, n, started = 0.0, 0, time.perf_counter()
        # a new order every epoch: blocks reshuffled (randomize_block_order) + a local buffer
        for i, batch in enumerate(train.iter_torch_batches(batch_size=seg.batch_size, drop_last=True,
                                                           local_shuffle_buffer_size=4 * seg.batch_size,
                                                           dtypes={"image": torch.uint8, "mask": torch.long, "index": torch.long})):
            if i >= loop.steps_per_epoch:
                break
            images, masks = flip_pairs(batch["image"].to(run.device), batch["mask"].to(run.device), flips)
            with run.autocast():
                logits = run.model(run.inputs(images))
            loss = dice_ce_loss(logits, masks, seg.dice_weight)
            if recorder is not None:  # this pass's per-sample Dice and EL2N, on every worker
                recorder.add(batch["index"], run.state["epoch"] + 1, run.state["step"] + 1, logits, masks)
            run.step(loss)
            loss_sum += float(loss.detach())
            n += 1
        loss_total, n_total = all_reduce_sum([loss_sum, n], run.device)
        if recorder is not None:
            recorder.end_epoch(run.state)  # gathered into rank 0's checkpointed state
        run.end_epoch({"epoch": run.state["epoch"] + 1, "step": run.state["step"], "loss": loss_total / max(1, n_total),
                       "lr": max(g["lr"] for g in run.optimizer.param_groups if not g.get("head")),  # the last block's
                       "seconds": time.perf_counter() - started}, "segmentation_metrics")
    if session.rank == 0:
        if recorder is not None:
            write_dynamics(loop.settings.run_dir, run.state.get("dynamics"), list(loop.ids), list(loop.train_index),
                           posixpath.basename(seg.data.rstrip("/")))
        _evaluate_segmentation(run, loop, session.dataset("test"))


def _evaluate_segmentation(run: Training, loop: SegLoop, test: Any) -> None:
    """Rank 0: the test split's foreground IoU (the report's mIoU) and the fg/bg mean ->
    ``segmentation.json``."""
    import torch

    from deldist.metrics import confusion_counts, per_image_fg_iou, segmentation_scores

    run.model.eval()
    counts = np.zeros(4, dtype=np.int64)
    iou_sum, images = 0.0, 0
    with torch.inference_mode():
        for batch in test.iter_torch_batches(batch_size=loop.segmentation.batch_size,
                                             dtypes={"image": torch.uint8, "mask": torch.long, "index": torch.long}):
            with run.autocast():
                pred = run.core(run.inputs(batch["image"])).argmax(dim=1).cpu().numpy()
            target = batch["mask"].numpy()
            counts += confusion_counts(pred, target)
            iou_sum += float(per_image_fg_iou(pred, target).sum())
            images += len(target)
    scores = segmentation_scores(counts, iou_sum, images)
    state = run.state
    storage.write_json(storage.join(loop.settings.run_dir, "segmentation.json"), {
        **scores, "miou": scores["iou_fg"], "miou_definition": "iou_fg: foreground IoU over the test set",
        "test_images": images, "train_images": loop.n_train, "epochs": state["epoch"], "steps": state["step"],
        "weights": loop.weights, "random_init": loop.random_init, "starts": state["starts"],
        "final_loss": state["history"][-1]["loss"] if state["history"] else None,
    })


def run_segmentation(config: Config, use_gpu: bool) -> dict[str, Any]:
    import ray
    from ray.train import DataConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    seg = config.segmentation
    if not seg.data:
        raise ValueError("segmentation.data is not set (a Kvasir-SEG layout: images/ + masks/)")
    pairs = segmentation_pairs(seg.data)
    train_idx, test_idx = split_indices(len(pairs), seg.test_fraction, seg.split_seed)
    rows = [{"image_uri": pairs[i][1], "mask_uri": pairs[i][2], "index": i} for i in range(len(pairs))]
    ids = [frame_id(posixpath.basename(p[1]), 0) for p in pairs]
    if seg.selection:
        from deldist.labelled import selection_subset

        train_idx = selection_subset(config.output, seg.selection, ids, train_idx, test_idx)

    def dataset(indices: np.ndarray) -> Any:
        items = [rows[i] for i in indices]
        return (ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // 8, 64)))
                .map_batches(load_pairs, batch_size=8, num_cpus=config.load_cpus, fn_kwargs={"size": config.image_size}))

    train = dataset(train_idx).materialize().randomize_block_order()
    test = dataset(test_idx).materialize()
    steps_per_epoch = len(train_idx) // (seg.batch_size * config.num_workers)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_idx)} training images do not fill one global batch "
                         f"({config.num_workers} x {seg.batch_size})")
    out = RunLayout(config.output).finetune(config.name)
    settings = LoopSettings(config.name, out, use_gpu, config.torch_threads or max(1, int(config.cpus_per_worker)),
                            config.precision, tuple(config.mean), tuple(config.std), config.seed)
    loop = SegLoop(settings, config.model, config.image_size, config.weights, config.random_init, seg, steps_per_epoch,
                   len(train_idx), tuple(ids), tuple(int(i) for i in train_idx))
    if config.engine == "local":
        if config.num_workers != 1:
            raise ValueError("engine=local runs one worker: set num_workers=1")
        storage_root = config.storage_path or RunLayout(config.output).finetune_ray
        segmentation_loop({"loop": loop}, LocalSession({"train": train, "test": test},
                                                       storage.join(storage_root, f"{config.name}-segmentation"),
                                                       "cuda" if use_gpu else "cpu"))
        return storage.read_json(storage.join(out, "segmentation.json"))
    trainer = TorchTrainer(
        segmentation_loop, train_loop_config={"loop": loop},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=ray_run_config(config.storage_path, RunLayout(config.output).finetune_ray,
                                  f"{config.name}-segmentation", config.max_failures, 2),
        datasets={"train": train, "test": test},
        dataset_config=DataConfig(datasets_to_split=["train"]),  # every image of the test split, once, on rank 0
    )
    trainer.fit()
    return storage.read_json(storage.join(out, "segmentation.json"))


# ------------------------------------------------------------------ classification (Ray tasks)


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


def classification_images(config: Config) -> tuple[np.ndarray, np.ndarray, list[str], bool]:
    """All labelled images as uint8 (N, 3, S, S) plus targets, classes, multilabel."""
    cls = config.classification
    names, targets, classes, multilabel = read_labels(cls)
    files = list_images(storage.join(cls.data, "images"))
    missing = [n for n in names if file_stem(n) not in files]
    if missing:
        raise FileNotFoundError(f"{len(missing)} labelled images are missing under images/: {missing[:5]}")
    images = np.stack([load_image(storage.read_bytes(files[file_stem(n)]), config.image_size) for n in names])
    return images, targets, classes, multilabel


def classification_run(images: np.ndarray, targets: np.ndarray, train_idx: np.ndarray, test_idx: np.ndarray,
                       mode: str, multilabel: bool, cfg: dict[str, Any]) -> dict[str, float]:
    """One few-shot run: train on ``train_idx``, score ``test_idx``. images uint8 (N, 3, S, S)."""
    import torch
    import torch.nn.functional as F

    from deldist.metrics import classification_scores
    from deldist.models import ClassifierViT

    torch.manual_seed(cfg["run_seed"])
    torch.set_num_threads(cfg["torch_threads"])
    cls = cfg["classification"]
    n_classes = targets.shape[1] if multilabel else int(targets.max()) + 1
    model = ClassifierViT(_encoder(cfg["model"], cfg["image_size"], cfg["seed"], cfg["weights"], cfg["random_init"]),
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
    import ray

    from deldist.metrics import few_shot_split, mean_over_runs

    cls = config.classification
    if not cls.data:
        raise ValueError("classification.data is not set (images/ + a labels CSV)")
    images, targets, classes, multilabel = classification_images(config)
    runs_dir = storage.join(RunLayout(config.output).finetune(config.name), "classification", "runs")
    images_ref = ray.put(images)
    remote = ray.remote(num_cpus=cls.cpus_per_run, num_gpus=1 if use_gpu else 0, max_retries=2)(classification_run)
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


# ------------------------------------------------------------------ driver


def run(config: Config) -> dict[str, Any]:
    """Run the configured downstream tasks for one encoder; publish the results."""
    from deldist.runtime import init_ray
    from deldist.runtime import use_gpu as gpus_wanted

    if config.weights is None and not config.random_init:
        raise ValueError("set `weights` (an encoder export) or `random_init: true` (the control)")
    started = time.time()
    init_ray()
    use_gpu = gpus_wanted(config.use_gpu)
    out = RunLayout(config.output).finetune(config.name)
    summary: dict[str, Any] = {"weights": config.weights, "random_init": config.random_init, "model": config.model}
    if "segmentation" in config.tasks:
        summary["segmentation"] = run_segmentation(config, use_gpu)
    if "classification" in config.tasks:
        summary["classification"] = run_classification(config, use_gpu)
    summary["seconds"] = round(time.time() - started, 1)
    storage.write_json(summary_of(out), summary)
    files = [p for p in storage.list_files(out)
             if p.endswith((".json", ".csv")) and not posixpath.basename(p).startswith("_")]
    storage.publish(out, files, {"tasks": list(config.tasks), "weights": config.weights,
                                 "random_init": config.random_init})
    return summary


def miou_of(summary: dict[str, Any]) -> float:
    """The mIoU the report uses (foreground IoU) from a finetune summary."""
    value = summary["segmentation"]["miou"]
    if not 0 <= value <= 1 or math.isnan(value):
        raise ValueError(f"mIoU {value} out of [0, 1]")
    return float(value)
