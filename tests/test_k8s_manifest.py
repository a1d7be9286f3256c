"""k8s/rayjob.yaml: a KubeRay RayJob whose fields exist in the CRD, whose entrypoint, config,
GPU group and image agree with the repository (jobs/, deldist.curate.Config, pyproject, Dockerfile).

The CRD itself (ray-operator/config/crd/bases/ray.io_rayjobs.yaml in ray-project/kuberay, 1.4 MB)
is not vendored: the field names, required fields and enums used here were read from it and are
listed below.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath

import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "k8s" / "rayjob.yaml"
DOCKERFILE = ROOT / "Dockerfile"

# From the ray.io/v1 RayJob CRD (openAPIV3Schema), ray-project/kuberay at feeaf72f (2026-08-19).
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
    "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes",
    "submissionMode", "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
RAYCLUSTER_SPEC_FIELDS = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
    "headGroupSpec", "headServiceAnnotations", "historyServerOptions", "managedBy", "networkPolicy",
    "rayVersion", "suspend", "tlsOptions", "upgradeStrategy", "workerGroupSpecs",
}
RAYCLUSTER_SPEC_REQUIRED = {"headGroupSpec"}
AUTOSCALER_OPTIONS_FIELDS = {
    "args", "command", "env", "envFrom", "idleTimeoutSeconds", "image", "imagePullPolicy", "resources",
    "securityContext", "upscalingMode", "version", "volumeMounts",
}
AUTOSCALER_ENUMS = {"version": {"v1", "v2"}, "upscalingMode": {"Default", "Aggressive", "Conservative"}}
HEAD_GROUP_FIELDS = {
    "enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources",
    "serviceType", "template",
}
HEAD_GROUP_REQUIRED = {"template"}
WORKER_GROUP_FIELDS = {
    "groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts", "priority",
    "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template",
}
WORKER_GROUP_REQUIRED = {"groupName", "maxReplicas", "minReplicas", "template"}
# the Kubernetes PodSpec / Container fields this manifest uses (core/v1)
POD_SPEC_FIELDS_USED = {"containers", "volumes", "tolerations", "nodeSelector", "serviceAccountName"}
CONTAINER_FIELDS_USED = {"name", "image", "ports", "resources", "env", "envFrom", "volumeMounts"}

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def _rayjob() -> dict:
    jobs = [d for d in _docs() if d.get("kind") == "RayJob"]
    assert len(jobs) == 1
    return jobs[0]


def _cluster() -> dict:
    return _rayjob()["spec"]["rayClusterSpec"]


def _groups() -> dict[str, dict]:
    return {g["groupName"]: g for g in _cluster()["workerGroupSpecs"]}


def _gpu_group() -> dict:
    gpu = [g for g in _cluster()["workerGroupSpecs"]
           if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                  for c in g["template"]["spec"]["containers"])]
    assert len(gpu) == 1, "exactly one worker group with nvidia.com/gpu limits"
    return gpu[0]


def _all_pod_specs() -> list[dict]:
    c = _cluster()
    return [c["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in c["workerGroupSpecs"]]


def _dockerfile_base() -> tuple[str, str]:
    """(image, tag) of the Dockerfile's FROM."""
    froms = [line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.upper().startswith("FROM ")]
    assert len(froms) == 1
    image, tag = froms[0].split(":", 1)
    return image, tag


def _dockerfile_workdir() -> str:
    workdirs = [line.split(None, 1)[1].strip() for line in DOCKERFILE.read_text().splitlines()
                if line.upper().startswith("WORKDIR ")]
    assert workdirs
    return workdirs[-1]


