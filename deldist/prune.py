"""``deldist prune``: a selection of a labelled segmentation set by training dynamics (DAD or
EL2N, :mod:`deldist.importance`), or the seeded random baseline at the same budget.

Reads what a ``deldist finetune`` run with ``segmentation.record_dynamics: true`` recorded
(``<output>/finetune/<dynamics>/dynamics/`` and ``train_set/``, :mod:`deldist.dynamics`): each
training sample's Dice of the argmax prediction and its pixel-averaged EL2N at every training
pass. Score = the mean over a window of epochs; ``round(prune_fraction * n)`` scored samples are
removed by ``mode`` (:func:`deldist.importance.removed_by_mode`). The ids are the labelled
images' (``<image file name>#0``, what ``deldist embed input=<data>/images`` names them).

Output ``<output>/selections/<name>/`` in ``deldist select``'s format: ``retained/``,
``removed/`` (reason ``dad_pruned``, ``el2n_pruned`` or ``random``; ``max_sim`` holds the
score the rule measured), ``population/`` (every training id with its score and passes: the ids
the selection partitions) and ``summary.json`` (counts, ratio, the rule and its parameters,
``population: "labelled"``, ``applies_to: "finetune"``). ``deldist finetune
segmentation.selection=<name>`` trains on the retained images; ``deldist report`` gives such a
selection a finetune row.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from deldist import storage
from deldist.config import StageConfig
from deldist.dynamics import DYNAMICS, TRAIN_SET
from deldist.ids import id_hash
from deldist.importance import DEFAULT_MODE, MODES, default_window, difficulty, removed_by_mode, window_mean
from deldist.layout import RunLayout
from deldist.rules import REASONS, Decision, counts_by_reason, random_decision
from deldist.schema import REMOVED_SCHEMA, RETAINED_SCHEMA

log = logging.getLogger(__name__)

RULES = {
    "dad": ("dad_pruned", "DAD: Dice of the argmax prediction on the foreground, averaged over a window of epochs",
            "He et al. 2023, Data-Centric Diet (arXiv 2308.01189); window and mode: deldist's defaults"),
    "el2n": ("el2n_pruned", "EL2N: L2 norm of the softmax error per pixel, averaged over pixels and early epochs",
             "Paul et al. 2021 (the DAD paper's gradient-norm baseline); per-pixel averaging: deldist's reading"),
}


class Config(StageConfig):
    """``deldist prune`` settings."""

    output: str = Field(description="run root URI; writes <output>/selections/<name>/")
    name: str = Field(description="the selection's name")
    dynamics: str = Field(description="the finetune run (<output>/finetune/<dynamics>/) that recorded the dynamics")
    method: Literal["dad", "el2n", "random"] = "dad"
    prune_fraction: float = Field(0.5, ge=0, lt=1, description="fraction of the scored training samples removed")
    mode: Literal["keep_hard", "keep_easy", "keep_tails", "keep_middle"] = Field(
        DEFAULT_MODE, description="which samples stay: " + ", ".join(MODES) + " (see deldist.importance)")
    window: tuple[int, int] | None = Field(None, description="first and last epoch (1-based, inclusive) the score "
                                                             "averages; default: dad all epochs, el2n the early ones")
    el2n_early_fraction: float = Field(0.2, gt=0, le=1, description="el2n's default window: this share of the epochs")
    seed: int = Field(0, description="random: the draw; dad / el2n: tie order (an id hash)")


def read_dynamics(output: str, run: str) -> tuple[pa.Table, pa.Table]:
    """(train_set, dynamics) tables a recording finetune run published."""
    out = RunLayout(output).finetune(run)
    for name in (TRAIN_SET, DYNAMICS):
        if not storage.is_published(storage.join(out, name)):
            raise FileNotFoundError(f"{out}/{name} is not published: run deldist finetune name={run} "
                                    "segmentation.record_dynamics=true first")
    return storage.read_published(storage.join(out, TRAIN_SET)), storage.read_published(storage.join(out, DYNAMICS))


def score_samples(config: Config, ids: pa.Array, dynamics: pa.Table) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(score (n,) NaN where unscored, passes (n,), window) of ``config.method`` for ``ids``."""
    index = {v: i for i, v in enumerate(ids.to_pylist())}
    sample = np.asarray([index.get(v, -1) for v in dynamics.column("id").to_pylist()], np.int64)
    if (sample < 0).any():
        raise ValueError(f"{int((sample < 0).sum())} recorded passes name ids outside the training set")
    epoch = dynamics.column("epoch").to_numpy().astype(np.int64)
    epochs = int(epoch.max()) if len(epoch) else 0
    method = "dad" if config.method == "random" else config.method
    window = tuple(config.window) if config.window else default_window(method, epochs, config.el2n_early_fraction)
    values = dynamics.column("dice" if method == "dad" else "el2n").to_numpy().astype(np.float64)
    score, passes = window_mean(sample, epoch, values, len(ids), window)
    return score, passes, window


