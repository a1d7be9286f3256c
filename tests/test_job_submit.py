"""``ray job submit`` end to end: the curate job submitted to the session's Ray head (started by
``ray start --head`` on loopback in conftest), on the tiny sample uploaded to the moto S3
server, config and outputs on S3. Encoder: random-initialised ViT-Ti (``random_init: true``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs

from deldist import storage

REPO = Path(__file__).resolve().parent.parent
CONFIG = """
embed: {model: vit_tiny_patch16_224, random_init: true, pooling: mean, stride: 3, segment_seconds: 4,
        batch_size: 32}
cluster: {k: 3, max_iter: 10, task_cpus: 0.5}
dedup: {task_cpus: 0.5}
select:
  - {name: meddel_30, target_ratio: 0.3, deldist_rules: {outlier_quantile: 0.98}}
html: false
"""


def _upload(local: Path, uri: str) -> None:
    fs, root = storage.resolve(uri)
    for path in sorted(local.rglob("*")):
        if path.is_file():
            with fs.open_output_stream(f"{root}/{path.relative_to(local).as_posix()}") as out:
                out.write(path.read_bytes())


def test_ray_job_submit_curate_on_s3(ray_head, ray_session, s3_bucket, tiny_sample):
    from ray.job_submission import JobStatus, JobSubmissionClient

    base = f"s3://{s3_bucket}/job-submit"
    _upload(tiny_sample / "videos", f"{base}/videos")
    storage.write_bytes(f"{base}/curate.yaml", CONFIG.encode())
    submission_id = f"deldist-test-{int(time.time())}"
    # no credentials in the runtime env: Ray logs it (runtime_env_agent.log). The job's driver
    # inherits them from the head, as it would from an instance role on a cluster
    env_vars = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")}
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    submit = subprocess.run(
        [ray_cli, "job", "submit", "--address", ray_head["dashboard"], "--submission-id", submission_id,
         "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--no-wait",
         "--", "python", "jobs/curate.py", "--config", f"{base}/curate.yaml",
         f"input={base}/videos", f"output={base}/run"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert submit.returncode == 0, submit.stdout + submit.stderr

    client = JobSubmissionClient(ray_head["dashboard"])
    deadline = time.time() + 900
    status = client.get_job_status(submission_id)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.time() < deadline:
        time.sleep(3)
        status = client.get_job_status(submission_id)
    logs = client.get_job_logs(submission_id)
    assert status == JobStatus.SUCCEEDED, logs[-5000:]

    # the retained table, read back from S3
    run = f"{base}/run"
    retained = storage.read_published(f"{run}/selections/meddel_30/retained").column("id").to_pylist()
    removed = storage.read_published(f"{run}/selections/meddel_30/removed").column("id").to_pylist()
    embedded = storage.read_published(f"{run}/embeddings", ["id"]).column("id").to_pylist()
    assert retained and not set(retained) & set(removed)
    assert sorted(retained + removed) == sorted(embedded)
    summary = storage.read_json(f"{run}/selections/meddel_30/summary.json")
    assert summary["kept_count"] == len(retained) and abs(summary["ratio"] - 0.3) < 0.02
    keys = {i.split("#")[0] for i in embedded}
    assert keys == {p.relative_to(tiny_sample / "videos").as_posix()
                    for p in (tiny_sample / "videos").rglob("*.mp4")}
    assert "meddel_30" in logs  # the job printed its selection table
    fs, root = storage.resolve(run)
    assert fs.get_file_info(f"{root}/embeddings/_SUCCESS").type == pafs.FileType.File
