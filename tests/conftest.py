"""Session-wide fixtures: one moto S3 server on loopback and one local Ray cluster.

The S3 endpoint and credentials go into the environment *before* ``ray.init`` so Ray's
worker processes inherit them and reach the same server over HTTP, as they would reach S3.
Only one Ray instance per test session: two on one host break Ray Train.
"""

from __future__ import annotations

import logging
import os
import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A moto S3 server on 127.0.0.1; returns its endpoint URL and exports the AWS env."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per S3 request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh bucket on the moto server; returns its name."""
    import boto3

    name = "deldist-test"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_session(s3_endpoint: str):
    """One local Ray cluster (2 CPUs) for the whole session, started after the S3 env is set."""
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_sample(tmp_path_factory):
    """The generator's tiny data set (videos, masks, Kvasir-style images, ground truth)."""
    from deldist.sample import generate

    out = tmp_path_factory.mktemp("sample")
    generate(str(out), size="tiny", seed=0)
    return out


@pytest.fixture(scope="session")
def small_sample(tmp_path_factory):
    """The generator's "small" set: ~30 scenes of very uneven length, for selection quality."""
    from deldist.sample import generate

    out = tmp_path_factory.mktemp("small_sample")
    generate(str(out), size="small", seed=0)
    return out