def decide(config: Config, ids: pa.Array, score: np.ndarray) -> Decision:
    """The removals of ``config`` over ``ids`` with their scores."""
    decision = Decision.empty(len(ids))
    if config.method == "random":
        keep = len(ids) - int(round(config.prune_fraction * len(ids)))
        decision.remove(random_decision(ids, keep / max(1, len(ids)), config.seed) >= 0, "random", "random",
                        "deldist (a seeded uniform sample of the same size as a DAD / EL2N pruning)",
                        {"prune_fraction": config.prune_fraction, "seed": config.seed})
        return decision
    reason, rule, by = RULES[config.method]
    removed = removed_by_mode(difficulty(score, config.method), config.prune_fraction, config.mode,
                              tie_break=id_hash(ids, config.seed))
    decision.remove(removed, reason, rule, by, {"prune_fraction": config.prune_fraction, "mode": config.mode},
                    score=score.astype(np.float32))
    return decision


def run(config: Config) -> dict[str, Any]:
    """Score the recorded training samples, prune, publish ``selections/<name>/``."""
    started = time.perf_counter()
    layout = RunLayout(config.output)
    train, dynamics = read_dynamics(config.output, config.dynamics)
    ids = train.column("id").combine_chunks()
    score, passes, window = score_samples(config, ids, dynamics)
    decision = decide(config, ids, score)
    kept = decision.reason < 0
    rows = pa.array(np.flatnonzero(~kept))
    reasons = np.asarray(REASONS, dtype=object)[decision.reason[~kept]]
    tables = {
        "retained": pa.table({"id": ids.filter(pa.array(kept)), "source": train.column("source").filter(pa.array(kept)),
                              "frame_index": np.zeros(int(kept.sum()), np.int64),
                              "timestamp_s": np.zeros(int(kept.sum())),
                              "dataset": train.column("dataset").filter(pa.array(kept))}, schema=RETAINED_SCHEMA),
        "removed": pa.table({"id": ids.take(rows), "reason": pa.array(reasons, pa.string()),
                             "duplicate_of": pa.nulls(len(rows), pa.string()),
                             "max_sim": pa.array(decision.score[~kept], pa.float32(), from_pandas=True)},
                            schema=REMOVED_SCHEMA),
        "population": pa.table({"id": ids, "score": pa.array(score, pa.float64(), from_pandas=True),
                                "passes": passes}),
    }
    for sub, table in tables.items():
        storage.replace_table(layout.selection_table(config.name, sub), table)
    summary = {
        "name": config.name, "method": config.method, "population": "labelled",
        "mode": None if config.method == "random" else config.mode,
        "applies_to": "finetune",
        "dynamics": config.dynamics, "input_count": len(ids), "kept_count": int(kept.sum()),
        "removed_count": int((~kept).sum()), "ratio": float(kept.mean()) if len(ids) else 0.0,
        "removed_by_reason": counts_by_reason(decision.reason), "rules": decision.rules,
        "window": list(window), "epochs_recorded": int(dynamics.column("epoch").to_numpy().max(initial=0)),
        "unscored_kept": int(np.isnan(score).sum()) if config.method != "random" else 0,
        "parameters": config.model_dump(mode="json"), "seconds": round(time.perf_counter() - started, 2),
    }
    storage.write_json(layout.selection_summary(config.name), summary)
    storage.publish(layout.selection(config.name), [], {"name": config.name, "retained": "retained",
                                                         "removed": "removed", "population": "population",
                                                         "summary": "summary.json"})
    how = "a seeded draw" if config.method == "random" else f"{config.mode}, epochs {window[0]}-{window[1]}"
    log.info(f"deldist prune {config.name}: {config.method} ({how}) kept {summary['kept_count']} of "
             f"{summary['input_count']} training images")
    return {"selection": layout.selection(config.name),
            **{k: summary[k] for k in ("method", "input_count", "kept_count", "ratio", "removed_by_reason")}}
