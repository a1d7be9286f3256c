"""Per-sample importance scores from training dynamics, and pruning by score (pure: no Ray, no I/O).

Two scores of a segmentation training sample, both recorded at every training forward pass:

- **DAD** (Dynamic Average Dice; He et al., "Data-Centric Diet", arXiv 2308.01189, IMLH @ ICML
  2023): the Dice of the argmax prediction on the target (foreground) region, averaged over the
  passes of a window of epochs. A low DAD is a hard sample, a high one an easy sample.
- **EL2N** (Paul et al., "Deep Learning on a Data Diet", NeurIPS 2021): the L2 norm of the
  error of the softmax output, ``||softmax(f(x)) - onehot(y)||_2``, averaged over a few early
  epochs. For dense labels deldist takes the L2 norm per pixel and averages it over the pixels
  (deldist's reading of "EL2N per pixel-averaged error", the DAD paper's baseline). A high EL2N
  is a hard sample.

Pruning keeps part of the ranked samples (:func:`removed_by_mode`); which part is the ``mode``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

Method = Literal["dad", "el2n"]
Mode = Literal["keep_hard", "keep_easy", "keep_tails", "keep_middle"]
MODES: tuple[str, ...] = ("keep_hard", "keep_easy", "keep_tails", "keep_middle")
DEFAULT_MODE = "keep_middle"  # the ablation on the sample data (README, "DAD and EL2N"): best mean over R = 0.5, 0.25


# ------------------------------------------------------------------ per pass (torch)


def argmax_dice(logits: Any, target: Any, foreground: int = 1) -> Any:
    """Dice of the argmax prediction on the foreground class, per sample.

    logits: (B, K, H, W) float; target: (B, H, W) long in [0, K). Returns (B,) float32:
    ``2 |P & T| / (|P| + |T|)`` with P the pixels predicted ``foreground``, T the target's.
    A sample with no foreground in either scores 1 (nothing to find and nothing found; deldist's
    rule: the authors' code gives such a sample 0 and leaves zeros out of the average)."""
    import torch

    pred = logits.detach().argmax(dim=1) == foreground
    truth = target == foreground
    inter = (pred & truth).flatten(1).sum(1).float()
    total = pred.flatten(1).sum(1).float() + truth.flatten(1).sum(1).float()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


def pixel_el2n(logits: Any, target: Any) -> Any:
    """EL2N per pixel, averaged over the pixels, per sample.

    logits: (B, K, H, W); target: (B, H, W) long in [0, K). Returns (B,) float32: the mean over
    the H x W pixels of ``||softmax(logits)[:, :, y, x] - onehot(target[y, x])||_2``."""
    import torch.nn.functional as F

    probs = logits.detach().float().softmax(dim=1)
    onehot = F.one_hot(target.long(), probs.shape[1]).permute(0, 3, 1, 2).float()
    return (probs - onehot).pow(2).sum(dim=1).sqrt().flatten(1).mean(dim=1)


# ------------------------------------------------------------------ over training (numpy)


def window_mean(sample: np.ndarray, epoch: np.ndarray, value: np.ndarray, n_samples: int,
                window: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``value`` per sample over the passes whose epoch lies in ``window`` (first, last;
    1-based, inclusive).

    sample: (P,) int in [0, n_samples), epoch: (P,) int, value: (P,) float, one entry per
    training forward pass of a sample. Returns (mean (n_samples,) float64, NaN for a sample with
    no pass in the window; passes (n_samples,) int64)."""
    first, last = window
    if first > last:
        raise ValueError(f"window {window}: first epoch after last")
    inside = (epoch >= first) & (epoch <= last)
    passes = np.bincount(sample[inside], minlength=n_samples).astype(np.int64)
    total = np.bincount(sample[inside], weights=value[inside].astype(np.float64), minlength=n_samples)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(passes > 0, total / np.maximum(passes, 1), np.nan), passes


def difficulty(scores: np.ndarray, method: str) -> np.ndarray:
    """Higher = harder, for either score: 1 - DAD (a low Dice is hard), EL2N as it is."""
    if method == "dad":
        return 1.0 - scores
    if method == "el2n":
        return scores
    raise ValueError(f"unknown method {method!r}")


def removed_by_mode(hardness: np.ndarray, prune_fraction: float, mode: str,
                    tie_break: np.ndarray | None = None) -> np.ndarray:
    """Which samples a pruning removes -> (n,) bool.

    hardness: (n,) float, higher = harder (:func:`difficulty`); NaN = unscored (never seen in
    the window), never removed. ``round(prune_fraction * n)`` samples go (n counts every row, so
    a budget is the same as a random draw's over the same rows; at most the scored ones go):

    - ``keep_hard``: the easiest go (the hardest are kept);
    - ``keep_easy``: the hardest go;
    - ``keep_middle``: both tails go, half the removals from each (the odd one from the hard
      end): the authors' code's "keep ambiguous" mode;
    - ``keep_tails``: the middle goes, a band centred on the median, so the easiest and the
      hardest stay (deldist's reading of "both tails").

    Ties are ordered by ``tie_break`` (e.g. an id hash; default the row order), so the result
    is deterministic."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} not in {MODES}")
    if not 0 <= prune_fraction <= 1:
        raise ValueError(f"prune_fraction {prune_fraction} not in [0, 1]")
    scored = np.flatnonzero(~np.isnan(hardness))
    tie = np.arange(len(hardness)) if tie_break is None else tie_break
    ranked = scored[np.lexsort((tie[scored], hardness[scored]))]  # easiest first
    n, k = len(ranked), min(len(ranked), int(round(prune_fraction * len(hardness))))
    if mode == "keep_hard":
        gone = ranked[:k]
    elif mode == "keep_easy":
        gone = ranked[n - k:]
    elif mode == "keep_middle":
        hard = (k + 1) // 2
        gone = np.concatenate([ranked[:k - hard], ranked[n - hard:]])
    else:
        start = (n - k) // 2
        gone = ranked[start:start + k]
    removed = np.zeros(len(hardness), bool)
    removed[gone] = True
    return removed


def default_window(method: str, epochs: int, early_fraction: float = 0.2) -> tuple[int, int]:
    """The window when none is given: DAD averages over every epoch recorded (deldist's choice:
    the paper's abstract says "averaged over epochs"; the authors' code averages the passes of
    the epochs it scores); EL2N over the first ``early_fraction`` of the epochs, at least one
    ("a few early epochs", Paul et al. score at epoch 20 of 200)."""
    if method == "dad":
        return 1, epochs
    return 1, max(1, int(round(early_fraction * epochs)))
