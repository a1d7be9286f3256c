"""Embed stage: sources -> sampled frames (CPU tasks) -> ViT actor pool -> ``embeddings/``.

Pipeline (Ray Data): a probe pass cuts each video into frame-index segments ("units"), then
one decode task per video segment (images are packed many per task) streams sampled frames
into an actor pool of encoders, and small writer tasks write Parquet parts.

Resumable and incremental: every decode task writes a progress record per unit (how many
sampled frames it holds, or why it failed) under ``_progress/embeddings/``. A unit is done
when its record exists and all its frames are in the parts; a rerun embeds only the missing
frames of unfinished units, and new sources that appeared under the input prefix. The
``embeddings/`` manifest is published only when every listed source is done, after a
check that no id is present twice (a retried task can write a frame again).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import Counter
from typing import Any, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import model_validator

import deldist
from deldist import storage
from deldist.config import StageConfig
from deldist.embed_units import (
    PROGRESS_SCHEMA,
    FramesPresent,
    load_state,
    pack_tasks,
    plan_units,
    source_hashes,
    source_progress,
)
from deldist.faults import fail_once
from deldist.frames import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DecodeError,
    Sampling,
    decode_image,
    decode_video,
    perceptual_hash,
    quality_stats,
)
from deldist.ids import frame_id
from deldist.io import Source, list_sources, open_source
from deldist.layout import RunLayout, run_file_of
from deldist.schema import ERRORS_SCHEMA, QUALITY_COLUMNS, SOURCES_SCHEMA, embedding_array, embeddings_schema

log = logging.getLogger(__name__)

DEFAULT_FPS = 2.0
# what fixes the embedding of a frame id (embeddings/_run.json): a rerun into the same output,
# and a curate-new batch against a corpus, must match them
FINGERPRINT_KEYS: tuple[str, ...] = ("model", "weights_sha256", "random_init", "pooling", "image_size", "mean", "std",
                                     "fps", "stride", "keyframes_only", "segment_seconds", "dim", "embedding_dtype")
# keys added after runs were recorded without them: such a run file has the default
FINGERPRINT_DEFAULTS: dict[str, Any] = {"embedding_dtype": "float32"}


def recorded(fingerprint: dict[str, Any], key: str) -> Any:
    """A fingerprint's value for ``key`` (the default for keys older run files lack)."""
    return fingerprint.get(key, FINGERPRINT_DEFAULTS.get(key))
_EMIT_ROWS = 32  # frames per batch a decode task hands downstream


class Config(StageConfig):
    """Embed stage settings (YAML keys)."""

    input: str  # URI prefix holding videos and images
    output: str  # run root: writes <output>/embeddings and <output>/errors
    manifest: str | None = None  # CSV/Parquet with uri[, dataset|center]
    model: str = "vit_base_patch16_224"
    weights: str | None = None  # local path or s3:// URI; never downloaded
    random_init: bool = False  # tests only: recorded in the manifest
    pooling: Literal["cls", "mean"] = "cls"
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    fps: float | None = None  # sampled frames per second of video (default 2 when no stride)
    stride: int | None = None  # or every stride-th frame (stride 1: every frame)
    keyframes_only: bool = False
    segment_seconds: float = 60.0  # video split unit: one decode task each
    images_per_task: int = 64
    batch_size: int = 32  # encoder batch
    actors_min: int = 1
    actors_max: int = 1
    encoder_cpus: float = 0.5  # per encoder actor on CPU clusters (fractional: leave room for decoding)
    torch_threads: int | None = None  # default: max(1, ceil(encoder_cpus))
    decode_cpus: float = 0.5
    decode_threads: int = 1  # FFmpeg threads per decode task
    decode_memory_mb: int = 768  # reserved per decode task (~500 MiB measured per decode worker here)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    # stored embeddings: float16 halves storage and every later read (cosines move by < 1e-3)
    embedding_dtype: Literal["float32", "float16"] = "float32"
    rows_per_part: int = 2048
    max_sources: int | None = None  # embed at most this many pending sources in this run
    id_prefix: str = ""  # prepended to every source key (and so to every id), e.g. "v2/" for an upload batch

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.fps is not None and self.stride is not None:
            raise ValueError("set either fps or stride, not both (fps: null to use stride)")
        if self.fps is not None and self.fps <= 0 or self.stride is not None and self.stride < 1:
            raise ValueError("fps must be > 0 and stride >= 1")
        if self.fps is None and self.stride is None:
            self.fps = DEFAULT_FPS
        return self

    @property
    def sampling(self) -> Sampling:
        return Sampling(fps=self.fps, stride=self.stride, keyframes_only=self.keyframes_only)


# ---------------------------------------------------------------- Ray Data stages


