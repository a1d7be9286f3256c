"""MAE pretraining on Ray Train: 2 CPU workers (gloo), checkpoints on a moto S3 storage_path,
a worker killed mid-run resumes from the last checkpoint, a rerun of the same name resumes;
the encoder export loads in ``build_encoder`` with identical outputs."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from deldist import augment, materialize, pretrain, storage
from deldist.config import load_config
from deldist.encoders import build_encoder, load_weights
from deldist.layout import RunLayout
from deldist.models import build_mae

MODEL = "deldist_vit_micro_patch16"
SIZE = 64


def _store_on_s3(root: str, sample) -> int:
    """Fake embeddings (every 2nd video frame) + a selection on S3, materialized there; returns frames."""
    truth = pq.read_table(sample / "ground_truth.parquet").to_pylist()
    rows = [{"id": f"{r['source_key']}#{r['frame_index']}", "source": str(sample / "videos" / r["source_key"]),
             "frame_index": r["frame_index"]} for r in truth if r["frame_index"] % 2 == 0]
    part = storage.join(root, "embeddings", "part-0.parquet")
    storage.write_table(pa.Table.from_pylist(rows), part)
    storage.publish(storage.join(root, "embeddings"), [storage.resolve(part)[1]], {})
    summary = materialize.run(materialize.Config(output=root, size=96, frames_per_task=64))
    assert summary["published"] and summary["stored"] == len(rows)
    return len(rows)


def _config(root: str, **extra) -> pretrain.Config:
    settings = {"output": root, "name": "mae-s3", "model": MODEL, "image_size": SIZE, "decoder_dim": 64,
                "decoder_depth": 1, "decoder_heads": 4, "epochs": 2, "warmup_epochs": 1, "batch_size": 8,
                "num_workers": 2, "cpus_per_worker": 0.5, "checkpoint_every_steps": 2, "max_failures": 1,
                "shuffle_buffer": 16, **extra}
    return load_config(pretrain.Config, None, [f"{k}={v}" for k, v in settings.items()])


def test_random_resized_crop_box_bounds():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = augment.random_resized_crop_box(rng, 100, 60, (0.2, 1.0))
        assert 0 <= left and left + w <= 100 and 0 <= top and top + h <= 60
        assert 0.2 * 6000 * 0.85 <= w * h <= 6000
    images = augment.augment_jpegs([_jpeg(np.full((40, 50, 3), 7, np.uint8))], 16, (0.2, 1.0), rng)
    assert images.shape == (1, 3, 16, 16) and images.dtype == np.uint8 and (images == 7).all()


def _jpeg(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_pretrain_s3_worker_failure_resume_and_rerun(ray_session, tiny_sample, s3_bucket):
    root = f"s3://{s3_bucket}/pretrain-run"
    n_frames = _store_on_s3(root, tiny_sample)
    steps_per_epoch = n_frames // 16

    # rank 1 dies (os._exit) at step 5; checkpoints every 2 steps -> the group restarts from step 4
    first = pretrain.run(_config(root, inject_failure_at_step=5))
    assert first["starts"] == [0, 4], first
    assert first["steps"] == 2 * steps_per_epoch and first["epochs"] == 2
    run_dir = RunLayout(root).pretrain("mae-s3")
    assert storage.read_bytes(storage.join(run_dir, "_injected_failure")) == b"5"
    checkpoints = storage.list_files(storage.join(root, "pretrain", "_ray", "mae-s3"))
    assert any("/checkpoint_" in p and p.endswith("state.pt") for p in checkpoints)
    history = storage.read_json(storage.join(run_dir, "metrics.json"))
    assert [h["step"] for h in history] == [steps_per_epoch, 2 * steps_per_epoch]
    assert all(h["img_per_s"] > 0 and np.isfinite(h["loss"]) and h["lr"] >= 0 for h in history)
    assert storage.read_bytes(storage.join(run_dir, "metrics.csv")).decode().startswith("epoch,step,loss,lr")
    assert storage.is_published(run_dir)

    # the export is a timm state dict: build_encoder + load_weights, same outputs as the checkpoint's MAE
    export = storage.join(run_dir, "encoder.safetensors")
    encoder = build_encoder(MODEL, SIZE, seed=9)
    load_weights(encoder, export)
    latest = sorted(p for p in checkpoints if p.endswith("state.pt"))[-1]
    state = torch.load(io.BytesIO(storage.read_bytes(storage.to_uri(root, latest))), weights_only=True)
    mae = build_mae(MODEL, SIZE, 64, 1, 4)
    mae.load_state_dict(state["model"])
    assert state["state"]["step"] == first["steps"]
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(encoder.eval().forward_features(x), mae.encoder.eval().forward_features(x))

    # rerunning the same name resumes (here: one more epoch on top of the finished two)
    second = pretrain.run(_config(root, epochs=3))
    assert second["starts"] == [0, 4, 2 * steps_per_epoch], second
    assert second["steps"] == 3 * steps_per_epoch
    assert [h["epoch"] for h in storage.read_json(storage.join(run_dir, "metrics.json"))] == [1, 2, 3]


def test_pretrain_config_checks():
    with pytest.raises(ValueError, match="crop_scale"):
        pretrain.Config(output="x", crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="global batch"):
        pretrain.loop_config(pretrain.Config(output="x", batch_size=64, num_workers=2), 100, False)


def test_stream_order_epochs_are_permutations():
    order = pretrain.stream_order(5, epochs=3, epochs_per_stream=None, seed=0)
    assert len(order) == 15 and all(sorted(order[e * 5:(e + 1) * 5]) == list(range(5)) for e in range(3))
    assert order[:5] != order[5:10] or order[5:10] != order[10:]  # a fresh order per epoch
    assert order == pretrain.stream_order(5, 3, None, 0)  # seeded
    assert len(pretrain.stream_order(5, 3, 1, 0)) == 5
    # capped at MAX_PART_READS_PER_STREAM part reads (at least one epoch)
    assert len(pretrain.stream_order(100, 400, None, 0)) == 1000
    assert len(pretrain.stream_order(3000, 400, None, 0)) == 3000


def test_training_stream_yields_each_selected_frame_once_per_epoch(ray_session, tmp_path):
    """One Ray Data execution covers every epoch: each retained frame (a solid grey level,
    which survives crop, flip and JPEG) comes out exactly ``epochs`` times, the others never."""
    root = str(tmp_path / "run")
    levels = list(range(8, 8 + 10 * 24, 10))  # 24 frames in 3 parts
    paths = []
    for p in range(3):
        rows = [{"id": f"f{lv}", "jpeg": _jpeg(np.full((24, 32, 3), lv, np.uint8)), "width": 32, "height": 24}
                for lv in levels[p * 8:(p + 1) * 8]]
        part = storage.join(root, "frames", "all", "data", f"part-{p}.parquet")
        storage.write_table(pa.Table.from_pylist(rows), part)
        paths.append(storage.resolve(part)[1])
    storage.publish(storage.join(root, "frames", "all"), paths, {})
    kept = levels[::2]
    retained = storage.join(root, "selections", "half", "retained", "part-0.parquet")
    storage.write_table(pa.table({"id": [f"f{lv}" for lv in kept]}), retained)
    storage.publish(storage.join(root, "selections", "half", "retained"), [storage.resolve(retained)[1]], {})

    config = pretrain.Config(output=root, selection="half", image_size=32, epochs=3, model=MODEL)
    ds, n_frames, _ = pretrain.training_frames(config)
    assert n_frames == len(kept)
    images = np.concatenate([b["image"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")])
    assert images.shape == (3 * len(kept), 3, 32, 32)
    seen = np.rint(images.reshape(len(images), -1).mean(axis=1)).astype(int)
    assert np.abs(images.astype(int) - seen[:, None, None, None]).max() <= 3
    nearest = [min(levels, key=lambda lv: abs(lv - s)) for s in seen]
    assert sorted(nearest) == sorted(kept * 3)

    # the training loop draws all three epochs from that one stream: only epoch 1 waits for a
    # stream to start (engine local: the same loop in this process)
    summary = pretrain.run(config.model_copy(update={
        "engine": "local", "batch_size": 4, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2,
        "warmup_epochs": 1, "shuffle_buffer": 0}))
    history = storage.read_json(storage.join(summary["run_dir"], "metrics.json"))
    assert [h["step"] for h in history] == [3, 6, 9]
    assert history[0]["first_batch_wait_s"] > 0
    assert [h["first_batch_wait_s"] for h in history[1:]] == [0.0, 0.0]
