"""Faults injected into real runs, nothing lost: a decode task's worker, an encoder actor and a
dedup task's worker exit hard mid-run (``inject_fault``, :mod:`deldist.faults`); a stage's
driver is killed between its writes and its publish; the S3 server goes down and comes back
during embed. Each run ends with the same ids (and the same scores) as an undisturbed run,
and ``deldist verify`` passes. (A Ray Train worker killed mid-epoch: ``tests/test_pretrain.py``;
an embed interrupted with a part lost: ``tests/test_embed.py``.)

Marked ``faults``: ``make test`` runs them; ``pytest -m "not faults"`` skips them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pyarrow as pa
import pytest
from conftest import restart_s3
from PIL import Image
from test_bad_inputs import texture, write_video

from deldist import cluster, dedup, embed, faults, select, storage, verify
from deldist.config import load_config
from deldist.layout import RunLayout

pytestmark = pytest.mark.faults

EMBED = ["model=vit_tiny_patch16_224", "random_init=true", "fps=5", "batch_size=8", "rows_per_part=16",
         "segment_seconds=1", "actors_max=1"]


def _corpus(root: Path) -> Path:
    for i in range(3):
        write_video(root / f"center_{i % 2}" / f"video_{i}.mp4", 30 + 15 * i)
    for i in range(4):
        path = root / "stills" / f"still_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(texture(seed=10 + i)).save(path)
    return root


def _embed(input_uri: str, output: str, *extra: str) -> dict:
    return embed.run(load_config(embed.Config, None, [f"input={input_uri}", f"output={output}", *EMBED, *extra]))


def _ids(root: str) -> list[str]:
    return sorted(storage.read_published(RunLayout(root).embeddings, columns=["id"]).column("id").to_pylist())


def _scores(root: str) -> pa.Table:
    table = storage.read_published(RunLayout(root).scores, columns=["id", "cluster", "rank", "max_sim"])
    return table.sort_by("id")


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """The corpus, and an undisturbed run of it: embed -> cluster -> dedup."""
    base = tmp_path_factory.mktemp("faults")
    corpus = _corpus(base / "corpus")
    root = str(base / "reference")
    _embed(str(corpus), root)
    cluster.run(cluster.Config(output=root, k=3, task_cpus=0.5))
    dedup.run(dedup.Config(output=root, task_cpus=0.5))
    return corpus, root


@pytest.mark.parametrize("point", ["decode_task", "encoder_actor"])
def test_embed_worker_or_actor_killed(reference, tmp_path, point):
    """The process dies hard in its first decode task / on the encoder actor's first batch:
    Ray retries the task (restarts the actor); if the run fails instead, a rerun completes."""
    corpus, ref = reference
    out = str(tmp_path / "run")
    try:
        _embed(str(corpus), out, f"inject_fault={point}")
    except Exception:  # a clean failure is allowed: the rerun must then finish the job
        _embed(str(corpus), out)
    assert storage.exists(storage.join(out, "_faults", point)), "the fault did not fire"
    assert _ids(out) == _ids(ref)
    assert verify.verify_run(out).ok


def _copy_until(ref: str, dest: Path, stages: tuple[str, ...]) -> str:
    for stage in stages:
        shutil.copytree(Path(ref) / stage, dest / stage)
    return str(dest)


def test_dedup_task_killed(reference, tmp_path):
    _, ref = reference
    root = _copy_until(ref, tmp_path / "run", ("embeddings", "errors", "sources", "clusters"))
    dedup.run(dedup.Config(output=root, task_cpus=0.5, inject_fault="score_task"))
    assert storage.exists(storage.join(root, "_faults", "score_task"))
    assert _scores(root).equals(_scores(ref))
    assert verify.verify_run(root).ok


def test_driver_killed_between_writes_and_publish(reference, ray_head, tmp_path):
    """``deldist dedup`` as its own process, killed after writing its parts and before its
    manifest: readers refuse the half-written stage, verify names it, and the rerun
    publishes once with the reference's scores."""
    _, ref = reference
    root = _copy_until(ref, tmp_path / "run", ("embeddings", "errors", "sources", "clusters"))
    env = {**os.environ, "RAY_ADDRESS": ray_head["address"]}
    killed = subprocess.run([sys.executable, "-m", "deldist.cli", "dedup", f"output={root}", "task_cpus=0.5",
                             "inject_fault=before_publish", "--no-verify"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == faults.EXIT_CODE, killed.stderr[-2000:]
    scores_dir = Path(root) / "dedup" / "scores"
    assert any(scores_dir.glob("*.parquet")) and not (scores_dir / "_SUCCESS").exists()
    with pytest.raises(storage.NotPublishedError):
        select.run(select.Config(output=root, name="after_crash", eps=0.1))
    report = verify.verify_run(root)
    assert not report.ok and any("no published directory" in f for f in report.failures)

    dedup.run(dedup.Config(output=root, task_cpus=0.5))
    assert _scores(root).equals(_scores(ref))
    # publishing removed the killed attempt's parts: the directory is exactly the table
    listed = {scores_dir / f for f in storage.read_manifest(str(scores_dir))["files"]}
    assert set(scores_dir.glob("*.parquet")) == listed
    report = verify.verify_run(root)
    assert report.ok and not report.warnings


def test_s3_down_and_back_during_embed(reference, s3_bucket, tmp_path):
    """Input and output on the S3 server, which stops for 3 s while embed runs: the S3 client
    retries with backoff (or the run fails cleanly and the rerun completes); either way every
    id once, and errors/ holds no row made of the outage."""
    corpus, ref = reference
    s3 = boto3.client("s3")
    for path in sorted(p for p in corpus.rglob("*") if p.is_file()):
        s3.upload_file(str(path), s3_bucket, f"faults/input/{path.relative_to(corpus)}")
    input_uri, out = f"s3://{s3_bucket}/faults/input", f"s3://{s3_bucket}/faults/run"
    progress = RunLayout(out).embed_progress

    went_down: list[float] = []

    def outage() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not storage.list_files(progress):
            time.sleep(0.2)  # down once the first decode task has finished: mid-run
        went_down.append(time.time())
        restart_s3(3.0)

    thread = threading.Thread(target=outage)
    thread.start()
    try:
        summary = _embed(input_uri, out)
    except Exception:  # a clean failure: rerun once the server is back
        thread.join()
        summary = _embed(input_uri, out)
    first_attempt_ended = time.time()
    thread.join()
    assert went_down and went_down[0] < first_attempt_ended  # the outage hit the run
    if not summary.get("published"):
        summary = _embed(input_uri, out)
    assert summary["published"]
    assert _ids(out) == _ids(ref)
    assert storage.read_published(RunLayout(out).errors).num_rows == 0
    assert verify.verify_run(out).ok
