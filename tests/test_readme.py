"""Every command in the README's code blocks works as written.

- every file a command names (configs, jobs, cluster.yaml, k8s manifests) exists, and every
  `make` target is in the Makefile;
- every `deldist ...` command and every `ray job submit ... python jobs/<x>.py ...` parses with
  the CLI and its configuration validates (s3://bucket/... is the test's moto bucket; a config
  the README stores on S3 is the k8s ConfigMap's curate config, which the README tells users to
  edit and put there);
- `embed` / `curate` commands also run with `--dry-run` against the tiny sample in that bucket;
- every YAML block validates as the stage configuration it shows.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from deldist import cli, storage

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.S | re.M)


def _commands() -> list[str]:
    """Shell commands of the bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def _stage_of_job(script: Path) -> str:
    match = re.search(r'main\(stage="([^"]+)"\)', script.read_text())
    assert match, f"{script} does not call deldist.cli.main(stage=...)"
    return match.group(1)


def _deldist_argv(command: str) -> tuple[str | None, list[str]] | None:
    """(stage given by a jobs/ script or None, argv) of a deldist command, else None."""
    words = shlex.split(command)
    if Path(words[0]).name == "deldist":
        return None, words[1:]
    if words[:3] == ["ray", "job", "submit"] and "--" in words:
        rest = words[words.index("--") + 1:]
        assert rest[0] in ("python", "python3") and rest[1].startswith("jobs/"), command
        script = ROOT / rest[1]
        assert script.is_file(), f"README names {rest[1]}, which does not exist"
        return _stage_of_job(script), rest[2:]
    return None


def test_the_readme_has_the_commands_this_test_checks():
    commands = _commands()
    assert sum(_deldist_argv(c) is not None for c in commands) >= 5
    assert any(c.startswith("make demo") for c in commands) and any(c.startswith("make test") for c in commands)


def test_files_and_make_targets_the_readme_names_exist():
    makefile = (ROOT / "Makefile").read_text()
    for command in _commands():
        words = shlex.split(command)
        if words[0] == "make":
            assert re.search(rf"^{words[1]}:", makefile, re.M), command
        for word in words:
            for path in re.findall(r"(?:^|=)((?:configs|jobs|k8s)/[\w./-]+|cluster\.yaml|Dockerfile)$", word):
                assert (ROOT / path).exists(), f"README: {command!r} names {path}, which does not exist"


@pytest.fixture(scope="module")
def readme_bucket(s3_bucket, tiny_sample):
    """s3://<test bucket>/readme/: the tiny sample's videos under videos/, and cfg/curate.yaml
    (the k8s ConfigMap's curate config, pointed at this bucket)."""
    prefix = f"s3://{s3_bucket}/readme"
    for video in sorted((tiny_sample / "videos").rglob("*.mp4")):
        storage.write_bytes(f"{prefix}/videos/{video.relative_to(tiny_sample / 'videos').as_posix()}",
                            video.read_bytes())
    docs = list(yaml.safe_load_all((ROOT / "k8s" / "rayjob.yaml").read_text()))
    config = next(d for d in docs if d and d.get("kind") == "ConfigMap")["data"]["curate.yaml"]
    storage.write_bytes(f"{prefix}/cfg/curate.yaml", config.replace("s3://<bucket>", prefix).encode())
    return {"s3://bucket": prefix, "$PWD/demo_out/sample": str(tiny_sample), "$PWD": str(ROOT)}


def _localize(argv: list[str], places: dict[str, str]) -> list[str]:
    """The README's bucket -> the test bucket, `make demo`'s sample -> the tiny sample."""
    out = []
    for a in argv:
        for name, place in places.items():
            a = a.replace(name, place)
        out.append(a)
    return out


def test_every_deldist_command_parses_and_validates(readme_bucket, tmp_path):
    checked = 0
    for command in _commands():
        found = _deldist_argv(command)
        if found is None:
            continue
        stage, argv = found
        argv = _localize(argv, readme_bucket)
        name, _, args, configs = cli.parse_command(argv, stage)
        assert configs, command
        checked += 1
        if name in ("embed", "curate"):
            # a config file's own s3://bucket/... paths point at the test bucket too
            argv += [f"{key}={_localize([getattr(configs[0], key)], readme_bucket)[0]}" for key in ("input", "output")
                     if (getattr(configs[0], key) or "").startswith("s3://bucket/")]
            plan_file = tmp_path / f"plan{checked}.json"
            assert cli.main([*argv, "--dry-run", "--json", str(plan_file)], stage=stage) == 0, command
            plan = json.loads(plan_file.read_text())
            if "/readme/videos" in (getattr(configs[0], "input", "") or "") or "demo_out" in command:
                assert plan["inputs"]["videos"] > 0 and plan["inputs"]["frames_kept"] > 0, command
    assert checked >= 5


def test_yaml_blocks_validate():
    from deldist import select

    for block in _blocks("yaml"):
        doc = yaml.safe_load(block)
        for entry in doc.get("select", []):
            select.Config.model_validate({"output": "/tmp/x", **entry})
