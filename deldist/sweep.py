"""``deldist sweep``: what a selection keeps at every eps of a grid and every target ratio, per
dataset, and the ``max_sim`` distribution those thresholds cut, before you choose one.

NeMo Curator's semantic-dedup docs advise looking at the similarity distribution before choosing
eps; MedDEL's Table 2 (:data:`deldist.select.MEDDEL_TABLE2`) gives the fractions its thresholds
kept on the paper's 88,282 frames, which say little about another encoder or data set. A sweep
runs the selection's rules before the duplicate rule once (quality filter, outlier rules,
temporal collapse, near copies: exactly as ``deldist select`` with the same settings), then
evaluates the duplicate rule at every grid point from the stored scores, never rerunning the
pairwise stage:

- ``kept`` rule: :class:`deldist.kept_rule.KeptRule`, the resolver ``deldist select`` uses (one
  object, its exact fallback's vectors gathered once for the whole grid); a ``target_ratio`` is
  searched as select searches it, so the kept count per grid point is ``select``'s ``kept_count``
  for that ``eps`` or ``target_ratio``;
- ``any_earlier`` rule (SemDeDup's): the candidates whose ``max_sim`` exceeds the threshold.

The selection settings are a ``deldist select`` entry: ``select`` holds it (in a YAML file the
``select:`` block itself, passed through, so ``deldist sweep --config curate.yaml
selection=meddel_20`` sweeps that entry's rules); its ``eps`` / ``target_ratio`` are replaced by
the grids. A similarity threshold below the scores' ``neighbour_floor`` cannot be evaluated by
the ``kept`` rule: its row says so (``evaluated`` false).

Output under ``<output>/sweeps/<name>/`` (``name``: the selection's), published (manifest, then
``_SUCCESS``):

- ``kept_by_eps.csv``: eps, similarity_threshold, dataset (``(all)`` for the whole run), input,
  candidates (after the rules before the duplicates), kept, ratio, evaluated,
  meddel_table2_ratio (the paper's kept fraction at that threshold, on their data);
- ``kept_by_ratio.csv``: target_ratio, reachable, similarity_threshold, eps, then as above;
- ``max_sim_histogram.csv``: dataset, bin_low, bin_high, count: ``max_sim`` of the candidates
  with an earlier-ranked item in their cluster (rank > 0; the first has none), in fixed bins over
  [-1, 1] spaced evenly in log(1 - max_sim) (:func:`deldist.html_render.similarity_edges`);
- ``sweep.png``: kept fraction against eps per dataset, beside the histogram;
- ``summary.json``: counts, the rules that ran, the overall rows, the settings.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from deldist import storage
from deldist.config import StageConfig
from deldist.greedy import any_earlier_duplicates, threshold_for_ratio
from deldist.html_render import similarity_edges, similarity_histogram, similarity_png
from deldist.layout import RunLayout
from deldist.rules import counts_by_reason
from deldist.select import MEDDEL_TABLE2, apply_rules, read_frames, read_scores
from deldist.select import Config as SelectConfig

log = logging.getLogger(__name__)

ALL = "(all)"  # the dataset column's value for the whole run
# eps 0.0025 .. 0.3; 0.1 .. 0.3 in steps of 0.05 are MedDEL Table 2's similarity thresholds 0.9 .. 0.7
EPS_GRID: tuple[float, ...] = (0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1,
                               0.125, 0.15, 0.175, 0.2, 0.25, 0.3)
RATIO_GRID: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
FILES = {"eps": "kept_by_eps.csv", "ratio": "kept_by_ratio.csv", "histogram": "max_sim_histogram.csv",
         "plot": "sweep.png", "summary": "summary.json"}
IGNORED = ("eps", "target_ratio", "match_selection", "ground_truth")  # the entry's keys a sweep replaces


class Config(StageConfig):
    """``deldist sweep`` settings: the selection whose duplicate rule is swept, and the grids."""

    output: str = Field(description="run root URI")
    select: dict[str, Any] | list[dict[str, Any]] = Field(
        default_factory=dict, description="the selection settings to sweep: a deldist select entry (its keys, "
                                          "e.g. method, dedup_rule, deldist_rules; in a YAML file the select: block "
                                          "itself); its eps / target_ratio are replaced by the grids")
    selection: str | None = Field(None, description="with a list under select: the entry of this name (default: the "
                                                    "first whose method is not random)")
    name: str | None = Field(None, description="output: <output>/sweeps/<name> (default: the selection's name)")
    eps_grid: list[float] = Field(default_factory=lambda: list(EPS_GRID),
                                  description="eps values (duplicate above similarity 1 - eps); the default holds "
                                              "MedDEL Table 2's 0.1-0.3")
    ratio_grid: list[float] = Field(default_factory=lambda: list(RATIO_GRID),
                                    description="target ratios (fraction of the input to keep)")
    histogram_min_eps: float = Field(1e-4, gt=0, lt=1, description="max_sim histogram: bins spaced evenly in "
                                                                  "log(1 - max_sim) from this to 2, one bin above")
    histogram_bins_per_decade: int = Field(20, ge=1, le=1000, description="max_sim histogram: bins per decade of "
                                                                          "1 - max_sim")

    @model_validator(mode="after")
    def _valid(self) -> "Config":
        if any(not 0 <= e <= 2 for e in self.eps_grid) or any(not 0 < r <= 1 for r in self.ratio_grid):
            raise ValueError("eps_grid values must lie in [0, 2] and ratio_grid values in (0, 1]")
        self.selection_config()  # the selection's settings are checked now, not after the rules ran
        return self

    def selection_config(self) -> SelectConfig:
        """The ``deldist select`` settings swept (without eps / target_ratio)."""
        entries = self.select if isinstance(self.select, list) else [self.select]
        if self.selection is not None:
            entries = [e for e in entries if e.get("name", "default") == self.selection]
        else:
            entries = [e for e in entries if e.get("method") != "random"]
        if not entries:
            raise ValueError(f"no select entry named {self.selection!r} to sweep" if self.selection else
                             "no select entry to sweep (method random has no duplicate rule)")
        entry = {k: v for k, v in entries[0].items() if k not in IGNORED}
        config = SelectConfig.model_validate({**entry, "output": self.output})
        if config.method == "random":
            raise ValueError("method random has no duplicate rule to sweep; sweep a meddel or semdedup selection")
        return config


# ----------------------------------------------------------------------------- math (pure)


def kept_by_group(kept: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """int64 (n_groups,): kept items per group; kept (n,) bool, group (n,) int codes."""
    return np.bincount(np.asarray(group)[np.asarray(kept, bool)], minlength=n_groups).astype(np.int64)


def count_rows(kept: np.ndarray | None, candidate: np.ndarray, group: np.ndarray, names: list[str],
               **head: Any) -> list[dict[str, Any]]:
    """One row for the whole run (dataset ``(all)``) and one per dataset: input, candidates, kept,
    ratio (kept / input), each after the ``head`` columns; ``kept`` None: not evaluated (blank)."""
    k = len(names)
    inputs = np.bincount(group, minlength=k)
    cands = kept_by_group(candidate, group, k)
    kept_n = kept_by_group(kept, group, k) if kept is not None else None
    rows = []
    for i, name in [(-1, ALL), *enumerate(names)]:
        n = int(inputs.sum()) if i < 0 else int(inputs[i])
        c = int(cands.sum()) if i < 0 else int(cands[i])
        kn = None if kept_n is None else int(kept_n.sum()) if i < 0 else int(kept_n[i])
        rows.append({**head, "dataset": name, "input": n, "candidates": c, "kept": kn,
                     "ratio": None if kn is None or not n else kn / n})
    return rows


def histogram_rows(max_sim: np.ndarray, mask: np.ndarray, group: np.ndarray, names: list[str],
                   edges: np.ndarray) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """The ``max_sim`` histogram of the items in ``mask``, whole run and per dataset -> (CSV rows:
    dataset, bin_low, bin_high, count; label -> counts (b,))."""
    counts = {ALL: similarity_histogram(max_sim[mask], edges)}
    for i, name in enumerate(names):
        counts[name] = similarity_histogram(max_sim[mask & (group == i)], edges)
    rows = [{"dataset": label, "bin_low": float(edges[b]), "bin_high": float(edges[b + 1]),
             "count": int(c[b])} for label, c in counts.items() for b in range(len(c))]
    return rows, counts


def threshold_columns(t: float) -> dict[str, Any]:
    """similarity_threshold and eps of threshold ``t`` (blank when infinite: keep all / only firsts)."""
    finite = math.isfinite(t)
    return {"similarity_threshold": t if finite else None, "eps": 1.0 - t if finite else None}


def table2_ratio(eps: float) -> float | None:
    """MedDEL's kept fraction at similarity 1 - eps (Table 2), as select looks it up."""
    paper = MEDDEL_TABLE2.get(round(1.0 - eps, 4))
    return paper[1] if paper else None


