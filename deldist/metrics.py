"""Evaluation math: segmentation IoU, MedFMC classification metrics, few-shot splits, NormDEL.

Pure NumPy, no Ray, no I/O. Every score is a fraction in [0, 1] (the papers print x100).

Segmentation (binary: 0 background, 1 foreground) is accumulated over the whole test set
(intersection and union summed over images, as mmseg does), giving

- ``iou_fg``: foreground (polyp) IoU. **This is what the report calls mIoU**: with Table 3's
  scale (Kvasir-SEG ~0.75) it is the polyp-class IoU, not the mean with background (that
  would be ~0.85 or more, background IoU being close to 1).
- ``iou_bg`` and ``miou_fg_bg`` = mean(iou_fg, iou_bg), mmseg's two-class mIoU;
- ``iou_fg_per_image``: mean over images of the per-image foreground IoU (PraNet-style;
  an image with empty prediction and empty mask counts 1).

Classification (MedFMC, Wang et al. 2023): multi-class tasks report accuracy (argmax) and AUC
(one-vs-rest per class, macro mean); multi-label tasks report mAP (mmcls ``mAP``: per class,
precision summed at each positive in descending score order over the positives; -1 targets
are "difficult" and ignored) and AUC (per class, macro mean). AUC is the Mann-Whitney
statistic with ties counted 1/2, which equals scikit-learn's ``roc_auc_score``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# ------------------------------------------------------------------ segmentation


def confusion_counts(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Binary masks (..., H, W) bool/0-1 -> int64 [tp, fp, fn, tn] summed over all pixels."""
    p = np.asarray(pred).astype(bool)
    t = np.asarray(target).astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and target {t.shape} differ in shape")
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    return np.array([tp, fp, fn, p.size - tp - fp - fn], dtype=np.int64)


def per_image_fg_iou(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(B, H, W) binary masks -> (B,) float64 foreground IoU per image (1 when both empty)."""
    p = np.asarray(pred).astype(bool).reshape(len(pred), -1)
    t = np.asarray(target).astype(bool).reshape(len(target), -1)
    inter = (p & t).sum(1)
    union = (p | t).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def segmentation_scores(counts: np.ndarray, per_image_iou_sum: float = float("nan"),
                        images: int = 0) -> dict[str, float]:
    """[tp, fp, fn, tn] (summed over the test set) -> iou_fg, iou_bg, miou_fg_bg, dice_fg,
    pixel_acc and, when given (sum of per-image IoUs, image count), iou_fg_per_image."""
    tp, fp, fn, tn = (float(c) for c in counts)
    iou_fg = tp / (tp + fp + fn) if tp + fp + fn > 0 else 1.0
    iou_bg = tn / (tn + fp + fn) if tn + fp + fn > 0 else 1.0
    out = {
        "iou_fg": iou_fg,
        "iou_bg": iou_bg,
        "miou_fg_bg": (iou_fg + iou_bg) / 2,
        "dice_fg": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 1.0,
        "pixel_acc": (tp + tn) / max(tp + fp + fn + tn, 1.0),
    }
    if images > 0:
        out["iou_fg_per_image"] = per_image_iou_sum / images
    return out


# ------------------------------------------------------------------ classification


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """scores (N, C), labels (N,) int -> fraction with argmax == label."""
    return float(np.mean(np.argmax(scores, axis=1) == np.asarray(labels)))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` (N,), ties sharing their mean rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(sorted_x)) + 1
    starts = np.r_[0, boundaries]
    ends = np.r_[boundaries, len(x)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    return ranks


def roc_auc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Binary AUC: scores (N,), targets (N,) in {0, 1} -> P(score_pos > score_neg) + 1/2 P(tie).
    NaN when only one class is present."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(targets).astype(bool)
    n_pos = int(t.sum())
    n_neg = len(t) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[t].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_multiclass(scores: np.ndarray, labels: np.ndarray) -> float:
    """scores (N, C), labels (N,) int -> macro mean of one-vs-rest AUCs over the classes
    present (scikit-learn ``roc_auc_score(labels, scores, multi_class="ovr")``). With C = 2
    this is the binary AUC of column 1."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    aucs = [roc_auc(scores[:, c], labels == c) for c in range(scores.shape[1])]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def auc_multilabel(scores: np.ndarray, targets: np.ndarray) -> float:
    """scores (N, C), targets (N, C) in {0, 1} -> macro mean of per-class AUCs (classes with
    both positives and negatives)."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    aucs = [roc_auc(scores[:, c], targets[:, c] == 1) for c in range(scores.shape[1])]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """One class, as mmcls ``average_precision``: scores (N,), targets (N,) in {1, 0, -1}
    (-1 = difficult: not counted as a prediction). Sorted by descending score (stable for
    ties); precision at each positive, summed, over the number of positives. 0 when no positive."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    t = np.asarray(targets)[order]
    positive = t == 1
    tp = np.cumsum(positive)
    counted = np.cumsum(t != -1)
    total_pos = tp[-1] if len(tp) else 0
    if total_pos == 0:
        return 0.0
    precision = np.where(positive, tp / np.maximum(counted, 1), 0.0)
    return float(precision.sum() / total_pos)


def mean_ap(scores: np.ndarray, targets: np.ndarray) -> float:
    """scores (N, C), targets (N, C) in {1, 0, -1} -> mean over classes of
    :func:`average_precision` (mmcls ``mAP`` / 100)."""
    scores = np.asarray(scores)
    targets = np.asarray(targets)
    if scores.shape != targets.shape:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} differ in shape")
    return float(np.mean([average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]))


