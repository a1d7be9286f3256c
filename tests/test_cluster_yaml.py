"""cluster.yaml passes Ray's own autoscaler validation and has the node types deldist needs; the
installed Ray's own code shows what each node type runs (docker run command, image, GPUs, shm) and
that `ray up`'s rsync leaves .venv/, demo_out/ and .git/ behind."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
# "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)": NVIDIA driver, docker, nvidia-container-toolkit
DLAMI_SSM_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
PLAIN_UBUNTU_AMI = "ami-0c7217cdde317cfec"  # Ubuntu 22.04, us-east-1: no driver, no docker
# memory of the instance types cluster.yaml uses (GiB; add a row when you change one)
INSTANCE_MEMORY_GIB = {"m6i.2xlarge": 32, "g5.2xlarge": 32, "c6i.4xlarge": 32}
GPU_INSTANCE_FAMILIES = {"g4dn", "g5", "g6", "g6e", "p4d", "p5"}
OBJECT_STORE_SHARE = 0.3  # Ray's default object store: 30% of the node's memory


@pytest.fixture(scope="module")
def config() -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))
    validate_config(config)  # raises jsonschema.ValidationError on a bad config
    return config


def _docker_config(config: dict, node_type: str) -> dict:
    """The docker section the node type gets: `ray up` passes config["docker"] to the head's updater
    (commands.py), the autoscaler merges the node type's `docker` into it for workers."""
    if node_type == config["head_node_type"]:
        return config["docker"]
    from ray.autoscaler._private.autoscaler import StandardAutoscaler
    from ray.autoscaler.tags import TAG_RAY_USER_NODE_TYPE

    provider = SimpleNamespace(node_tags=lambda node_id: {TAG_RAY_USER_NODE_TYPE: node_type})
    fake = SimpleNamespace(config=config, provider=provider, available_node_types=config["available_node_types"])
    fake._get_node_type_specific_fields = partial(StandardAutoscaler._get_node_type_specific_fields, fake)
    return StandardAutoscaler._get_node_specific_docker_config(fake, "i-0")


class _FakeHost:
    """Stands in for the SSH runner under Ray's DockerCommandRunner: records the commands, answers the
    probes as a Deep Learning AMI host does (docker and the NVIDIA runtime installed; nvidia-smi works
    only where the instance has a GPU)."""

    def __init__(self, has_gpu: bool):
        self.has_gpu, self.commands = has_gpu, []
        self.ssh_user, self.cluster_name = "ubuntu", "deldist"

    def run(self, cmd, with_output=False, **_):
        self.commands.append(cmd)
        if cmd.startswith("command -v docker"):
            out = "/usr/bin/docker"
        elif cmd.startswith("docker info"):
            out = "map[nvidia:{nvidia-container-runtime [] <nil>} runc:{runc [] <nil>}]"
        elif cmd == "nvidia-smi" and not self.has_gpu:
            raise subprocess.CalledProcessError(9, cmd)
        elif "{{json .Config.Env}}" in cmd:
            out = '["PATH=/home/ray/anaconda3/bin:/usr/bin", "HOME=/home/ray"]'
        elif "cat /proc/meminfo" in cmd:
            out = "MemAvailable:   32000000 kB"
        else:
            out = ""  # includes `docker inspect ... .State.Running`: no container yet
        return out.encode() if with_output else 0


def _docker_run(config: dict, node_type: str) -> tuple[list[str], _FakeHost]:
    """The `docker run` command the installed Ray issues on a fresh node of this type."""
    from ray.autoscaler._private.command_runner import DockerCommandRunner

    instance = config["available_node_types"][node_type]["node_config"]["InstanceType"]
    gpu = instance.split(".")[0] in GPU_INSTANCE_FAMILIES
    runner = DockerCommandRunner(
        _docker_config(config, node_type), log_prefix="", node_id="i-0", provider=None,
        auth_config=config["auth"], cluster_name=config["cluster_name"], process_runner=subprocess,
        use_internal_ip=False)
    host = runner.ssh_command_runner = _FakeHost(has_gpu=gpu)
    runner.run_init(as_head=node_type == config["head_node_type"], file_mounts=config["file_mounts"],
                    sync_run_yet=True)
    runs = [c for c in host.commands if c.startswith("docker run")]
    assert len(runs) == 1, host.commands
    return shlex.split(runs[0]), host


def _shm_bytes(argv: list[str]) -> int:
    (value,) = [a.split("=", 1)[1].strip("'") for a in argv if a.startswith("--shm-size=")]
    number, unit = re.fullmatch(r"([0-9.]+)([bkmg]?)", value.lower()).groups()
    return int(float(number) * {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit])


