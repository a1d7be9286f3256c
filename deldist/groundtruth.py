"""Selection quality against frame labels (the sample generator's ground truth): scene and
segment coverage, invalid-frame recall, beside a seeded random sample of the same size.
Pure: tables and arrays in, figures out."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deldist.ids import join_ids, split_ids
from deldist.rules import random_decision


def _match_ground_truth(ids: pa.Array, ground_truth: pa.Table) -> np.ndarray:
    """Row of ``ground_truth`` for each id (-1 when none). Tries the id's key as is, then
    with 1-3 leading path components stripped (ids are relative to the embed input root,
    which may sit above the ground truth's root)."""
    key, frame = split_ids(ids)
    gt_key = join_ids(ground_truth.column("source_key").combine_chunks(), ground_truth.column("frame_index"))
    row = np.full(len(ids), -1, np.int64)
    candidates = key
    for strip in range(4):
        if strip:
            candidates = pc.replace_substring_regex(key, pattern=f"^([^/]*/){{{strip}}}", replacement="")
        joined = join_ids(candidates, frame)
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
