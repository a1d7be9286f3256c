"""Session-wide fixtures: one moto S3 server on loopback and one local Ray cluster.

The S3 endpoint and credentials go into the environment *before* ``ray.init`` so Ray's
worker processes inherit them and reach the same server over HTTP, as they would reach S3.
Only one Ray instance per test session: two on one host break Ray Train.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket

import pytest

# token authentication (Ray's default for local clusters) with a token of this session: the
# test process, the CLI and the job driver all present it. Set at import, before any test
# module imports ray.data: Ray caches its auth mode when first configured.
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))


# the S3 secret of this session: tests/test_security.py looks for it in every output
SECRET = f"deldist-test-secret-{secrets.token_hex(8)}"


# the session's moto server, for fault tests that stop and restart it (moto keeps its buckets
# in this process, so a new server on the same port serves the same objects)
S3_SERVER: dict = {}


def restart_s3(down_seconds: float) -> None:
    """Stop the session's S3 server, keep it down for ``down_seconds``, start it again."""
    import time

    from moto.server import ThreadedMotoServer

    S3_SERVER["server"].stop()
    time.sleep(down_seconds)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_SERVER["port"])
    server.start()
    S3_SERVER["server"] = server


def _free_port() -> int:
    return _free_ports(["port"])["port"]


def _free_ports(names) -> dict[str, int]:
    """One free loopback port per name, all distinct: every socket stays bound until all are
    chosen (one at a time, the kernel may hand out the same port twice, and `ray start` then
    refuses two components on one port, as a CI run saw)."""
    sockets = []
    try:
        for _ in names:
            s = socket.socket()
            sockets.append(s)
            s.bind(("127.0.0.1", 0))
        return {name: s.getsockname()[1] for name, s in zip(names, sockets)}
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A moto S3 server on 127.0.0.1; returns its endpoint URL and exports the AWS env."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per S3 request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    S3_SERVER.update(server=server, port=port)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    yield endpoint
    S3_SERVER["server"].stop()


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh bucket on the moto server; returns its name."""
    import boto3

    name = "deldist-test"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


def _wait_for_job_server(head, dashboard: str, log) -> bool:
    """True when the head's job server answers (the GCS is up before the dashboard); False when
    `ray start` exited first. Raises when neither happens in 120 s."""
    import time
    import urllib.request

    deadline = time.time() + 120
    while head.poll() is None:
        try:
            request = urllib.request.Request(f"{dashboard}/api/version",
                                             headers={"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"})
            urllib.request.urlopen(request, timeout=2).read()
            return True
        except OSError:
            if time.time() > deadline:
                head.terminate()
                raise RuntimeError(f"the Ray head did not come up in 120 s:\n{log.read_text()}")
            time.sleep(1)
    return False


@pytest.fixture(scope="session")
def ray_head(s3_endpoint: str, tmp_path_factory):
    """One local Ray head for the whole session (2 CPUs, loopback, its own temp dir), started
    with ``ray start --head --block`` after the S3 env is set, so its workers inherit it and
    reach the moto server over HTTP, as they would reach S3. Its dashboard runs the job server
    for the ``ray job submit`` test. Only one Ray instance per session: two on one host break
    Ray Train. Yields {"address", "dashboard"}."""
    import subprocess
    import sys
    import tempfile

    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    log = tmp_path_factory.mktemp("ray_head") / "ray_start.log"
    for _attempt in range(3):
        ports = _free_ports(["port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
                             "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
                             "node-manager-port", "object-manager-port"])
        temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's unix sockets live under it
        cmd = [ray_cli, "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0",
               "--node-ip-address=127.0.0.1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--temp-dir={temp_dir}", "--disable-usage-stats", *[f"--{k}={v}" for k, v in ports.items()]]
        with open(log, "w") as out:
            head = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        address = f"127.0.0.1:{ports['port']}"
        dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
        if _wait_for_job_server(head, dashboard, log):
            break
        # `ray start` exited while starting: a port found free was taken before Ray bound it
        # (other processes draw from the same ephemeral range); again with new ports
    else:
        raise RuntimeError(f"ray start --head exited with {head.returncode} in 3 attempts:\n{log.read_text()}")
    yield {"address": address, "dashboard": dashboard, "temp_dir": temp_dir}
    head.terminate()  # --block: SIGTERM stops this head's processes (never `ray stop`: it kills every Ray on the host)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()


@pytest.fixture(scope="session")
def ray_session(ray_head):
    """This process's connection to the session's Ray head."""
    import ray

    ray.init(address=ray_head["address"], log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
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
