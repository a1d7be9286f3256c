"""Embed throughput, measured side by side in one run on the same videos, model and threads:

  pipeline   deldist.embed.run on a local Ray cluster (decode tasks -> encoder actor -> Parquet)
  plain      one process: PyAV decode + resize, then torch forward, in a loop
  model-only the forward alone on the pre-decoded frames

Prints frames/s (median over interleaved rounds) and the ratios pipeline/plain and pipeline/model-only.

    .venv/bin/python bench/embed.py [--model vit_tiny_patch16_224] [--threads 2] [--videos 6]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deldist import sample  # noqa: E402
from deldist.config import load_config  # noqa: E402
from deldist.embed import Config, run  # noqa: E402
from deldist.encoders import build_encoder, pool_tokens  # noqa: E402
from deldist.frames import IMAGENET_MEAN, IMAGENET_STD, Sampling, decode_video  # noqa: E402

BATCH = 32


def _forward(model: torch.nn.Module, frames: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float().sub_(mean).div_(std)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        emb = pool_tokens(model.forward_features(x), "cls", model.num_prefix_tokens)
    return torch.nn.functional.normalize(emb, dim=1).numpy()


def plain_loop(videos: list[Path], model_name: str, stride: int) -> tuple[int, float, list[np.ndarray]]:
    model = build_encoder(model_name).eval().to(memory_format=torch.channels_last)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    batches, buf, n = [], [], 0
    start = time.perf_counter()
    for v in videos:
        for _, _, rgb in decode_video(str(v), 224, Sampling(stride=stride), threads=1):
            buf.append(rgb)
            if len(buf) == BATCH:
                batch = np.stack(buf)
                _forward(model, batch, mean, std)
                batches.append(batch)
                n, buf = n + len(buf), []
    if buf:
        batch = np.stack(buf)
        _forward(model, batch, mean, std)
        batches.append(batch)
        n += len(buf)
    return n, time.perf_counter() - start, batches


def model_only(batches: list[np.ndarray], model_name: str) -> tuple[int, float]:
    model = build_encoder(model_name).eval().to(memory_format=torch.channels_last)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    _forward(model, batches[0], mean, std)  # warm-up
    start = time.perf_counter()
    n = 0
    for b in batches:
        _forward(model, b, mean, std)
        n += len(b)
    return n, time.perf_counter() - start


def pipeline(input_dir: Path, out: Path, model_name: str, stride: int, threads: int) -> tuple[int, float]:
    cfg = load_config(Config, None, [
        f"input={input_dir}", f"output={out}", f"model={model_name}", "random_init=true",
        f"stride={stride}", f"batch_size={BATCH}", "actors_max=1", "encoder_cpus=1.0",
        f"torch_threads={threads}", "decode_cpus=0.5", "segment_seconds=20", "rows_per_part=4096",
    ])
    start = time.perf_counter()
    summary = run(cfg)
    return summary["frames_written_this_run"], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--videos", type=int, default=6)
    parser.add_argument("--stride", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="deldist-bench-"))
    data = work / "sample"
    if not (data / "ground_truth.parquet").exists():
        sample.generate(str(data), size="demo", seed=0)
    videos = sorted((data / "videos").rglob("*.mp4"))[: args.videos]
    input_dir = work / "input"
    shutil.rmtree(input_dir, ignore_errors=True)
    for v in videos:
        (input_dir / v.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(v, input_dir / v.parent.name / v.name)

    import ray

    ray.init(num_cpus=args.threads, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    pipeline(input_dir, work / "warmup", args.model, args.stride * 50, args.threads)  # start workers, import torch
    # Interleave the variants round by round so a change in machine load hits all of them.
    times: dict[str, list[float]] = {"pipeline": [], "plain_loop": [], "model_only": []}
    counts = set()
    for r in range(args.rounds):
        shutil.rmtree(work / "out", ignore_errors=True)
        n_pipe, t_pipe = pipeline(input_dir, work / "out", args.model, args.stride, args.threads)
        n_plain, t_plain, batches = plain_loop(videos, args.model, args.stride)
        n_model, t_model = model_only(batches, args.model)
        counts |= {n_pipe, n_plain, n_model}
        for k, t in (("pipeline", t_pipe), ("plain_loop", t_plain), ("model_only", t_model)):
            times[k].append(t)
    ray.shutdown()
    assert len(counts) == 1, f"variants embedded different frame counts: {counts}"
    n_pipe = counts.pop()
    fps = {k: n_pipe / float(np.median(v)) for k, v in times.items()}
    result = {
        "model": args.model, "threads": args.threads, "videos": len(videos), "frames": n_pipe,
        "stride": args.stride, "rounds": args.rounds, "frames_per_s": {k: round(v, 1) for k, v in fps.items()},
        "pipeline_vs_plain": round(fps["pipeline"] / fps["plain_loop"], 2),
        "pipeline_vs_model_only": round(fps["pipeline"] / fps["model_only"], 2),
        "seconds_all": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
