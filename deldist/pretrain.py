"""MAE pretraining on a frame store, on Ray Train (``TorchTrainer``, DDP).

Data: the frame store (``deldist materialize``), optionally restricted to a selection's
retained ids, streams through Ray Data: JPEG decode + RandomResizedCrop(scale 0.2-1) +
horizontal flip run in a pool of CPU actors, and each worker reads its shard with
``iter_torch_batches`` (uint8; normalised on the worker's device). One Ray Data execution
covers several epochs (``epochs_per_stream``: each epoch's parts in a fresh seeded order), so
the pipeline is not stopped and restarted at every epoch boundary: Ray Data starts a new
execution, with a wait of a second or more for the first batch, each time a shard is iterated.
Epochs are counted in steps (frames // global batch).

Optimisation follows MAE: AdamW(betas 0.9, 0.95), weight decay 0.05 except norms, biases and
tokens, lr = base_lr * global batch / 256, per-step linear warmup then cosine; bf16 autocast on
GPU. Checkpoints (model, optimizer, scheduler, epoch, step, metric history) go to
``storage_path`` (local or s3://) every ``checkpoint_every_steps`` steps and every
``checkpoint_every_epochs`` epochs. ``FailureConfig(max_failures)`` restarts the workers from
the last checkpoint when one dies, and rerunning with the same ``name`` resumes from it (a
mid-epoch checkpoint resumes at the same step, drawing the rest of that epoch from a new stream).

Outputs under ``<output>/pretrain/<name>/`` (published): ``encoder.safetensors`` (a plain
timm state dict: ``deldist embed weights=<it> model=<model>`` loads it), ``encoder.json``,
``metrics.csv`` / ``metrics.json`` (per epoch: loss, lr, img/s) and ``tensorboard/`` event
files when a TensorBoard writer (``torch.utils.tensorboard`` or ``tensorboardX``) is importable.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import numpy as np
from pydantic import Field, model_validator

from deldist import storage
from deldist.augment import AugmentParts
from deldist.config import StageConfig
from deldist.frames import IMAGENET_MEAN, IMAGENET_STD
from deldist.layout import RunLayout
from deldist.trainer import LocalSession, LoopSettings, RayTrainSession, Training, all_reduce_sum, ray_run_config

log = logging.getLogger(__name__)


class Config(StageConfig):
    """``deldist pretrain`` settings."""

    output: str = Field(description="run root URI; writes <output>/pretrain/<name>/")
    name: str = Field("mae", description="run name; rerunning the same name resumes")
    frames: str | None = Field(None, description="frame store; default <output>/frames/all")
    selection: str | None = Field(None, description="train on this selection's retained ids only")
    model: str = "vit_base_patch16_224"
    image_size: int = Field(224, ge=16)
    decoder_dim: int = Field(512, ge=8)
    decoder_depth: int = Field(8, ge=1)
    decoder_heads: int = Field(16, ge=1)
    mask_ratio: float = Field(0.75, ge=0, lt=1)
    norm_pix_loss: bool = True
    epochs: int = Field(400, ge=1)
    warmup_epochs: float = Field(40, ge=0)
    batch_size: int = Field(64, ge=1, description="per worker")
    base_lr: float = Field(1.5e-4, gt=0, description="lr = base_lr * global batch / 256")
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    crop_scale: tuple[float, float] = (0.2, 1.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    seed: int = 0
    # Ray Train wiring
    num_workers: int = Field(1, ge=1)
    use_gpu: bool | None = Field(None, description="default: when the cluster has GPUs")
    cpus_per_worker: float = Field(1.0, gt=0)
    worker_resources: dict[str, float] = Field(default_factory=dict, description="custom resources each Train "
                                               "worker also asks for, e.g. {trainer_node: 1} to place the "
                                               "workers on nodes started with that resource")
    torch_threads: int | None = Field(None, ge=1, description="default: max(1, floor(cpus_per_worker))")
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU
    storage_path: str | None = Field(None, description="Ray Train checkpoints; default <output>/pretrain/_ray")
    checkpoint_every_steps: int | None = Field(None, ge=1)
    checkpoint_every_epochs: int = Field(1, ge=1)
    checkpoints_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(3, ge=-1, description="worker failures to recover from (-1: unlimited)")
    augment_cpus: float = Field(0.25, gt=0, description="CPUs of each decode + augment actor")
    augment_nice: int = Field(5, ge=0, le=19, description="niceness added to the decode + augment actors")
    augment_actors: int | None = Field(
        None, ge=1, description="decode + augment actors; default: one per CPU the training workers leave")
    shuffle_buffer: int = Field(256, ge=0, description="rows in each worker's local shuffle buffer")
    data_buffer_mb: float | None = Field(
        None, gt=0, description="object-store MiB the training stream may fill ahead of the workers; default Ray Data's")
    epochs_per_stream: int | None = Field(
        None, ge=1, description="epochs per Ray Data execution; default: all, up to 1024 part reads per execution")
    engine: Literal["ray_train", "local"] = Field(
        "ray_train", description="local: the same loop in the driver process, one worker (small demos)")
    inject_failure_at_step: int | None = Field(
        None, description="tests: rank 1 (else 0) exits at this step once (marker file in the run dir)")

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.image_size % 16 and self.model.endswith(("patch16_224", "patch16")):
            raise ValueError(f"image_size {self.image_size} is not a multiple of the patch size 16")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError("crop_scale must satisfy 0 < low <= high <= 1")
        return self


# ------------------------------------------------------------------ train loop (one per worker)


@dataclass(frozen=True)
class MAELoop:
    """The pretraining loop's configuration (typed; what ``loop_config`` derives from
    :class:`Config` and the frame count)."""

    settings: LoopSettings
    model: str
    image_size: int
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    mask_ratio: float
    norm_pix_loss: bool
    epochs: int
    steps_per_epoch: int
    warmup_steps: int
    batch_size: int
    peak_lr: float
    min_lr: float
    weight_decay: float
    betas: tuple[float, float]
    shuffle_buffer: int
    checkpoint_every_steps: int | None
    checkpoint_every_epochs: int
    n_frames: int
    selection: str | None


def train_loop(config: dict[str, Any], session: Any = None) -> None:
    """Ray Train worker (or ``LocalSession``): MAE pretraining over this worker's shard,
    resuming from the last checkpoint. config: ``{"loop": MAELoop}`` (Ray Train passes a dict)."""
    import torch

    from deldist.models import build_mae, lr_lambda, param_groups

    loop: MAELoop = config["loop"]
    session = session or RayTrainSession()
    model = build_mae(loop.model, loop.image_size, loop.decoder_dim, loop.decoder_depth, loop.decoder_heads,
                      loop.mask_ratio, loop.norm_pix_loss, seed=loop.settings.seed)
    optimizer = torch.optim.AdamW(param_groups(model, loop.weight_decay), lr=loop.peak_lr, betas=loop.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(loop.steps_per_epoch * loop.epochs, loop.warmup_steps, loop.peak_lr, loop.min_lr))
    run = Training.start(session, model, optimizer, scheduler, loop.settings)
    batches = TrainingBatches(session.dataset("train"), loop.batch_size, loop.shuffle_buffer)
    while run.state["epoch"] < loop.epochs:
        epoch = run.state["epoch"]
        # after a resume mid-epoch, the epoch's remaining steps are drawn from a new stream
        steps = (epoch + 1) * loop.steps_per_epoch - run.state["step"]
        run.model.train()
        loss_sum, images, started = 0.0, 0, time.perf_counter()
        batches.reset_waits()
        for i in range(steps):
            batch = batches.next()
            run.before_step()
            x = run.inputs(batch["image"])
            with run.autocast():
                loss, _, _ = run.model(x)
            run.step(loss)
            loss_sum += float(loss.detach())
            images += x.shape[0]
            every = loop.checkpoint_every_steps
            if every and run.state["step"] % every == 0 and i + 1 < steps:
                session.report({"step": run.state["step"], "epoch": epoch, "loss": loss_sum / (i + 1)}, run.snapshot())
        run.end_epoch(_epoch_row(run, batches, epoch, steps, loss_sum, images, time.perf_counter() - started),
                      "metrics", checkpoint=(epoch + 1) % loop.checkpoint_every_epochs == 0 or epoch + 1 == loop.epochs)
    batches.close()
    if session.rank == 0:
        export_encoder(run.core, loop, run.state)


def _epoch_row(run: Training, batches: "TrainingBatches", epoch: int, steps: int, loss_sum: float, images: int,
               seconds: float) -> dict[str, Any]:
    """The epoch's metrics, summed over the workers. Steady rate: without the waits for a new
    stream's first batch, a fixed cost per stream that only matters when a stream lasts
    seconds (tests, benchmarks), not hours."""
    world = run.session.world
    loss_total, images_total, worker_rate, steady_rate = all_reduce_sum(
        [loss_sum, images, images / max(seconds, 1e-9), images / max(seconds - batches.start_wait, 1e-9)],
        run.device)
    return {"epoch": epoch + 1, "step": run.state["step"], "loss": loss_total / (world * max(1, steps)),
            "lr": run.optimizer.param_groups[0]["lr"], "img_per_s": worker_rate,
            "img_per_s_per_worker": worker_rate / world, "img_per_s_steady": steady_rate,
            "first_batch_wait_s": batches.start_wait, "data_wait_s": batches.wait, "images": int(images_total),
            "seconds": seconds}


class TrainingBatches:
    """Batches from a worker's shard across epochs: one iteration of the shard (one Ray Data
    execution of ``epochs_per_stream`` epochs) after another. Every worker's shard holds the
    same number of rows (``streaming_split(equal=True)``), so all workers run dry at the same
    step and start the next execution together. Records the time spent waiting for data:
    ``wait`` in total and ``start_wait`` for the first batch of a new execution."""

    def __init__(self, shard: Any, batch_size: int, shuffle_buffer: int):
        self.shard, self.batch_size, self.shuffle_buffer = shard, batch_size, shuffle_buffer
        self.stream: Iterator[dict[str, Any]] | None = None
        self.wait = self.start_wait = 0.0

    def reset_waits(self) -> None:
        self.wait = self.start_wait = 0.0

    def next(self) -> dict[str, Any]:
        import torch

        started = time.perf_counter()
        for _ in range(2):
            fresh = self.stream is None
            if fresh:
                self.stream = iter(self.shard.iter_torch_batches(
                    batch_size=self.batch_size, drop_last=True, dtypes=torch.uint8,
                    local_shuffle_buffer_size=self.shuffle_buffer or None))
            try:
                batch = next(self.stream)
            except StopIteration:
                self.stream = None
                if fresh:
                    break
                continue
            waited = time.perf_counter() - started
            self.wait += waited
            if fresh:
                self.start_wait += waited
            return batch
        raise RuntimeError("the training data stream yields no full batch")

    def close(self) -> None:
        self.stream = None  # drops the iterator: Ray Data stops the execution


def export_encoder(mae: Any, loop: MAELoop, state: dict[str, Any]) -> None:
    """Write ``encoder.safetensors`` (plain timm ViT state dict) and ``encoder.json``."""
    from safetensors.torch import save as save_safetensors

    tensors = {k: v.detach().cpu().contiguous() for k, v in mae.encoder.state_dict().items()}
    data = save_safetensors(tensors)
    out = loop.settings.run_dir
    storage.write_bytes(storage.join(out, "encoder.safetensors"), data)
    last = state["history"][-1] if state["history"] else {}
    storage.write_json(storage.join(out, "encoder.json"), {
        "model": loop.model, "image_size": loop.image_size, "sha256": hashlib.sha256(data).hexdigest(),
        "epochs": state["epoch"], "steps": state["step"], "final_loss": last.get("loss"),
        "frames": loop.n_frames, "selection": loop.selection, "starts": state["starts"],
        "usage": f"deldist embed model={loop.model} weights=<this dir>/encoder.safetensors",
    })


# ------------------------------------------------------------------ driver


def training_frames(config: Config) -> tuple[Any, int, Any]:
    """(Ray Dataset of uint8 augmented images, number of frames, ObjectRef of kept ids or None)."""
    import pyarrow.compute as pc
    import ray
    from ray.data import ActorPoolStrategy

    frames = config.frames or RunLayout(config.output).frames()
    _, paths = storage.published_paths(frames)
    ids = storage.read_published(frames, columns=["id"]).column("id")
    keep_ref = None
    n = len(ids)
    if config.selection:
        retained = storage.read_published(RunLayout(config.output).selection_table(config.selection, "retained"),
                                          columns=["id"]).column("id").combine_chunks()
        n = int(pc.sum(pc.is_in(ids, value_set=retained)).as_py() or 0)
        if n < len(retained):
            raise ValueError(f"{len(retained) - n} of selection {config.selection!r}'s ids are not in the frame "
                             f"store {frames}: materialize that selection (or all frames) first")
        keep_ref = ray.put(retained.to_pylist())
    # one actor call per part read (ray.data.read_parquet is not used: in this environment its
    # path resolution imports fsspec's HTTP filesystem, which needs aiohttp)
    uris = [storage.to_uri(frames, p) for p in paths]
    order = stream_order(len(uris), config.epochs, config.epochs_per_stream, config.seed)
    ds = ray.data.from_items([{"uri": uris[j]} for j in order], override_num_blocks=len(order))
    ds = ds.map_batches(AugmentParts, batch_size=1, num_cpus=config.augment_cpus,
                        compute=ActorPoolStrategy(size=augment_actors(config)),
                        fn_constructor_kwargs={"size": config.image_size, "scale": tuple(config.crop_scale),
                                               "rows": 64, "keep_ids": keep_ref, "nice": config.augment_nice})
    return ds, n, keep_ref


def augment_actors(config: Config) -> int:
    """Size of the decode + augment pool: ``augment_actors``, else one actor per CPU the
    training workers leave in the cluster now (at least 1). A fixed size: an autoscaling pool
    stops idle actors while the stream is backpressured and starts new processes later."""
    return config.augment_actors or max(1, int(spare_cpus(config) + 1e-9))


def spare_cpus(config: Config) -> float:
    """The cluster's CPUs now, less what the training workers reserve."""
    import ray

    return ray.cluster_resources().get("CPU", 0.0) - config.num_workers * config.cpus_per_worker


