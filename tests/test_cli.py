"""The command line: --version, per-stage help generated from the config models, the result
JSON alone on stdout (messages on stderr), --json FILE, and list blocks in a config file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import deldist
from deldist import cli, select
from deldist.config import load_configs

REPO = Path(__file__).resolve().parents[1]


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"deldist {deldist.__version__}"


def test_stage_help_lists_every_key_with_type_default_and_description(capsys):
    with pytest.raises(SystemExit):
        cli.main(["select", "--help"])
    text = capsys.readouterr().out
    for key in select.Config.model_fields:
        assert f"\n  {key} (" in text, key
    assert "deldist_rules.near_copy.max_hamming (int, default 10): Hamming distance" in text
    assert "  output (str, required): run root URI" in text


def test_result_json_alone_on_stdout_messages_on_stderr(tmp_path, capsys):
    assert cli.main(["verify", str(tmp_path)]) == 1  # an empty directory: embeddings not published
    out, err = capsys.readouterr()
    result = json.loads(out)  # stdout is the JSON and nothing else
    assert result["ok"] is False and "embeddings" in result["checked"]
    assert "deldist verify: FAIL embeddings" in err
    assert cli.main(["verify", str(tmp_path), "--json", str(tmp_path / "result.json")]) == 1
    assert capsys.readouterr().out == ""
    assert json.loads((tmp_path / "result.json").read_text())["ok"] is False


def test_a_list_block_gives_one_config_per_entry():
    configs = load_configs(select.Config, str(REPO / "configs" / "demo.yaml"), ["output=/x"], section="select")
    assert len(configs) >= 2 and all(c.output == "/x" for c in configs)
    names = [c.name for c in configs]
    assert len(set(names)) == len(names)
    picked = load_configs(select.Config, str(REPO / "configs" / "demo.yaml"), ["output=/x", f"name={names[1]}"],
                          section="select")
    assert [c.name for c in picked] == [names[1]]
    with pytest.raises(ValueError, match="no select entry named 'nope'"):
        load_configs(select.Config, str(REPO / "configs" / "demo.yaml"), ["output=/x", "name=nope"], section="select")
