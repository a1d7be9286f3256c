"""``deldist curate``: embed -> cluster -> dedup -> select in one job, one config file.

The YAML has the shared keys (``input``, ``output``, ``manifest``, ``ground_truth``) at the
top and one block per stage (``embed:``, ``cluster:``, ``dedup:``, ``select:``); ``select``
may be a list, one entry per selection (e.g. MedDEL at several target ratios and the random
baseline at the same ratios). Each stage runs through its own ``run(config)``, so a curate
job and the stages run one by one give the same tables.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from pydantic import Field

from deldist import cluster, dedup, embed, select, storage
from deldist.config import StageConfig
from deldist.layout import RunLayout

log = logging.getLogger(__name__)


class Config(StageConfig):
    input: str
    output: str
    manifest: str | None = None
    ground_truth: str | None = Field(None, description="optional frame labels for selection quality figures")
    embed: dict[str, Any] = Field(default_factory=dict)
    cluster: dict[str, Any] = Field(default_factory=dict)
    dedup: dict[str, Any] = Field(default_factory=dict)
    select: dict[str, Any] | list[dict[str, Any]] = Field(default_factory=dict)
    html: bool = Field(True, description="write the HTML curation report <output>/reports/html/index.html")

    def stage_configs(self) -> tuple[embed.Config, cluster.Config, dedup.Config, list[select.Config]]:
        """Validate every stage's block up front, so a typo fails before hours of embedding."""
        shared = {"output": self.output}
        embed_cfg = embed.Config.model_validate({"input": self.input, "manifest": self.manifest, **shared, **self.embed})
        cluster_cfg = cluster.Config.model_validate({**shared, **self.cluster})
        dedup_cfg = dedup.Config.model_validate({**shared, **self.dedup})
        blocks = self.select if isinstance(self.select, list) else [self.select]
        gt = {"ground_truth": self.ground_truth} if self.ground_truth else {}
        select_cfgs = [select.Config.model_validate({**shared, **gt, **b}) for b in blocks]
        names = [c.name for c in select_cfgs]
        if len(set(names)) != len(names):
            raise ValueError(f"selection names must be unique: {names}")
        return embed_cfg, cluster_cfg, dedup_cfg, select_cfgs


def format_selection_table(summaries: list[dict[str, Any]]) -> str:
    """A plain-text table of selection summaries: counts, ratio, removals by reason, and the
    ground-truth figures when present."""
    reasons = sorted({r for s in summaries for r in s.get("removed_by_reason", {})})
    head = ["selection", "input", "kept", "ratio", *[f"rm:{r}" for r in reasons]]
    has_gt = any("ground_truth" in s for s in summaries)
    if has_gt:
        head += ["scene_cov", "random_cov", "inv_recall", "random_inv"]
    rows = []
    for s in summaries:
        row = [s["name"], str(s["input_count"]), str(s["kept_count"]), f"{s['ratio']:.3f}",
               *[str(s.get("removed_by_reason", {}).get(r, 0)) for r in reasons]]
        if has_gt:
            gt = s.get("ground_truth", {})
            rb = gt.get("random_baseline", {})
            row += [_fmt(gt.get("scene_coverage")), _fmt(rb.get("scene_coverage")),
                    _fmt(gt.get("invalid_recall")), _fmt(rb.get("invalid_recall"))]
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def format_dataset_table(summary: dict[str, Any]) -> str:
    """Per-dataset input / kept / ratio of one selection."""
    rows = [f"  {name:<20} input {d['input']:>7}  kept {d['kept']:>7}  ratio {d['ratio']:.3f}"
            for name, d in summary.get("per_dataset", {}).items()]
    return "\n".join([f"per dataset ({summary['name']}):", *rows])


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _unless_current(stage: Any, config: Any, out_dir: str, inputs: str, line: Callable[[dict], str]) -> dict:
    """Run ``stage`` (cluster or dedup) unless ``out_dir`` is published from the same inputs
    and settings (its manifest's fingerprint): a curate rerun skips what it would redo."""
    name = stage.__name__.rsplit(".", 1)[-1]
    if storage.is_current(out_dir, stage.fingerprint(config)):
        log.info(f"deldist {name}: unchanged {inputs}, kept -> {out_dir}")
        return {"skipped": f"unchanged {inputs}", "output": out_dir}
    result = stage.run(config)
    _release_arrow_pool()
    log.info(f"deldist {name}: {line(result)}")
    return result


def _release_arrow_pool() -> None:
    """Give the finished stage's freed Arrow buffers back to the OS before the next stage: the
    allocator keeps them otherwise (after dedup at 10M frames, 0.6 GiB of the driver)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def run(config: Config) -> dict[str, Any]:
    from deldist.runtime import init_ray

    started = time.time()
    init_ray()
    embed_cfg, cluster_cfg, dedup_cfg, select_cfgs = config.stage_configs()
    result: dict[str, Any] = {"embed": embed.run(embed_cfg)}
    if not result["embed"].get("published"):
        raise RuntimeError("embedding did not finish (max_sources?); rerun curate to continue")
    layout = RunLayout(config.output)
    result["cluster"] = _unless_current(cluster, cluster_cfg, layout.clusters, "embeddings and settings", lambda c: (
        f"k={c['k']}, {c['rows']} frames, {c['iterations']} passes, mean cosine distance {c['mean_distance']:.4f}, "
        f"largest cluster {c['largest_cluster']} -> {c['clusters']}"))
    result["dedup"] = _unless_current(dedup, dedup_cfg, layout.scores, "embeddings, clusters and settings", lambda d: (
        f"{d['rows']} frames in {d['clusters']} clusters, {d['pairs']:,} pairs scored (keep={d['keep']}) "
        f"-> {d['scores']}"))
    summaries = []
    for cfg in select_cfgs:
        select.run(cfg)
        _release_arrow_pool()
        summaries.append(storage.read_json(layout.selection_summary(cfg.name)))
    log.info("\n" + format_selection_table(summaries))
    log.info("\n" + format_dataset_table(summaries[0]))
    result["selections"] = {s["name"]: {k: s[k] for k in ("input_count", "kept_count", "ratio")} for s in summaries}
    if config.html:
        from deldist import html_report

        result["html_report"] = html_report.write_html_report(config.output, [c.name for c in select_cfgs])
        log.info(f"\nHTML report: {result['html_report']}")
    result["seconds"] = round(time.time() - started, 1)
    result["output"] = config.output
    return result
