"""``deldist <stage> --dry-run``: what a run would do, how big it is, and what it would cost.

Nothing is written and no Ray cluster is started. ``embed``, ``curate`` and ``curate-new``
list their sources and read the container headers of a sample of the videos (PyAV) to estimate
the frames kept and decoded; ``cluster``, ``dedup`` and ``select`` read the published manifests
they would start from. The README's cost model ("Time and cost estimate") then turns the work
into vCPU-hours, GPU-hours, a wall time and a price for a cluster shape. Every rate is an
assumption the output repeats (:class:`CostModel`); give your own with ``--cost-model FILE``.
"""

from __future__ import annotations

import math
import random
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deldist import storage
from deldist.frames import DecodeError, Sampling, is_sampled, probe_video
from deldist.io import list_sources, open_source
from deldist.layout import RunLayout, table_of

VIT_B16_GFLOPS = 35.1  # per 224 px image, forward (2 x 86M params x 197 tokens + attention): the rates' model


class CostModel(BaseModel):
    """Rates and a cluster shape (defaults: README "Time and cost estimate", k8s/rayjob.yaml)."""

    model_config = ConfigDict(extra="forbid")

    decode_frames_per_vcpu_s: float = Field(200.0, description="software H.264 1080p decode (assumed)")
    encoder_frames_per_gpu_s: float = Field(1000.0, description="ViT-B/16 bf16 on one A10G (assumed); scaled by "
                                                                "the model's GFLOPs")
    encoder_frames_per_vcpu_s: float = Field(6.5, description="ViT-B/16 bf16 per vCPU (measured: 13 img/s on 2)")
    kmeans_vcpu_s_per_nkd: float = Field(3.8e-10, description="k-means stage per row x centroid x dim, 20 passes "
                                                              "(measured: 294 vCPU-s at 1M, k 1000, D 768)")
    dedup_vcpu_s_per_pair_dim: float = Field(3.2e-11, description="dedup stage per (sum of n_c^2) x dim (measured: "
                                                                  "68 vCPU-s at sum 2.78e9, D 768)")
    cluster_size_factor: float = Field(2.8, description="sum n_c^2 / (n^2 / k) before clustering (measured at 1M)")
    gpu_nodes: int = Field(8, description="GPU workers (one GPU each)")
    gpu_node_decode_vcpus: int = Field(3, description="decode vCPUs per GPU worker")
    gpu_node_price_h: float = Field(1.006, description="g5.xlarge on demand, us-east-1 (assumed list price)")
    cpu_nodes: int = Field(8, description="CPU workers")
    cpu_node_vcpus: int = Field(14, description="vCPUs per CPU worker")
    cpu_node_price_h: float = Field(0.68, description="c6i.4xlarge on demand (assumed list price)")
    head_price_h: float = Field(0.384, description="m6i.2xlarge head (assumed list price)")

    @property
    def vcpus(self) -> int:
        return self.gpu_nodes * self.gpu_node_decode_vcpus + self.cpu_nodes * self.cpu_node_vcpus

    @property
    def price_h(self) -> float:
        return self.gpu_nodes * self.gpu_node_price_h + self.cpu_nodes * self.cpu_node_price_h + self.head_price_h


# ----------------------------------------------------------------------------- pure estimates


def kept_and_decoded(n_frames: int, source_fps: float, sampling: Sampling, keyframes: int | None = None
                     ) -> tuple[int, int]:
    """Frames a video of ``n_frames`` at ``source_fps`` keeps and decodes under ``sampling``
    (``keyframes``: its keyframe count, for ``keyframes_only``)."""
    if sampling.keyframes_only:
        k = keyframes if keyframes is not None else math.ceil(n_frames / 12)
        return k, k
    if sampling.stride:
        kept = math.ceil(n_frames / sampling.stride)
    elif sampling.fps and source_fps > sampling.fps:
        kept = sum(is_sampled(i, source_fps, sampling) for i in range(n_frames))
    else:
        kept = n_frames
    return kept, n_frames  # every frame up to the last kept one is decoded


def embed_estimate(kept: float, decoded: float, encoder_gflops: float, on_gpu: bool, model: CostModel
                   ) -> dict[str, Any]:
    """Work, throughput, wall time and price of embedding ``kept`` frames (``decoded`` decoded)."""
    speed = VIT_B16_GFLOPS / max(encoder_gflops, 1e-9)
    decode_vcpu_s = decoded / model.decode_frames_per_vcpu_s
    if on_gpu:
        encode = {"gpu_h": kept / (model.encoder_frames_per_gpu_s * speed) / 3600}
        rate = min(model.vcpus * kept / max(decode_vcpu_s, 1e-9),
                   model.gpu_nodes * model.encoder_frames_per_gpu_s * speed)
    else:
        encode = {"encode_vcpu_h": kept / (model.encoder_frames_per_vcpu_s * speed) / 3600}
        vcpu_s_per_frame = decode_vcpu_s / max(kept, 1) + 1 / (model.encoder_frames_per_vcpu_s * speed)
        rate = model.vcpus / vcpu_s_per_frame
    wall_h = kept / max(rate, 1e-9) / 3600
    return {"decode_vcpu_h": decode_vcpu_s / 3600, **encode, "frames_per_s": rate, "wall_h": wall_h,
            "cost_usd": wall_h * model.price_h}


