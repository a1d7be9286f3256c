"""Selections from the dedup scores: MedDEL thresholds, target ratios, filters, baselines.

A selection partitions every embedded id into ``retained`` and ``removed`` (with a reason).
Filters apply in this order; an id removed by an earlier one keeps that reason:

1. ``invalid``  — quality statistics of the frame (:class:`InvalidThresholds`): black,
   over-exposed, flat (low contrast), blurred.
2. ``outlier``  — MedDEL: farther from its centroid than ``outlier_distance`` (cosine
   distance) or than the ``outlier_quantile`` of its own cluster's distances.
3. ``temporal`` — optional pre-dedup inside each video: sampled frames of one ``source`` in
   frame order collapse into the last kept frame while their cosine similarity to it exceeds
   ``temporal_threshold``; the summary reports what that saves downstream (pairwise work).
4. ``duplicate`` — SemDeDup / MedDEL: ``max_sim > 1 - eps`` (first-ranked items never).
   With ``target_ratio`` instead of ``eps``, the threshold is the order statistic of the
   scores that keeps that fraction of the input: no similarity is recomputed.

``method="random"`` is the paper's ablation: keep a seeded uniform sample of the same size
(``target_ratio``, or the kept ratio of the selection named by ``match_selection``).

MedDEL (Yang et al. 2024, Table 2, 88,282 frames) fixes one threshold at 0.9 and sweeps the
similarity threshold 1 - eps from 0.9 to 0.7: see :data:`MEDDEL_TABLE2`. The retained
fractions there are properties of their data; use ``target_ratio`` to hit a fraction on ours.

Output under ``<output>/selections/<name>/``: ``retained/`` (id) and ``removed/`` (id, reason,
duplicate_of, max_sim) as published tables, ``summary.json`` (input count, kept count, ratio,
counts per reason, per dataset, parameters, and ground-truth metrics when
``ground_truth`` is set), then the directory's own manifest and ``_SUCCESS``.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from deldist import storage
from deldist.arrays import equal_runs
from deldist.cluster import EmptyInputError
from deldist.config import StageConfig
from deldist.schema import QUALITY_COLUMNS, REMOVED_SCHEMA, RETAINED_SCHEMA

# similarity threshold (1 - eps) -> (frames retained, fraction retained) in MedDEL's Table 2
MEDDEL_TABLE2: dict[float, tuple[int, float]] = {
    1.0: (88_282, 1.00), 0.9: (43_484, 0.50), 0.85: (28_352, 0.33),
    0.8: (16_789, 0.20), 0.75: (9_055, 0.10), 0.7: (4_461, 0.05),
}

REASONS: tuple[str, ...] = ("invalid", "outlier", "temporal", "duplicate", "random")


class SelectionInvariantError(RuntimeError):
    """retained and removed do not partition the input ids."""


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


class Config(StageConfig):
    """``deldist select`` settings."""

    output: str = Field(description="run root URI")
    name: str = Field("default", description="selection name: <output>/selections/<name>")
    method: Literal["meddel", "random"] = "meddel"
    eps: float | None = Field(None, ge=0, le=2, description="remove duplicates with max_sim > 1 - eps")
    target_ratio: float | None = Field(None, gt=0, le=1, description="keep this fraction of the input")
    match_selection: str | None = Field(None, description="random: copy the kept ratio of this selection")
    outlier_distance: float | None = Field(None, ge=0, description="remove cosine distance to centroid above")
    outlier_quantile: float | None = Field(None, gt=0, le=1, description="remove above this per-cluster quantile")
    invalid: InvalidThresholds | None = Field(default_factory=InvalidThresholds)
    temporal_threshold: float | None = Field(None, ge=-1, le=1, description="collapse consecutive frames above")
    ground_truth: str | None = Field(None, description="Parquet with source_key, frame_index, scene_id, invalid")
    seed: int = 0
    embeddings: str | None = None
    clusters: str | None = None
    scores: str | None = None
    # temporal pre-dedup wiring
    shard_rows: int = Field(65_536, ge=1)
    io_cpus: float = Field(0.5, gt=0)
    task_cpus: float = Field(1.0, gt=0)

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


def threshold_for_ratio(max_sim: np.ndarray, first: np.ndarray, candidates: np.ndarray,
                        keep_count: int) -> tuple[float, bool]:
    """Similarity threshold t such that keeping the candidates with ``max_sim <= t`` (plus
    every first-ranked candidate) keeps about ``keep_count`` items.

    max_sim: (n,) float; first: (n,) bool first-ranked; candidates: (n,) bool items still in
    after the other filters. Returns (t, reachable); t = -inf keeps only first-ranked items,
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


