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
import io
import math
import os
import tempfile
import time
from typing import Any, Iterator, Literal

import numpy as np
from pydantic import Field, model_validator

from deldist import storage
from deldist.config import StageConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATE_FILE = "state.pt"


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


def run_dir(output: str, name: str) -> str:
    return storage.join(output, "pretrain", name)


# ------------------------------------------------------------------ augmentation (pure)


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


# ------------------------------------------------------------------ worker helpers (shared with finetune)


def worker_device(use_gpu: bool, torch_threads: int) -> Any:
    """The worker's torch device (Ray Train's GPU when given one); sets CPU threads."""
    import torch

    if use_gpu and torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    torch.set_num_threads(torch_threads)
    return torch.device("cpu")


def autocast(device: Any, precision: str) -> Any:
    """bf16 autocast on CUDA (``precision`` auto or bf16), a no-op context otherwise."""
    import torch

    enabled = device.type == "cuda" and precision in ("auto", "bf16")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def normalize(images: Any, mean: Any, std: Any) -> Any:
    """uint8 (B, 3, H, W) -> float32 normalised; mean/std (1, 3, 1, 1) on the same device, x255."""
    return images.float().sub_(mean).div_(std)


def all_reduce_sum(values: list[float], device: Any) -> list[float]:
    """Sum floats over the DDP workers (identity with one worker)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class RayTrainSession:
    """What a train loop needs from Ray Train: rank, dataset shards, checkpoints, DDP."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def dataset(self, name: str) -> Any:
        import ray.train

        return ray.train.get_dataset_shard(name)

    def prepare(self, model: Any) -> Any:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)  # to the device; DDP when world > 1

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None) -> None:
        """``ray.train.report``, with a checkpoint of ``state`` from rank 0 when given (every
        rank must call this the same number of times)."""
        import ray.train
        import torch

        if state is None or self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, os.path.join(d, STATE_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def restore(self) -> dict[str, Any] | None:
        """The latest registered checkpoint's state (after a worker restart or a rerun), or None."""
        import ray.train
        import torch

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        # A private copy per rank: ranks on one node sharing as_directory()'s download dir
        # can read a file another rank is still writing (seen as a corrupt state.pt).
        with tempfile.TemporaryDirectory() as d:
            checkpoint.to_directory(d)
            return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)


class LocalSession:
    """The same loop in the driver process (``engine: local``): one worker, the whole Ray
    Datasets, checkpoints as ``<checkpoint_dir>/state.pt``. For small demos, where starting a
    Ray Train worker group costs more than the training."""

    def __init__(self, datasets: dict[str, Any], checkpoint_dir: str, device: str = "auto"):
        import torch

        self.rank, self.world = 0, 1
        self.datasets = datasets
        self.path = storage.join(checkpoint_dir, STATE_FILE)
        self.device = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")

    def dataset(self, name: str) -> Any:
        return self.datasets[name]

    def prepare(self, model: Any) -> Any:
        return model.to(self.device)

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None) -> None:
        import torch

        if state is not None:
            buf = io.BytesIO()
            torch.save(state, buf)
            storage.write_bytes(self.path, buf.getvalue())

    def restore(self) -> dict[str, Any] | None:
        import torch

        if not storage.exists(self.path):
            return None
        return torch.load(io.BytesIO(storage.read_bytes(self.path)), map_location="cpu", weights_only=False)


def tensorboard_writer_class() -> Any:
    """``torch.utils.tensorboard.SummaryWriter`` or ``tensorboardX.SummaryWriter``; None if neither."""
    try:
        from torch.utils.tensorboard import (
            SummaryWriter,  # needs the tensorboard package
        )

        return SummaryWriter
    except ImportError:
        pass
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    except ImportError:
        return None