# ----------------------------------------------------------------------------- the rule on a grid


class DuplicateGrid:
    """The selection's duplicate rule on fixed candidates at any threshold: ``kept(t)`` (bool rows,
    None when the rule cannot evaluate ``t``) and ``search(ratio)`` -> (threshold, reachable)."""

    def __init__(self, config: SelectConfig, layout: RunLayout, ids: pa.Array, candidate: np.ndarray,
                 dim: int | None):
        scores = read_scores(config, ids, layout, also=("rank", "max_sim"))  # max_sim: the histogram
        self.config, self.candidate, self.n = config, candidate, len(candidate)
        self.first = scores.table.column("rank").to_numpy() == 0
        self.max_sim = scores.table.column("max_sim").to_numpy(zero_copy_only=False).astype(np.float64)
        self.floor: float | None = None
        self.rule = None
        if config.dedup_rule == "kept":
            from deldist.kept_rule import KeptRule
            from deldist.runtime import init_ray

            init_ray()
            self.floor = float(scores.manifest["neighbour_floor"])
            self.rule = KeptRule(config, scores, candidate, layout.embeddings, dim, self.floor,
                                 layout.scratch("sweep", config.name))

    def kept(self, t: float) -> np.ndarray | None:
        if self.rule is None:
            return self.candidate & ~any_earlier_duplicates(self.candidate, self.first, self.max_sim, t)
        if t < self.floor:
            return None
        return self.rule.kept_rows(t, self.candidate)

    def search(self, ratio: float) -> tuple[float, bool, np.ndarray]:
        """The threshold select finds for ``ratio``, whether it is within the tolerance, the kept rows."""
        if self.rule is None:
            t, reachable = threshold_for_ratio(self.max_sim, self.first, self.candidate, int(round(ratio * self.n)))
            return t, reachable, self.kept(t)
        threshold, info = self.rule.search(ratio, self.config.ratio_tolerance)
        return threshold, bool(info["target_reachable"]), self.kept(threshold)


