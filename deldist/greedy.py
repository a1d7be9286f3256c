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

import math
from dataclasses import dataclass
from typing import Callable

import numba
import numpy as np

from deldist.tiles import float_order_key

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


@dataclass
class NeighbourEdges:
    """The scores' neighbour lists in position space, compressed by row: items at positions
    0..n-1 sorted by (cluster, rank); item p's listed earlier items are entries
    ``offsets[p]:offsets[p + 1]`` of ``dst`` (positions, each earlier in p's cluster) and
    ``sim`` (similarities); ``bound[p]``: no earlier item unlisted for p is more similar.
    8 bytes per listed pair (int32 positions below 2^31 items), no per-pair index arrays."""

    offsets: np.ndarray  # (n + 1,) int64
    dst: np.ndarray  # (e,) int32 or int64
    sim: np.ndarray  # (e,) float32
    bound: np.ndarray  # (n,) float32
    floor: float

    @classmethod
    def from_pairs(cls, src: np.ndarray, dst: np.ndarray, sim: np.ndarray, bound: np.ndarray,
                   floor: float) -> "NeighbourEdges":
        """From (e,) pairs in any order: ``dst[e]`` listed for ``src[e]`` (dst < src)."""
        src = np.asarray(src, np.int64)
        order = np.argsort(src, kind="stable")
        counts = np.bincount(src, minlength=len(bound))
        return cls(np.r_[0, np.cumsum(counts)].astype(np.int64), np.asarray(dst, np.int64)[order],
                   np.asarray(sim, np.float32)[order], np.asarray(bound, np.float32), floor)


@numba.njit(cache=True, nogil=True)
def _resolve_in_order(candidate, offsets, dst, sim, bound, threshold, kept, dup, dup_sim,
                      unresolved):  # pragma: no cover - compiled
    """One pass in position order: a candidate is removed when a listed earlier item above
    ``threshold`` is kept (duplicate_of: the most similar, ties the earliest), else kept.
    ``threshold`` is a float64 (float32 similarities compare exactly against it)."""
    for p in range(len(candidate)):
        if not candidate[p]:
            continue
        best = -1
        best_sim = -np.inf
        for e in range(offsets[p], offsets[p + 1]):
            s = sim[e]
            if s > threshold:
                q = dst[e]
                if kept[q] and (s > best_sim or (s == best_sim and q < best)):
                    best = q
                    best_sim = s
        if best >= 0:
            dup[p] = best
            dup_sim[p] = best_sim
        else:
            kept[p] = True
            unresolved[p] = bound[p] > threshold