def classification_scores(scores: np.ndarray, targets: np.ndarray, multilabel: bool) -> dict[str, float]:
    """MedFMC metrics. Multi-class: scores (N, C) probabilities, targets (N,) int -> acc, auc.
    Multi-label: scores (N, C) sigmoid outputs, targets (N, C) 0/1 -> map, auc."""
    if multilabel:
        return {"map": mean_ap(scores, targets), "auc": auc_multilabel(scores, targets)}
    return {"acc": accuracy(scores, targets), "auc": auc_multiclass(scores, targets)}


# ------------------------------------------------------------------ few-shot splits


def few_shot_split(targets: np.ndarray, n_shot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """MedFMC N-shot split -> (train indices, test indices), both sorted int64.

    targets: (N,) int class per sample (multi-class) or (N, C) 0/1 (multi-label). For each
    class in turn (seeded order) pick samples of that class not picked yet until the training
    set holds ``n_shot`` of it (a multi-label sample counts for all its classes); the rest is
    the test set. A class with fewer samples than ``n_shot`` gives all but one of them (at
    least one), so each class keeps a test sample where it can.
    """
    t = np.asarray(targets)
    onehot = t.astype(bool) if t.ndim == 2 else np.eye(int(t.max()) + 1, dtype=bool)[t]
    rng = np.random.default_rng(seed)
    chosen = np.zeros(len(onehot), dtype=bool)
    for c in rng.permutation(onehot.shape[1]):
        members = np.flatnonzero(onehot[:, c])
        if len(members) == 0:
            continue
        want = min(n_shot, max(1, len(members) - 1))
        have = int(chosen[members].sum())
        candidates = rng.permutation(members[~chosen[members]])
        chosen[candidates[: max(0, want - have)]] = True
    return np.flatnonzero(chosen), np.flatnonzero(~chosen)


def mean_over_runs(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    """Average each metric over runs (NaNs ignored); adds ``<metric>_std``."""
    keys = sorted({k for r in runs for k in r})
    out: dict[str, float] = {}
    for k in keys:
        vals = np.array([r[k] for r in runs if k in r], dtype=np.float64)
        vals = vals[~np.isnan(vals)]
        out[k] = float(vals.mean()) if len(vals) else float("nan")
        out[f"{k}_std"] = float(vals.std()) if len(vals) else float("nan")
    return out


# ------------------------------------------------------------------ NormDEL


def del_score(miou: float, retained: float, alpha: float = 1.0) -> float:
    """DEL = mIoU * exp(-alpha * R); mIoU in [0, 1], R the retained fraction of the pretraining data."""
    _check_unit("mIoU", miou)
    _check_unit("retained fraction", retained)
    return miou * math.exp(-alpha * retained)


def normdel(miou: float, retained: float, alpha: float = 1.0) -> float:
    """NormDEL = 1 / (1 + exp(-DEL)) (Yang et al. 2024, eq. 4-5), in (0.5, 0.731] for mIoU in [0, 1]."""
    return 1.0 / (1.0 + math.exp(-del_score(miou, retained, alpha)))


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value} (divide percentages by 100)")