MAX_PART_READS_PER_STREAM = 1024  # from_items makes a block per read: 4096 took 5 s in the driver


def stream_order(n_parts: int, epochs: int, epochs_per_stream: int | None, seed: int) -> list[int]:
    """Part indices of one training stream: ``epochs_per_stream`` epochs (default: all
    ``epochs``, capped so a stream holds at most 1024 part reads), each a seeded permutation
    of all parts. Ray Data runs its tasks roughly in this order, so epochs stay apart."""
    per_stream = epochs_per_stream or max(1, min(epochs, MAX_PART_READS_PER_STREAM // max(1, n_parts)))
    rng = np.random.default_rng(seed)
    return [int(j) for _ in range(per_stream) for j in rng.permutation(n_parts)]


def loop_config(config: Config, n_frames: int, use_gpu: bool) -> MAELoop:
    global_batch = config.batch_size * config.num_workers
    steps_per_epoch = n_frames // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{n_frames} frames do not fill one global batch of {global_batch} "
                         f"({config.num_workers} workers x batch_size {config.batch_size})")
    from deldist.models import scaled_lr

    fingerprint = {k: getattr(config, k) for k in ("model", "image_size", "decoder_dim", "decoder_depth",
                                                    "decoder_heads", "mask_ratio", "norm_pix_loss")}
    settings = LoopSettings(config.name, RunLayout(config.output).pretrain(config.name), use_gpu,
                            config.torch_threads or max(1, int(config.cpus_per_worker)), config.precision,
                            tuple(config.mean), tuple(config.std), config.seed, fingerprint,
                            config.inject_failure_at_step)
    return MAELoop(settings, config.model, config.image_size, config.decoder_dim, config.decoder_depth,
                   config.decoder_heads, config.mask_ratio, config.norm_pix_loss, config.epochs, steps_per_epoch,
                   round(config.warmup_epochs * steps_per_epoch), config.batch_size,
                   scaled_lr(config.base_lr, global_batch), config.min_lr, config.weight_decay, tuple(config.betas),
                   config.shuffle_buffer, config.checkpoint_every_steps, config.checkpoint_every_epochs, n_frames,
                   config.selection)


def run(config: Config) -> dict[str, Any]:
    """Pretrain (or resume) the MAE; publish the encoder export and metrics."""
    from deldist.runtime import init_ray, throttle_idle_scheduling
    from deldist.runtime import use_gpu as gpus_wanted

    started = time.time()
    init_ray()
    throttle_idle_scheduling()  # the training stream, backpressured, spins the scheduler (runtime doc)
    use_gpu = gpus_wanted(config.use_gpu)
    ds, n_frames, _ = training_frames(config)
    loop = loop_config(config, n_frames, use_gpu)
    out = loop.settings.run_dir
    if config.engine == "local":
        if config.num_workers != 1:
            raise ValueError("engine=local runs one worker: set num_workers=1")
        storage_root = config.storage_path or RunLayout(config.output).pretrain_ray
        train_loop({"loop": loop}, LocalSession({"train": ds}, storage.join(storage_root, config.name),
                                                "cuda" if use_gpu else "cpu"))
    else:
        _fit(config, loop, ds, use_gpu)
    return _publish(config, out, n_frames, started)


def _fit(config: Config, loop: MAELoop, ds: Any, use_gpu: bool) -> None:
    from ray.data import ExecutionResources
    from ray.train import DataConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    spare, actors = spare_cpus(config), augment_actors(config)
    needed = actors * config.augment_cpus
    if spare < needed:
        log.warning(f"deldist pretrain: the {config.num_workers} workers reserve "
              f"{config.num_workers * config.cpus_per_worker:g} of the cluster's CPUs, leaving {spare:g} for the "
              f"{actors} Ray Data actors that decode and augment ({needed:g} CPUs); training waits "
              "for data until the cluster grows. Lower cpus_per_worker (torch_threads sets the threads) or "
              "augment_actors.")

    ingest_options = DataConfig.default_ingest_options()
    if config.data_buffer_mb:
        ingest_options.resource_limits = ExecutionResources(object_store_memory=config.data_buffer_mb * 2**20)
    trainer = TorchTrainer(
        train_loop, train_loop_config={"loop": loop},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker,
                                                           **config.worker_resources}),
        run_config=ray_run_config(config.storage_path, RunLayout(config.output).pretrain_ray, config.name,
                                  config.max_failures, config.checkpoints_to_keep),
        datasets={"train": ds},
        dataset_config=DataConfig(execution_options=ingest_options),
    )
    trainer.fit()


def _publish(config: Config, out: str, n_frames: int, started: float) -> dict[str, Any]:
    export = storage.read_json(storage.join(out, "encoder.json"))
    history = storage.read_json(storage.join(out, "metrics.json"))
    files = [storage.resolve(storage.join(out, f))[1] for f in ("encoder.safetensors", "encoder.json",
                                                                 "metrics.csv", "metrics.json")]
    tensorboard = bool(storage.list_files(storage.join(out, "tensorboard")))
    storage.publish(out, files, {"model": config.model, "image_size": config.image_size, "frames": n_frames,
                                 "selection": config.selection, "tensorboard": tensorboard, **export})
    last = history[-1] if history else {}
    return {"run_dir": out, "encoder": storage.join(out, "encoder.safetensors"), "model": config.model,
            "frames": n_frames, "epochs": export["epochs"], "steps": export["steps"], "loss": last.get("loss"),
            "img_per_s": last.get("img_per_s"), "starts": [s["resumed_from_step"] for s in export["starts"]],
            "tensorboard": tensorboard, "seconds": round(time.time() - started, 1)}