def sweep_rows(grid: DuplicateGrid, config: Config, group: np.ndarray, names: list[str],
               progress: Callable[[str], None]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """kept_by_eps and kept_by_ratio rows (see the module doc)."""
    by_eps: list[dict[str, Any]] = []
    for eps in config.eps_grid:
        t = 1.0 - float(eps)  # as select computes it
        kept = grid.kept(t)
        by_eps += count_rows(kept, grid.candidate, group, names, eps=eps, similarity_threshold=t,
                             evaluated=kept is not None, meddel_table2_ratio=table2_ratio(eps))
        progress(f"eps {eps:g}: {by_eps[-len(names) - 1]['kept']} kept")
    by_ratio: list[dict[str, Any]] = []
    for ratio in config.ratio_grid:
        t, reachable, kept = grid.search(ratio)
        by_ratio += count_rows(kept, grid.candidate, group, names, target_ratio=ratio, reachable=reachable,
                               **threshold_columns(t))
        progress(f"target ratio {ratio:g}: similarity threshold {t:.4f}, {by_ratio[-len(names) - 1]['kept']} kept")
    return by_eps, by_ratio


def _overall(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in ("dataset", "input", "candidates")} for r in rows
            if r["dataset"] == ALL]


def _plot(by_eps: list[dict[str, Any]], names: list[str], edges: np.ndarray,
          histograms: dict[str, np.ndarray]) -> bytes:
    curves = {}
    for label in [ALL, *names]:
        rows = [r for r in by_eps if r["dataset"] == label and r["ratio"] is not None and r["eps"] > 0]
        curves[label] = (np.array([r["eps"] for r in rows]), np.array([r["ratio"] for r in rows]))
    reference = {round(1.0 - t, 4): ratio for t, (_, ratio) in MEDDEL_TABLE2.items() if t < 1}
    return similarity_png(edges, histograms, curves, reference)