def decode_task(batch: dict[str, np.ndarray], config: Config, progress_dir: str) -> Iterator[dict[str, Any]]:
    """Decode task specs (a video segment, or a pack of images) into frame batches of
    ``_EMIT_ROWS``; then write one progress record per unit. Runs as a plain Ray task."""
    fail_once("decode_task", config.inject_fault, config.output)
    records: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for spec_json in batch["task"]:
        for unit in json.loads(spec_json)["units"]:
            for frame_row in _decode_unit(unit, config, records):
                rows.append(frame_row)
                if len(rows) >= _EMIT_ROWS:
                    yield _stack(rows)
                    rows = []
    if rows:
        yield _stack(rows)
    storage.write_table(pa.Table.from_pylist(records, schema=PROGRESS_SCHEMA),
                        storage.join(progress_dir, storage.new_part_name("units")))


def _decode_unit(unit: dict[str, Any], cfg: Config, records: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Yield frame rows of one unit (skipping ids already embedded); append its record."""
    stats = {"decoded": 0, "sampled": 0, "kept": 0}
    skip = frozenset(unit["skip"])
    error_type, message = "", ""
    try:
        if unit["kind"] == "image":
            stats["decoded"] = 1
            rgb = decode_image(storage.read_bytes(unit["uri"]), cfg.image_size)
            stats["sampled"] = 1
            frames: Iterator[tuple[int, float, np.ndarray]] = iter([(0, 0.0, rgb)])
        else:
            seg = unit["segment_frames"]
            start = unit["unit"] * seg
            last = unit["unit"] == unit["n_units"] - 1
            # decode_video drops the skip set itself, before the costly colour conversion
            frames = decode_video(open_source(unit["uri"]), cfg.image_size, cfg.sampling,
                                  start_frame=start, end_frame=None if last or seg == 0 else start + seg,
                                  skip=skip, threads=cfg.decode_threads, stats=stats)
        for index, ts, rgb in frames:
            yield {"id": frame_id(unit["key"], index), "source": unit["uri"], "frame_index": index,
                   "timestamp_s": ts, "dataset": unit["dataset"], "pixels": rgb, **quality_stats(rgb),
                   "phash": perceptual_hash(rgb)}
        if unit["kind"] == "video" and stats["decoded"] == 0 and unit["unit"] == 0:
            raise DecodeError("no decodable video frames")
    except Exception as e:  # recorded per unit; the frames decoded before it are kept
        if storage.is_transient_error(e):
            raise  # not a fact about the file: the task fails, Ray retries it or a rerun does
        error_type, message = type(e).__name__, str(e)
    records.append({"source": unit["key"], "unit": unit["unit"], "n_units": unit["n_units"],
                    "segment_frames": unit["segment_frames"], "expected": stats["sampled"],
                    "decoded": stats["decoded"], "stage": "decode",
                    "error_type": error_type, "message": message})


def _stack(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    out = {k: np.asarray([r[k] for r in rows]) for k in rows[0] if k not in ("pixels", "phash")}
    out["phash"] = np.array([r["phash"] for r in rows], np.uint64)
    out["pixels"] = np.stack([r["pixels"] for r in rows])
    for name in QUALITY_COLUMNS:
        out[name] = out[name].astype(np.float32)
    return out


class Encoder:
    """Actor-pool callable: (B, H, W, 3) uint8 frames -> (B, D) L2-normalised embeddings.

    ``__init__`` is the expensive setup (model build + weight load) done once per actor.
    """

    def __init__(self, config: Config):
        import torch

        from deldist.encoders import build_encoder, load_weights

        self.device = torch.device("cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(config.torch_threads or max(1, math.ceil(config.encoder_cpus)))
        precision = config.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.autocast = precision == "bf16"
        self.model = build_encoder(config.model, config.image_size)
        load_weights(self.model, config.weights, config.random_init)
        self.model.eval().to(self.device).to(memory_format=torch.channels_last)
        self.prefix = getattr(self.model, "num_prefix_tokens", 1)
        self.pooling = config.pooling
        self.mean = torch.tensor(config.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(config.std, device=self.device).view(1, 3, 1, 1) * 255.0
        self.fault = (config.inject_fault, config.output)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from deldist.encoders import pool_tokens

        fail_once("encoder_actor", *self.fault)
        pixels = torch.from_numpy(batch.pop("pixels")).to(self.device, non_blocking=True)
        x = pixels.permute(0, 3, 1, 2).float().sub_(self.mean).div_(self.std)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            emb = pool_tokens(self.model.forward_features(x), self.pooling, self.prefix)
        emb = torch.nn.functional.normalize(emb.float(), dim=1)
        batch["embedding"] = emb.cpu().numpy()
        return batch


def _write_part(batch: dict[str, np.ndarray], data_dir: str, dim: int, dtype: str) -> dict[str, np.ndarray]:
    """Sink: write one batch of embedded frames as a Parquet part; return its row count."""
    schema = embeddings_schema(dim, dtype)
    emb = np.ascontiguousarray(batch["embedding"], dtype=np.float32)
    columns = {name: batch[name] for name in schema.names if name != "embedding"}
    columns["embedding"] = embedding_array(emb, dtype)
    table = pa.table({n: columns[n] for n in schema.names}).cast(schema)
    storage.write_table(table, storage.join(data_dir, storage.new_part_name()))
    return {"rows": np.array([len(emb)])}


# ---------------------------------------------------------------- driver


def _fingerprint(config: Config, weights_sha: str | None, dim: int) -> dict[str, Any]:
    """Settings that change the embedding of a given frame id: a rerun must match them."""
    values = {**config.model_dump(), "weights_sha256": weights_sha, "dim": dim, "mean": list(config.mean),
              "std": list(config.std)}
    return {**{k: values[k] for k in FINGERPRINT_KEYS}, **({"id_prefix": config.id_prefix} if config.id_prefix else {})}


def fingerprint(config: Config) -> dict[str, Any]:
    """What a run of ``config`` records in ``embeddings/_run.json`` (builds the model once)."""
    return _fingerprint(config, *_weights_and_dim(config))


def _check_or_record_run(layout: RunLayout, fingerprint: dict[str, Any]) -> None:
    run_file = run_file_of(layout.embeddings)
    if storage.exists(run_file):
        previous = storage.read_json(run_file)
        diff = {k: (recorded(previous, k), v) for k, v in fingerprint.items() if recorded(previous, k) != v}
        if diff:
            raise ValueError(f"{layout.embeddings} was embedded with other settings {diff} (old, new); "
                             "use a new output root to embed with these")
        return
    storage.write_json(run_file, fingerprint)


def _weights_and_dim(config: Config) -> tuple[str | None, int]:
    """Fail fast in the driver: build the model and load the weights once (also gives D)."""
    from deldist.encoders import build_encoder, load_weights

    model = build_encoder(config.model, config.image_size)
    report = load_weights(model, config.weights, config.random_init)
    return report.sha256, int(model.num_features)


def _run_pipeline(tasks: list[str], config: Config, layout: RunLayout, dim: int) -> int:
    import ray
    from ray.data import ActorPoolStrategy

    from deldist.runtime import use_gpu

    on_gpu = use_gpu({"cuda": True, "cpu": False}.get(config.device))
    encoder_resources = {"num_gpus": 1} if on_gpu else {"num_cpus": config.encoder_cpus}
    ds = (
        ray.data.from_items([{"task": t} for t in tasks], override_num_blocks=len(tasks))
        .map_batches(decode_task, fn_kwargs={"config": config, "progress_dir": layout.embed_progress},
                     batch_size=1, num_cpus=config.decode_cpus,
                     # its own resource request also keeps Ray Data from fusing decoding into
                     # the encoder actors: decoding must fan out over CPU tasks
                     memory=config.decode_memory_mb * 2**20)
        .map_batches(Encoder, fn_constructor_args=(config,), batch_size=config.batch_size,
                     compute=ActorPoolStrategy(min_size=config.actors_min, max_size=config.actors_max),
                     **encoder_resources)
        .map_batches(_write_part, fn_kwargs={"data_dir": layout.embedding_parts, "dim": dim,
                                             "dtype": config.embedding_dtype},
                     batch_size=config.rows_per_part, num_cpus=0.1)
    )
    return int(sum(int(b["rows"].sum()) for b in ds.iter_batches(batch_size=None, batch_format="numpy")))


def _publish_sources(layout: RunLayout, config: Config, sources: list[Source], skipped: list[str],
                     errors: list[dict[str, Any]], present: FramesPresent) -> None:
    """``sources/``: one row per listed file with the sha256 of its bytes, so ``deldist verify``
    can account for each and curate-new can recognise byte-identical re-uploads."""
    error_rows = Counter(e["source"] for e in errors)
    sha = source_hashes(layout.source_hashes, [s.uri for s in sources], config.decode_cpus)
    rows = [{"source": s.uri, "key": s.key, "dataset": s.dataset, "kind": s.kind, "frames": len(present.of(s.key)),
             "errors": error_rows[s.uri], "sha256": sha[s.uri]} for s in sources]
    rows += [{"source": uri, "key": "", "dataset": "", "kind": "skipped", "frames": 0, "errors": error_rows[uri],
              "sha256": ""} for uri in skipped]
    storage.replace_table(layout.sources, pa.Table.from_pylist(rows, schema=SOURCES_SCHEMA))


def _publish(layout: RunLayout, config: Config, fingerprint: dict[str, Any], sources: list[Source],
             skipped: list[str], progress: dict[str, dict[str, Any]], present: FramesPresent,
             decoded: int) -> dict[str, Any]:
    by_key = {s.key: s for s in sources}
    errors = [{"source": s, "stage": "list", "error_type": "UnsupportedType",
               "message": "not a video or image extension"} for s in skipped]
    for key, p in progress.items():
        uri = by_key[key].uri if key in by_key else key
        seen_messages = set()
        for r in p["errors"]:
            if (r["error_type"], r["message"]) not in seen_messages:  # reruns repeat records
                seen_messages.add((r["error_type"], r["message"]))
                errors.append({"source": uri, "stage": r["stage"], "error_type": r["error_type"],
                               "message": r["message"]})
    storage.replace_table(layout.errors, pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA))

    _publish_sources(layout, config, sources, skipped, errors, present)
    parts = [p for p in storage.list_files(layout.embedding_parts) if p.endswith(".parquet")]
    fs, _ = storage.resolve(layout.embedding_parts)
    rows = sum(pq.ParquetFile(p, filesystem=fs).metadata.num_rows for p in parts)
    meta = {
        **fingerprint,
        "preprocessing": {"resize_short_side": config.image_size, "center_crop": config.image_size,
                          "interpolation": "bilinear", "mean": list(config.mean), "std": list(config.std)},
        "sampling": {"fps": config.fps, "stride": config.stride, "keyframes_only": config.keyframes_only},
        "weights": config.weights,
        "rows": rows,
        "sources": len(sources),
        "errors": len(errors),
        "frames_decoded_per_frame_kept": round(decoded / rows, 3) if rows else None,
        "deldist_version": deldist.__version__,
        "embedding_dtype": config.embedding_dtype,
        "schema": storage.schema_hex(embeddings_schema(fingerprint["dim"], config.embedding_dtype)),
    }
    fail_once("before_publish", config.inject_fault, layout.root)
    storage.publish(layout.embeddings, parts, meta)
    return meta


def run(config: Config) -> dict[str, Any]:
    """Embed every source under ``config.input`` not embedded yet; publish ``embeddings/``."""
    from deldist.runtime import init_ray

    started = time.time()
    init_ray()
    layout = RunLayout(config.output)
    weights_sha, dim = _weights_and_dim(config)
    fingerprint = _fingerprint(config, weights_sha, dim)
    _check_or_record_run(layout, fingerprint)

    sources, skipped = list_sources(config.input, config.manifest)
    if config.id_prefix:
        sources = [dataclasses.replace(s, key=config.id_prefix + s.key) for s in sources]
    records, present = load_state(layout)
    progress = source_progress(records, present)
    pending = [s for s in sources if not progress.get(s.key, {}).get("done", False)]
    if config.max_sources is not None:
        pending = pending[: config.max_sources]
    written = 0
    if pending:
        done_units = {k: p["units_done"] for k, p in progress.items()}
        units = plan_units(pending, done_units, present, config.segment_seconds, config.decode_cpus,
                           layout.embed_progress)
        tasks = pack_tasks(units, config.images_per_task)
        if tasks:
            written = _run_pipeline(tasks, config, layout, dim)

    duplicates = storage.drop_repeated_ids(layout.embedding_parts) if written else 0
    records, present = load_state(layout)
    progress = source_progress(records, present)
    remaining = [s.key for s in sources if not progress.get(s.key, {}).get("done", False)]
    decoded = sum(r["decoded"] for r in records)
    summary: dict[str, Any] = {
        "sources": len(sources), "pending_sources": len(remaining), "frames_written_this_run": written,
        "duplicates_dropped": duplicates, "seconds": round(time.time() - started, 1),
        "output": layout.embeddings,
    }
    if remaining:
        summary["published"] = False
        log.info(f"deldist embed: {len(remaining)} of {len(sources)} sources still pending "
              f"(max_sources={config.max_sources}); rerun to continue. Parts under {layout.embedding_parts}")
        return summary
    meta = _publish(layout, config, fingerprint, sources, skipped, progress, present, decoded)
    fps = written / max(summary["seconds"], 1e-9)
    summary.update(published=True, frames=meta["rows"], errors=meta["errors"], frames_per_s=round(fps, 1),
                   frames_decoded_per_frame_kept=meta["frames_decoded_per_frame_kept"],
                   random_init=config.random_init)
    log.info(f"deldist embed: {len(sources)} sources, {meta['rows']} frames ({written} new), "
          f"{meta['errors']} errors, {fps:.1f} frames/s, decoded/kept {meta['frames_decoded_per_frame_kept']}"
          f" -> {layout.embeddings}")
    return summary
