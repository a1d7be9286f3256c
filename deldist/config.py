"""Stage configs: YAML files plus ``key=value`` overrides, validated by pydantic.

Every stage module defines ``Config`` (a :class:`StageConfig`) and ``run(config)``; the CLI
and the ``jobs/`` entry points build the config the same way through :func:`load_config`.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field

from deldist import storage
from deldist.faults import FaultPoint

C = TypeVar("C", bound="StageConfig")

# the blocks of a YAML file that configures a whole chain
STAGE_SECTIONS = {"embed", "cluster", "dedup", "select", "curate", "materialize", "pretrain", "finetune", "report",
                  "curate_new"}


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
        shared = {k: v for k, v in data.items() if k not in STAGE_SECTIONS}
        # a chain stage (curate) has fields named after the stages it runs: pass their blocks
        shared.update({k: v for k, v in data.items() if k in STAGE_SECTIONS and k in cls.model_fields})
        data = _merge(shared, data.get(section) or {})
        # Keep only keys this stage knows, so one file can configure the whole chain.
        data = {k: v for k, v in data.items() if k in cls.model_fields}
    data = _merge(data, parse_overrides(overrides or []))
    return cls.model_validate(data)


def load_configs(cls: type[C], path: str | None = None, overrides: list[str] | None = None,
                 section: str | None = None) -> list[C]:
    """:func:`load_config`, but a stage block that is a list (``select:`` holding several
    selections) gives one config per entry; a ``name=`` override picks one of them."""
    if path and section is not None:
        loaded = yaml.safe_load(storage.read_bytes(path)) or {}
        block = loaded.get(section) if isinstance(loaded, dict) else None
        if isinstance(block, list):
            wanted = parse_overrides(overrides or []).get("name")
            entries = [b for b in block if wanted is None or b.get("name") == wanted]
            if not entries:
                raise ValueError(f"{path}: no {section} entry named {wanted!r} "
                                 f"(has {[b.get('name') for b in block]})")
            shared = {k: v for k, v in loaded.items() if k not in STAGE_SECTIONS}
            extra = parse_overrides(overrides or [])
            return [cls.model_validate(_merge({k: v for k, v in _merge(shared, entry).items() if k in cls.model_fields},
                                              extra)) for entry in entries]
    return [load_config(cls, path, overrides, section)]


def config_help(cls: type[BaseModel], prefix: str = "") -> str:
    """Every key of a config model (nested models dotted): type, default and description, for
    ``deldist <stage> --help``."""
    lines = [] if prefix else [f"config keys (YAML file, or key=value; {cls.__name__}):"]
    for name, field in cls.model_fields.items():
        annotation = field.annotation
        nested = next((a for a in (annotation, *getattr(annotation, "__args__", ()))
                       if isinstance(a, type) and issubclass(a, BaseModel)), None)
        kind = annotation.__name__ if isinstance(annotation, type) else str(annotation)
        kind = re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", kind.replace("typing.", ""))  # deldist.rules.X -> X
        if field.is_required():
            default = "required"
        elif nested is not None:
            default = "keys below"
        else:
            default = f"default {field.get_default(call_default_factory=True)!r}"
        lines.append(f"  {prefix}{name} ({kind}, {default})" + (f": {field.description}" if field.description else ""))
        if nested is not None:
            lines += config_help(nested, prefix=f"{prefix}{name}.").splitlines()
    return "\n".join(lines)