def resolve_kept(candidate: np.ndarray, edges: NeighbourEdges, threshold: float,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ``kept`` rule from the neighbour lists at similarity ``threshold`` (>= the floor).

    candidate: (n,) bool in position order. Returns (kept bool (n,), duplicate_of int64 (n,):
    position of the most similar earlier kept item *among the listed ones* of a removed
    candidate (ties: the earliest; an unlisted kept item may be more similar, never less
    than the threshold), -1; similarity float64 (n,), NaN; unresolved bool (n,): items kept here whose
    lists cannot rule out an unlisted kept neighbour above the threshold; they and the items
    after them in their cluster need :func:`deldist.pairwise.keep_first_exact`).

    Every listed link points to an earlier item, so one pass in position order decides each
    item after all its links (the same result as :func:`keep_first_in_order` on the links
    above the threshold): O(n + listed pairs), compiled, no per-pair temporaries (at 10M
    items and 32 listed pairs each, the rounds of :func:`keep_first_in_order` held ~20 GB).
    """
    if threshold < edges.floor:
        raise ValueError(f"similarity threshold {threshold:.4f} is below the scores' neighbour floor "
                         f"{edges.floor}; re-run dedup with neighbour_floor <= {threshold:.4f}")
    candidate = np.asarray(candidate, bool)
    n = len(candidate)
    kept = np.zeros(n, bool)
    dup = np.full(n, -1, np.int64)
    dup_sim = np.full(n, np.nan, np.float64)
    unresolved = np.zeros(n, bool)
    _resolve_in_order(candidate, edges.offsets, edges.dst, edges.sim, edges.bound, float(threshold), kept, dup,
                      dup_sim, unresolved)
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


class FloatGrid:
    """Every float32 value from ``low`` to ``high`` in ascending order, then +inf, indexed
    without materialising them (``len``, ``grid[i]``): the thresholds a ratio search may need
    when the count only changes at float32 similarities (sorting the 320M listed
    similarities of 10M items would take ~1.3 GB and tens of seconds)."""

    def __init__(self, low: float, high: float):
        self.low, self.high = _sortable(low), _sortable(high)

    def __len__(self) -> int:
        return self.high - self.low + 2

    def __getitem__(self, i: int) -> float:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return math.inf if i == len(self) - 1 else _from_sortable(self.low + i)

    def index(self, value: float) -> int:
        """The index of the largest grid value <= ``value`` (0 below the grid)."""
        if value == math.inf:
            return len(self) - 1
        return min(max(_sortable(value) - self.low, 0), len(self) - 2)


def _sortable(value: float) -> int:
    """float32 -> an int that orders as the floats do (:func:`deldist.tiles.float_order_key`)."""
    return int(float_order_key(np.float32(value).view(np.int32)))


def _from_sortable(key: int) -> float:
    return float(np.int32(float_order_key(np.int32(key))).view(np.float32))


def search_threshold(count_at: Callable[[float], int], thresholds: np.ndarray | FloatGrid, keep_count: int,
                     tolerance: int, start: int | None = None, first_step: int = 1,
                     stop_within: int | None = None) -> tuple[float, int, bool]:
    """The threshold among ``thresholds`` (ascending) whose kept count ``count_at(t)`` is
    nearest ``keep_count``, by bisection (the count grows with t, up to the local wiggles
    of the keep-first rule; the neighbours of the crossing are checked too). ``start``: an
    index near the answer (from a cheaper count): the bracket is found by doubling steps
    (from ``first_step``) out from it, so ``count_at`` runs only near the crossing (the exact kept rule gathers vectors
    for the clusters its lists cannot decide, the more the lower the threshold).
    ``stop_within``: stop at the first count that close to the target (fewer probes when each
    is costly). Returns (t, its count, reachable: within ``tolerance`` of the target)."""
    seen: dict[int, int] = {}

    def at(i: int) -> int:
        if i not in seen:
            seen[i] = count_at(float(thresholds[i]))
            if stop_within is not None and abs(seen[i] - keep_count) <= stop_within:
                raise _Found
        return seen[i]

    try:
        _bracket_and_bisect(at, len(thresholds) - 1, keep_count, start, first_step)
    except _Found:
        pass
    best = min(seen, key=lambda i: (abs(seen[i] - keep_count), i))
    return float(thresholds[best]), seen[best], abs(seen[best] - keep_count) <= tolerance


class _Found(Exception):
    """A probe of :func:`search_threshold` landed within ``stop_within``."""


def _bracket_and_bisect(at: Callable[[int], int], last: int, keep_count: int, start: int | None,
                        first_step: int) -> None:
    """The probes of :func:`search_threshold` (``at(i)``: the count at grid index i)."""
    lo, hi = 0, last
    if start is not None:
        lo = hi = min(max(start, 0), last)
        step = first_step
        if at(lo) < keep_count:  # more must stay: a higher threshold
            while hi < last and at(hi) < keep_count:
                lo, hi = hi, min(hi + step, last)
                step *= 2
        else:
            while lo > 0 and at(lo) >= keep_count:
                hi, lo = lo, max(lo - step, 0)
                step *= 2
    if at(lo) < keep_count and at(hi) > keep_count:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if at(mid) < keep_count:
                lo = mid
            else:
                hi = mid
    for i in (lo - 1, lo + 1, hi - 1, hi + 1):
        if 0 <= i <= last:
            at(i)


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
