"""A multi-node cluster on loopback: two worker nodes join the session's head with ``ray start``
(each its own raylet, object store and resources), ``curate`` and ``pretrain`` run spread over
the nodes, and a worker node is killed mid-run (SIGKILL to its raylet, object store and
workers, as a lost machine). Curate completes with every id once and ``deldist verify``
passing; pretraining resumes from its last checkpoint on a replacement node.

Marked ``faults`` (slow). The worker nodes leave at the end of each test, so the rest of the
session sees its one-node cluster again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import _free_ports
from PIL import Image
from test_bad_inputs import texture, write_video

from deldist import curate, materialize, pretrain, storage, verify
from deldist.config import load_config
from deldist.ids import split_id
from deldist.layout import RunLayout

pytestmark = pytest.mark.faults

NODE_RESOURCE = "test_worker_node"  # only the worker nodes have it: pins work to them


class WorkerNode:
    """``ray start --address <head> --block`` as a subprocess: one more node of the cluster."""

    def __init__(self, head: dict, name: str, attempts: int = 3):
        import ray

        before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        self.name = name
        log = Path(head["temp_dir"]) / f"ray_start_{name}.log"
        for attempt in range(attempts):
            self.process = self._ray_start(head, name, log)
            deadline = time.time() + 120
            while self.process.poll() is None and time.time() < deadline:
                new = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] not in before
                       and n["Resources"].get(name)]
                if new:
                    self.node_id = new[0]["NodeID"]
                    return
                time.sleep(0.5)
            if self.process.poll() is None:  # still starting after 2 minutes: not a port race
                self.kill()
                break
            # `ray start` exited: a port _free_ports found free was taken before the node bound
            # it (Ray's own connections draw from the same ephemeral range); new ports, again
        raise RuntimeError(f"worker node {name} did not join the cluster in {attempt + 1} attempts; "
                           f"`ray start` said: {log.read_text()[-2000:]}")

    @staticmethod
    def _ray_start(head: dict, name: str, log: Path) -> subprocess.Popen:
        ports = _free_ports(["node-manager-port", "object-manager-port", "metrics-export-port",
                             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port"])
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("RAY_ADDRESS", None)
        with log.open("w") as out:
            return subprocess.Popen(
                [ray_cli, "start", "--address", head["address"], "--block", "--num-cpus=1", "--num-gpus=0",
                 "--node-ip-address=127.0.0.1", "--object-store-memory=200000000", "--disable-usage-stats",
                 f"--resources={json.dumps({NODE_RESOURCE: 1, name: 1})}",
                 *[f"--{k}={v}" for k, v in ports.items()]],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        """SIGKILL to every process of the node at once: a lost machine, not a clean stop."""
        for pid in [self.process.pid, *_descendants(self.process.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # --block: SIGTERM stops this node's processes
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: raylet, object store, workers)."""
    parent_of = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent_of[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parent_of.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _wait_dead(node_id: str, timeout: float = 120) -> None:
    import ray

    deadline = time.time() + timeout
    while time.time() < deadline:
        if not any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
            return
        time.sleep(1)
    raise RuntimeError(f"node {node_id} still alive")


@pytest.fixture
def nodes(ray_head, ray_session):
    started: list[WorkerNode] = []

    def start(name: str) -> WorkerNode:
        node = WorkerNode(ray_head, name)
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()
    for node in started:
        _wait_dead(node.node_id)


def _corpus(root: Path, videos: int = 6) -> set[str]:
    """Videos and stills; returns the ids embed must produce at fps 5 (every 3rd frame of 15)."""
    expected = set()
    for i in range(videos):
        n = 45 + 6 * i
        key = f"center_{i % 3}/video_{i}.mp4"
        write_video(root / key, n)
        expected |= {f"{key}#{j}" for j in range(0, n, 3)}
    for i in range(6):
        key = f"stills/still_{i}.png"
        (root / "stills").mkdir(parents=True, exist_ok=True)
        Image.fromarray(texture(seed=20 + i)).save(root / key)
        expected.add(f"{key}#0")
    return expected


def _kill_when(node: WorkerNode, ready, timeout: float = 180) -> threading.Thread:
    """Kill ``node`` as soon as ``ready()`` holds (polled): mid-run, not before it starts."""
    def watch() -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and not ready():
            time.sleep(0.2)
        node.kill()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _task_nodes(name_part: str) -> set[str]:
    from ray.util.state import list_tasks

    return {t.node_id for t in list_tasks(filters=[("state", "=", "FINISHED")], limit=10_000, detail=True)
            if name_part in (t.name or "") and t.node_id}


def test_curate_over_three_nodes_survives_a_lost_node(nodes, tmp_path):
    corpus = tmp_path / "corpus"
    expected = _corpus(corpus)
    node_a, node_b = nodes("node_a"), nodes("node_b")
    root = str(tmp_path / "run")
    progress = RunLayout(root).embed_progress
    config = curate.Config(
        input=str(corpus), output=root, html=False,
        embed={"model": "vit_tiny_patch16_224", "random_init": True, "fps": 5, "batch_size": 8,
               "segment_seconds": 1, "actors_max": 2, "rows_per_part": 16},
        cluster={"k": 4, "task_cpus": 0.5}, dedup={"task_cpus": 0.5},
        select=[{"name": "meddel", "target_ratio": 0.5}])
    killer = _kill_when(node_b, lambda: len(storage.list_files(progress)) >= 2 if storage.exists(progress) else False)
    try:
        curate.run(config)
    except Exception:  # a clean failure is allowed; the rerun must complete the job
        killer.join()
        curate.run(config)
    killer.join()
    _wait_dead(node_b.node_id)
    ids = storage.read_published(RunLayout(root).embeddings, columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == expected
    report = verify.verify_run(root)
    assert report.ok, report.failures
    assert len(_task_nodes("decode_task")) >= 2  # the decode tasks ran on more than one node
    assert node_a.process.poll() is None


def test_pretrain_resumes_on_a_replacement_node(nodes, tmp_path):
    """Two Train workers, one per worker node (each asks for the nodes' resource); the node of
    one is killed after a checkpoint; a replacement node joins (as an autoscaler's would) and
    the run resumes from the checkpoint there."""
    corpus = tmp_path / "corpus"
    expected = _corpus(corpus, videos=4)
    root = str(tmp_path / "run")
    rows = [{"id": i, "source": str(corpus / split_id(i)[0]), "frame_index": split_id(i)[1]} for i in sorted(expected)]
    import pyarrow as pa

    part = storage.join(root, "embeddings", "part-0.parquet")
    storage.write_table(pa.Table.from_pylist(rows), part)
    storage.publish(storage.join(root, "embeddings"), [storage.resolve(part)[1]], {})
    materialize.run(materialize.Config(output=root, size=64, frames_per_task=32))
    nodes("node_c")
    node_d = nodes("node_d")
    settings = {"output": root, "name": "multinode", "model": "deldist_vit_micro_patch16", "image_size": 64,
                "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, "epochs": 3, "warmup_epochs": 1,
                "batch_size": 4, "num_workers": 2, "cpus_per_worker": 0.25,
                "worker_resources": json.dumps({NODE_RESOURCE: 1}), "checkpoint_every_steps": 2,
                "max_failures": 2, "shuffle_buffer": 8}
    config = load_config(pretrain.Config, None, [f"{k}={v}" for k, v in settings.items()])
    metrics_dir = Path(RunLayout(root).pretrain_ray)

    def checkpointed() -> bool:
        # registered by Ray Train's controller (it polls the workers every 2 s): only then
        # does a restart resume from it
        return any(metrics_dir.rglob("checkpoint_manager_snapshot.json"))

    def kill_then_replace() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not checkpointed():
            time.sleep(0.2)
        time.sleep(1.0)
        node_d.kill()
        nodes("node_e")

    thread = threading.Thread(target=kill_then_replace, daemon=True)
    thread.start()
    summary = pretrain.run(config)
    thread.join()
    assert summary["epochs"] == 3 and summary["frames"] == len(expected)
    assert len(summary["starts"]) >= 2 and summary["starts"][-1] > 0, summary["starts"]
    assert storage.exists(summary["encoder"])
