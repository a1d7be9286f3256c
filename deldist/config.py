"""Stage configs: YAML files plus ``key=value`` overrides, validated by pydantic.

Every stage module defines ``Config`` (a :class:`StageConfig`) and ``run(config)``; the CLI
and the ``jobs/`` entry points build the config the same way through :func:`load_config`.
"""

from __future__ import annotations

from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field

from deldist import storage
from deldist.faults import FaultPoint

C = TypeVar("C", bound="StageConfig")


class StageConfig(BaseModel):
    """Base of all stage configs: unknown keys are errors (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid")

    inject_fault: FaultPoint | None = Field(
        None, description="test hook: exit hard once at this point (deldist.faults); never in real runs")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["a.b=3", "c=x"]`` -> ``{"a": {"b": 3}, "c": "x"}``; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} is not key=value")
        key, raw = pair.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw) if raw != "" else ""
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def load_config(cls: type[C], path: str | None = None, overrides: list[str] | None = None,
                section: str | None = None) -> C:
    """Build ``cls`` from an optional YAML file (local or object-store URI) and overrides.

    With ``section``, a YAML file holding several stages (``embed:``, ``cluster:`` ...) gives
    that stage its own block merged over the shared top-level keys (``output``, ...).
    """
    data: dict[str, Any] = {}
    if path:
        loaded = yaml.safe_load(storage.read_bytes(path)) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        data = loaded
    if section is not None:
        stage_names = {"embed", "cluster", "dedup", "select", "curate", "materialize",
                       "pretrain", "finetune", "report", "curate_new"}
        shared = {k: v for k, v in data.items() if k not in stage_names}
        # a chain stage (curate) has fields named after the stages it runs: pass their blocks
        shared.update({k: v for k, v in data.items() if k in stage_names and k in cls.model_fields})
        data = _merge(shared, data.get(section) or {})
        # Keep only keys this stage knows, so one file can configure the whole chain.
        data = {k: v for k, v in data.items() if k in cls.model_fields}
    data = _merge(data, parse_overrides(overrides or []))
    return cls.model_validate(data)
