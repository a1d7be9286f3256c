"""k8s/rayjob.yaml: a KubeRay RayJob that validates against the RayJob CRD of a named KubeRay release
(a pruned copy of its schema is in tests/data/), and whose entrypoint, config, worker groups, images
and spill volumes agree with the repository (jobs/, deldist.curate.Config, pyproject, Dockerfile,
the installed Ray's `ray start`). Also checks .dockerignore against the Dockerfile's COPY sources.

The schema is a Kubernetes structural schema (OpenAPI v3 with x-kubernetes-* extensions); to check it
with jsonschema, `x-kubernetes-int-or-string` fields become integer-or-string, `nullable` adds null, and
objects with `properties` (and neither `additionalProperties` nor x-kubernetes-preserve-unknown-fields)
reject unknown keys, as `kubectl apply` does with its default strict field validation (the API server
would otherwise drop them silently). Not checked: the CRD's CEL rules (x-kubernetes-validations, on
fields this manifest does not use) and list-map key uniqueness.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "k8s" / "rayjob.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
(CRD_SCHEMA,) = sorted((ROOT / "tests" / "data").glob("kuberay-*-rayjob-crd-schema.json"))
MIN_KUBERAY = "1.4.0"  # autoscalerOptions.version first appears in the v1.4.0 CRD (ray-project/kuberay#3578)

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _k8s_to_jsonschema(node):
    """A structural schema node as plain JSON Schema (see the module docstring)."""
    if isinstance(node, list):
        return [_k8s_to_jsonschema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):  # maps of field name -> schema
            out[key] = {name: _k8s_to_jsonschema(schema) for name, schema in value.items()}
        elif key in ("enum", "default", "required", "example"):
            out[key] = value
        else:
            out[key] = _k8s_to_jsonschema(value)
    if out.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]  # a `pattern` beside it applies to the string form only
    if out.get("nullable"):
        types = out.get("type", [])
        out["type"] = (types if isinstance(types, list) else [types]) + ["null"]
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=1)
def _crd() -> dict:
    return json.loads(CRD_SCHEMA.read_text())


@functools.lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft7Validator:
    schema = _k8s_to_jsonschema(_crd()["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _errors(doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in _validator().iter_errors(doc)]


def _quantity(q) -> float:
    """A Kubernetes quantity ("12Gi", "500M", "3", 2) in base units."""
    m = re.fullmatch(r"([0-9.]+)(Ki|Mi|Gi|Ti|k|M|G|T|m)?", str(q))
    assert m, q
    scale = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m.group(2)]
    return float(m.group(1)) * scale


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


def _dockerfile_stages() -> list[dict]:
    """The Dockerfile's stages in order: {"name", "base", "lines"} (instruction lines, continuations joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?$", line, re.I)
        if m:
            stages.append({"base": m.group(1), "name": (m.group(2) or "").lower(), "lines": []})
        else:
            stages[-1]["lines"].append(line)
    return stages


def _image_targets() -> dict[str, dict]:
    """The stages that are images to push (their base is rayproject/ray), by target name."""
    return {st["name"]: st for st in _dockerfile_stages() if st["base"].startswith("rayproject/ray:")}


def _workdir(stage: dict) -> str:
    workdirs = [ln.split(None, 1)[1].strip() for ln in stage["lines"] if ln.upper().startswith("WORKDIR ")]
    assert workdirs, stage["name"]
    return workdirs[-1]


