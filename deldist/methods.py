"""``make methods``: DAD, EL2N and random pruning of the sample's labelled segmentation set at the
same budgets, every mode, a few seeds; not part of ``make demo``.

1. the Kvasir-style set of the sample generator (``--size demo``: 150 image / mask pairs; only
   the stills are written, not the videos);
2. one recording finetune on Ray Train (``segmentation.record_dynamics``; two workers, each
   recording its own passes) -> ``finetune/record/dynamics/``;
3. ``deldist prune`` for every method x mode x budget, and the random baseline per budget;
4. per seed, ``deldist report`` over all of them: each selection finetuned from the same
   random-initialised encoder for the same number of steps (equal compute), plus the whole
   training set (R = 1) -> ``reports/methods-s<seed>/`` (table and plot);
5. ``ablation.md`` / ``ablation.json``: mean and spread of the test mIoU over the seeds, per
   method, mode and budget.

Settings: ``configs/methods.yaml`` (``methods:`` block).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from deldist import finetune, prune, report, storage
from deldist.config import StageConfig, load_config
from deldist.importance import DEFAULT_MODE, MODES

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "methods.yaml"


class Config(StageConfig):
    """``python -m deldist.methods`` settings."""

    output: str = Field(description="run root")
    data: str | None = Field(None, description="a Kvasir-SEG layout; default: the sample's stills under output")
    budgets: list[float] = Field(default_factory=lambda: [0.5, 0.25], description="retained fractions R")
    methods: list[str] = Field(default_factory=lambda: ["dad", "el2n"])
    modes: list[str] = Field(default_factory=lambda: list(MODES))
    ablation_methods: list[str] = Field(default_factory=lambda: ["dad"], description="methods run in every mode; "
                                        "the others in the default mode only")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="finetune seeds of the report runs")
    ablation_seeds: list[int] = Field(default_factory=lambda: [0], description="seeds that run every mode; the "
                                      "other seeds run the default mode (and random) only")
    finetune: dict[str, Any] = Field(default_factory=dict, description="deldist finetune settings of every run")
    record: dict[str, Any] = Field(default_factory=dict, description="the recording run's own settings on top")


def sample_stills(out: Path) -> str:
    """The demo sample's Kvasir-style set (the same pixels ``deldist.sample --size demo`` writes)."""
    from deldist.sample import write_kvasir
    from deldist.sample_scenes import SIZES

    root = out / "kvasir"
    if not (root / "labels.csv").exists():
        spec = SIZES["demo"]
        write_kvasir(root, np.random.default_rng([0, 3]), spec.kvasir_n, spec.kvasir_px)
    return str(root)


def selection_names(config: Config) -> list[tuple[str, str]]:
    """Prune every method x mode x budget and the random draw per budget -> (name, mode)."""
    names = []
    for budget in config.budgets:
        pct = f"{round(100 * budget)}"
        runs = [(f"{m}-{mode}-{pct}", m, mode) for m in config.methods
                for mode in (config.modes if m in config.ablation_methods else [DEFAULT_MODE])]
        for name, method, mode in [*runs, (f"random-{pct}", "random", MODES[0])]:
            prune.run(prune.Config(output=config.output, name=name, dynamics="record", method=method, mode=mode,
                                   prune_fraction=1 - budget))
            names.append((name, mode if method != "random" else DEFAULT_MODE))
    return names


def ablation(rows_by_seed: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Mean, spread and per-seed mIoU per (method, mode, R) over the seeds' report rows."""
    groups: dict[tuple, list[float]] = {}
    for rows in rows_by_seed.values():
        for r in rows:
            if r.get("pruned") == report.FINETUNE_SET:
                groups.setdefault((r["method"], r.get("mode") or "-", r["retained"]), []).append(r["miou"])
    out = []
    for (method, mode, retained), values in sorted(groups.items(), key=lambda kv: (-kv[0][2], kv[0][0], kv[0][1])):
        out.append({"method": method, "mode": mode if method not in ("random", "full") else "-", "R": retained,
                    "miou_mean": statistics.fmean(values), "miou_sd": statistics.stdev(values) if len(values) > 1
                    else 0.0, "miou_runs": values})
    return out


def ablation_markdown(table: list[dict[str, Any]], seeds: list[int]) -> str:
    lines = [f"Test mIoU (foreground IoU, %) after finetuning on the retained training images, mean +- sd over "
             f"the finetune seeds run (of {seeds}); same steps for every row (equal compute).", "",
             "| method | mode | R | mIoU mean | sd | per seed |", "|---|---|---|---|---|---|"]
    for r in table:
        runs = ", ".join(f"{100 * v:.1f}" for v in r["miou_runs"])
        lines.append(f"| {r['method']} | {r['mode']} | {r['R']:.3f} | {100 * r['miou_mean']:.2f} | "
                     f"{100 * r['miou_sd']:.2f} | {runs} |")
    return "\n".join(lines) + "\n"


def run(config: Config) -> dict[str, Any]:
    from deldist.runtime import init_ray

    started = time.perf_counter()
    init_ray()
    record = finetune.Config.model_validate({
        **config.finetune, **config.record, "output": config.output, "name": "record", "random_init": True,
        "segmentation": {**config.finetune.get("segmentation", {}), "data": config.data, "record_dynamics": True}})
    if not storage.is_published(storage.join(config.output, "finetune", "record")):
        finetune.run(record)
    names = selection_names(config)
    fine = {**config.finetune, "segmentation": {**config.finetune.get("segmentation", {}), "data": config.data}}
    rows_by_seed, reports = {}, {}
    for seed in config.seeds:
        chosen = [n for n, mode in names if seed in config.ablation_seeds or mode == DEFAULT_MODE]
        result = report.run(report.Config(output=config.output, name=f"methods-s{seed}", selections=chosen,
                                          labelled_encoder="random_init", control=False,
                                          finetune={**fine, "seed": seed}))
        rows_by_seed[seed], reports[seed] = result["rows"], result["report"]
    table = ablation(rows_by_seed)
    text = ablation_markdown(table, config.seeds)
    storage.write_bytes(storage.join(config.output, "ablation.md"), text.encode())
    storage.write_json(storage.join(config.output, "ablation.json"), {"rows": table, "seeds": config.seeds,
                                                                     "reports": reports})
    return {"ablation": text, "reports": reports, "seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    from deldist.cli import setup_logging
    from deldist.demo import quiet_ray

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="methods_out")
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("overrides", nargs="*", help="key=value")
    args = parser.parse_args(argv)
    quiet_ray()
    setup_logging("INFO", sys.stdout)
    out = Path(args.out).resolve()
    config = load_config(Config, args.config, [f"output={out / 'run'}", *args.overrides], section="methods")
    if config.data is None:
        config = config.model_copy(update={"data": sample_stills(out / "sample")})
    result = run(config)
    print("\n" + result["ablation"])
    for seed, path in result["reports"].items():
        print(f"report (seed {seed}): {path}/table.md, plot.png")
    print(f"took {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
