"""Downstream evaluation of an encoder (a pretraining export, any checkpoint ``deldist embed``
loads, or random init as the control).

Segmentation (the MedDEL paper's protocol): ViT encoder + a light per-token MLP head,
bilinearly upsampled to the mask, Dice + cross-entropy, on a Kvasir-SEG layout (``images/``
and ``masks/`` with the same stems; masks 0/255). Trained on Ray Train (``TorchTrainer``, DDP,
checkpoint every epoch, resumable like ``deldist pretrain``); rank 0 evaluates the held-out
split. Reports ``iou_fg`` (what the report calls mIoU), ``iou_bg``, ``miou_fg_bg``,
``iou_fg_per_image``, ``dice_fg`` (see :mod:`deldist.metrics`), computed at ``image_size``.

Classification (MedFMC protocol, few-shot linear probe and full finetuning): :mod:`deldist.few_shot`.

Output ``<output>/finetune/<name>/``: ``segmentation.json`` (+ per-epoch ``segmentation_metrics.csv/json``),
``classification/runs/*.json`` and ``classification.json``, ``summary.json``, published.
"""

from __future__ import annotations

import math
import posixpath
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from deldist import storage
from deldist.augment import flip_pairs
from deldist.config import StageConfig
from deldist.dynamics import PassRecorder, write_dynamics
from deldist.few_shot import Classification, run_classification
from deldist.frames import IMAGENET_MEAN, IMAGENET_STD
from deldist.ids import frame_id
from deldist.labelled import load_pairs, segmentation_pairs, split_indices
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

    from deldist.encoders import encoder_with_weights
    from deldist.models import SegmentationViT, dice_ce_loss, lr_lambda, param_groups

    loop: SegLoop = config["loop"]
    seg = loop.segmentation
    session = session or RayTrainSession()
    model = SegmentationViT(encoder_with_weights(loop.model, loop.image_size, loop.settings.seed, loop.weights, loop.random_init),
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
