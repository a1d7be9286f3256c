"""``--dry-run``: the cost model's arithmetic, and the frame counts it predicts against a decode.

The frame prediction is checked against an independent count: every sampled frame PyAV actually
decodes from the tiny sample's videos (not the container header the dry run reads).
"""

from __future__ import annotations

import json

import av
import pytest

from deldist import cli, dry_run
from deldist.frames import Sampling, is_sampled


def test_kept_and_decoded_by_sampling():
    assert dry_run.kept_and_decoded(100, 30.0, Sampling(stride=3)) == (34, 100)
    fps = Sampling(fps=2.0)
    assert dry_run.kept_and_decoded(300, 30.0, fps) == (sum(is_sampled(i, 30.0, fps) for i in range(300)), 300) \
        == (20, 300)
    assert dry_run.kept_and_decoded(50, 1.0, fps) == (50, 50)  # a source slower than the sampling rate
    assert dry_run.kept_and_decoded(300, 30.0, Sampling(keyframes_only=True), keyframes=7) == (7, 7)


def test_embed_estimate_reproduces_the_readme_table():
    """README "Time and cost estimate": 1M frames at 15 decoded per kept, ViT-B/16, on
    8 x g5.xlarge + 8 x c6i.4xlarge: min(136 x 200 / 15, 8 x 1000) = 1,813 frames/s, 9 min, $2."""
    cost = dry_run.CostModel()
    est = dry_run.embed_estimate(1e6, 15e6, dry_run.VIT_B16_GFLOPS, True, cost)
    assert cost.vcpus == 136 and cost.price_h == pytest.approx(13.872)
    assert est["frames_per_s"] == pytest.approx(136 * 200 / 15)
    assert est["wall_h"] * 60 == pytest.approx(1e6 / (136 * 200 / 15) / 60)
    assert 9.0 < est["wall_h"] * 60 < 9.5 and 2.0 < est["cost_usd"] < 2.2
    assert est["decode_vcpu_h"] == pytest.approx(15e6 / 200 / 3600) and est["gpu_h"] == pytest.approx(1e6 / 1000 / 3600)
    # GPU-bound: 3 GPU nodes + 16 CPU nodes (the README's third row) run at the GPUs' 3,000 frames/s
    three = dry_run.CostModel(gpu_nodes=3, cpu_nodes=16)
    assert dry_run.embed_estimate(1e6, 15e6, dry_run.VIT_B16_GFLOPS, True, three)["frames_per_s"] == 3000
    # a model with a tenth of the GFLOPs encodes 10x faster per GPU
    small = dry_run.embed_estimate(1e6, 1e6, dry_run.VIT_B16_GFLOPS / 10, True, three)
    assert small["gpu_h"] == pytest.approx(1e6 / 10_000 / 3600)


def test_cluster_and_dedup_estimates_scale_from_the_measured_runs():
    cost = dry_run.CostModel()
    one_m = dry_run.cluster_estimate(1_000_000, 1000, 768, 1.0, 20, cost)
    assert one_m["vcpu_h"] * 3600 == pytest.approx(294, rel=0.01)  # the measured 1M stage
    # fit on 10 %: 20 passes over a tenth of the rows, one more pass assigns all of them
    sampled = dry_run.cluster_estimate(1_000_000, 1000, 768, 0.1, 20, cost)
    assert sampled["vcpu_h"] == pytest.approx(one_m["vcpu_h"] * (0.1 * 20 + 1) / 21)
    dedup = dry_run.dedup_estimate(2.78e9, 768, cost)
    assert dedup["vcpu_h"] * 3600 == pytest.approx(68, rel=0.01)


def _decoded_sampled_frames(path, sampling: Sampling) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        return sum(is_sampled(i, fps, sampling) for i, _ in enumerate(container.decode(stream)))


def test_dry_run_predicts_the_frames_and_writes_nothing(tiny_sample, tmp_path):
    out, result_file = tmp_path / "run", tmp_path / "plan.json"
    argv = ["curate", f"input={tiny_sample / 'videos'}", f"output={out}", "embed.model=vit_tiny_patch16_224",
            "embed.random_init=true", "embed.stride=2", "embed.fps=null", "cluster.k=4", "--dry-run",
            "--json", str(result_file)]
    assert cli.main(argv) == 0
    plan = json.loads(result_file.read_text())
    assert not out.exists()
    videos = sorted((tiny_sample / "videos").rglob("*.mp4"))
    expected = sum(_decoded_sampled_frames(v, Sampling(stride=2)) for v in videos)
    assert plan["inputs"]["videos"] == len(videos) and plan["inputs"]["probed_videos"] == len(videos)
    assert plan["inputs"]["frames_kept"] == expected
    assert plan["inputs"]["dim"] == 192  # ViT-Ti
    assert plan["would_run"][:3] == ["embed", "cluster", "dedup"] and plan["would_run"][-1] == "verify"
    assert set(plan["estimate"]) == {"embed", "cluster", "dedup"}
    assert plan["total"]["cost_usd"] == pytest.approx(sum(e["cost_usd"] for e in plan["estimate"].values()))
    # another cluster shape from --cost-model
    rates = tmp_path / "rates.yaml"
    rates.write_text("gpu_nodes: 0\ncpu_nodes: 2\n")
    assert cli.main([*argv, "--cost-model", str(rates)]) == 0
    cpu_only = json.loads(result_file.read_text())
    assert cpu_only["estimate"]["embed"]["on_gpu"] is False and "encode_vcpu_h" in cpu_only["estimate"]["embed"]
    rates.write_text("gpu_nodez: 1\n")
    with pytest.raises(ValueError, match="gpu_nodez"):
        cli.main([*argv, "--cost-model", str(rates)])
