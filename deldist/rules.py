"""The selection rules' math, pure (no Ray, no I/O): deldist's quality filter, the outlier
rules (MedDEL's distance threshold, deldist's per-cluster quantile), deldist's temporal
collapse, the near-copy preference order and the random baseline's draw. ``deldist.select``
applies them in order; ``deldist.curate_new`` applies them to uploads.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from deldist.arrays import equal_runs


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


def random_decision(ids: pa.Array, ratio: float, seed: int) -> np.ndarray:
    """Seeded uniform sample keeping round(ratio * n) ids -> reason index (n,) int8 (-1 kept,
    else "random"). The draw is made in id order, so it does not depend on the row order."""
    n = len(ids)
    keep_count = int(round(ratio * n))
    by_id = pc.sort_indices(ids).to_numpy()
    reason = np.full(n, REASONS.index("random"), np.int8)
    reason[by_id[np.random.default_rng(seed).permutation(n)[:keep_count]]] = -1
    return reason


# dad_pruned / el2n_pruned: deldist prune's rules on a labelled set (deldist.importance)
REASONS: tuple[str, ...] = ("invalid", "outlier", "temporal", "near_copy", "duplicate", "random", "dad_pruned",
                            "el2n_pruned")


def counts_by_reason(reason: np.ndarray) -> dict[str, int]:
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


def temporal_savings(collapsed: np.ndarray, cluster: np.ndarray) -> dict[str, Any]:
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


class SelectionInvariantError(RuntimeError):
    """retained and removed do not partition the input ids, or a removed item does not point
    at a retained one."""


def check_partition(all_ids: pa.Array | pa.ChunkedArray, retained: pa.Array | pa.ChunkedArray,
                    removed: pa.Array | pa.ChunkedArray) -> None:
    """Raise :class:`SelectionInvariantError` unless retained and removed hold every id of
    ``all_ids`` (distinct: the selection's readers check it) exactly once between them, and
    nothing else: n entries that include all n distinct input ids are those ids once each. One
    hash table, of the output's ids (two, at 10M ids, were the driver's peak: ~1.1 GB)."""
    n = len(all_ids)
    if len(retained) + len(removed) != n:
        raise SelectionInvariantError(f"{len(retained)} retained + {len(removed)} removed != {n} input ids")
    union = pa.chunked_array(_chunks(retained) + _chunks(removed), pa.string()).combine_chunks()
    missing = pc.sum(pc.invert(pc.is_in(all_ids, value_set=union))).as_py() or 0
    if missing:
        raise SelectionInvariantError(f"{missing} input ids are neither retained nor removed (and as many output "
                                      "entries are other ids or repeats)")


def _chunks(a: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return list(a.chunks) if isinstance(a, pa.ChunkedArray) else [a]