def write_metrics(out_dir: str, history: list[dict[str, Any]], prefix: str = "metrics") -> bool:
    """Per-epoch rows -> ``<prefix>.csv`` + ``<prefix>.json`` and TensorBoard events under
    ``tensorboard/`` (rewritten whole: object stores have no append). Returns whether
    TensorBoard files were written."""
    storage.write_json(storage.join(out_dir, f"{prefix}.json"), history)
    storage.write_csv(storage.join(out_dir, f"{prefix}.csv"), history)
    summary_writer = tensorboard_writer_class()
    if summary_writer is None or not history:
        return False
    with tempfile.TemporaryDirectory() as d:
        tb = summary_writer(log_dir=d)
        for row in history:
            for k, v in row.items():
                if k not in ("epoch", "step") and isinstance(v, (int, float)) and math.isfinite(v):
                    tb.add_scalar(f"{prefix}/{k}", v, global_step=int(row.get("step", row.get("epoch", 0))))
        tb.close()
        for name in os.listdir(d):
            with open(os.path.join(d, name), "rb") as f:
                storage.write_bytes(storage.join(out_dir, "tensorboard", f"{prefix}.{name}"), f.read())
    return True


def maybe_inject_failure(cfg: dict[str, Any], step: int, rank: int, world: int) -> None:
    """Test hook: the chosen rank exits hard at ``inject_failure_at_step``, once per run dir."""
    at = cfg.get("inject_failure_at_step")
    if at is None or step != at or rank != min(1, world - 1):
        return
    marker = storage.join(cfg["run_dir"], "_injected_failure")
    if storage.exists(marker):
        return
    storage.write_bytes(marker, str(step).encode())
    # Ray Train's controller registers reported checkpoints when it polls the workers (every
    # 2 s by default); dying later than that makes "resumes from the last checkpoint" exact
    time.sleep(float(cfg.get("inject_failure_delay_s", 5.0)))
    os._exit(17)


# ------------------------------------------------------------------ train loop (one per worker)


