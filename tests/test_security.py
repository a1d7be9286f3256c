"""Credentials stay in the credential chain: the session's S3 secret (``conftest.SECRET``)
appears in no output: no object in the bucket, no local file the session wrote, no Ray log
and nothing a stage printed. Runs after the S3 tests of the session (alphabetical order) and
makes its own S3 run, so it has something to search also when run alone."""

from __future__ import annotations

from pathlib import Path

import boto3
from conftest import SECRET

from deldist import embed, verify
from deldist.config import load_config


def _files_holding(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle in path.read_bytes():
                    hits.append(str(path))
            except OSError:  # sockets and files that vanished while walking
                continue
    return hits


def test_the_s3_secret_is_in_no_output(ray_head, ray_session, s3_bucket, tiny_sample, tmp_path_factory, capfd):
    s3 = boto3.client("s3")
    images = sorted((tiny_sample / "kvasir" / "images").iterdir())[:3]
    for path in images:
        s3.upload_file(str(path), s3_bucket, f"security/input/{path.name}")
    s3.put_object(Bucket=s3_bucket, Key="security/input/broken.jpg", Body=b"not a jpeg")  # an error row too
    output = f"s3://{s3_bucket}/security/run"
    embed.run(load_config(embed.Config, None, [f"input=s3://{s3_bucket}/security/input", f"output={output}",
                                               "model=vit_tiny_patch16_224", "random_init=true"]))
    assert verify.run(verify.Config(output=output))["ok"]
    printed = capfd.readouterr()
    assert SECRET not in printed.out + printed.err

    needle = SECRET.encode()
    objects = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
               for o in page.get("Contents", [])]
    assert any(k.startswith("security/run/errors/") for k in objects)
    leaked = [k for k in objects if needle in s3.get_object(Bucket=s3_bucket, Key=k)["Body"].read()]
    assert leaked == []
    local_outputs = Path(tmp_path_factory.getbasetemp())
    assert _files_holding(local_outputs, needle) == []
    ray_logs = Path(ray_head["temp_dir"])
    assert any(ray_logs.rglob("*.log")) or any(ray_logs.rglob("*.err"))
    assert _files_holding(ray_logs, needle) == []