def _pinned_ray() -> str:
    """``2.60`` from ``ray[data,train]==2.60.*`` in pyproject.toml."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [re.match(r"^ray(?:\[[^\]]*\])?==([0-9.]+?)(?:\.\*)?$", d.replace(" ", "")) for d in deps]
    pins = [m.group(1) for m in pins if m]
    assert len(pins) == 1, f"one ray==X.Y.* pin in pyproject.toml, got {deps}"
    return pins[0]


def _entrypoint() -> tuple[str, str]:
    """(script path in the image, --config path) of the RayJob entrypoint."""
    argv = shlex.split(_rayjob()["spec"]["entrypoint"])
    assert argv[0] in ("python", "python3")
    assert "--config" in argv
    return argv[1], argv[argv.index("--config") + 1]


def _config_text() -> str:
    """The curate YAML the entrypoint's --config names, resolved through the head's volume mounts."""
    _, config_path = _entrypoint()
    head = _cluster()["headGroupSpec"]["template"]["spec"]
    config = PurePosixPath(config_path)
    for mount in head["containers"][0].get("volumeMounts", []):
        if config.parent == PurePosixPath(mount["mountPath"]):
            volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
            cm_name = volume["configMap"]["name"]
            items = {i["path"]: i["key"] for i in volume["configMap"].get("items", [])}
            key = items.get(config.name, config.name)
            cms = [d for d in _docs() if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == cm_name]
            assert cms, f"ConfigMap {cm_name} is not in {MANIFEST.name}"
            assert key in cms[0]["data"], f"ConfigMap {cm_name} has no key {key}"
            return cms[0]["data"][key]
    raise AssertionError(f"--config {config_path} is not under a volume mounted into the head container")


def test_documents_and_kinds():
    kinds = {(d["apiVersion"], d["kind"]) for d in _docs()}
    assert ("ray.io/v1", "RayJob") in kinds
    assert ("v1", "ConfigMap") in kinds
    for d in _docs():
        assert DNS_LABEL.match(d["metadata"]["name"])


def test_fields_exist_in_the_kuberay_crd():
    spec = _rayjob()["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    assert spec["submissionMode"] == "K8sJobMode" and spec["submissionMode"] in SUBMISSION_MODES
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0

    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC_FIELDS, set(cluster) - RAYCLUSTER_SPEC_FIELDS
    assert RAYCLUSTER_SPEC_REQUIRED <= set(cluster)
    assert cluster["enableInTreeAutoscaling"] is True
    autoscaler = cluster.get("autoscalerOptions", {})
    assert set(autoscaler) <= AUTOSCALER_OPTIONS_FIELDS
    for key, allowed in AUTOSCALER_ENUMS.items():
        assert autoscaler.get(key, next(iter(allowed))) in allowed

    head = cluster["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_FIELDS and HEAD_GROUP_REQUIRED <= set(head)
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS and WORKER_GROUP_REQUIRED <= set(group), group["groupName"]
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        assert DNS_LABEL.match(group["groupName"])
    for group in [head, *cluster["workerGroupSpecs"]]:
        # rayStartParams and group resources are map[string]string in the CRD
        for key in ("rayStartParams", "resources"):
            assert all(isinstance(v, str) for v in group.get(key, {}).values()), (key, group.get(key))

    for pod in _all_pod_specs():
        assert set(pod) <= POD_SPEC_FIELDS_USED, set(pod) - POD_SPEC_FIELDS_USED
        assert pod["containers"]
        for c in pod["containers"]:
            assert set(c) <= CONTAINER_FIELDS_USED, set(c) - CONTAINER_FIELDS_USED
            assert DNS_LABEL.match(c["name"])


def test_head_runs_no_work_and_has_the_dashboard():
    head = _cluster()["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert 8265 in {p["containerPort"] for p in container["ports"]}


def test_entrypoint_runs_the_curate_job_script():
    script, _ = _entrypoint()
    workdir = PurePosixPath(_dockerfile_workdir())
    rel = PurePosixPath(script).relative_to(workdir) if PurePosixPath(script).is_absolute() else PurePosixPath(script)
    assert rel.parts[0] == "jobs"
    local = ROOT / rel
    assert local.is_file(), f"{script} -> {local} does not exist"
    assert 'stage="curate"' in local.read_text()
    # the image holds jobs/ and the package at the WORKDIR the entrypoint points into
    docker = DOCKERFILE.read_text()
    assert re.search(r"^COPY .*\bjobs\b", docker, re.M) and re.search(r"^COPY .*\bdeldist\b", docker, re.M)
    assert "pip install" in docker


def test_config_in_the_configmap_validates(tmp_path):
    from deldist import curate
    from deldist.config import load_config

    path = tmp_path / "curate.yaml"
    path.write_text(_config_text())
    cfg = load_config(curate.Config, str(path), [], section="curate")  # as jobs/curate.py does
    embed_cfg, cluster_cfg, dedup_cfg, select_cfgs = cfg.stage_configs()
    assert cfg.input.startswith("s3://") and cfg.output.startswith("s3://")
    assert embed_cfg.weights and not embed_cfg.random_init
    assert select_cfgs and all(s.output == cfg.output for s in select_cfgs)

    gpu = _gpu_group()
    gpus_per_pod = int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    # one GPU per encoder actor: the pool must fit the GPU group at full size
    assert embed_cfg.actors_max <= gpu["maxReplicas"] * gpus_per_pod
    # embed picks GPU vs CPU from the GPUs present at start: with a GPU group that starts empty,
    # `device: auto` would see none and put the encoders on CPUs
    if gpu["minReplicas"] == 0:
        assert embed_cfg.device == "cuda"
    # cluster / dedup size their task counts from the CPUs present at stage start unless told
    assert cluster_cfg.num_tasks and dedup_cfg.num_buckets


def test_gpu_group_is_consistent():
    gpu = _gpu_group()
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    containers = gpu["template"]["spec"]["containers"]
    res = containers[0]["resources"]
    limit = res["limits"]["nvidia.com/gpu"]
    assert int(limit) >= 1
    assert res.get("requests", {}).get("nvidia.com/gpu", limit) == limit  # extended resources: requests == limits
    if "num-gpus" in gpu.get("rayStartParams", {}):
        assert int(gpu["rayStartParams"]["num-gpus"]) == int(limit)
    if "GPU" in gpu.get("resources", {}):
        assert int(gpu["resources"]["GPU"]) == int(limit)
    # the other groups (and the head) get no GPUs
    for group in _cluster()["workerGroupSpecs"]:
        if group["groupName"] != gpu["groupName"]:
            for c in group["template"]["spec"]["containers"]:
                assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
            assert group.get("rayStartParams", {}).get("num-gpus", "0") == "0"
    assert "cpu" in _groups(), "a CPU worker group for decoding"


def test_ray_version_matches_pyproject_and_dockerfile():
    pinned = _pinned_ray()  # e.g. "2.60"
    cluster = _cluster()
    assert cluster["rayVersion"] == cluster["rayVersion"].strip()
    assert cluster["rayVersion"].startswith(pinned + "."), (cluster["rayVersion"], pinned)

    image, tag = _dockerfile_base()
    assert image == "rayproject/ray"
    ray_tag = tag.split("-")[0]
    assert ray_tag == cluster["rayVersion"], (tag, cluster["rayVersion"])
    py = re.search(r"-py3(\d+)", tag)
    assert py, tag
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minor_min = int(re.match(r">=\s*3\.(\d+)", requires).group(1))
    assert int(py.group(1)) >= minor_min

    images = {c["image"] for pod in _all_pod_specs() for c in pod["containers"]}
    assert len(images) == 1, f"one image for head and workers: {images}"
    assert images.pop().endswith("/deldist:latest")


def test_every_pod_gets_the_aws_secret():
    for pod in _all_pod_specs():
        container = pod["containers"][0]
        secret_refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
        secret_refs += [e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
                        if "secretKeyRef" in e.get("valueFrom", {})]
        assert secret_refs, f"{container['name']}: AWS credentials from a Kubernetes Secret"
    # a Secret with real values must not live in this file
    assert not [d for d in _docs() if d.get("kind") == "Secret"]
