"""Pretraining throughput: the Ray Train loop (``deldist.pretrain``) against a plain
single-process PyTorch loop, same MAE, batch and threads per worker, measured in one run:

  plain (model)    one process, batches pre-decoded in memory: forward + backward + AdamW only
  plain (+ data)   one process, JPEG decode + RandomResizedCrop + flip in the loop, then the step
  plain DDP xN     N such processes (torch.multiprocessing, gloo DistributedDataParallel), no Ray:
                   what N workers can reach on this machine without Ray Train or Ray Data
  ray_train xN     deldist.pretrain.run on a local Ray cluster, N workers (gloo DDP), Ray Data
                   decoding/augmenting in a CPU actor pool; img/s per worker from the run's metrics
                   (epoch wall time, data waits included; first epoch dropped as warm-up)

Prints img/s and the per-worker ratios ray_train / plain (model) and ray_train / plain DDP
with the same number of processes, with and without the wait for the data stream's first
batch (the pipeline's start-up, once per run).

    .venv/bin/python bench/train.py [--workdir /tmp/bt] [--sample small] [--size 112] [--batch 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deldist import augment, materialize, pretrain, sample, storage  # noqa: E402
from deldist.frames import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from deldist.layout import RunLayout  # noqa: E402
from deldist.models import build_mae, param_groups  # noqa: E402
from deldist.trainer import normalize  # noqa: E402

MODEL = "deldist_vit_micro_patch16"


def prepare(workdir: Path, size: str) -> str:
    """Sample videos -> fake embeddings of every frame -> frame store (128 px). Returns the run root."""
    data = workdir / f"sample-{size}"
    if not (data / "ground_truth.parquet").exists():
        sample.generate(str(data), size=size, seed=0)
    root = str(workdir / f"run-{size}")
    if not storage.is_published(storage.join(root, "embeddings")):
        truth = pq.read_table(data / "ground_truth.parquet").to_pylist()
        rows = [{"id": f"{r['source_key']}#{r['frame_index']}", "source": str(data / "videos" / r["source_key"]),
                 "frame_index": r["frame_index"]} for r in truth]
        part = storage.join(root, "embeddings", "part-0.parquet")
        storage.write_table(pa.Table.from_pylist(rows), part)
        storage.publish(storage.join(root, "embeddings"), [part], {})
    materialize.run(materialize.Config(output=root, size=128))
    return root


def plain_loop(jpegs: list[bytes], size: int, batch: int, steps: int, threads: int, with_data: bool,
               mae_args: dict, rank: int = 0) -> float:
    """img/s of forward + backward + AdamW on this process (after 2 warm-up steps); DDP when a
    process group is initialised."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_mae(MODEL, size, **mae_args)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    if torch.distributed.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(model)
    rng = np.random.default_rng(rank)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    fixed = [torch.from_numpy(augment.augment_jpegs([jpegs[j % len(jpegs)] for j in range(i * batch, (i + 1) * batch)],
                                                     size, (0.2, 1.0), rng)) for i in range(4)]
    start = 0.0
    for step in range(steps + 2):
        if step == 2:
            start = time.perf_counter()
        if with_data:
            chosen = rng.choice(len(jpegs), batch, replace=False)
            images = torch.from_numpy(augment.augment_jpegs([jpegs[j] for j in chosen], size, (0.2, 1.0), rng))
        else:
            images = fixed[step % 4]
        loss, _, _ = model(normalize(images, mean, std))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def _ddp_process(rank: int, world: int, port: int, jpegs: list[bytes], args: tuple, results: Any) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    results.put(plain_loop(jpegs, *args, rank=rank))
    torch.distributed.destroy_process_group()