def test_cluster_yaml_validates_with_ray(config):
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}  # head runs no tasks
    gpu = nodes["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["node_config"]["InstanceType"].startswith(("g5.", "g6."))
    assert config["idle_timeout_minutes"] > 0


def test_gpu_workers_run_the_gpu_image_with_the_gpus(config):
    argv, host = _docker_run(config, "gpu_worker")
    image = argv[argv.index("bash") - 1]
    assert image.endswith("/deldist:gpu"), image
    assert f"docker pull {image}" in host.commands
    assert "--gpus" in argv and argv[argv.index("--gpus") + 1] == "all"
    assert "--runtime=nvidia" in argv  # added by Ray itself: the AMI has the NVIDIA runtime and a GPU
    ami = config["available_node_types"]["gpu_worker"]["node_config"]["ImageId"]
    assert re.fullmatch(r"ami-[0-9a-f]{17}", ami) and ami != PLAIN_UBUNTU_AMI
    assert DLAMI_SSM_PARAMETER in CLUSTER_YAML.read_text()  # how to look the AMI up for a region


@pytest.mark.parametrize("node_type", ["head", "cpu_worker"])
def test_cpu_nodes_run_the_cpu_image_without_gpus(config, node_type):
    argv, _ = _docker_run(config, node_type)
    assert argv[argv.index("bash") - 1].endswith("/deldist:cpu")
    assert "--gpus" not in argv and "--runtime=nvidia" not in argv
    # docker runs on every node, so every node needs the AMI that has it
    assert config["available_node_types"][node_type]["node_config"]["ImageId"] != PLAIN_UBUNTU_AMI


@pytest.mark.parametrize("node_type", ["head", "gpu_worker", "cpu_worker"])
def test_shm_holds_the_object_store(config, node_type):
    argv, _ = _docker_run(config, node_type)
    instance = config["available_node_types"][node_type]["node_config"]["InstanceType"]
    memory = INSTANCE_MEMORY_GIB[instance] * 2**30
    assert OBJECT_STORE_SHARE * memory <= _shm_bytes(argv) <= memory


def test_the_checkout_is_mounted_where_the_image_has_it(config):
    argv, _ = _docker_run(config, "cpu_worker")
    mounts = [argv[i + 1].split(":") for i, a in enumerate(argv) if a == "-v"]
    assert any(dst == "/home/ray/deldist" for _, dst in mounts), mounts  # the Dockerfile's WORKDIR
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert set(workdirs) == {"/home/ray/deldist"}
    assert any(re.search(r"pip install .*-e ~/deldist\b", c) for c in config["setup_commands"])


def _ray_start_flags(command: str) -> dict[str, str | None]:
    argv = shlex.split(command.split(";")[-1])
    assert argv[:2] == ["ray", "start"], command
    flags = {}
    for i, arg in enumerate(argv[2:], start=2):
        if arg.startswith("--"):
            name, _, value = arg.partition("=")
            flags[name] = value or (argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else None)
    return flags


def test_dashboard_on_loopback_and_ray_start_flags_exist(config):
    from ray.scripts.scripts import start

    options = {opt for param in start.params for opt in param.opts}
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
              if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        assert set(_ray_start_flags(command)) <= options, command
    (head,) = [_ray_start_flags(c) for c in config["head_start_ray_commands"] if "ray start" in c]
    assert head.get("--dashboard-host") in ("127.0.0.1", "localhost")  # reached through `ray dashboard`


def test_ray_rsync_leaves_out_venv_demo_out_and_git(config, tmp_path):
    """The rsync command Ray's SSH runner builds from the config's rsync_exclude / rsync_filter (the
    docker runner passes the same options to it), run locally instead of over SSH."""
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed (ray up needs it too)")
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    assert config["file_mounts"] == {"~/deldist": "."}
    src = tmp_path / "checkout"
    files = ["pyproject.toml", "README.md", "deldist/__init__.py", "deldist/sub/mod.py", "jobs/curate.py",
             "configs/demo.yaml", "bench/embed.py",
             ".venv/bin/python", ".venv/lib/python3.11/site-packages/x.py", "demo_out/sample/videos/a.mp4",
             ".git/HEAD", ".git/objects/ab/cdef", "deldist/__pycache__/mod.cpython-311.pyc",
             "bench/out/run.json", "deldist.egg-info/PKG-INFO", ".pytest_cache/v/x"]
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        (src / f).write_text("x")
    shutil.copy(ROOT / ".gitignore", src / ".gitignore")

    runner = SSHCommandRunner(log_prefix="", node_id="i-0", provider=None, auth_config=config["auth"],
                              cluster_name=config["cluster_name"], process_runner=subprocess,
                              use_internal_ip=False)
    runner.ssh_ip = "192.0.2.1"  # no lookup through the provider
    commands = []
    runner._run_helper = lambda cmd, *a, **k: commands.append(cmd)
    options = {"rsync_exclude": config.get("rsync_exclude"), "rsync_filter": config.get("rsync_filter"),
               "docker_mount_if_possible": True}  # as NodeUpdater.rsync_up passes them
    runner.run_rsync_up(f"{src}/", "/tmp/ray_tmp_mount/deldist/~/deldist/", options=options)
    (cmd,) = commands
    assert cmd[0] == "rsync" and cmd[-1].startswith("ubuntu@192.0.2.1:")
    i = cmd.index("--rsh")
    dest = tmp_path / "node"
    subprocess.run(cmd[:i] + cmd[i + 2:-1] + [f"{dest}/"], check=True, capture_output=True)

    got = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    assert {"pyproject.toml", "README.md", "deldist/__init__.py", "deldist/sub/mod.py", "jobs/curate.py",
            "configs/demo.yaml", "bench/embed.py"} <= got
    for left_out in (".venv/", "demo_out/", ".git/", "__pycache__/", "bench/out/", ".egg-info/", ".pytest_cache/"):
        assert not [f for f in got if left_out in f"/{f}"], (left_out, sorted(got))

    # and on this checkout itself (dry run: lists what `ray up` would send)
    listed = subprocess.run(cmd[:i] + ["--dry-run"] + cmd[i + 2:-2] + [f"{ROOT}/", f"{tmp_path / 'dry'}/"],
                            check=True, capture_output=True, text=True).stdout.splitlines()
    assert "pyproject.toml" in listed and any(f.startswith("deldist/") for f in listed)
    assert not [f for f in listed if f.split("/")[0] in (".venv", "demo_out", ".git")]