def train_loop(cfg: dict[str, Any], session: Any = None) -> None:
    """Ray Train worker (or ``LocalSession``): MAE pretraining over this worker's shard,
    resuming from the last checkpoint."""
    import torch

    from deldist.models import build_mae, lr_lambda, param_groups

    session = session or RayTrainSession()
    rank, world = session.rank, session.world
    device = session.device if isinstance(session, LocalSession) else worker_device(cfg["use_gpu"], cfg["torch_threads"])
    if device.type == "cpu":
        torch.set_num_threads(cfg["torch_threads"])
    model = build_mae(cfg["model"], cfg["image_size"], cfg["decoder_dim"], cfg["decoder_depth"],
                      cfg["decoder_heads"], cfg["mask_ratio"], cfg["norm_pix_loss"], seed=cfg["seed"])
    steps_per_epoch, total_steps = cfg["steps_per_epoch"], cfg["steps_per_epoch"] * cfg["epochs"]
    optimizer = torch.optim.AdamW(param_groups(model, cfg["weight_decay"]), lr=cfg["peak_lr"], betas=cfg["betas"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, cfg["warmup_steps"], cfg["peak_lr"], cfg["min_lr"]))
    state: dict[str, Any] = {"epoch": 0, "step": 0, "history": [], "starts": []}
    restored = session.restore()
    if restored is not None:
        if restored["fingerprint"] != cfg["fingerprint"]:
            raise ValueError(f"run {cfg['name']!r} was started with other model settings "
                             f"{restored['fingerprint']}; use a new name for {cfg['fingerprint']}")
        model.load_state_dict(restored["model"])
        optimizer.load_state_dict(restored["optimizer"])
        scheduler.load_state_dict(restored["scheduler"])
        state = restored["state"]
    state["starts"].append({"resumed_from_step": state["step"], "world_size": world, "time": time.time()})
    model = session.prepare(model)
    core = model.module if hasattr(model, "module") else model
    mean = torch.tensor(cfg["mean"], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg["std"], device=device).view(1, 3, 1, 1) * 255
    shard = session.dataset("train")

    def snapshot() -> dict[str, Any]:
        return {"model": core.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "state": state, "fingerprint": cfg["fingerprint"]}

    batches = TrainingBatches(shard, cfg["batch_size"], cfg["shuffle_buffer"])
    while state["epoch"] < cfg["epochs"]:
        epoch = state["epoch"]
        # after a resume mid-epoch, the epoch's remaining steps are drawn from a new stream
        steps = (epoch + 1) * steps_per_epoch - state["step"]
        model.train()
        loss_sum, images, started = 0.0, 0, time.perf_counter()
        batches.reset_waits()
        for i in range(steps):
            batch = batches.next()
            maybe_inject_failure(cfg, state["step"] + 1, rank, world)
            x = normalize(batch["image"].to(device, non_blocking=True), mean, std)
            with autocast(device, cfg["precision"]):
                loss, _, _ = model(x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            state["step"] += 1
            loss_sum += float(loss.detach())
            images += x.shape[0]
            every = cfg["checkpoint_every_steps"]
            if every and state["step"] % every == 0 and i + 1 < steps:
                session.report({"step": state["step"], "epoch": epoch, "loss": loss_sum / (i + 1)}, snapshot())
        seconds = time.perf_counter() - started
        # steady rate: without the waits for a new stream's first batch, a fixed cost per
        # stream that only matters when a stream lasts seconds (tests, benchmarks), not hours
        loss_total, images_total, worker_rate, steady_rate = all_reduce_sum(
            [loss_sum, images, images / max(seconds, 1e-9),
             images / max(seconds - batches.start_wait, 1e-9)], device)
        state["epoch"] = epoch + 1
        row = {"epoch": epoch + 1, "step": state["step"], "loss": loss_total / (world * max(1, steps)),
               "lr": optimizer.param_groups[0]["lr"], "img_per_s": worker_rate, "img_per_s_per_worker": worker_rate / world,
               "img_per_s_steady": steady_rate, "first_batch_wait_s": batches.start_wait,
               "data_wait_s": batches.wait, "images": int(images_total), "seconds": seconds}
        state["history"].append(row)
        if rank == 0:
            write_metrics(cfg["run_dir"], state["history"])
        due = (epoch + 1) % cfg["checkpoint_every_epochs"] == 0 or epoch + 1 == cfg["epochs"]
        session.report(row, snapshot() if due else None)
    batches.close()
    if rank == 0:
        export_encoder(core, cfg, state)


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


def export_encoder(mae: Any, cfg: dict[str, Any], state: dict[str, Any]) -> None:
    """Write ``encoder.safetensors`` (plain timm ViT state dict) and ``encoder.json``."""
    from safetensors.torch import save as save_safetensors

    tensors = {k: v.detach().cpu().contiguous() for k, v in mae.encoder.state_dict().items()}
    data = save_safetensors(tensors)
    storage.write_bytes(storage.join(cfg["run_dir"], "encoder.safetensors"), data)
    last = state["history"][-1] if state["history"] else {}
    storage.write_json(storage.join(cfg["run_dir"], "encoder.json"), {
        "model": cfg["model"], "image_size": cfg["image_size"], "sha256": hashlib.sha256(data).hexdigest(),
        "epochs": state["epoch"], "steps": state["step"], "final_loss": last.get("loss"),
        "frames": cfg["n_frames"], "selection": cfg["selection"], "starts": state["starts"],
        "usage": f"deldist embed model={cfg['model']} weights=<this dir>/encoder.safetensors",
    })


# ------------------------------------------------------------------ driver


def training_frames(config: Config) -> tuple[Any, int, Any]:
    """(Ray Dataset of uint8 augmented images, number of frames, ObjectRef of kept ids or None)."""
    import pyarrow.compute as pc
    import ray
    from ray.data import ActorPoolStrategy

    frames = config.frames or storage.join(config.output, "frames", "all")
    _, paths = storage.published_paths(frames)
    ids = storage.read_published(frames, columns=["id"]).column("id")
    keep_ref = None
    n = len(ids)
    if config.selection:
        retained = storage.read_published(storage.join(config.output, "selections", config.selection, "retained"),
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


def loop_config(config: Config, n_frames: int, use_gpu: bool) -> dict[str, Any]:
    global_batch = config.batch_size * config.num_workers
    steps_per_epoch = n_frames // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{n_frames} frames do not fill one global batch of {global_batch} "
                         f"({config.num_workers} workers x batch_size {config.batch_size})")
    from deldist.models import scaled_lr

    fingerprint = {k: getattr(config, k) for k in ("model", "image_size", "decoder_dim", "decoder_depth",
                                                    "decoder_heads", "mask_ratio", "norm_pix_loss")}
    return {
        **config.model_dump(), "betas": tuple(config.betas), "use_gpu": use_gpu,
        "torch_threads": config.torch_threads or max(1, int(config.cpus_per_worker)),
        "run_dir": run_dir(config.output, config.name), "n_frames": n_frames,
        "steps_per_epoch": steps_per_epoch, "warmup_steps": round(config.warmup_epochs * steps_per_epoch),
        "peak_lr": scaled_lr(config.base_lr, global_batch), "fingerprint": fingerprint,
    }


def ray_run_config(config_storage: str | None, default_storage: str, name: str, max_failures: int,
                   keep: int) -> Any:
    """RunConfig with the pyarrow filesystem of ``storage_path`` (so s3 endpoints from the
    environment, e.g. MinIO or moto, are used)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    fs, path = storage.resolve(config_storage or default_storage)
    return RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                     failure_config=FailureConfig(max_failures=max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=keep))


def run(config: Config) -> dict[str, Any]:
    """Pretrain (or resume) the MAE; publish the encoder export and metrics."""
    from deldist.runtime import cluster_gpus, init_ray

    started = time.time()
    init_ray()
    use_gpu = config.use_gpu if config.use_gpu is not None else cluster_gpus() > 0
    ds, n_frames, _ = training_frames(config)
    cfg = loop_config(config, n_frames, use_gpu)
    out = cfg["run_dir"]
    if config.engine == "local":
        if config.num_workers != 1:
            raise ValueError("engine=local runs one worker: set num_workers=1")
        storage_root = config.storage_path or storage.join(config.output, "pretrain", "_ray")
        train_loop(cfg, LocalSession({"train": ds}, storage.join(storage_root, config.name),
                                     "cuda" if use_gpu else "cpu"))
    else:
        _fit(config, cfg, ds, use_gpu)
    return _publish(config, out, n_frames, started)


def _fit(config: Config, cfg: dict[str, Any], ds: Any, use_gpu: bool) -> None:
    from ray.data import ExecutionResources
    from ray.train import DataConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    spare, actors = spare_cpus(config), augment_actors(config)
    needed = actors * config.augment_cpus
    if spare < needed:
        print(f"deldist pretrain: warning: the {config.num_workers} workers reserve "
              f"{config.num_workers * config.cpus_per_worker:g} of the cluster's CPUs, leaving {spare:g} for the "
              f"{actors} Ray Data actors that decode and augment ({needed:g} CPUs); training waits "
              "for data until the cluster grows. Lower cpus_per_worker (torch_threads sets the threads) or "
              "augment_actors.")

    ingest_options = DataConfig.default_ingest_options()
    if config.data_buffer_mb:
        ingest_options.resource_limits = ExecutionResources(object_store_memory=config.data_buffer_mb * 2**20)
    trainer = TorchTrainer(
        train_loop, train_loop_config=cfg,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=ray_run_config(config.storage_path, storage.join(config.output, "pretrain", "_ray"), config.name,
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