def plain_ddp_rate(jpegs: list[bytes], world: int, size: int, batch: int, steps: int, threads: int,
                   with_data: bool, mae_args: dict) -> float:
    """img/s per process of ``world`` plain DDP processes (gloo on loopback), no Ray."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    args = (size, batch, steps, threads, with_data, mae_args)
    procs = [ctx.Process(target=_ddp_process, args=(r, world, port, jpegs, args, results)) for r in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
        if proc.exitcode:
            raise RuntimeError(f"plain DDP process exited with {proc.exitcode}")
    return statistics.mean(results.get() for _ in range(world))


def ray_train_rate(root: str, workers: int, size: int, batch: int, threads: int, epochs: int, mae_args: dict,
                   name: str, buffer_mb: float | None) -> tuple[float, float, float]:
    """(img/s per worker, img/s total, steady img/s per worker = without the wait for a new data
    stream's first batch): medians over epochs 2.. of the run's per-epoch metrics."""
    # the workers must leave CPU for the Ray Data actors that decode and augment (2-CPU cluster)
    cpus = min(float(threads), (2.0 - 0.5) / workers)
    cfg = pretrain.Config(output=root, name=name, model=MODEL, image_size=size, epochs=epochs, warmup_epochs=1,
                          batch_size=batch, num_workers=workers, cpus_per_worker=cpus,
                          torch_threads=threads, max_failures=0, data_buffer_mb=buffer_mb, **mae_args)
    pretrain.run(cfg)
    history = storage.read_json(storage.join(RunLayout(root).pretrain(name), "metrics.json"))[1:]
    per_worker = statistics.median(h["img_per_s_per_worker"] for h in history)
    steady = statistics.median(h["img_per_s_steady"] / workers for h in history)
    return per_worker, statistics.median(h["img_per_s"] for h in history), steady


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/deldist_bench_train")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (and for plain)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--sample", default="small", choices=["tiny", "small", "demo"],
                        help="generator set: epochs of the tiny one (219 frames) last ~1 s, too short to time")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--buffer-mb", type=float, default=8.0,
                        help="data_buffer_mb: keeps the decode + augment work running beside training, as in "
                             "a run whose epochs do not fit the object store (0: Ray Data's default)")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    workdir = Path(args.workdir)
    root = prepare(workdir, args.sample)
    jpegs = storage.read_published(storage.join(root, "frames", "all"), ["jpeg"]).column("jpeg").to_pylist()
    mae_args = {"decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4}
    steps = max(8, len(jpegs) // args.batch)
    results: dict[str, float] = {"frames": len(jpegs), "batch": args.batch, "image_size": args.size,
                                 "threads_per_worker": args.threads}
    results["plain_model_img_s"] = plain_loop(jpegs, args.size, args.batch, steps, args.threads, False, mae_args)
    results["plain_with_data_img_s"] = plain_loop(jpegs, args.size, args.batch, steps, args.threads, True, mae_args)
    for n in args.workers:
        if n > 1:
            for label, with_data in (("model", False), ("with_data", True)):
                results[f"plain_ddp_{n}p_{label}_img_s_per_process"] = plain_ddp_rate(
                    jpegs, n, args.size, args.batch, steps, args.threads, with_data, mae_args)
        name = f"bench-{n}w-{int(time.time())}"
        per_worker, total, steady = ray_train_rate(root, n, args.size, args.batch, args.threads, args.epochs,
                                                   mae_args, name, args.buffer_mb or None)
        results[f"ray_train_{n}w_steady_img_s_per_worker"] = steady
        results[f"ratio_{n}w_steady_per_worker_vs_plain_model"] = steady / results["plain_model_img_s"]
        results[f"ray_train_{n}w_img_s_per_worker"] = per_worker
        results[f"ray_train_{n}w_img_s_total"] = total
        results[f"ratio_{n}w_per_worker_vs_plain_model"] = per_worker / results["plain_model_img_s"]
        results[f"ratio_{n}w_per_worker_vs_plain_with_data"] = per_worker / results["plain_with_data_img_s"]
        if n > 1:
            ddp = results[f"plain_ddp_{n}p_model_img_s_per_process"]
            results[f"ratio_{n}w_per_worker_vs_plain_ddp_model"] = per_worker / ddp
            results[f"ratio_{n}w_per_worker_vs_plain_ddp_with_data"] = \
                per_worker / results[f"plain_ddp_{n}p_with_data_img_s_per_process"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