def cluster_estimate(n: int, k: int, dim: int, fit_fraction: float, max_iter: int, model: CostModel) -> dict[str, Any]:
    """The measured stage made 21 passes over its rows (20 Lloyd passes, one assignment):
    ``max_iter`` passes over the fit sample plus one over every row, at that rate per pass."""
    row_passes = n * fit_fraction * max_iter + n
    return _cpu_stage(model.kmeans_vcpu_s_per_nkd * k * dim * row_passes / 21, model)


def dedup_estimate(sum_nc2: float, dim: int, model: CostModel) -> dict[str, Any]:
    return {"sum_cluster_size_squared": sum_nc2, **_cpu_stage(model.dedup_vcpu_s_per_pair_dim * sum_nc2 * dim, model)}


def _cpu_stage(vcpu_s: float, model: CostModel) -> dict[str, Any]:
    wall_h = vcpu_s / model.vcpus / 3600
    return {"vcpu_h": vcpu_s / 3600, "wall_h": wall_h, "cost_usd": wall_h * model.price_h}


# ----------------------------------------------------------------------------- inputs


def source_sizes(input_uri: str, manifest: str | None, sampling: Sampling, probe: int, seed: int = 0,
                 exclude: set[str] | None = None) -> dict[str, Any]:
    """What embed would read: sources by kind and dataset, bytes, and kept / decoded frames
    extrapolated by bytes from ``probe`` videos' headers (images: one frame each)."""
    sources, skipped = list_sources(input_uri, manifest)
    sources = [s for s in sources if s.uri not in (exclude or set())]
    videos = [s for s in sources if s.kind == "video"]
    images = len(sources) - len(videos)
    sample = random.Random(seed).sample(videos, min(probe, len(videos)))
    kept = decoded = probed_bytes = 0
    unreadable = []
    for s in sample:
        try:
            info = probe_video(open_source(s.uri))
        except DecodeError as e:
            unreadable.append({"source": s.uri, "error": str(e)})
            continue
        keyframes = count_keyframes(s.uri) if sampling.keyframes_only else None
        k, d = kept_and_decoded(info.n_frames, info.fps, sampling, keyframes)
        kept, decoded, probed_bytes = kept + k, decoded + d, probed_bytes + max(s.size, 0)
    video_bytes = sum(max(s.size, 0) for s in videos)
    scale = video_bytes / probed_bytes if probed_bytes else 0.0
    datasets: dict[str, int] = {}
    for s in sources:
        datasets[s.dataset] = datasets.get(s.dataset, 0) + 1
    return {"sources": len(sources), "videos": len(videos), "images": images, "not_media": len(skipped),
            "bytes": sum(max(s.size, 0) for s in sources), "datasets": datasets, "probed_videos": len(sample),
            "unreadable_in_probe": unreadable, "frames_kept": round(kept * scale) + images,
            "frames_decoded": round(decoded * scale) + images}


def count_keyframes(uri: str) -> int:
    """Keyframes of a video's first stream, by demuxing its packets (no decode)."""
    import av

    with av.open(open_source(uri)) as container:
        stream = container.streams.video[0]
        return sum(1 for p in container.demux(stream) if p.is_keyframe)