def run(config: Config) -> dict[str, Any]:
    """Sweep the selection's duplicate rule and publish ``sweeps/<name>/`` (see the module doc)."""
    started = time.perf_counter()
    sel = config.selection_config()
    name = config.name or sel.name
    layout = RunLayout.of(sel)
    storage.check_inputs_current(layout.clusters, "deldist cluster")
    storage.check_inputs_current(layout.scores, "deldist dedup")
    meta = read_frames(layout, sel.deldist_rules, also=("dataset",))
    ids = meta.column("id").chunk(0)
    dim = storage.read_manifest(layout.embeddings).get("dim")
    decision = apply_rules(sel, meta, ids, layout, dim)  # no eps, no target_ratio: every rule but duplicates
    candidate = decision.reason < 0
    # the dataset names as select's summary spells them (per_dataset), sorted; group: (n,) codes
    unique, group = np.unique(meta.column("dataset").to_numpy(zero_copy_only=False).astype(str), return_inverse=True)
    names = [str(d) for d in unique]
    log.info(f"deldist sweep {name}: {int(candidate.sum())} of {len(ids)} items pass the rules before the "
             f"duplicates; {len(config.eps_grid)} eps values, {len(config.ratio_grid)} target ratios")
    grid = DuplicateGrid(sel, layout, ids, candidate, dim)
    try:
        by_eps, by_ratio = sweep_rows(grid, config, group, names, lambda m: log.info(f"deldist sweep {name}: {m}"))
    finally:
        if grid.rule is not None:
            grid.rule.close()
    edges = similarity_edges(config.histogram_min_eps, config.histogram_bins_per_decade)
    hist_rows, histograms = histogram_rows(grid.max_sim, candidate & ~grid.first, group, names, edges)
    summary = {
        "name": name, "selection": sel.name, "method": sel.method, "dedup_rule": sel.dedup_rule,
        "input_count": len(ids), "candidate_count": int(candidate.sum()),
        "removed_before_duplicates": counts_by_reason(decision.reason), "rules": decision.rules,
        "neighbour_floor": grid.floor, "datasets": names,
        "histogram": {"bins": len(edges) - 1, "min_eps": config.histogram_min_eps,
                      "bins_per_decade": config.histogram_bins_per_decade, "items": int(histograms[ALL].sum()),
                      "items_by_dataset": {d: int(histograms[d].sum()) for d in names}},
        "kept_by_eps": _overall(by_eps), "kept_by_ratio": _overall(by_ratio),
        "exact_fallback_gathers": grid.rule.fallback.gathers if grid.rule is not None else None,
        "parameters": {**config.model_dump(mode="json", exclude={"select"}), "select": sel.model_dump(mode="json")},
        "files": FILES, "seconds": time.perf_counter() - started,
    }
    out = publish_sweep(layout, name, {"eps": by_eps, "ratio": by_ratio, "histogram": hist_rows},
                        _plot(by_eps, names, edges, histograms), summary)
    log.info(f"deldist sweep {name}: {out} in {summary['seconds']:.1f} s")
    return {"sweep": out, "input_count": len(ids), "candidate_count": summary["candidate_count"],
            "histogram_items": summary["histogram"]["items"],
            "kept_by_eps": {str(r["eps"]): r["kept"] for r in summary["kept_by_eps"]},
            "kept_by_ratio": {str(r["target_ratio"]): r["kept"] for r in summary["kept_by_ratio"]}}


def publish_sweep(layout: RunLayout, name: str, tables: dict[str, list[dict[str, Any]]], png: bytes,
                  summary: dict[str, Any]) -> str:
    """``sweeps/<name>/``: the CSVs, the plot, summary.json, then the manifest and ``_SUCCESS``
    (the old ``_SUCCESS`` goes first, so a half-rewritten sweep is never taken for a published one)."""
    out = layout.sweep(name)
    success = storage.join(out, storage.SUCCESS)
    if storage.exists(success):
        fs, path = storage.resolve(success)
        fs.delete_file(path)
    for key, rows in tables.items():
        storage.write_csv(storage.join(out, FILES[key]), rows)
    storage.write_bytes(storage.join(out, FILES["plot"]), png)
    storage.write_json(storage.join(out, FILES["summary"]), summary)
    inputs = [d for d in (layout.embeddings, layout.clusters, layout.scores) if storage.is_published(d)]
    storage.publish(out, [storage.resolve(storage.join(out, f))[1] for f in FILES.values()],
                    {"name": name, "selection": summary["selection"], "outputs": FILES,
                     **storage.stage_fingerprint(summary["parameters"], inputs)})
    return out
