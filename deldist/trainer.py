"""The training skeleton pretrain and finetune share: where a loop runs (a Ray Train worker or
the driver), its device and autocast, metrics files, checkpoints, and one start / step /
end-of-epoch sequence (:class:`Training`) that restores a run, prepares the model and reports.

A loop builds its model, optimizer and scheduler on the CPU, then::

    run = Training.start(session, model, optimizer, scheduler, settings)
    ...   loss = run.model(x) ... ; run.step(loss)
    run.end_epoch(row, "metrics")     # history, metrics files on rank 0, report + checkpoint
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from deldist import storage

STATE_FILE = "state.pt"


@dataclass(frozen=True)
class LoopSettings:
    """What every training loop is told besides its own recipe."""

    name: str
    run_dir: str
    use_gpu: bool
    torch_threads: int
    precision: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    seed: int = 0
    fingerprint: dict[str, Any] | None = None  # a resumed run must have been started with these
    inject_failure_at_step: int | None = None  # test hook: see maybe_inject_failure
    inject_failure_delay_s: float = 5.0


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


def all_gather_rows(rows: Any) -> Any:
    """Every worker's (n_i, C) tensor, concatenated in rank order on every worker (the tensor
    itself with one worker). Workers may hold different row counts."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows.cpu())
    return torch.cat(gathered)


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
            return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


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
        return torch.load(io.BytesIO(storage.read_bytes(self.path)), map_location="cpu", weights_only=True)


def tensorboard_writer_class() -> Any:
    """``torch.utils.tensorboard.SummaryWriter`` or ``tensorboardX.SummaryWriter``; None if neither."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

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


def maybe_inject_failure(settings: LoopSettings, step: int, rank: int, world: int) -> None:
    """Test hook: the chosen rank exits hard at ``inject_failure_at_step``, once per run dir."""
    at = settings.inject_failure_at_step
    if at is None or step != at or rank != min(1, world - 1):
        return
    marker = storage.join(settings.run_dir, "_injected_failure")
    if storage.exists(marker):
        return
    storage.write_bytes(marker, str(step).encode())
    # Ray Train's controller registers reported checkpoints when it polls the workers (every
    # 2 s by default); dying later than that makes "resumes from the last checkpoint" exact
    time.sleep(settings.inject_failure_delay_s)
    os._exit(17)


def ray_run_config(config_storage: str | None, default_storage: str, name: str, max_failures: int,
                   keep: int) -> Any:
    """RunConfig with the pyarrow filesystem of ``storage_path`` (so s3 endpoints from the
    environment, e.g. MinIO or moto, are used)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    fs, path = storage.resolve(config_storage or default_storage)
    return RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                     failure_config=FailureConfig(max_failures=max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=keep))


@dataclass
class Training:
    """One worker's training: the session, the device, the model prepared for it (moved; DDP
    on Ray Train) and unwrapped (``core``), optimizer, scheduler and the resumable ``state``
    (epoch, step, history, starts)."""

    session: Any
    settings: LoopSettings
    device: Any
    model: Any
    core: Any
    optimizer: Any
    scheduler: Any
    mean: Any
    std: Any
    state: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(cls, session: Any, model: Any, optimizer: Any, scheduler: Any, settings: LoopSettings) -> "Training":
        """Pick the device, restore the run's last checkpoint (refusing one of other settings)
        into the CPU model / optimizer / scheduler, then prepare the model for the session."""
        import torch

        device = session.device if isinstance(session, LocalSession) else \
            worker_device(settings.use_gpu, settings.torch_threads)
        if device.type == "cpu":
            torch.set_num_threads(settings.torch_threads)
        state: dict[str, Any] = {"epoch": 0, "step": 0, "history": [], "starts": []}
        restored = session.restore()
        if restored is not None:
            if settings.fingerprint is not None and restored.get("fingerprint") != settings.fingerprint:
                raise ValueError(f"run {settings.name!r} was started with other settings {restored.get('fingerprint')}; "
                                 f"use a new name for {settings.fingerprint}")
            model.load_state_dict(restored["model"])
            optimizer.load_state_dict(restored["optimizer"])
            scheduler.load_state_dict(restored["scheduler"])
            state = restored["state"]
        state["starts"].append({"resumed_from_step": state["step"], "world_size": session.world, "time": time.time()})
        prepared = session.prepare(model)
        core = prepared.module if hasattr(prepared, "module") else prepared
        mean = torch.tensor(settings.mean, device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(settings.std, device=device).view(1, 3, 1, 1) * 255
        return cls(session, settings, device, prepared, core, optimizer, scheduler, mean, std, state)

    def inputs(self, images: Any) -> Any:
        """uint8 (B, 3, H, W) -> float32 normalised on the device."""
        return normalize(images.to(self.device, non_blocking=True), self.mean, self.std)

    def autocast(self) -> Any:
        return autocast(self.device, self.settings.precision)

    def step(self, loss: Any) -> None:
        """One optimizer step on ``loss`` (counted in ``state["step"]``)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.state["step"] += 1

    def before_step(self) -> None:
        """The failure test hook (:func:`maybe_inject_failure`), before the step is computed."""
        maybe_inject_failure(self.settings, self.state["step"] + 1, self.session.rank, self.session.world)

    def snapshot(self) -> dict[str, Any]:
        return {"model": self.core.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "state": self.state,
                "fingerprint": self.settings.fingerprint}

    def end_epoch(self, row: dict[str, Any], metrics: str, checkpoint: bool = True) -> None:
        """Record the epoch's ``row``, rewrite ``<metrics>.csv/.json`` on rank 0, and report it
        (with a checkpoint when ``checkpoint``; every rank reports)."""
        self.state["epoch"] = row["epoch"]
        self.state["history"].append(row)
        if self.session.rank == 0:
            write_metrics(self.settings.run_dir, self.state["history"], prefix=metrics)
        self.session.report(row, self.snapshot() if checkpoint else None)
