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
  (:func:`deldist.greedy.keep_first_in_order`); the clusters where a list cannot decide (all
  its listed neighbours above the threshold were removed, and an unlisted one might be
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

Output under ``<output>/selections/<name>/``: ``retained/`` (id) and ``removed/`` (id, reason,
duplicate_of, max_sim) as published tables, ``summary.json`` (input count, kept count, ratio,
counts per reason, per dataset, ``rules``: each rule that ran, where it comes from, its
parameters and what it removed; ground-truth metrics when ``ground_truth`` is set), then the
directory's own manifest and ``_SUCCESS``.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from deldist import storage
from deldist.arrays import equal_runs
from deldist.config import StageConfig
from deldist.greedy import best_kept_link, keep_first_in_order
from deldist.schema import QUALITY_COLUMNS, REMOVED_SCHEMA, RETAINED_SCHEMA
from deldist.shards import EmptyInputError

# similarity threshold (1 - eps) -> (frames retained, fraction retained) in MedDEL's Table 2
MEDDEL_TABLE2: dict[float, tuple[int, float]] = {
    1.0: (88_282, 1.00), 0.9: (43_484, 0.50), 0.85: (28_352, 0.33),
    0.8: (16_789, 0.20), 0.75: (9_055, 0.10), 0.7: (4_461, 0.05),
}

REASONS: tuple[str, ...] = ("invalid", "outlier", "temporal", "near_copy", "duplicate", "random")

# what each method fixes: the dedup stage's rank order, the outlier distance, the dedup rule
METHODS: dict[str, dict[str, Any]] = {
    "meddel": {"keep": "easy", "outlier_distance": 0.9, "dedup_rule": "kept"},
    "semdedup": {"keep": "hard", "outlier_distance": None, "dedup_rule": "any_earlier"},
}
PAPER_RULE = {"outlier_distance": "MedDEL §3.2 (distance threshold 0.9, read as cosine distance)",
              "duplicate": {"meddel": "MedDEL §3.2 / Table 2 (SemDeDup within k-means clusters, nearest-first)",
                            "semdedup": "SemDeDup (Abbas et al. 2023, farthest-first)"}}


class SelectionInvariantError(RuntimeError):
    """retained and removed do not partition the input ids, or a removed item does not point
    at a retained one."""


class InvalidThresholds(BaseModel):
    """Invalid-frame rules on ``deldist.frames.quality_stats`` (brightness / contrast in
    [0, 1], blur = variance of the Laplacian of 0-255 luma, saturated / dark = pixel
    fractions). ``None`` disables a rule. A frame is invalid when any enabled rule fires."""

    model_config = ConfigDict(extra="forbid")

    min_brightness: float | None = Field(0.06, description="black: mean luma below")
    max_dark: float | None = Field(0.9, description="black: fraction of near-black pixels above")
    max_brightness: float | None = Field(0.92, description="over-exposed: mean luma above")
    max_saturated: float | None = Field(0.5, description="over-exposed: fraction of saturated pixels above")
    min_contrast: float | None = Field(0.01, description="flat frame: luma std below")
    min_blur: float | None = Field(None, description="blurred: Laplacian variance below (scale-dependent: off by default)")
    blur_relative: float | None = Field(
        0.2, description="blurred: Laplacian variance below this fraction of its source's median "
                         "(adapts to each video's texture; a one-frame source is never flagged)")
    blur_window: int | None = Field(
        None, ge=1, description="relative blur: the median over this many sampled frames on each side "
                                "instead of the whole source (videos whose scenes differ in texture)")


class NearCopyRule(BaseModel):
    """deldist's near-copy rule (:mod:`deldist.nearcopy`)."""

    model_config = ConfigDict(extra="forbid")

    max_hamming: int = Field(10, ge=0, le=32, description="Hamming distance of 64-bit perceptual hashes at or "
                                                          "below which a frame is a copy of a kept frame (lower it "
                                                          "for runs of millions of frames: see chance_pairs)")
    task_cpus: float = Field(1.0, gt=0, description="CPUs per join task")


class DeldistRules(BaseModel):
    """deldist's own rules, not in MedDEL or SemDeDup; each runs only when set."""

    model_config = ConfigDict(extra="forbid")

    quality: InvalidThresholds | None = Field(None, description="remove invalid frames (black, over-exposed, flat, "
                                                                "blurred); {} for the defaults")
    outlier_quantile: float | None = Field(None, gt=0, le=1, description="remove items beyond this quantile of their "
                                                                         "own cluster's distances to the centroid")
    temporal_threshold: float | None = Field(None, ge=-1, le=1, description="collapse consecutive frames of a video "
                                                                            "above this cosine similarity")
    near_copy: NearCopyRule | None = Field(None, description="remove perceptual-hash copies of kept frames; {} for "
                                                             "the defaults")


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


# ----------------------------------------------------------------------------- math (pure)


def group_median(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(n,) median of ``values`` (n,) within each item's group (groups: (n,) int codes)."""
    values = np.asarray(values, np.float64)
    order = np.lexsort((values, groups))
    starts, stops = equal_runs(groups[order])
    medians = np.array([np.median(values[order[a:b]]) for a, b in zip(starts, stops)])
    out = np.empty(len(values))
    out[order] = np.repeat(medians, stops - starts)
    return out


def local_median(values: np.ndarray, groups: np.ndarray, order: np.ndarray, window: int,
                 chunk: int = 65_536) -> np.ndarray:
    """(n,) float64: for each item, the median of ``values`` (n,) over the items of its group
    (groups: (n,) int codes) within ``window`` positions on each side when the group is sorted
    by ``order`` (n,), e.g. frame index. NaN values are left out. Windows are built in chunks of
    rows: (chunk, 2 * window + 1) at a time."""
    values = np.asarray(values, np.float64)
    n = len(values)
    out = np.empty(n)
    if not n:
        return out
    by_position = np.lexsort((np.asarray(order), groups))
    v = np.pad(values[by_position], window, constant_values=np.nan)
    g = np.pad(np.asarray(groups)[by_position].astype(np.int64), window, constant_values=-1)
    width = 2 * window + 1
    v_windows = np.lib.stride_tricks.sliding_window_view(v, width)  # row i: positions i-window..i+window
    g_windows = np.lib.stride_tricks.sliding_window_view(g, width)
    sorted_out = np.empty(n)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        block = np.where(g_windows[a:b] == g_windows[a:b, window:window + 1], v_windows[a:b], np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows: NaN, never flagged
            sorted_out[a:b] = np.nanmedian(block, axis=1)
    out[by_position] = sorted_out
    return out


def invalid_mask(quality: dict[str, np.ndarray], rules: InvalidThresholds,
                 groups: np.ndarray | None = None, frame_index: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per rule, a bool (n,) mask of frames it flags. quality: column -> float (n,) (NaN = unknown);
    groups: (n,) int source codes for the relative blur rule (skipped without them); frame_index:
    (n,) frame order within each source, for its ``blur_window`` form."""
    def col(name: str) -> np.ndarray:
        return np.asarray(quality[name], dtype=np.float64)

    masks: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore"):
        if rules.min_brightness is not None:
            masks["dark"] = col("brightness") < rules.min_brightness
        if rules.max_dark is not None:
            masks["dark"] = masks.get("dark", False) | (col("dark") > rules.max_dark)
        if rules.max_brightness is not None:
            masks["overexposed"] = col("brightness") > rules.max_brightness
        if rules.max_saturated is not None:
            masks["overexposed"] = masks.get("overexposed", False) | (col("saturated") > rules.max_saturated)
        if rules.min_contrast is not None:
            masks["flat"] = col("contrast") < rules.min_contrast
        if rules.min_blur is not None:
            masks["blurred"] = col("blur") < rules.min_blur
        if rules.blur_relative is not None and groups is not None and len(groups):
            if rules.blur_window is None:
                around = group_median(col("blur"), groups)
            elif frame_index is None:
                raise ValueError("blur_window needs each frame's frame_index")
            else:
                around = local_median(col("blur"), groups, frame_index, rules.blur_window)
            relative = col("blur") < rules.blur_relative * around
            masks["blurred"] = masks.get("blurred", False) | relative
    return masks


def cluster_quantiles(cluster: np.ndarray, distance: np.ndarray, quantile: float,
                      k: int | None = None) -> np.ndarray:
    """(k,) float64: the ``quantile`` of ``distance`` within each cluster (linear
    interpolation, as ``np.quantile``); NaN for a cluster with no items. cluster: (n,) int."""
    cluster = np.asarray(cluster, np.int64)
    distance = np.asarray(distance, np.float64)
    k = int(cluster.max()) + 1 if k is None and len(cluster) else (k or 0)
    out = np.full(k, np.nan)
    if not len(distance):
        return out
    order = np.lexsort((distance, cluster))
    c_sorted, d_sorted = cluster[order], distance[order]
    starts, ends = equal_runs(c_sorted)
    position = starts + quantile * (ends - 1 - starts)  # fractional index of the quantile
    lo = np.floor(position).astype(np.int64)
    hi = np.minimum(lo + 1, ends - 1)
    out[c_sorted[starts]] = d_sorted[lo] + (position - lo) * (d_sorted[hi] - d_sorted[lo])
    return out


def outlier_mask(cluster: np.ndarray, distance: np.ndarray, max_distance: float | None = None,
                 quantile: float | None = None) -> np.ndarray:
    """bool (n,): distance (n,) above ``max_distance``, or above the ``quantile`` of the
    distances in the item's own cluster (cluster: (n,) int; linear interpolation)."""
    distance = np.asarray(distance, np.float64)
    mask = np.zeros(len(distance), bool)
    if max_distance is not None:
        mask |= distance > max_distance
    if quantile is not None and len(distance):
        mask |= distance > cluster_quantiles(cluster, distance, quantile)[np.asarray(cluster, np.int64)]
    return mask


@dataclass
class NeighbourEdges:
    """The scores' neighbour lists in position space: items at positions 0..n-1 sorted by
    (cluster, rank). Entry e links ``src[e]`` to the earlier ``dst[e]`` of the same cluster
    with similarity ``sim[e]``; ``bound[p]``: no earlier item unlisted for p is more similar."""

    src: np.ndarray  # (e,) int64
    dst: np.ndarray  # (e,) int64
    sim: np.ndarray  # (e,) float32
    bound: np.ndarray  # (n,) float32
    floor: float


def resolve_kept(candidate: np.ndarray, edges: NeighbourEdges, threshold: float,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ``kept`` rule from the neighbour lists at similarity ``threshold`` (>= the floor).

    candidate: (n,) bool in position order. Returns (kept bool (n,), duplicate_of int64 (n,):
    position of the most similar earlier kept item *among the listed ones* of a removed
    candidate (ties: the earliest; an unlisted kept item may be more similar, never less
    than the threshold), -1; similarity float64 (n,), NaN; unresolved bool (n,): items kept here whose
    lists cannot rule out an unlisted kept neighbour above the threshold; they and the items
    after them in their cluster need :func:`deldist.pairwise.keep_first_exact`).
    """
    if threshold < edges.floor:
        raise ValueError(f"similarity threshold {threshold:.4f} is below the scores' neighbour floor "
                         f"{edges.floor}; re-run dedup with neighbour_floor <= {threshold:.4f}")
    candidate = np.asarray(candidate, bool)
    above = edges.sim > threshold
    src, dst, sim = edges.src[above], edges.dst[above], edges.sim[above]
    kept = keep_first_in_order(candidate, src, dst)
    dup, dup_sim = best_kept_link(kept, src, dst, sim, len(candidate))
    unresolved = kept & (edges.bound > threshold)
    return kept, dup, dup_sim, unresolved


def any_earlier_duplicates(candidate: np.ndarray, first: np.ndarray, max_sim: np.ndarray,
                           threshold: float) -> np.ndarray:
    """SemDeDup's rule: candidates whose similarity to any earlier item exceeds ``threshold``
    (first-ranked items never) -> bool (n,)."""
    return np.asarray(candidate, bool) & ~np.asarray(first, bool) & (np.asarray(max_sim, np.float64) > threshold)


def threshold_for_ratio(max_sim: np.ndarray, first: np.ndarray, candidates: np.ndarray,
                        keep_count: int) -> tuple[float, bool]:
    """``any_earlier`` rule: similarity threshold t such that keeping the candidates with
    ``max_sim <= t`` (plus every first-ranked candidate) keeps about ``keep_count`` items.

    max_sim: (n,) float; first: (n,) bool first-ranked; candidates: (n,) bool items still in
    after the other rules. Returns (t, reachable); t = -inf keeps only first-ranked items,
    +inf keeps every candidate. Exact ties at t are all kept, so the count may exceed
    ``keep_count`` by the size of the tie.
    """
    firsts = int((candidates & first).sum())
    others = np.sort(np.asarray(max_sim, np.float64)[candidates & ~first])
    slots = keep_count - firsts
    if slots <= 0:
        return -math.inf, slots == 0
    if slots >= len(others):
        return math.inf, slots == len(others)
    return float(others[slots - 1]), True


def search_threshold(count_at: Callable[[float], int], thresholds: np.ndarray, keep_count: int,
                     tolerance: int) -> tuple[float, int, bool]:
    """The threshold among ``thresholds`` (ascending) whose kept count ``count_at(t)`` is
    nearest ``keep_count``, by bisection (the count grows with t, up to the local wiggles
    of the keep-first rule; the neighbours of the crossing are checked too).
    Returns (t, its count, reachable: within ``tolerance`` of the target)."""
    seen: dict[int, int] = {}

    def at(i: int) -> int:
        if i not in seen:
            seen[i] = count_at(float(thresholds[i]))
        return seen[i]

    lo, hi = 0, len(thresholds) - 1
    if at(lo) < keep_count and at(hi) > keep_count:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if at(mid) < keep_count:
                lo = mid
            else:
                hi = mid
    for i in (lo - 1, lo + 1, hi - 1, hi + 1):
        if 0 <= i < len(thresholds):
            at(i)
    best = min(seen, key=lambda i: (abs(seen[i] - keep_count), i))
    return float(thresholds[best]), seen[best], abs(seen[best] - keep_count) <= tolerance


def follow_to_kept(link: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """The kept item each item stands for, following ``link`` (n,) int64 (-1: none) from
    removed items until a kept one: kept items are their own root; a chain that ends at a
    removed item without a link (or cycles) gives -1. Pointer jumping: log2(length) rounds."""
    kept = np.asarray(kept, bool)
    n = len(kept)
    root = np.where(kept, np.arange(n), np.asarray(link, np.int64))
    for _ in range(64):
        hop = np.maximum(root, 0)
        settled = (root < 0) | kept[hop]
        jumped = np.where(settled, root, root[hop])
        if np.array_equal(jumped, root):
            break
        root = jumped
    ok = (root >= 0) & kept[np.maximum(root, 0)]
    return np.where(ok, root, -1)


def near_copy_order(blur: np.ndarray, ids: pa.Array) -> np.ndarray:
    """deldist's preference among copies: the sharpest frame first (highest variance of the
    Laplacian; NaN last), ties by id. Returns (n,) int64 preference ranks (0 = first)."""
    sharp = np.nan_to_num(np.asarray(blur, np.float64), nan=-np.inf)
    by_id = np.empty(len(ids), np.int64)
    by_id[pc.sort_indices(ids).to_numpy()] = np.arange(len(ids))
    order = np.lexsort((by_id, -sharp))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank


def temporal_collapse(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Collapse near-identical consecutive frames of one video.

    x: (n, D) unit float32, frames in frame order. Frame 0 is kept; each later frame collapses
    into the last kept frame when their cosine similarity exceeds ``threshold``, otherwise it
    is kept and becomes the new reference. Comparing to the kept frame (not the previous
    frame) stops slow drifts from chaining a whole pan into one frame.
    Returns (representative int64 (n,): index of the kept frame it collapses into, -1 when
    kept; similarity float32 (n,) to it, 0 when kept). Cost O(n D) amortised.
    """
    n = len(x)
    rep = np.full(n, -1, np.int64)
    sim = np.zeros(n, np.float32)
    ref, i, window = 0, 1, 8
    while i < n:
        stop = min(n, i + window)
        sims = x[i:stop] @ x[ref]
        below = np.flatnonzero(sims <= threshold)
        run = below[0] if len(below) else stop - i
        rep[i:i + run] = ref
        sim[i:i + run] = sims[:run]
        if len(below):
            ref = i + run
            i = ref + 1
            window = 8
        else:
            i = stop
            window *= 2
    return rep, sim


def check_partition(all_ids: pa.Array | pa.ChunkedArray, retained: pa.Array | pa.ChunkedArray,
                    removed: pa.Array | pa.ChunkedArray) -> None:
    """Raise :class:`SelectionInvariantError` unless retained and removed hold every id of
    ``all_ids`` exactly once between them (and nothing else)."""
    n = len(all_ids)
    if len(retained) + len(removed) != n:
        raise SelectionInvariantError(f"{len(retained)} retained + {len(removed)} removed != {n} input ids")
    union = pa.chunked_array(_chunks(retained) + _chunks(removed), pa.string())
    if pc.count_distinct(union).as_py() != n:
        raise SelectionInvariantError("an id appears twice across retained and removed")
    everything = pa.chunked_array(_chunks(all_ids), pa.string()).combine_chunks()
    if not pc.all(pc.is_in(union, value_set=everything)).as_py():
        raise SelectionInvariantError("retained/removed hold ids that are not in the input")


def _chunks(a: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return list(a.chunks) if isinstance(a, pa.ChunkedArray) else [a]


def split_frame_id(ids: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """``<source key>#<frame_index>`` -> (source key strings, frame_index int64; null if none)."""
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    parts = pc.extract_regex(ids, r"^(?P<key>.*)#(?P<frame>-?[0-9]+)$")
    key = pc.struct_field(parts, "key")
    frame = pc.cast(pc.struct_field(parts, "frame"), pa.int64())
    return key, frame


def _match_ground_truth(ids: pa.Array, ground_truth: pa.Table) -> np.ndarray:
    """Row of ``ground_truth`` for each id (-1 when none). Tries the id's key as is, then
    with 1-3 leading path components stripped (ids are relative to the embed input root,
    which may sit above the ground truth's root)."""
    key, frame = split_frame_id(ids)
    gt_key = pc.binary_join_element_wise(ground_truth.column("source_key").combine_chunks(),
                                         pc.cast(ground_truth.column("frame_index"), pa.string()), "#")
    row = np.full(len(ids), -1, np.int64)
    candidates = key
    for strip in range(4):
        if strip:
            candidates = pc.replace_substring_regex(key, pattern=f"^([^/]*/){{{strip}}}", replacement="")
        joined = pc.binary_join_element_wise(candidates, pc.cast(frame, pa.string()), "#")
        position = pc.fill_null(pc.index_in(joined, value_set=gt_key), -1).to_numpy().astype(np.int64)
        fill = (row < 0) & (position >= 0)
        row[fill] = position[fill]
        if (row >= 0).all():
            break
    return row


def ground_truth_metrics(ids: pa.Array | pa.ChunkedArray | Sequence[str], kept: np.ndarray,
                         ground_truth: pa.Table, random_seed: int | None = 0) -> dict[str, Any]:
    """Selection quality against the sample generator's frame labels.

    ids: (n,) embedding ids ``<source key>#<frame_index>``; kept: (n,) bool; ground_truth:
    table with source_key, frame_index, scene_id, invalid (optional: segment_id,
    invalid_kind). Frames without a ground-truth row (e.g. still images) are left out.

    - scene_coverage: fraction of scenes with >= 1 valid embedded frame that keep >= 1 valid
      frame (a kept black frame does not cover its scene); segment_coverage likewise.
    - invalid_recall: fraction of the embedded invalid frames that were removed (any reason),
      per ``invalid_kind`` too; valid_removed: fraction of valid frames removed.
    - random_baseline: the same metrics for a seeded uniform sample of the same size (the
      paper's ablation), unless ``random_seed`` is None.
    """
    ids = pa.array(ids, pa.string()) if not isinstance(ids, (pa.Array, pa.ChunkedArray)) else ids
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    kept = np.asarray(kept, bool)
    row = _match_ground_truth(ids, ground_truth)
    matched = row >= 0
    gt = ground_truth.take(pa.array(row[matched]))
    k = kept[matched]
    invalid = (pc.fill_null(gt.column("invalid"), False).to_numpy(zero_copy_only=False).astype(bool)
               if "invalid" in gt.column_names else np.zeros(len(k), bool))
    result: dict[str, Any] = {"frames": int(matched.sum()), "frames_without_ground_truth": int((~matched).sum())}
    result.update(_coverage_and_recall(gt, k, invalid))
    if random_seed is not None and matched.any():
        random_kept = random_decision(ids, kept.sum() / len(ids), random_seed) < 0
        result["random_baseline"] = _coverage_and_recall(gt, random_kept[matched], invalid)
    return result


def _coverage_and_recall(gt: pa.Table, kept: np.ndarray, invalid: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for level in ("scene_id", "segment_id"):
        if level not in gt.column_names:
            continue
        codes = pc.dictionary_encode(gt.column(level)).combine_chunks().indices
        codes = pc.fill_null(codes, -1).to_numpy().astype(np.int64)
        counted = ~invalid & (codes >= 0)  # valid frames with a label
        present = np.zeros(int(codes.max()) + 1 if len(codes) else 0, bool)
        covered = present.copy()
        present[codes[counted]] = True
        covered[codes[counted & kept]] = True
        name = "scene" if level == "scene_id" else "segment"
        out[f"{name}s"] = int(present.sum())
        out[f"{name}_coverage"] = float(covered.sum() / present.sum()) if present.any() else None
    n_invalid = int(invalid.sum())
    out["invalid_frames"] = n_invalid
    out["invalid_removed"] = int((invalid & ~kept).sum())
    out["invalid_recall"] = out["invalid_removed"] / n_invalid if n_invalid else None
    n_valid = int((~invalid).sum())
    out["valid_removed"] = float((~invalid & ~kept).sum() / n_valid) if n_valid else None
    if "invalid_kind" in gt.column_names and n_invalid:
        kinds = gt.column("invalid_kind").to_numpy(zero_copy_only=False)
        out["invalid_recall_by_kind"] = {
            str(kind): float((~kept[invalid & (kinds == kind)]).mean())
            for kind in sorted({str(v) for v in kinds[invalid]})
        }
    return out


# ----------------------------------------------------------------------------- the selection


def random_decision(ids: pa.Array, ratio: float, seed: int) -> np.ndarray:
    """Seeded uniform sample keeping round(ratio * n) ids -> reason index (n,) int8 (-1 kept,
    else "random"). The draw is made in id order, so it does not depend on the row order."""
    n = len(ids)
    keep_count = int(round(ratio * n))
    by_id = pc.sort_indices(ids).to_numpy()
    reason = np.full(n, REASONS.index("random"), np.int8)
    reason[by_id[np.random.default_rng(seed).permutation(n)[:keep_count]]] = -1
    return reason


def _align(ids: pa.Array, table: pa.Table, what: str) -> pa.Table:
    """Rows of ``table`` (with an ``id`` column) in the order of ``ids``; every id must be
    present exactly once."""
    if table.num_rows != len(ids):
        raise ValueError(f"{what} has {table.num_rows} rows but {len(ids)} ids are embedded; re-run it")
    position = pc.index_in(ids, value_set=table.column("id"))
    if position.null_count:
        examples = ids.filter(pc.is_null(position)).slice(0, 5).to_pylist()
        raise ValueError(f"{position.null_count} embedded ids are missing from {what}, e.g. {examples}")
    return table.take(position)


def _check_found(stats: list[dict[str, Any]], expected: int, what: str) -> None:
    found = sum(s["rows"] - s["missing"] for s in stats)
    if found != expected:
        raise RuntimeError(f"found {found} of the {expected} embeddings {what} needs: the embeddings changed "
                           "since the earlier stages; re-run them")


def _temporal(config: Config, emb_dir: str, dim: int | None, meta: pa.Table, candidate: np.ndarray,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray wiring of the temporal rule over the candidates: shuffle their embeddings by
    source, collapse per video. Returns (collapsed bool (n,), representative row int64 (n,),
    similarity (n,)) aligned with ``meta``'s rows."""
    import ray

    from deldist.shards import shuffle_by_bucket

    n = meta.num_rows
    rows = np.flatnonzero(candidate)
    source_code = pc.dictionary_encode(meta.column("source")).combine_chunks().indices.to_numpy()
    n_sources = int(source_code.max()) + 1 if n else 0
    n_buckets = max(1, min(n_sources, 2 * int(ray.cluster_resources().get("CPU", 1.0) // config.task_cpus)))
    lookup = pa.table({"id": meta.column("id").take(pa.array(rows)),
                       "bucket": (source_code[rows] % n_buckets).astype(np.int32),
                       "source_code": source_code[rows].astype(np.int64),
                       "frame_index": meta.column("frame_index").to_numpy()[rows].astype(np.int64),
                       "row": rows.astype(np.int64)})
    slices_of, stats = shuffle_by_bucket(emb_dir, dim, lookup, n_buckets, config.shard_rows, config.io_cpus)
    task = ray.remote(num_cpus=config.task_cpus)(_temporal_bucket)
    pending = [task.remote(config.deldist_rules.temporal_threshold, *slices) for slices in slices_of]
    _check_found(ray.get(stats), len(rows), "the temporal rule")
    collapsed = np.zeros(n, bool)
    representative = np.full(n, -1, np.int64)
    similarity = np.zeros(n, np.float32)
    for done_rows, rep_rows, sims in ray.get(pending):
        collapsed[done_rows] = rep_rows >= 0
        representative[done_rows] = rep_rows
        similarity[done_rows] = sims
    return collapsed, representative, similarity


def _temporal_bucket(threshold: float, *slices: tuple[pa.Table, np.ndarray]) -> tuple[np.ndarray, ...]:
    """Task body: temporal collapse of every video in one bucket -> (rows, representative
    rows (-1 kept), similarity), rows being indices into the driver's table."""
    from deldist.shards import gather_sorted

    x, meta = gather_sorted(slices, keys=("source_code", "frame_index"))
    rows = meta.column("row").to_numpy()
    code = meta.column("source_code").to_numpy()
    rep_rows = np.full(len(rows), -1, np.int64)
    sims = np.zeros(len(rows), np.float32)
    if len(rows):
        for s, e in zip(*equal_runs(code)):
            rep, sim = temporal_collapse(x[s:e], threshold)
            rep_rows[s:e] = np.where(rep >= 0, rows[s + np.maximum(rep, 0)], -1)
            sims[s:e] = sim
    return rows, rep_rows, sims


class ExactFallback:
    """Ray wiring of the exact ``kept`` rule for the clusters the neighbour lists cannot
    decide: their vectors are gathered once (one shuffle of the embeddings per new set of
    clusters) and kept in the object store, so every threshold a ratio search tries reuses
    them. Positions as in :class:`NeighbourEdges`."""

    def __init__(self, config: Config, emb_dir: str, dim: int | None, ids_pos: pa.Array,
                 starts: np.ndarray, sizes: np.ndarray):
        self.config, self.emb_dir, self.dim = config, emb_dir, dim
        self.ids_pos, self.starts, self.sizes = ids_pos, starts, sizes
        self.where: dict[int, tuple[Any, int]] = {}  # cluster -> (ref of its bucket's vectors, row offset)
        self.gathers = 0

    def _gather(self, clusters: Sequence[int]) -> None:
        import ray

        from deldist.shards import gather_sorted, plan_buckets, shuffle_by_bucket

        missing = sorted(set(int(c) for c in clusters) - set(self.where))
        if not missing:
            return
        sizes = np.zeros(len(self.sizes), np.int64)
        sizes[missing] = self.sizes[missing]
        cpus = ray.cluster_resources().get("CPU", 1.0)
        buckets = plan_buckets(sizes, max(1, int(2 * cpus // self.config.task_cpus)), int(sizes.max()) + 1, 1 << 40)
        bucket_of = np.full(len(sizes), -1, np.int32)
        for b, bucket in enumerate(buckets):
            bucket_of[bucket.clusters] = b
        positions = np.concatenate([np.arange(self.starts[c], self.starts[c] + self.sizes[c]) for c in missing])
        cluster = np.repeat(np.asarray(missing, np.int64), self.sizes[missing])
        lookup = pa.table({"id": self.ids_pos.take(pa.array(positions)), "bucket": bucket_of[cluster],
                           "cluster": cluster.astype(np.int32), "rank": positions - self.starts[cluster]})
        slices_of, stats = shuffle_by_bucket(self.emb_dir, self.dim, lookup, len(buckets), self.config.shard_rows,
                                             self.config.io_cpus)
        gather = ray.remote(num_cpus=self.config.io_cpus)(lambda *slices: gather_sorted(slices)[0])
        refs = [gather.remote(*slices) for slices in slices_of]
        _check_found(ray.get(stats), len(positions), "the exact dedup fallback")
        for b, bucket in enumerate(buckets):
            offset = 0
            for c in sorted(bucket.clusters):
                self.where[c] = (refs[b], offset)
                offset += int(self.sizes[c])
        self.gathers += 1

    def run(self, clusters: Sequence[int], threshold: float, candidate: np.ndarray,
            ) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """:func:`deldist.pairwise.keep_first_exact` on each cluster -> [(cluster, kept, duplicate_of
        position, similarity)]; candidate: (n,) bool in position order."""
        import ray

        from deldist.pairwise import keep_first_exact

        self._gather(clusters)
        by_ref: dict[int, tuple[Any, list[tuple[int, int, int, np.ndarray]]]] = {}
        for c in clusters:
            ref, offset = self.where[int(c)]
            start, size = int(self.starts[c]), int(self.sizes[c])
            by_ref.setdefault(id(ref), (ref, []))[1].append((int(c), offset, size, candidate[start:start + size]))

        def exact(x: np.ndarray, spans: list[tuple[int, int, int, np.ndarray]], t: float, block_rows: int) -> list:
            return [(c, *keep_first_exact(x[o:o + z], cand, t, block_rows=block_rows)) for c, o, z, cand in spans]

        task = ray.remote(num_cpus=self.config.task_cpus)(exact)
        out = []
        for done in ray.get([task.remote(ref, spans, threshold, self.config.block_rows)
                             for ref, spans in by_ref.values()]):
            for c, kept, dup, sim in done:
                out.append((c, kept, np.where(dup >= 0, dup + self.starts[c], -1), sim))
        return out


def neighbour_edges(scores: pa.Table, position: np.ndarray, starts: np.ndarray, floor: float) -> NeighbourEdges:
    """The scores' ``neighbours`` / ``neighbour_sims`` lists (rows aligned with ``position``,
    ranks within the cluster) as :class:`NeighbourEdges` in position space."""
    nbr = scores.column("neighbours").combine_chunks()
    sims = scores.column("neighbour_sims").combine_chunks()
    counts = pc.list_value_length(nbr).to_numpy(zero_copy_only=False).astype(np.int64)
    cluster = scores.column("cluster").to_numpy().astype(np.int64)
    src_row = np.repeat(np.arange(len(counts)), counts)
    dst = starts[cluster[src_row]] + nbr.flatten().to_numpy().astype(np.int64)
    bound = np.empty(len(position), np.float32)
    bound[position] = scores.column("unlisted_max_sim").to_numpy()
    return NeighbourEdges(position[src_row], dst, sims.flatten().to_numpy().astype(np.float32), bound, floor)


def _dedup_kept(config: Config, scores: pa.Table, candidate: np.ndarray, ids: pa.Array, emb_dir: str,
                dim: int | None, floor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """The ``kept`` duplicate rule over the candidates (rows) -> (duplicate bool (n,), the row
    it duplicates int64 (n,), similarity float32 (n,), info)."""
    n = len(candidate)
    cluster = scores.column("cluster").to_numpy().astype(np.int64)
    rank = scores.column("rank").to_numpy().astype(np.int64)
    order = np.lexsort((rank, cluster))  # position -> row
    position = np.empty(n, np.int64)
    position[order] = np.arange(n)
    sizes = np.bincount(cluster, minlength=int(cluster.max()) + 1)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    if not np.array_equal(rank[order], np.arange(n) - starts[cluster[order]]):
        raise ValueError("dedup/scores ranks are not 0..n-1 within each cluster; re-run dedup")
    edges = neighbour_edges(scores, position, starts, floor)
    cand_pos = np.asarray(candidate, bool)[order]
    cluster_pos = cluster[order]
    fallback = ExactFallback(config, emb_dir, dim, ids.take(pa.array(order)), starts, sizes)
    evaluated: dict[float, tuple[np.ndarray, np.ndarray, np.ndarray, int]] = {}

    def evaluate(t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        if t not in evaluated:
            kept, dup, sim, unresolved = resolve_kept(cand_pos, edges, t)
            hard = np.unique(cluster_pos[unresolved])
            for c, k, d, s in fallback.run(hard, t, cand_pos) if len(hard) else []:
                span = slice(starts[c], starts[c] + sizes[c])
                kept[span], dup[span], sim[span] = k, d, s
            evaluated[t] = (kept, dup, sim, len(hard))
        return evaluated[t]

    info: dict[str, Any] = {}
    if config.target_ratio is not None:
        keep_count = int(round(config.target_ratio * n))
        grid = np.unique(np.r_[floor, edges.sim[edges.sim >= floor], np.inf]).astype(np.float64)
        threshold, count, reachable = search_threshold(lambda t: int(evaluate(t)[0].sum()), grid, keep_count,
                                                       int(math.floor(config.ratio_tolerance * n)))
        info.update(target_ratio=config.target_ratio, target_reachable=reachable, thresholds_tried=len(evaluated))
        if not reachable:
            low = int(evaluate(float(grid[0]))[0].sum())
            why = (f"at the neighbour floor {floor} (the lowest threshold the scores allow) {low} items stay; re-run "
                   "dedup with a lower neighbour_floor" if low > keep_count else
                   f"only {int(cand_pos.sum())} items pass the earlier rules")
            info["target_unreachable_because"] = why
    else:
        threshold = 1.0 - float(config.eps)
    kept, dup, sim, hard_clusters = evaluate(threshold)
    info.update(similarity_threshold=threshold if math.isfinite(threshold) else None,
                eps=1.0 - threshold if math.isfinite(threshold) else None,
                exact_fallback_clusters=hard_clusters, exact_fallback_gathers=fallback.gathers)
    duplicate = np.zeros(n, bool)
    duplicate[order] = cand_pos & ~kept
    link = np.full(n, -1, np.int64)
    link[order] = np.where(dup >= 0, order[np.maximum(dup, 0)], -1)
    score = np.full(n, np.nan, np.float32)
    score[order] = sim
    return duplicate, link, score, info


def _dedup_any_earlier(config: Config, scores: pa.Table, candidate: np.ndarray, ids: pa.Array,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """SemDeDup's duplicate rule over the candidates (rows); outputs as :func:`_dedup_kept`."""
    n = len(candidate)
    first = scores.column("rank").to_numpy() == 0
    max_sim = scores.column("max_sim").to_numpy(zero_copy_only=False)
    info: dict[str, Any] = {}
    if config.target_ratio is not None:
        threshold, reachable = threshold_for_ratio(max_sim, first, candidate, int(round(config.target_ratio * n)))
        info.update(target_ratio=config.target_ratio, target_reachable=reachable)
    else:
        threshold = 1.0 - float(config.eps)
    info.update(similarity_threshold=threshold if math.isfinite(threshold) else None,
                eps=1.0 - threshold if math.isfinite(threshold) else None)
    duplicate = any_earlier_duplicates(candidate, first, max_sim, threshold)
    matched = pc.fill_null(pc.index_in(scores.column("duplicate_of"), value_set=ids), -1).to_numpy()
    link = np.where(duplicate, matched, -1).astype(np.int64)
    return duplicate, link, np.where(duplicate, max_sim, np.nan).astype(np.float32), info


def _counts_by(reason: np.ndarray) -> dict[str, int]:
    return {name: int((reason == i).sum()) for i, name in enumerate(REASONS) if (reason == i).any()}


@dataclass
class Decision:
    """Per row: reason (int8, -1 kept), link (row the rule matched it to, -1), score (the
    similarity that rule measured, NaN), plus the rules that ran and their figures."""

    reason: np.ndarray
    link: np.ndarray
    score: np.ndarray
    rules: list[dict[str, Any]]
    info: dict[str, Any]

    @classmethod
    def empty(cls, n: int) -> "Decision":
        return cls(np.full(n, -1, np.int8), np.full(n, -1, np.int64), np.full(n, np.nan, np.float32), [], {})

    def remove(self, mask: np.ndarray, reason: str, rule: str, by: str, parameters: dict[str, Any],
               link: np.ndarray | None = None, score: np.ndarray | None = None, **figures: Any) -> np.ndarray:
        """Remove the still-kept items of ``mask`` for ``reason`` and record the rule."""
        newly = (self.reason < 0) & np.asarray(mask, bool)
        self.reason[newly] = REASONS.index(reason)
        if link is not None:
            self.link[newly] = link[newly]
        if score is not None:
            self.score[newly] = score[newly]
        self.rules.append({"rule": rule, "reason": reason, "by": by, "parameters": parameters,
                           "removed": int(newly.sum()), **figures})
        return newly


def _rules(config: Config, meta: pa.Table, ids: pa.Array, paths: dict[str, str], dim: int | None) -> Decision:
    """Every rule of a ``meddel`` / ``semdedup`` selection, in the module doc's order."""
    n = meta.num_rows
    decision = Decision.empty(n)
    extra = config.deldist_rules
    if extra.quality is not None:
        sources = pc.dictionary_encode(meta.column("source").combine_chunks()).indices.to_numpy()
        quality = {c: meta.column(c).to_numpy(zero_copy_only=False) for c in QUALITY_COLUMNS}
        masks = invalid_mask(quality, extra.quality, sources, meta.column("frame_index").to_numpy())
        decision.remove(np.logical_or.reduce([np.zeros(n, bool), *masks.values()]), "invalid", "quality", "deldist",
                        extra.quality.model_dump(), flagged_by_check={k: int(m.sum()) for k, m in masks.items()})
    needs_assignments = (config.outlier_distance is not None or extra.outlier_quantile is not None
                         or extra.temporal_threshold is not None)
    if needs_assignments:
        manifest = storage.read_manifest(paths["clusters"])
        assign_dir = storage.join(paths["clusters"], manifest.get("assignments", "assignments"))
        assignments = _align(ids, storage.read_published(assign_dir, ["id", "cluster", "distance"]), assign_dir)
        cluster = assignments.column("cluster").to_numpy()
        distance = assignments.column("distance").to_numpy()
    if config.outlier_distance is not None:
        decision.remove(outlier_mask(cluster, distance, config.outlier_distance), "outlier", "outlier_distance",
                        PAPER_RULE["outlier_distance"] if config.outlier_distance == 0.9 else "MedDEL §3.2 (distance "
                        "to the centroid; the paper fixes 0.9)", {"outlier_distance": config.outlier_distance})
    if extra.outlier_quantile is not None:
        decision.remove(outlier_mask(cluster, distance, quantile=extra.outlier_quantile), "outlier",
                        "outlier_quantile", "deldist", {"outlier_quantile": extra.outlier_quantile})
    if extra.temporal_threshold is not None:
        from deldist.runtime import init_ray

        init_ray()
        collapsed, rep_row, sim = _temporal(config, paths["embeddings"], dim, meta, decision.reason < 0)
        decision.remove(collapsed, "temporal", "temporal", "deldist", {"temporal_threshold": extra.temporal_threshold},
                        link=rep_row, score=sim)
        decision.info["temporal_collapse"] = (collapsed, cluster)
    if extra.near_copy is not None:
        _near_copy_rule(config, meta, ids, decision)
    if config.eps is not None or config.target_ratio is not None:
        _duplicate_rule(config, ids, paths, dim, decision)
    return decision


def _near_copy_rule(config: Config, meta: pa.Table, ids: pa.Array, decision: Decision) -> None:
    from deldist.nearcopy import chance_pairs, distributed_pairs, near_copies
    from deldist.runtime import init_ray

    rule = config.deldist_rules.near_copy
    assert rule is not None
    if "phash" not in meta.column_names:
        raise ValueError("the near-copy rule needs the embeddings' phash column (embedded by deldist >= 0.2); "
                         "re-run embed into a fresh output")
    init_ray()
    import ray

    tasks = max(1, int(ray.cluster_resources().get("CPU", 1.0) // rule.task_cpus))
    near, copy_of, hamming = near_copies(
        meta.column("phash").to_numpy(), decision.reason < 0, near_copy_order(meta.column("blur").to_numpy(), ids),
        rule.max_hamming, pair_finder=lambda unique, h: distributed_pairs(unique, h, tasks, rule.task_cpus))
    decision.remove(near, "near_copy", "near_copy", "deldist", rule.model_dump(), link=copy_of,
                    score=(1.0 - hamming / 64.0).astype(np.float32),
                    keep_order="sharpest first (highest variance of the Laplacian), ties by id",
                    chance_pairs=chance_pairs(int((decision.reason < 0).sum()), rule.max_hamming))


def _duplicate_rule(config: Config, ids: pa.Array, paths: dict[str, str], dim: int | None,
                    decision: Decision) -> None:
    expected = METHODS[config.method]["keep"]
    manifest = storage.read_manifest(paths["scores"])
    if manifest.get("keep") != expected:
        raise ValueError(f"method {config.method} ranks each cluster keep={expected} but {paths['scores']} was "
                         f"ranked keep={manifest.get('keep')}; re-run dedup with keep: {expected}")
    columns = ["id", "cluster", "rank", "max_sim", "duplicate_of"]
    if config.dedup_rule == "kept":
        if "neighbour_floor" not in manifest:
            raise ValueError(f"{paths['scores']} has no neighbour lists (an older dedup run); re-run dedup")
        columns += ["neighbours", "neighbour_sims", "unlisted_max_sim"]
    scores = _align(ids, storage.read_published(paths["scores"], columns), paths["scores"])
    candidate = decision.reason < 0
    if config.dedup_rule == "kept":
        from deldist.runtime import init_ray

        init_ray()
        duplicate, link, score, info = _dedup_kept(config, scores, candidate, ids, paths["embeddings"], dim,
                                                   float(manifest["neighbour_floor"]))
    else:
        duplicate, link, score, info = _dedup_any_earlier(config, scores, candidate, ids)
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
    paths = {"embeddings": config.embeddings or storage.join(config.output, "embeddings"),
             "clusters": config.clusters or storage.join(config.output, "clusters"),
             "scores": config.scores or storage.join(config.output, "dedup", "scores")}
    sel_dir = storage.join(config.output, "selections", config.name)
    emb_manifest = storage.read_manifest(paths["embeddings"])
    emb_columns = ["id", "source", "frame_index", "dataset", *QUALITY_COLUMNS]
    if config.deldist_rules.near_copy is not None:
        emb_columns.append("phash")
    meta = storage.read_published(paths["embeddings"], columns=emb_columns)
    n = meta.num_rows
    if n == 0:
        raise EmptyInputError(f"{paths['embeddings']} has no rows: nothing to select from")
    ids = meta.column("id").combine_chunks()
    if pc.count_distinct(ids).as_py() != n:
        raise ValueError(f"{paths['embeddings']} holds duplicate ids")

    if config.method == "random":
        decision = Decision.empty(n)
        ratio = config.target_ratio
        if config.match_selection is not None:
            other = storage.read_json(storage.join(config.output, "selections", config.match_selection, "summary.json"))
            ratio = float(other["ratio"])
            decision.info["matched_selection"] = config.match_selection
        assert ratio is not None
        decision.remove(random_decision(ids, ratio, config.seed) >= 0, "random", "random", "MedDEL's ablation "
                        "(a seeded uniform sample)", {"ratio": ratio, "seed": config.seed})
        decision.info["target_ratio"] = ratio
    else:
        decision = _rules(config, meta, ids, paths, emb_manifest.get("dim"))

    reason = decision.reason
    kept = reason < 0
    stand_in = follow_to_kept(decision.link, kept)
    if config.method == "random" or config.dedup_rule == "kept":
        broken = int(((reason >= 0) & (decision.link >= 0) & (stand_in < 0)).sum())
        if broken:
            raise SelectionInvariantError(f"{broken} removed items stand for no retained item")
    else:  # SemDeDup's rule: a duplicate names the item it matched, kept or not
        stand_in = np.where((stand_in < 0) | (reason == REASONS.index("duplicate")), decision.link, stand_in)
    tables = build_tables(ids, reason, stand_in, decision.score)
    check_partition(ids, tables["retained"].column("id"), tables["removed"].column("id"))

    info = {k: v for k, v in decision.info.items() if k != "temporal_collapse"}
    if "temporal_collapse" in decision.info:
        info["temporal"] = _temporal_savings(*decision.info["temporal_collapse"])
    summary = _summary(config, meta, reason, decision.rules, info)
    if config.ground_truth:
        gt = storage.read_published(config.ground_truth) if storage.is_published(config.ground_truth) else \
            _read_parquet(config.ground_truth)
        summary["ground_truth"] = ground_truth_metrics(ids, kept, gt, random_seed=config.seed)
    summary["seconds"] = time.perf_counter() - started

    for sub, schema in (("retained", RETAINED_SCHEMA), ("removed", REMOVED_SCHEMA)):
        sub_dir = storage.join(sel_dir, sub)
        path = storage.join(sub_dir, storage.new_part_name())
        storage.write_table(tables[sub], path)
        storage.publish(sub_dir, [storage.resolve(path)[1]], {"schema": storage.schema_hex(schema),
                                                              "rows": tables[sub].num_rows})
    storage.write_json(storage.join(sel_dir, "summary.json"), summary)
    storage.publish(sel_dir, [], {"name": config.name, "retained": "retained", "removed": "removed",
                                  "summary": "summary.json"})
    return {"selection": sel_dir, **{k: summary[k] for k in ("input_count", "kept_count", "ratio", "removed_by_reason")}}


def build_tables(ids: pa.Array, reason: np.ndarray, stand_in: np.ndarray, score: np.ndarray) -> dict[str, pa.Table]:
    """``retained`` (id) and ``removed`` (id, reason, duplicate_of, max_sim) tables.
    reason: (n,) int8 (-1 kept); stand_in: (n,) row each removed item's duplicate_of names
    (-1: none); score: (n,) the similarity its rule measured (NaN: none)."""
    kept = reason < 0
    rows = np.flatnonzero(~kept)
    named = stand_in[rows] >= 0
    duplicate_of = pc.if_else(pa.array(named), ids.take(pa.array(np.maximum(stand_in[rows], 0))),
                              pa.nulls(len(rows), pa.string()))
    return {
        "retained": pa.table({"id": ids.filter(pa.array(kept))}, schema=RETAINED_SCHEMA),
        "removed": pa.table({
            "id": ids.take(pa.array(rows)),
            "reason": pa.array(np.asarray(REASONS, dtype=object)[reason[rows]], pa.string()),
            "duplicate_of": duplicate_of,
            "max_sim": pa.array(score[rows], pa.float32(), from_pandas=True),
        }, schema=REMOVED_SCHEMA),
    }


def _read_parquet(uri: str) -> pa.Table:
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri)
    return pq.read_table(path, filesystem=fs)


def _temporal_savings(collapsed: np.ndarray, cluster: np.ndarray) -> dict[str, Any]:
    """What the temporal rule saves downstream if run before clustering / dedup."""
    before = np.bincount(cluster).astype(np.float64)
    after = np.bincount(cluster[~collapsed], minlength=len(before)).astype(np.float64)
    pairs_before = float((before * (before - 1) / 2).sum())
    pairs_after = float((after * (after - 1) / 2).sum())
    return {
        "collapsed_frames": int(collapsed.sum()),
        "collapsed_fraction": float(collapsed.mean()) if len(collapsed) else 0.0,
        "pairwise_pairs_before": pairs_before, "pairwise_pairs_after": pairs_after,
        "pairwise_work_saved": 1.0 - pairs_after / pairs_before if pairs_before else 0.0,
    }


def _summary(config: Config, meta: pa.Table, reason: np.ndarray, rules: list[dict[str, Any]],
             info: dict[str, Any]) -> dict[str, Any]:
    n = len(reason)
    kept = reason < 0
    datasets = meta.column("dataset").to_numpy(zero_copy_only=False).astype(str)
    per_dataset: dict[str, Any] = {}
    for name in sorted(set(datasets.tolist())):
        mask = datasets == name
        per_dataset[name] = {"input": int(mask.sum()), "kept": int(kept[mask].sum()),
                             "ratio": float(kept[mask].mean()), "removed_by_reason": _counts_by(reason[mask])}
    return {
        "name": config.name, "method": config.method, "dedup_rule": config.dedup_rule,
        "input_count": n, "kept_count": int(kept.sum()), "removed_count": int((~kept).sum()),
        "ratio": float(kept.mean()), "removed_by_reason": _counts_by(reason), "rules": rules,
        "per_dataset": per_dataset, "parameters": config.model_dump(mode="json"), **info,
    }
