"""Write tests/data/kuberay-<release>-rayjob-crd-schema.json from a clone of ray-project/kuberay.

    python tests/data/vendor_kuberay_crd.py <kuberay git dir> v1.7.0

Reads ray-operator/config/crd/bases/ray.io_rayjobs.yaml at the tag (with `git show`, so any clone
that has the tag will do) and keeps only spec.versions[name=v1].schema.openAPIV3Schema: the other
served version (v1alpha1, deprecated), printer columns and CRD metadata are dropped, and so is every
`description` keyword (the CRD at v1.7.0 has none: KubeRay generates it with crd:maxDescLen=0; its
1.4 MB are indented YAML and the v1alpha1 copy). Nothing else is changed: the test adapts the
Kubernetes extensions (x-kubernetes-int-or-string, ...) itself. The schema is written as compact JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

CRD_PATH = "ray-operator/config/crd/bases/ray.io_rayjobs.yaml"


def drop_descriptions(node, in_properties=False):
    """The schema without `description` keywords; a field named "description" (a key of a
    `properties` map) stays."""
    if isinstance(node, dict):
        return {k: drop_descriptions(v, in_properties=(k == "properties" and not in_properties))
                for k, v in node.items() if in_properties or k != "description"}
    if isinstance(node, list):
        return [drop_descriptions(v) for v in node]
    return node


def main(repo: str, tag: str) -> Path:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True, text=True).stdout

    commit = git("rev-list", "-n1", tag).strip()
    crd = yaml.load(git("show", f"{commit}:{CRD_PATH}"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = drop_descriptions(v1["schema"]["openAPIV3Schema"])
    out = Path(__file__).with_name(f"kuberay-{tag.lstrip('v')}-rayjob-crd-schema.json")
    header = {
        "comment": "Pruned copy of the RayJob CRD's v1 schema; written by tests/data/vendor_kuberay_crd.py, "
                   "read by tests/test_k8s_manifest.py. Kept: spec.versions[name=v1].schema.openAPIV3Schema, "
                   "unchanged except that `description` keywords are dropped (there are none at this release).",
        "source": {"repository": "https://github.com/ray-project/kuberay", "release": tag, "commit": commit,
                   "path": CRD_PATH, "crd": crd["metadata"]["name"], "version": "v1"},
    }
    lines = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in header.items()]
    lines.append('"openAPIV3Schema": ' + json.dumps(schema, separators=(",", ":")))
    out.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    return out


if __name__ == "__main__":
    print(main(*sys.argv[1:3]))