def encoder_size(model_name: str, image_size: int) -> tuple[float, int]:
    """(forward GFLOPs per image, embedding dim) of a timm ViT: 2 x parameters x tokens (built
    randomly initialised to count them; nothing is downloaded). Other models: ViT-B/16's."""
    from deldist.encoders import build_encoder

    try:
        net = build_encoder(model_name, image_size)
    except Exception:  # noqa: BLE001 - a model this build does not know: the reference figures
        return VIT_B16_GFLOPS, 768
    patch = getattr(getattr(net, "patch_embed", None), "patch_size", None)
    if patch is None:
        return VIT_B16_GFLOPS, int(getattr(net, "num_features", 768))
    tokens = (image_size // patch[0]) * (image_size // patch[1]) + 1
    return 2 * sum(p.numel() for p in net.parameters()) * tokens / 1e9, int(net.num_features)


# ----------------------------------------------------------------------------- per stage


def _embedded_sources(output: str) -> set[str]:
    layout = RunLayout(output)
    if not storage.is_published(layout.sources):
        return set()
    return set(storage.read_published(layout.sources, ["source"]).column("source").to_pylist())


def _embed_part(cfg: Any, cost: CostModel, probe: int, exclude: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    sizes = source_sizes(cfg.input, cfg.manifest, cfg.sampling, probe, exclude=exclude)
    on_gpu = cfg.device == "cuda" or (cfg.device == "auto" and cost.gpu_nodes > 0)
    gflops, dim = encoder_size(cfg.model, cfg.image_size)
    estimate = embed_estimate(sizes["frames_kept"], sizes["frames_decoded"], gflops, on_gpu, cost)
    return {**sizes, "dim": dim}, {**estimate, "encoder_gflops": round(gflops, 2), "on_gpu": on_gpu,
                                   "sources_already_embedded": len(exclude)}


def _rows_and_dim(output: str, frames_if_unknown: int | None, dim_if_unknown: int) -> tuple[int, int]:
    emb = RunLayout(output).embeddings
    if storage.is_published(emb) and frames_if_unknown is None:
        manifest = storage.read_manifest(emb)
        return int(manifest.get("rows") or 0), int(manifest.get("dim") or dim_if_unknown)
    return int(frames_if_unknown or 0), dim_if_unknown


def _sum_nc2(output: str, n: int, k: int, cost: CostModel, clustered: bool) -> float:
    layout = RunLayout(output)
    if clustered and storage.is_published(layout.clusters):
        sizes = storage.read_published(layout.centroids, ["size"]).column("size").to_numpy().astype(float)
        return float((sizes ** 2).sum())
    return cost.cluster_size_factor * n * n / max(k, 1)


def plan(stage: str, configs: list[Any], cost: CostModel, probe: int = 20) -> dict[str, Any]:
    """What ``deldist <stage>`` would run with ``configs``, its inputs and the estimate."""
    cfg = configs[0]
    out: dict[str, Any] = {"dry_run": True, "stage": stage, "would_run": [stage], "inputs": {}, "estimate": {},
                           "cluster_shape": {"vcpus": cost.vcpus, "gpus": cost.gpu_nodes, "price_h": cost.price_h},
                           "assumptions": cost.model_dump()}
    frames = None
    dim = 768
    if stage in ("embed", "curate", "curate-new"):
        if stage == "curate-new":
            from deldist import curate_new, versions

            emb_cfg = curate_new.planned_embed_config(cfg)
            latest = versions.version_dir(cfg.corpus, cfg.selection)
            exclude = set(storage.read_published(table_of(latest, "sources"), ["source"]).column("source").to_pylist())
        else:
            emb_cfg = cfg if stage == "embed" else cfg.stage_configs()[0]
            exclude = _embedded_sources(emb_cfg.output)
        out["inputs"], out["estimate"]["embed"] = _embed_part(emb_cfg, cost, probe, exclude)
        frames, dim = out["inputs"]["frames_kept"], out["inputs"]["dim"]
    if stage == "curate":
        _, cluster_cfg, dedup_cfg, select_cfgs = cfg.stage_configs()
        out["would_run"] = ["embed", "cluster", "dedup", *[f"select:{s.name}" for s in select_cfgs], "verify"]
        n, dim = _rows_and_dim(cfg.output, frames, dim)
        out["estimate"]["cluster"] = cluster_estimate(n, cluster_cfg.k, dim, cluster_cfg.fit_fraction,
                                                      cluster_cfg.max_iter, cost)
        out["estimate"]["dedup"] = dedup_estimate(_sum_nc2(cfg.output, n, cluster_cfg.k, cost, False), dim, cost)
    elif stage in ("cluster", "dedup", "select"):
        n, dim = _rows_and_dim(cfg.output, None, dim)
        out["inputs"] = {"frames": n, "dim": dim}
        if stage == "cluster":
            out["estimate"]["cluster"] = cluster_estimate(n, cfg.k, dim, cfg.fit_fraction, cfg.max_iter, cost)
        elif stage == "dedup":
            k = int(storage.read_manifest(RunLayout(cfg.output).clusters).get("k", 1))
            out["estimate"]["dedup"] = dedup_estimate(_sum_nc2(cfg.output, n, k, cost, True), dim, cost)
        else:
            out["would_run"] = [f"select:{c.name}" for c in configs]
    elif stage not in ("embed", "curate-new"):
        out["note"] = f"no size or cost estimate for {stage}: it runs on the selection's frames as configured"
    parts = out["estimate"].values()
    out["total"] = {key: sum(p.get(key, 0.0) for p in parts) for key in ("wall_h", "cost_usd", "gpu_h")}
    out["total"]["vcpu_h"] = sum(p.get("vcpu_h", 0.0) + p.get("decode_vcpu_h", 0.0) + p.get("encode_vcpu_h", 0.0)
                                 for p in parts)
    return out