def _pins() -> dict[str, str]:
    """{name: version} of the exact (==) pins in pyproject.toml's dependencies."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {m.group(1).lower(): m.group(2) for m in
            (re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9][0-9A-Za-z.*]*)$", d.replace(" ", "")) for d in deps)
            if m}


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


def test_rayjob_validates_against_the_kuberay_crd():
    assert not _errors(_rayjob()), "\n".join(_errors(_rayjob()))


@pytest.mark.parametrize("mistake, where, kind", [
    # a misspelled field: kubectl (strict field validation) rejects it, the API server would drop it
    (lambda c: c.update(workerGroupSpec=c.pop("workerGroupSpecs")), "spec.rayClusterSpec", "additionalProperties"),
    (lambda c: c["workerGroupSpecs"][0].update(minReplicas="zero"), "spec.rayClusterSpec.workerGroupSpecs.0.minReplicas",
     "type"),
    (lambda c: c["autoscalerOptions"].update(version="v3"), "spec.rayClusterSpec.autoscalerOptions.version", "enum"),
    (lambda c: c["workerGroupSpecs"][0]["rayStartParams"].update({"num-gpus": 1}),
     "spec.rayClusterSpec.workerGroupSpecs.0.rayStartParams.num-gpus", "type"),  # map[string]string
    (lambda c: c["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]["limits"].update(
        memory="28 GB"), "spec.rayClusterSpec.workerGroupSpecs.1.template.spec.containers.0.resources.limits.memory",
     "pattern"),
    (lambda c: c["workerGroupSpecs"][0]["template"]["spec"]["tolerations"][0].update(efect="NoSchedule"),
     "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.tolerations.0", "additionalProperties"),
    (lambda c: c["headGroupSpec"].pop("template"), "spec.rayClusterSpec.headGroupSpec", "required"),
])
def test_the_schema_check_catches_mistakes(mistake, where, kind):
    doc = copy.deepcopy(_rayjob())
    mistake(doc["spec"]["rayClusterSpec"])
    errors = list(_validator().iter_errors(doc))
    assert [e for e in errors if ".".join(map(str, e.absolute_path)) == where and e.validator == kind], \
        [(list(e.absolute_path), e.validator, e.message) for e in errors]


def test_quantities_may_be_integers_or_strings():
    doc = copy.deepcopy(_rayjob())
    res = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]
    res["requests"]["cpu"], res["limits"]["cpu"] = 14, "14000m"  # int-or-string fields
    assert not _errors(doc)


def test_the_vendored_crd_names_its_release():
    source = _crd()["source"]
    assert re.fullmatch(r"[0-9a-f]{40}", source["commit"])
    assert CRD_SCHEMA.name == f"kuberay-{source['release'].lstrip('v')}-rayjob-crd-schema.json"
    assert source["path"] == "ray-operator/config/crd/bases/ray.io_rayjobs.yaml" and source["version"] == "v1"
    autoscaler = _crd()["openAPIV3Schema"]["properties"]["spec"]["properties"]["rayClusterSpec"]["properties"][
        "autoscalerOptions"]["properties"]
    assert set(autoscaler["version"]["enum"]) == {"v1", "v2"}
    # the manifest says which KubeRay it needs and which it was checked against
    header = MANIFEST.read_text()
    assert f"KubeRay >= {MIN_KUBERAY}" in header and f"KubeRay {source['release']} CRD" in header


def test_job_settings_and_groups():
    spec = _rayjob()["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["version"] == "v2"  # hence KubeRay >= MIN_KUBERAY
    for group in cluster["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        assert DNS_LABEL.match(group["groupName"])
    for pod in _all_pod_specs():
        for c in pod["containers"]:
            assert DNS_LABEL.match(c["name"])


def test_ray_start_params_are_ray_start_options():
    from ray.scripts.scripts import start

    options = {opt for param in start.params for opt in param.opts}
    cluster = _cluster()
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for key in group.get("rayStartParams", {}):
            assert f"--{key}" in options, key  # KubeRay passes each as `ray start --<key>=<value>`


def test_workers_spill_to_a_sized_volume():
    """Ray spills to --object-spilling-directory (default: /tmp/ray/session_*/, the writable layer):
    each worker group points it at an emptyDir whose size limit, with room for Ray's logs, fits in the
    container's ephemeral-storage request (= limit), and which holds at least the pod's memory."""
    for group in _cluster()["workerGroupSpecs"]:
        spill = group["rayStartParams"]["object-spilling-directory"]
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        (mount,) = [m for m in container.get("volumeMounts", []) if m["mountPath"] == spill]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["emptyDir"].get("medium", "") == "", "on disk, not in memory"
        size = _quantity(volume["emptyDir"]["sizeLimit"])
        res = container["resources"]
        assert res["requests"]["ephemeral-storage"] == res["limits"]["ephemeral-storage"]
        storage = _quantity(res["limits"]["ephemeral-storage"])
        assert size + 5 * 2**30 <= storage, (group["groupName"], size, storage)
        assert size >= _quantity(res["limits"]["memory"]), group["groupName"]


def test_head_runs_no_work_and_has_the_dashboard():
    head = _cluster()["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert 8265 in {p["containerPort"] for p in container["ports"]}


def test_entrypoint_runs_the_curate_job_script():
    script, _ = _entrypoint()
    workdirs = {_workdir(stage) for stage in _image_targets().values()}
    assert len(workdirs) == 1, f"every image target keeps the repository at one place: {workdirs}"
    workdir = PurePosixPath(workdirs.pop())
    rel = PurePosixPath(script).relative_to(workdir) if PurePosixPath(script).is_absolute() else PurePosixPath(script)
    assert rel.parts[0] == "jobs"
    local = ROOT / rel
    assert local.is_file(), f"{script} -> {local} does not exist"
    assert 'stage="curate"' in local.read_text()
    # the images hold jobs/ and the package at the WORKDIR the entrypoint points into
    docker = DOCKERFILE.read_text()
    assert re.search(r"^COPY .*\bjobs\b", docker, re.M) and re.search(r"^COPY .*\bdeldist\b", docker, re.M)
    for name, stage in _image_targets().items():
        assert any(ln.startswith("COPY --from=src") and ln.split()[-1] == str(workdir) for ln in stage["lines"]), name
        assert any(ln.startswith("RUN pip install") and " . " in f"{ln} " for ln in stage["lines"]), name


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
    # GPU node pools are usually tainted nvidia.com/gpu:NoSchedule
    assert GPU_TOLERATION in gpu["template"]["spec"].get("tolerations", [])


def test_ray_version_matches_pyproject_and_dockerfile():
    pinned = _pinned_ray()  # e.g. "2.60"
    cluster = _cluster()
    assert cluster["rayVersion"] == cluster["rayVersion"].strip()
    assert cluster["rayVersion"].startswith(pinned + "."), (cluster["rayVersion"], pinned)

    targets = _image_targets()
    assert set(targets) == {"cpu", "gpu"}, set(targets)
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minor_min = int(re.match(r">=\s*3\.(\d+)", requires).group(1))
    pythons = set()
    for name, stage in targets.items():
        image, tag = stage["base"].split(":", 1)
        assert image == "rayproject/ray"
        m = re.fullmatch(r"([0-9.]+)-py3(\d+)(-gpu)?", tag)
        assert m, tag
        assert m.group(1) == cluster["rayVersion"], (tag, cluster["rayVersion"])
        assert int(m.group(2)) >= minor_min
        assert bool(m.group(3)) == (name == "gpu"), f"target {name} on {tag}"
        pythons.add(m.group(2))
    assert len(pythons) == 1, "one Python for every node of a cluster"


def test_images_are_the_dockerfile_targets():
    """GPU group on the gpu target, head and the other groups on the cpu target (tags named as the
    targets, as the README's `docker build --target X -t <registry>/deldist:X` gives them)."""
    gpu = _gpu_group()["groupName"]
    targets = set(_image_targets())
    for pod, want in [(_cluster()["headGroupSpec"]["template"]["spec"], "cpu")] + \
            [(g["template"]["spec"], "gpu" if g["groupName"] == gpu else "cpu") for g in _cluster()["workerGroupSpecs"]]:
        for c in pod["containers"]:
            repo, _, tag = c["image"].rpartition(":")
            assert repo.endswith("/deldist") and tag == want and tag in targets, c["image"]
    assert len({c["image"].rpartition(":")[0] for pod in _all_pod_specs() for c in pod["containers"]}) == 1


def test_cpu_image_torch_matches_the_pins():
    (run,) = [ln for ln in _image_targets()["cpu"]["lines"] if "download.pytorch.org/whl/cpu" in ln]
    wanted = dict(re.findall(r"\b(torch|torchvision)==([0-9][0-9A-Za-z.]*)", run))
    pins = _pins()
    assert wanted == {"torch": pins["torch"], "torchvision": pins["torchvision"]}, (wanted, pins)


def _dockerignore_patterns() -> list[tuple[re.Pattern, bool]]:
    """(regex, is_exception) per line, with the Docker (moby/patternmatcher) syntax: paths relative to
    the context, `*` / `?` within one path element, `**` across any number of them, `!` re-includes."""
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = str(PurePosixPath(line.lstrip("!").strip())).lstrip("/")
        rx, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pattern[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pattern[i] == "?":
                rx, i = rx + "[^/]", i + 1
            else:
                rx, i = rx + re.escape(pattern[i]), i + 1
        patterns.append((re.compile(rx), negate))
    return patterns


def _dockerignored(path: str) -> bool:
    """Whether docker leaves `path` out of the build context (a pattern matching a parent excludes it too)."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for rx, negate in _dockerignore_patterns():
        if any(rx.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_copy_sources_and_drops_the_clutter():
    sources = []
    for stage in _dockerfile_stages():
        for ln in stage["lines"]:
            if ln.upper().startswith(("COPY ", "ADD ")) and "--from=" not in ln:
                sources += [a for a in shlex.split(ln)[1:-1] if not a.startswith("--")]
    assert {"pyproject.toml", "README.md", "deldist", "jobs", "configs"} <= set(sources), sources
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not _dockerignored(src), src
        if (ROOT / src).is_dir():
            for f in (ROOT / src).rglob("*"):
                rel = f.relative_to(ROOT).as_posix()
                if f.is_file() and "__pycache__" not in rel and f.suffix in (".py", ".yaml", ".yml", ".json"):
                    assert not _dockerignored(rel), rel
    for clutter in [".venv", ".venv/bin/python", "demo_out", "demo_out/sample/videos/a.mp4", ".git/HEAD",
                    "deldist/__pycache__/embed.cpython-311.pyc", "__pycache__/x.pyc", "bench/out/embed.json",
                    "deldist.egg-info/PKG-INFO", ".pytest_cache/v/cache/nodeids"]:
        assert _dockerignored(clutter), clutter


def test_every_pod_gets_the_aws_secret():
    for pod in _all_pod_specs():
        container = pod["containers"][0]
        secret_refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
        secret_refs += [e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
                        if "secretKeyRef" in e.get("valueFrom", {})]
        assert secret_refs, f"{container['name']}: AWS credentials from a Kubernetes Secret"
    # a Secret with real values must not live in this file
    assert not [d for d in _docs() if d.get("kind") == "Secret"]