def decide(n: int, *, first: np.ndarray | None = None, max_sim: np.ndarray | None = None,
           eps: float | None = None, target_ratio: float | None = None,
           invalid: np.ndarray | None = None, outlier: np.ndarray | None = None,
           temporal: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The MedDEL decision for n items -> (reason index int8 (n,): -1 kept, else index into
    :data:`REASONS`; info dict with the threshold used).

    first / max_sim: (n,) from the scores (needed for eps or target_ratio); invalid /
    outlier / temporal: (n,) bool masks from the earlier filters, applied in that order.
    """
    reason = np.full(n, -1, np.int8)
    for name, mask in (("invalid", invalid), ("outlier", outlier), ("temporal", temporal)):
        if mask is not None:
            reason[(reason < 0) & np.asarray(mask, bool)] = REASONS.index(name)
    info: dict[str, Any] = {}
    if eps is None and target_ratio is None:
        return reason, info
    if max_sim is None or first is None:
        raise ValueError("eps / target_ratio need the dedup scores")
    candidates = reason < 0
    if target_ratio is not None:
        keep_count = int(round(target_ratio * n))
        threshold, reachable = threshold_for_ratio(max_sim, first, candidates, keep_count)
        info.update(target_ratio=target_ratio, target_reachable=reachable)
    else:
        threshold = 1.0 - float(eps)
    info.update(similarity_threshold=threshold, eps=1.0 - threshold if math.isfinite(threshold) else None)
    duplicate = candidates & ~np.asarray(first, bool) & (np.asarray(max_sim, np.float64) > threshold)
    reason[duplicate] = REASONS.index("duplicate")
    return reason, info


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


def _temporal(config: Config, emb_dir: str, dim: int | None, meta: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray wiring of the temporal pre-dedup: shuffle embeddings by source, collapse per
    video. Returns (collapsed bool (n,), representative row int64 (n,), similarity (n,))
    aligned with ``meta``'s rows."""
    import ray

    from deldist.dedup import check_shuffle, shuffle_by_bucket

    n = meta.num_rows
    source_code = pc.dictionary_encode(meta.column("source")).combine_chunks().indices.to_numpy()
    n_sources = int(source_code.max()) + 1 if n else 0
    n_buckets = max(1, min(n_sources, 2 * int(ray.cluster_resources().get("CPU", 1.0) // config.task_cpus)))
    lookup = pa.table({"id": meta.column("id"), "bucket": (source_code % n_buckets).astype(np.int32),
                       "source_code": source_code.astype(np.int64),
                       "frame_index": meta.column("frame_index").to_numpy().astype(np.int64),
                       "row": np.arange(n, dtype=np.int64)})
    slices_of, stats = shuffle_by_bucket(emb_dir, dim, lookup, n_buckets, config.shard_rows, config.io_cpus)
    task = ray.remote(num_cpus=config.task_cpus)(_temporal_bucket)
    pending = [task.remote(config.temporal_threshold, *slices) for slices in slices_of]
    check_shuffle(ray.get(stats), n, "the embeddings metadata")
    collapsed = np.zeros(n, bool)
    representative = np.full(n, -1, np.int64)
    similarity = np.zeros(n, np.float32)
    for rows, rep_rows, sims in ray.get(pending):
        collapsed[rows] = rep_rows >= 0
        representative[rows] = rep_rows
        similarity[rows] = sims
    return collapsed, representative, similarity


def _temporal_bucket(threshold: float, *slices: tuple[pa.Table, np.ndarray]) -> tuple[np.ndarray, ...]:
    """Task body: temporal collapse of every video in one bucket -> (rows, representative
    rows (-1 kept), similarity), rows being indices into the driver's table."""
    from deldist.dedup import gather_sorted

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


def _counts_by(reason: np.ndarray) -> dict[str, int]:
    return {name: int((reason == i).sum()) for i, name in enumerate(REASONS) if (reason == i).any()}


def run(config: Config) -> dict[str, Any]:
    """Build selection ``config.name`` and publish it (see the module doc)."""
    started = time.perf_counter()
    emb_dir = config.embeddings or storage.join(config.output, "embeddings")
    clusters_dir = config.clusters or storage.join(config.output, "clusters")
    scores_dir = config.scores or storage.join(config.output, "dedup", "scores")
    sel_dir = storage.join(config.output, "selections", config.name)
    emb_manifest = storage.read_manifest(emb_dir)
    emb_columns = ["id", "source", "frame_index", "dataset", *QUALITY_COLUMNS]
    meta = storage.read_published(emb_dir, columns=emb_columns)
    n = meta.num_rows
    if n == 0:
        raise EmptyInputError(f"{emb_dir} has no rows: nothing to select from")
    ids = meta.column("id").combine_chunks()
    if pc.count_distinct(ids).as_py() != n:
        raise ValueError(f"{emb_dir} holds duplicate ids")

    info: dict[str, Any] = {}
    duplicate_of = pa.nulls(n, pa.string())
    removed_sim = np.full(n, np.nan, np.float32)
    if config.method == "random":
        ratio = config.target_ratio
        if config.match_selection is not None:
            other = storage.read_json(storage.join(config.output, "selections", config.match_selection, "summary.json"))
            ratio = float(other["ratio"])
            info["matched_selection"] = config.match_selection
        assert ratio is not None
        reason = random_decision(ids, ratio, config.seed)
        info["target_ratio"] = ratio
    else:
        quality = {c: meta.column(c).to_numpy(zero_copy_only=False) for c in QUALITY_COLUMNS}
        sources = pc.dictionary_encode(meta.column("source").combine_chunks()).indices.to_numpy()
        frame_index = meta.column("frame_index").to_numpy(zero_copy_only=False)
        invalid_rules = invalid_mask(quality, config.invalid, sources, frame_index) if config.invalid else {}
        invalid = np.zeros(n, bool)
        for mask in invalid_rules.values():
            invalid |= mask
        info["invalid_by_rule"] = {rule: int(m.sum()) for rule, m in invalid_rules.items()}
        outlier = None
        assignments = None
        if config.outlier_distance is not None or config.outlier_quantile is not None or config.temporal_threshold:
            manifest = storage.read_manifest(clusters_dir)
            assign_dir = storage.join(clusters_dir, manifest.get("assignments", "assignments"))
            assignments = _align(ids, storage.read_published(assign_dir, ["id", "cluster", "distance"]), assign_dir)
        if config.outlier_distance is not None or config.outlier_quantile is not None:
            outlier = outlier_mask(assignments.column("cluster").to_numpy(), assignments.column("distance").to_numpy(),
                                   config.outlier_distance, config.outlier_quantile)
        temporal = None
        if config.temporal_threshold is not None:
            from deldist.runtime import init_ray

            init_ray()
            temporal, rep_row, temporal_sim = _temporal(config, emb_dir, emb_manifest.get("dim"), meta)
        first = max_sim = scores = None
        if config.eps is not None or config.target_ratio is not None:
            scores = _align(ids, storage.read_published(scores_dir, ["id", "rank", "max_sim", "duplicate_of"]),
                            scores_dir)
            first = scores.column("rank").to_numpy() == 0
            max_sim = scores.column("max_sim").to_numpy(zero_copy_only=False)
        reason, decision = decide(n, first=first, max_sim=max_sim, eps=config.eps, target_ratio=config.target_ratio,
                                  invalid=invalid, outlier=outlier, temporal=temporal)
        info.update(decision)
        if scores is not None:
            is_dup = reason == REASONS.index("duplicate")
            duplicate_of = pc.if_else(pa.array(is_dup), scores.column("duplicate_of").combine_chunks(), duplicate_of)
            removed_sim[is_dup] = max_sim[is_dup]
        if temporal is not None:
            is_tmp = reason == REASONS.index("temporal")
            rep_ids = ids.take(pa.array(np.maximum(rep_row, 0)))
            duplicate_of = pc.if_else(pa.array(is_tmp), rep_ids, duplicate_of)
            removed_sim[is_tmp] = temporal_sim[is_tmp]
            info["temporal"] = _temporal_savings(temporal, assignments.column("cluster").to_numpy(),
                                                 max_sim, first, info.get("similarity_threshold"))
        if config.eps is not None:
            paper = MEDDEL_TABLE2.get(round(1.0 - config.eps, 4))
            if paper:
                info["meddel_table2_ratio_at_this_threshold"] = paper[1]

    kept = reason < 0
    removed_rows = np.flatnonzero(~kept)
    retained = pa.table({"id": ids.filter(pa.array(kept))}, schema=RETAINED_SCHEMA)
    reason_names = pa.array(np.asarray(REASONS, dtype=object)[reason[removed_rows]], pa.string())
    removed = pa.table({
        "id": ids.take(pa.array(removed_rows)),
        "reason": reason_names,
        "duplicate_of": duplicate_of.take(pa.array(removed_rows)),
        "max_sim": pa.array(removed_sim[removed_rows], pa.float32(), from_pandas=True),
    }, schema=REMOVED_SCHEMA)
    check_partition(ids, retained.column("id"), removed.column("id"))

    summary = _summary(config, meta, reason, info)
    if config.ground_truth:
        gt = storage.read_published(config.ground_truth) if storage.is_published(config.ground_truth) else \
            _read_parquet(config.ground_truth)
        summary["ground_truth"] = ground_truth_metrics(ids, kept, gt, random_seed=config.seed)
    summary["seconds"] = time.perf_counter() - started

    for sub, table, schema in (("retained", retained, RETAINED_SCHEMA), ("removed", removed, REMOVED_SCHEMA)):
        sub_dir = storage.join(sel_dir, sub)
        path = storage.join(sub_dir, storage.new_part_name())
        storage.write_table(table, path)
        storage.publish(sub_dir, [storage.resolve(path)[1]], {"schema": storage.schema_hex(schema),
                                                              "rows": table.num_rows})
    storage.write_json(storage.join(sel_dir, "summary.json"), summary)
    storage.publish(sel_dir, [], {"name": config.name, "retained": "retained", "removed": "removed",
                                  "summary": "summary.json"})
    return {"selection": sel_dir, **{k: summary[k] for k in ("input_count", "kept_count", "ratio", "removed_by_reason")}}


def _read_parquet(uri: str) -> pa.Table:
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri)
    return pq.read_table(path, filesystem=fs)


def _temporal_savings(collapsed: np.ndarray, cluster: np.ndarray, max_sim: np.ndarray | None,
                      first: np.ndarray | None, threshold: float | None) -> dict[str, Any]:
    """What the temporal pre-dedup saves downstream if run before clustering / dedup."""
    before = np.bincount(cluster).astype(np.float64)
    after = np.bincount(cluster[~collapsed], minlength=len(before)).astype(np.float64)
    pairs_before = float((before * (before - 1) / 2).sum())
    pairs_after = float((after * (after - 1) / 2).sum())
    out: dict[str, Any] = {
        "collapsed_frames": int(collapsed.sum()),
        "collapsed_fraction": float(collapsed.mean()) if len(collapsed) else 0.0,
        "pairwise_pairs_before": pairs_before, "pairwise_pairs_after": pairs_after,
        "pairwise_work_saved": 1.0 - pairs_after / pairs_before if pairs_before else 0.0,
    }
    if max_sim is not None and first is not None and threshold is not None and collapsed.any():
        semantic = ~first & (np.asarray(max_sim, np.float64) > threshold)
        out["also_semantic_duplicates"] = float(semantic[collapsed].mean())
    return out


def _summary(config: Config, meta: pa.Table, reason: np.ndarray, info: dict[str, Any]) -> dict[str, Any]:
    n = len(reason)
    kept = reason < 0
    datasets = meta.column("dataset").to_numpy(zero_copy_only=False).astype(str)
    per_dataset: dict[str, Any] = {}
    for name in sorted(set(datasets.tolist())):
        mask = datasets == name
        per_dataset[name] = {"input": int(mask.sum()), "kept": int(kept[mask].sum()),
                             "ratio": float(kept[mask].mean()), "removed_by_reason": _counts_by(reason[mask])}
    return {
        "name": config.name, "method": config.method,
        "input_count": n, "kept_count": int(kept.sum()), "removed_count": int((~kept).sum()),
        "ratio": float(kept.mean()), "removed_by_reason": _counts_by(reason),
        "per_dataset": per_dataset, "parameters": config.model_dump(mode="json"), **info,
    }
