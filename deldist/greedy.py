"""Keep-first-in-order resolution: which items stay when an item may only be removed as a
copy of an item that is kept. Pure NumPy, no Ray, no I/O.

Items sit at positions 0..n-1 in priority order (within a cluster: its rank; for near
copies: deldist's preference order). ``candidate`` marks items still in after the earlier
rules. A candidate is **kept** unless it is linked to an earlier **kept** candidate, in which
case it is **removed** and that kept item stands for it. Non-candidates are never kept and
never remove anything. Links are edges (src, dst) with dst < src (dst earlier), e.g. cosine
similarity above the threshold, or Hamming distance of perceptual hashes within a bound.

This is the greedy maximal independent set in a fixed order. It is sequential by
definition, but every item whose earlier links are all decided can be decided at once, so
it resolves in rounds (Blelloch, Fineman and Shun, "Greedy sequential maximal independent
set and matching are parallel on average", SPAA 2012): each round decides every item with
an earlier kept link (removed) or with only removed earlier links (kept). Rounds are
vectorised; when a round decides few items (long chains of links), the remaining items
are decided by one pass in position order.

SemDeDup's reference code removes an item on similarity to *any* earlier item, kept or
not, so a chain a ~ b ~ c removes b and c although only b is like a; here c stays unless it
is like a kept item. deldist offers SemDeDup's rule as ``dedup_rule: any_earlier``.
"""

from __future__ import annotations

import numpy as np

UNDECIDED, KEPT, REMOVED = 0, 1, 2


def keep_first_in_order(candidate: np.ndarray, src: np.ndarray, dst: np.ndarray,
                        tail_fraction: float = 0.02) -> np.ndarray:
    """Decide every item: kept (True) or not (False).

    candidate: (n,) bool; src, dst: (e,) int64 edges with ``dst < src`` (dst is earlier).
    Edges that touch a non-candidate are ignored. Returns kept (n,) bool: a candidate is kept
    iff none of its earlier linked candidates is kept.
    ``tail_fraction``: when a round decides fewer than this fraction of the undecided items,
    the rest are decided in one ordered pass (bounded rounds on long chains).
    """
    candidate = np.asarray(candidate, bool)
    n = len(candidate)
    src = np.asarray(src, np.int64)
    dst = np.asarray(dst, np.int64)
    if len(src) and np.any(dst >= src):
        raise ValueError("every edge must point to an earlier item (dst < src)")
    live = candidate[src] & candidate[dst] if len(src) else np.zeros(0, bool)
    src, dst = src[live], dst[live]
    state = np.where(candidate, UNDECIDED, REMOVED).astype(np.int8)
    # items with no earlier link are kept at once
    has_link = np.zeros(n, bool)
    has_link[src] = True
    state[candidate & ~has_link] = KEPT
    undecided = int((state == UNDECIDED).sum())
    while undecided:
        dst_state = state[dst]
        kept_link = np.zeros(n, bool)
        kept_link[src[dst_state == KEPT]] = True
        open_link = np.zeros(n, bool)
        open_link[src[dst_state == UNDECIDED]] = True
        waiting = state == UNDECIDED
        state[waiting & kept_link] = REMOVED
        state[waiting & ~kept_link & ~open_link] = KEPT
        keep_edges = state[src] == UNDECIDED
        src, dst = src[keep_edges], dst[keep_edges]
        left = int((state == UNDECIDED).sum())
        decided, undecided = undecided - left, left
        if undecided and decided < tail_fraction * (decided + undecided):
            _ordered_pass(state, src, dst)
            break
    return state == KEPT


def _ordered_pass(state: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
    """Decide the undecided items in position order (in place). src/dst: the edges of the
    undecided items (any order)."""
    order = np.argsort(src, kind="stable")
    src, dst = src[order], dst[order]
    items = np.flatnonzero(state == UNDECIDED)
    starts = np.searchsorted(src, items, "left")
    stops = np.searchsorted(src, items, "right")
    for item, a, b in zip(items.tolist(), starts.tolist(), stops.tolist()):
        state[item] = REMOVED if (state[dst[a:b]] == KEPT).any() else KEPT


def best_kept_link(kept: np.ndarray, src: np.ndarray, dst: np.ndarray, score: np.ndarray,
                   n: int) -> tuple[np.ndarray, np.ndarray]:
    """For every item, its linked earlier kept item with the highest ``score`` (ties: the
    earliest) -> (position int64 (n,), -1 for none; score float (n,), NaN for none).
    src, dst, score: (e,) edges as in :func:`keep_first_in_order`."""
    src = np.asarray(src, np.int64)
    dst = np.asarray(dst, np.int64)
    score = np.asarray(score)
    to_kept = np.asarray(kept, bool)[dst] if len(dst) else np.zeros(0, bool)
    s, d, v = src[to_kept], dst[to_kept], score[to_kept]
    order = np.lexsort((d, -v.astype(np.float64), s))
    s, d, v = s[order], d[order], v[order]
    first = np.r_[True, s[1:] != s[:-1]] if len(s) else np.zeros(0, bool)
    best = np.full(n, -1, np.int64)
    best_score = np.full(n, np.nan, np.float64)
    best[s[first]] = d[first]
    best_score[s[first]] = v[first]
    return best, best_score
