"""Selections from the dedup scores: MedDEL, SemDeDup, random, and deldist's own rules.

A selection partitions every embedded id into ``retained`` and ``removed`` (with a reason).
Rules run in this order; an id removed by one keeps that reason, and an id removed by any
rule never causes another removal (only kept items stand for removed ones):

=============  ==============================================  ==========================
reason         rule                                            from
=============  ==============================================  ==========================
``invalid``    quality statistics: black, over-exposed, flat,  deldist (``deldist_rules.
               blurred (:class:`InvalidThresholds`)            quality``)
``outlier``    cosine distance to the centroid above           MedDEL §3.2: "data points
               ``outlier_distance`` (0.9 for ``meddel``)       far from the cluster
                                                               centroid are considered
                                                               disruptive or invalid"
``outlier``    above the ``outlier_quantile`` of the item's    deldist (``deldist_rules.
               own cluster's distances                         outlier_quantile``)
``temporal``   consecutive sampled frames of one video within  deldist (``deldist_rules.
               ``temporal_threshold`` of the last kept frame   temporal_threshold``)
``near_copy``  perceptual hash within ``max_hamming`` of a     deldist (``deldist_rules.
               kept frame, any cluster, any video              near_copy``)
``duplicate``  cosine similarity above ``1 - eps`` to an       MedDEL §3.2 / SemDeDup
               earlier-ranked item of the same cluster
=============  ==============================================  ==========================

MedDEL (Yang et al. 2024, §3.2): "we retain a set of features that are closer to the cluster
center": within a cluster the items are ranked nearest-first (``dedup.keep: easy``) and the
earlier-ranked copy stays. The paper's distance threshold is fixed at 0.9; its symbols were
lost in the text we have, so deldist reads it as cosine distance to the centroid > 0.9. Its
similarity thresholds run from 0.9 to 0.7 (Table 2, :data:`MEDDEL_TABLE2`); the fractions
kept there are properties of their 88,282 frames: ``target_ratio`` finds the threshold that
keeps a fraction of ours, with no similarity recomputed.

Duplicates, two rules (``dedup_rule``):

- ``kept`` (default for ``meddel``): an item is removed only when it is more similar than the
  threshold to an earlier-ranked item that is *kept*; its ``duplicate_of`` is such an item
  (the most similar one its neighbour list holds). A group of copies therefore always keeps a member, also when its first
  member was removed as invalid or outlier. Resolved from the neighbour lists the dedup
  stage stored (:class:`deldist.pairwise.NeighbourLists`) in rank order
  (:func:`deldist.greedy.resolve_kept`), on actors that each hold a share of the clusters
  (:mod:`deldist.kept_rule`: the driver reads no lists); the clusters where a list cannot decide
  (all its listed neighbours above the threshold were removed, and an unlisted one might be
  above it) are computed exactly from the vectors (:func:`deldist.pairwise.keep_first_exact`,
  Ray tasks). A threshold sweep or a ``target_ratio`` search never reruns the pairwise stage.
- ``any_earlier`` (default for ``semdedup``): SemDeDup's reference code: removed when the
  similarity to *any* earlier-ranked item of the cluster exceeds the threshold, kept or
  not; ``duplicate_of`` is that item, which may itself be removed.

``method``: ``meddel`` (nearest-first rank, the 0.9 outlier rule, ``kept``), ``semdedup``
(Abbas et al. 2023: farthest-first rank, no outlier rule, ``any_earlier``) or ``random`` (the
paper's ablation: a seeded uniform sample of ``target_ratio`` or of the kept ratio of
``match_selection``). The rank order is the dedup stage's ``keep``; a method refuses scores
ranked the other way. deldist's own rules run only when named under ``deldist_rules``.

Removed rows: ``duplicate_of`` is the retained item that stands for the removed one (for
``temporal`` / ``near_copy`` whose matched frame was later removed itself: the retained
item standing for that frame); ``max_sim`` is the similarity the rule measured (cosine; for
``near_copy`` 1 - Hamming distance / 64).

Output under ``<output>/selections/<name>/``: ``retained/`` (id, source, frame_index,
timestamp_s, dataset: deldist adds these to DESIGN.md's id-only table, so a reader needs no
join back to embeddings) and ``removed/`` (id, reason, duplicate_of, max_sim) as published
tables, written part by part (:mod:`deldist.selection_tables`), ``summary.json`` (input count,
kept count, ratio, counts per reason, per dataset, ``rules``: each rule that ran, where it comes from, its
parameters and what it removed; ground-truth metrics when ``ground_truth`` is set), then the
directory's own manifest and ``_SUCCESS``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from deldist import storage
from deldist.config import StageConfig
from deldist.groundtruth import ground_truth_metrics
from deldist.kept_rule import dedup_kept
from deldist.layout import RunLayout
from deldist.rules import (
    Decision,
    DeldistRules,
    counts_by_reason,
    invalid_mask,
    near_copy_order,
    outlier_mask,
    random_decision,
    temporal_savings,
)
from deldist.schema import QUALITY_COLUMNS
from deldist.select_ray import Scores, dedup_any_earlier, stored_rows, temporal_rule
from deldist.selection_tables import per_dataset_summary, publish_selection, stand_in_rows, write_tables
from deldist.shards import EmptyInputError, read_files

# similarity threshold (1 - eps) -> (frames retained, fraction retained) in MedDEL's Table 2
MEDDEL_TABLE2: dict[float, tuple[int, float]] = {
    1.0: (88_282, 1.00), 0.9: (43_484, 0.50), 0.85: (28_352, 0.33),
    0.8: (16_789, 0.20), 0.75: (9_055, 0.10), 0.7: (4_461, 0.05),
}


# what each method fixes: the dedup stage's rank order, the outlier distance, the dedup rule
log = logging.getLogger(__name__)

METHODS: dict[str, dict[str, Any]] = {
    "meddel": {"keep": "easy", "outlier_distance": 0.9, "dedup_rule": "kept"},
    "semdedup": {"keep": "hard", "outlier_distance": None, "dedup_rule": "any_earlier"},
}
PAPER_RULE = {"outlier_distance": "MedDEL §3.2 (distance threshold 0.9, read as cosine distance)",
              "duplicate": {"meddel": "MedDEL §3.2 / Table 2 (SemDeDup within k-means clusters, nearest-first)",
                            "semdedup": "SemDeDup (Abbas et al. 2023, farthest-first)"}}


class Config(StageConfig):
    """``deldist select`` settings."""

    output: str = Field(description="run root URI")
    name: str = Field("default", description="selection name: <output>/selections/<name>")
    method: Literal["meddel", "semdedup", "random"] = "meddel"
    eps: float | None = Field(None, ge=0, le=2, description="remove duplicates above similarity 1 - eps")
    target_ratio: float | None = Field(None, gt=0, le=1, description="keep this fraction of the input")
    ratio_tolerance: float = Field(0.005, ge=0, le=1, description="target_ratio: the kept fraction may differ by this")
    match_selection: str | None = Field(None, description="random: copy the kept ratio of this selection")
    outlier_distance: float | None = Field(None, ge=0, description="remove cosine distance to the centroid above "
                                                                   "(meddel: 0.9, the paper's)")
    dedup_rule: Literal["kept", "any_earlier"] | None = Field(None, description="kept: duplicates of kept items only "
                                                                                "(meddel); any_earlier: SemDeDup's")
    deldist_rules: DeldistRules = Field(default_factory=DeldistRules)
    ground_truth: str | None = Field(None, description="Parquet with source_key, frame_index, scene_id, invalid")
    seed: int = 0
    embeddings: str | None = None
    clusters: str | None = None
    scores: str | None = None
    # Ray wiring of the temporal rule and of the exact fallback
    shard_rows: int = Field(65_536, ge=1)
    io_cpus: float = Field(0.5, gt=0)
    task_cpus: float = Field(1.0, gt=0)
    block_rows: int = Field(512, ge=1, description="exact fallback: rows per block")
    kept_shards: int | None = Field(None, ge=0, description="kept rule: actors holding the neighbour lists (0: in "
                                                             "the driver; default: one per task slot from 1M items)")
    memory_budget_gb: float | None = Field(None, gt=0, description="exact fallback: vectors one wave of its "
                                                                     "shuffle may hold in the object store "
                                                                     "(default: half of it)")

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            method = METHODS.get(data.get("method") or "meddel")
            if method is not None:
                data = {**data}
                data.setdefault("outlier_distance", method["outlier_distance"])
                data["dedup_rule"] = data.get("dedup_rule") or method["dedup_rule"]
        return data

    @model_validator(mode="after")
    def _one_ratio_rule(self) -> "Config":
        if self.eps is not None and self.target_ratio is not None:
            raise ValueError("give eps or target_ratio, not both")
        if self.method == "random":
            if (self.target_ratio is None) == (self.match_selection is None):
                raise ValueError("method=random needs exactly one of target_ratio or match_selection")
            if self.eps is not None:
                raise ValueError("method=random takes no eps")
        elif self.match_selection is not None:
            raise ValueError("match_selection applies to method=random only")
        return self


# ----------------------------------------------------------------------------- the selection


def apply_rules(config: Config, meta: pa.Table, ids: pa.Array, layout: RunLayout, dim: int | None) -> Decision:
    """Every rule of a ``meddel`` / ``semdedup`` selection, in the module doc's order, on the
    frames of ``meta`` (ids, sources, frame indices, quality columns; ``phash`` for near copies)."""
    extra = config.deldist_rules
    cluster = distance = None
    if config.outlier_distance is not None or extra.outlier_quantile is not None or extra.temporal_threshold is not None:
        stored = storage.read_published(layout.assignments, ["id", "cluster", "distance"])
        row = stored_rows(ids, stored.column("id"), layout.assignments)
        cluster = stored.column("cluster").to_numpy()[row]  # not the ids: they stay in the driver otherwise
        distance = stored.column("distance").to_numpy()[row]
        del stored, row
        pa.default_memory_pool().release_unused()
    decision = apply_filters(config, meta, cluster, distance, layout.embeddings, dim)
    _log_rules(config.name, decision, 0)
    if extra.near_copy is not None:
        _near_copy_rule(config, meta, ids, decision)
        _log_rules(config.name, decision, len(decision.rules) - 1)
    if config.eps is not None or config.target_ratio is not None:
        _duplicate_rule(config, ids, layout, dim, decision)
        _log_rules(config.name, decision, len(decision.rules) - 1)
    return decision


def _log_rules(name: str, decision: Decision, first: int) -> None:
    for rule in decision.rules[first:]:
        log.info(f"deldist select {name}: {rule['rule']} ({rule['by']}) removed {rule['removed']}, "
                 f"{int((decision.reason < 0).sum())} of {len(decision.reason)} still kept")


def apply_filters(config: Config, meta: pa.Table, cluster: np.ndarray | None, distance: np.ndarray | None,
                  emb_dir: str, dim: int | None, quantile_limit: np.ndarray | None = None) -> Decision:
    """The rules before the near copies and duplicates: deldist's quality filter, MedDEL's
    outlier distance, deldist's outlier quantile and temporal collapse. cluster / distance:
    (n,) each frame's cluster and cosine distance to its centroid (needed by the outlier and
    temporal rules); quantile_limit: (n,) each frame's outlier-quantile distance when the caller
    computes it over more than these frames (curate-new: corpus + uploads)."""
    n = meta.num_rows
    decision = Decision.empty(n)
    extra = config.deldist_rules
    if extra.quality is not None and n:
        sources = pc.dictionary_encode(meta.column("source").combine_chunks()).indices.to_numpy()
        quality = {c: meta.column(c).to_numpy(zero_copy_only=False) for c in QUALITY_COLUMNS}
        masks = invalid_mask(quality, extra.quality, sources, meta.column("frame_index").to_numpy())
        decision.remove(np.logical_or.reduce([np.zeros(n, bool), *masks.values()]), "invalid", "quality", "deldist",
                        extra.quality.model_dump(), flagged_by_check={k: int(m.sum()) for k, m in masks.items()})
    if config.outlier_distance is not None:
        decision.remove(outlier_mask(cluster, distance, config.outlier_distance), "outlier", "outlier_distance",
                        PAPER_RULE["outlier_distance"] if config.outlier_distance == 0.9 else "MedDEL §3.2 (distance "
                        "to the centroid; the paper fixes 0.9)", {"outlier_distance": config.outlier_distance})
    if extra.outlier_quantile is not None and n:
        mask = outlier_mask(cluster, distance, quantile=extra.outlier_quantile) if quantile_limit is None \
            else np.asarray(distance) > quantile_limit
        decision.remove(mask, "outlier", "outlier_quantile", "deldist", {"outlier_quantile": extra.outlier_quantile})
    if extra.temporal_threshold is not None and n:
        from deldist.runtime import init_ray

        init_ray()
        collapsed, rep_row, sim = temporal_rule(config, emb_dir, dim, meta, decision.reason < 0)
        decision.remove(collapsed, "temporal", "temporal", "deldist", {"temporal_threshold": extra.temporal_threshold},
                        link=rep_row, score=sim)
        decision.info["temporal_collapse"] = (collapsed, cluster)
    return decision


def _near_copy_rule(config: Config, meta: pa.Table, ids: pa.Array, decision: Decision) -> None:
    from deldist.nearcopy import chance_pairs, near_copies, ray_pair_finder
    from deldist.runtime import init_ray

    rule = config.deldist_rules.near_copy
    assert rule is not None
    if "phash" not in meta.column_names:
        raise ValueError("the near-copy rule needs the embeddings' phash column (embedded by deldist >= 0.2); "
                         "re-run embed into a fresh output")
    init_ray()
    near, copy_of, hamming = near_copies(
        meta.column("phash").to_numpy(), decision.reason < 0, near_copy_order(meta.column("blur").to_numpy(), ids),
        rule.max_hamming, pair_finder=ray_pair_finder(rule.task_cpus))
    decision.remove(near, "near_copy", "near_copy", "deldist", rule.model_dump(), link=copy_of,
                    score=(1.0 - hamming / 64.0).astype(np.float32),
                    keep_order="sharpest first (highest variance of the Laplacian), ties by id",
                    chance_pairs=chance_pairs(int((decision.reason < 0).sum()), rule.max_hamming))


def read_scores(config: Config, ids: pa.Array, layout: RunLayout, also: tuple[str, ...] = ()) -> Scores:
    """dedup's scores for the rows of ``ids`` (:class:`~deldist.select_ray.Scores`): for the kept
    rule each row's cluster and where its parts are (its shards read the neighbour lists
    themselves), for SemDeDup's rule cluster, rank, max_sim and duplicate_of; ``also``: more
    columns to align; refuses scores ranked for another method or without lists."""
    expected = METHODS[config.method]["keep"]
    manifest = storage.read_manifest(layout.scores)
    if manifest.get("keep") != expected:
        raise ValueError(f"method {config.method} ranks each cluster keep={expected} but {layout.scores} was "
                         f"ranked keep={manifest.get('keep')}; re-run dedup with keep: {expected}")
    if config.dedup_rule != "kept":
        columns = list(dict.fromkeys(["cluster", "rank", "max_sim", "duplicate_of", *also]))
        stored = storage.read_published(layout.scores, ["id", *columns])
        row = stored_rows(ids, stored.column("id"), layout.scores)
        return Scores(stored.select(columns).take(pa.array(row)), None, None, manifest)
    if "neighbour_floor" not in manifest:
        raise ValueError(f"{layout.scores} has no neighbour lists (an older dedup run); re-run dedup")
    paths = storage.published_paths(layout.scores)[1]
    columns = list(dict.fromkeys(["cluster", *also]))
    pieces = read_files(layout.scores, paths, ["id", *columns])
    stored = pa.concat_tables(pieces)
    row = stored_rows(ids, stored.column("id"), layout.scores)
    return Scores(stored.select(columns).take(pa.array(row)), None, row, manifest, source_dir=layout.scores,
                  parts=[(path, piece.num_rows) for path, piece in zip(paths, pieces)])


def _duplicate_rule(config: Config, ids: pa.Array, layout: RunLayout, dim: int | None, decision: Decision) -> None:
    expected = METHODS[config.method]["keep"]
    scores = read_scores(config, ids, layout)
    pa.default_memory_pool().release_unused()
    manifest = scores.manifest
    candidate = decision.reason < 0
    if config.dedup_rule == "kept":
        from deldist.runtime import init_ray

        init_ray()
        duplicate, link, score, info = dedup_kept(config, scores, candidate, layout.embeddings, dim,
                                                  float(manifest["neighbour_floor"]),
                                                  layout.scratch("select", config.name))
    else:
        duplicate, link, score, info = dedup_any_earlier(config, scores, candidate, ids)
    if config.eps is not None:
        paper = MEDDEL_TABLE2.get(round(1.0 - config.eps, 4))
        if paper:
            info["meddel_table2_ratio_at_this_threshold"] = paper[1]
    decision.remove(duplicate, "duplicate", "duplicate", PAPER_RULE["duplicate"][config.method],
                    {"dedup_rule": config.dedup_rule, "rank": expected, "eps": config.eps,
                     "target_ratio": config.target_ratio}, link=link, score=score, **info)
    decision.info.update(info)


def run(config: Config) -> dict[str, Any]:
    """Build selection ``config.name`` and publish it (see the module doc)."""
    started = time.perf_counter()
    layout = RunLayout.of(config)
    if config.method != "random":
        storage.check_inputs_current(layout.clusters, "deldist cluster")
        storage.check_inputs_current(layout.scores, "deldist dedup")
    meta = read_frames(layout, config.deldist_rules)
    ids = meta.column("id").chunk(0)
    if config.method == "random":
        decision = _random_sample(config, ids, layout)
    else:
        decision = apply_rules(config, meta, ids, layout, storage.read_manifest(layout.embeddings).get("dim"))
    del meta  # the rules' columns; ids stays (its own chunk)
    strict = config.method == "random" or config.dedup_rule == "kept"
    written = write_tables(layout, config.name, ids, decision, stand_in_rows(decision, strict), config.io_cpus)
    summary = summarize(config, ids, decision, per_dataset_summary(written.per_dataset))
    summary["seconds"] = time.perf_counter() - started
    publish_selection(layout, config.name, summary)
    log.info(f"deldist select {config.name}: kept {summary['kept_count']} of {summary['input_count']} "
             f"-> {layout.selection(config.name)}")
    return {"selection": layout.selection(config.name),
            **{k: summary[k] for k in ("input_count", "kept_count", "ratio", "removed_by_reason")}}


def read_frames(layout: RunLayout, rules: DeldistRules | None = None, also: tuple[str, ...] = ()) -> pa.Table:
    """The embedded frames' columns the selection's rules read (no vectors): id; source and
    frame_index for deldist's quality and temporal rules, its quality columns (20 bytes per
    frame) for the quality rule, ``phash`` and ``blur`` for the near-copy rule; ``also``: more
    columns. The retained table's own columns are read by its writers
    (:mod:`deldist.selection_tables`), not here. Checked: not empty, ids unique. ``id`` is one
    chunk: ``meta.column("id").chunk(0)``."""
    rules = rules or DeldistRules()
    columns = ["id"]
    if rules.quality is not None or rules.temporal_threshold is not None:
        columns += ["source", "frame_index"]
    if rules.quality is not None:
        columns += QUALITY_COLUMNS
    if rules.near_copy is not None:
        columns += ["phash", "blur"]
    meta = storage.read_published(layout.embeddings, columns=list(dict.fromkeys([*columns, *also])))
    if meta.num_rows == 0:
        raise EmptyInputError(f"{layout.embeddings} has no rows: nothing to select from")
    if pc.count_distinct(meta.column("id")).as_py() != meta.num_rows:
        raise ValueError(f"{layout.embeddings} holds duplicate ids")
    # one chunk, so the rules' pa.Array of the ids is this column, not a second copy of every id
    meta = meta.set_column(0, "id", meta.column("id").combine_chunks())
    pa.default_memory_pool().release_unused()  # the read's buffers
    return meta


def _random_sample(config: Config, ids: pa.Array, layout: RunLayout) -> Decision:
    """The paper's ablation: a seeded uniform sample of ``target_ratio`` or of the kept ratio
    of ``match_selection``."""
    decision = Decision.empty(len(ids))
    ratio = config.target_ratio
    if config.match_selection is not None:
        ratio = float(storage.read_json(layout.selection_summary(config.match_selection))["ratio"])
        decision.info["matched_selection"] = config.match_selection
    assert ratio is not None
    decision.remove(random_decision(ids, ratio, config.seed) >= 0, "random", "random", "MedDEL's ablation "
                    "(a seeded uniform sample)", {"ratio": ratio, "seed": config.seed})
    decision.info["target_ratio"] = ratio
    return decision


def summarize(config: Config, ids: pa.Array, decision: Decision, per_dataset: dict[str, Any]) -> dict[str, Any]:
    """``summary.json``: counts, ratio, removals per reason and per dataset
    (:func:`~deldist.selection_tables.per_dataset_summary`), the rules that ran, the parameters,
    the rules' figures, and the ground-truth metrics when configured."""
    reason = decision.reason
    n = len(reason)
    kept = reason < 0
    info = {k: v for k, v in decision.info.items() if k != "temporal_collapse"}
    if "temporal_collapse" in decision.info:
        info["temporal"] = temporal_savings(*decision.info["temporal_collapse"])
    summary = {
        "name": config.name, "method": config.method, "dedup_rule": config.dedup_rule,
        "input_count": n, "kept_count": int(kept.sum()), "removed_count": int((~kept).sum()),
        "ratio": float(kept.mean()), "removed_by_reason": counts_by_reason(reason), "rules": decision.rules,
        "per_dataset": per_dataset, "parameters": config.model_dump(mode="json"), **info,
    }
    if config.ground_truth:
        gt = storage.read_published(config.ground_truth) if storage.is_published(config.ground_truth) else \
            storage.read_table(config.ground_truth)
        summary["ground_truth"] = ground_truth_metrics(ids, kept, gt, random_seed=config.seed)
    return summary
