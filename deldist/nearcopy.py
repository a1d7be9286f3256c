"""Encoder-free near-copy pass (deldist's own rule, not in MedDEL or SemDeDup).

Re-exported and re-encoded copies of the same video are the most common duplicates in an
upload stream, and a weak or mismatched encoder misses them. Every frame gets a 64-bit
perceptual hash at decode time (``imagehash.phash`` of the frame as embedded: the 8 x 8
lowest DCT frequencies of a 32 x 32 grey image against their median; see
:func:`deldist.frames.perceptual_hash`). A frame is a ``near_copy`` when its hash is within
Hamming distance ``max_hamming`` of the hash of a *kept* frame, across clusters and
across videos. Which copy stays: the sharpest (highest Laplacian variance, the ``blur``
quality column), ties by id; in ``curate-new`` the corpus's retained frames come first.

Finding the pairs (:func:`hamming_pairs`) is a multi-index hashing join (Norouzi, Punjani
and Fleet, "Fast search in Hamming space with multi-index hashing", CVPR 2012), not an
all-pairs loop: the 64 bits are cut into ``b`` bands; two hashes within distance h differ
in at most ``r`` bits of some band when ``b (r + 1) > h`` (pigeonhole). With r = 0 the
candidates are the hashes equal on a band; with r = 1 also those equal on a band with one
bit cleared (one pass per bit), split by that bit so each pair is generated once per band.
Every candidate is checked on all 64 bits and reported once, from the first band it
qualifies in. The plan (b, r) minimises passes x n + expected candidates for n hashes.
Identical hashes are joined once (:func:`group_identical`), so a long static run of equal
frames costs one hash, not its square.

Which frames stay is the keep-first rule of :mod:`deldist.greedy` over unique hashes: a hash
stands at the position of its best frame; it is kept unless an earlier kept hash is within
``max_hamming``; its first frame stays and its other frames (distance 0) are near copies of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from deldist.greedy import best_kept_link, keep_first_in_order

HASH_BITS = 64


@dataclass(frozen=True)
class JoinPlan:
    """Bands (shift, width) covering the 64 bits and the per-band radius r (0 or 1)."""

    bands: tuple[tuple[int, int], ...]
    radius: int

    def passes(self) -> list[tuple[int, int]]:
        """(band, bit) passes: bit -1 = hashes equal on the band; bit k = hashes whose band
        values differ in bit k only (radius 1)."""
        out = []
        for j, (_, width) in enumerate(self.bands):
            out.append((j, -1))
            if self.radius:
                out += [(j, k) for k in range(width)]
        return out


def _bands(count: int) -> tuple[tuple[int, int], ...]:
    widths = [HASH_BITS // count + (1 if j < HASH_BITS % count else 0) for j in range(count)]
    shifts = np.r_[0, np.cumsum(widths)[:-1]]
    return tuple((int(s), int(w)) for s, w in zip(shifts, widths))


def plan_join(n: int, max_distance: int) -> JoinPlan:
    """The cheapest exact plan for ``n`` hashes and pairs within ``max_distance``: cost =
    passes x n (a sort each) + 4 x expected candidates for uniformly spread hashes."""
    best: tuple[float, JoinPlan] | None = None
    for radius in (0, 1):
        for count in range(max(1, math.ceil((max_distance + 1) / (radius + 1))), 33):
            if count * (radius + 1) <= max_distance:
                continue
            bands = _bands(count)
            if max(w for _, w in bands) > 32:
                continue
            plan = JoinPlan(bands, radius)
            per_pair = sum((1 + radius * w) / 2.0 ** w for _, w in bands)
            cost = len(plan.passes()) * n + 4.0 * n * (n - 1) / 2 * per_pair
            if best is None or cost < best[0]:
                best = (cost, plan)
    assert best is not None
    return best[1]


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance of uint64 arrays (broadcast)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


def _band(hashes: np.ndarray, shift: int, width: int) -> np.ndarray:
    return ((hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.uint32)


def _cross_pairs(starts_a: np.ndarray, sizes_a: np.ndarray, starts_b: np.ndarray, sizes_b: np.ndarray,
                 max_pairs: int, same: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pairs of sorted positions: every member of run a with every member of run b (``same``:
    a and b are one run, each unordered pair once), in chunks of about ``max_pairs``."""
    counts = sizes_a * (sizes_a - 1) // 2 if same else sizes_a * sizes_b
    cum = np.cumsum(counts)
    lo = 0
    while lo < len(counts):
        done = cum[lo - 1] if lo else 0
        hi = max(lo + 1, int(np.searchsorted(cum, done + max_pairs, side="right")))
        sa, za, sb, zb = starts_a[lo:hi], sizes_a[lo:hi], starts_b[lo:hi], sizes_b[lo:hi]
        member = np.repeat(sa, za) + np.arange(za.sum()) - np.repeat(np.cumsum(za) - za, za)
        if same:  # partners: the members after it in the same run
            first = member + 1
            partners = np.repeat(sa + za, za) - first
        else:
            first = np.repeat(sb, za)
            partners = np.repeat(zb, za)
        left = np.repeat(member, partners)
        right = np.repeat(first, partners) + np.arange(partners.sum()) - np.repeat(np.cumsum(partners) - partners,
                                                                                   partners)
        yield left, right
        lo = hi


def band_pairs(hashes: np.ndarray, plan: JoinPlan, band: int, bits: Sequence[int], max_distance: int,
               max_pairs: int = 1 << 22) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs passes (band, bit) for ``bits`` of one band report: candidates within
    ``max_distance`` on all 64 bits that no earlier band qualifies (each pair once overall).
    hashes: (n,) uint64. Returns (i, j, distance) int64 with i < j."""
    shift, width = plan.bands[band]
    key = _band(hashes, shift, width)
    order = np.argsort(key, kind="stable")
    values, starts, sizes = np.unique(key[order], return_index=True, return_counts=True)
    found: list[tuple[np.ndarray, ...]] = []
    for bit in bits:
        if bit < 0:  # equal on the band
            many = sizes > 1
            runs = _cross_pairs(starts[many], sizes[many], starts[many], sizes[many], max_pairs, same=True)
        else:  # values differing in this bit only: each unordered pair of runs once
            partner = values ^ np.uint32(1 << bit)
            at = np.minimum(np.searchsorted(values, partner), len(values) - 1)
            pair = (values[at] == partner) & (partner > values)
            runs = _cross_pairs(starts[pair], sizes[pair], starts[at[pair]], sizes[at[pair]], max_pairs, same=False)
        for left, right in runs:
            a, b = order[left], order[right]
            diff = hashes[a] ^ hashes[b]
            d = np.bitwise_count(diff).astype(np.int64)
            ok = d <= max_distance
            for s, w in plan.bands[:band]:  # qualifies in an earlier band: reported there
                ok &= np.bitwise_count((diff >> np.uint64(s)) & np.uint64((1 << w) - 1)) > plan.radius
            a, b = a[ok], b[ok]
            found.append((np.minimum(a, b), np.maximum(a, b), d[ok]))
    if not found:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    return tuple(np.concatenate(p).astype(np.int64) for p in zip(*found))  # type: ignore[return-value]


def hamming_pairs(hashes: np.ndarray, max_distance: int, plan: JoinPlan | None = None,
                  passes: Sequence[tuple[int, int]] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of ``hashes`` (n,) uint64 within ``max_distance``, each once -> (i, j,
    distance) int64 with i < j. ``passes``: a subset of ``plan.passes()`` (a task's share)."""
    hashes = np.asarray(hashes, np.uint64)
    plan = plan or plan_join(len(hashes), max_distance)
    by_band: dict[int, list[int]] = {}
    for band, bit in (plan.passes() if passes is None else passes):
        by_band.setdefault(band, []).append(bit)
    parts = [band_pairs(hashes, plan, band, bits, max_distance) for band, bits in by_band.items()]
    if not parts:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    return tuple(np.concatenate(p) for p in zip(*parts))  # type: ignore[return-value]


def group_identical(hashes: np.ndarray, preference: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique hashes in the order of their best item.

    hashes: (n,) uint64; preference: (n,) int64, lower = preferred (unique). Returns
    (unique (u,) uint64 ordered by their best item's preference, node (n,) int64: each
    item's unique hash, best (u,) int64: the item standing for each)."""
    hashes = np.asarray(hashes, np.uint64)
    by_pref = np.argsort(preference, kind="stable")
    unique, first, inverse = np.unique(hashes[by_pref], return_index=True, return_inverse=True)
    node_order = np.argsort(first, kind="stable")  # unique hashes by the position of their best item
    rank_of = np.empty(len(unique), np.int64)
    rank_of[node_order] = np.arange(len(unique))
    node = np.empty(len(hashes), np.int64)
    node[by_pref] = rank_of[inverse]
    return unique[node_order], node, by_pref[first[node_order]]


def near_copies(hashes: np.ndarray, candidate: np.ndarray, preference: np.ndarray, max_distance: int,
                fixed: np.ndarray | None = None, pair_finder: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The near-copy rule over the candidates.

    hashes: (n,) uint64; candidate: (n,) bool; preference: (n,) int64 unique, lower kept
    first; fixed: optional (n,) bool candidates that stay whatever (a curated corpus's
    retained frames; they must come first in ``preference``). pair_finder: ``f(unique
    hashes, max_distance) -> (i, j, distance)``, default :func:`hamming_pairs` (the Ray
    wiring passes :func:`distributed_pairs`). Returns (near_copy bool (n,), copy_of int64 (n,):
    the kept item it copies, else -1; distance int64 (n,), -1 for none).
    """
    n = len(hashes)
    rows = np.flatnonzero(np.asarray(candidate, bool))
    near = np.zeros(n, bool)
    copy_of = np.full(n, -1, np.int64)
    distance = np.full(n, -1, np.int64)
    if not len(rows):
        return near, copy_of, distance
    unique, node, best = group_identical(np.asarray(hashes, np.uint64)[rows], np.asarray(preference)[rows])
    i, j, d = (pair_finder or hamming_pairs)(unique, max_distance)  # i < j: i is the earlier hash
    is_fixed = np.zeros(len(rows), bool) if fixed is None else np.asarray(fixed, bool)[rows]
    fixed_node = np.zeros(len(unique), bool)
    fixed_node[node[is_fixed]] = True
    if fixed_node.any() and not fixed_node[: int(fixed_node.sum())].all():
        raise ValueError("fixed items must come first in the preference order")
    free = ~(fixed_node[i] & fixed_node[j])  # fixed items never remove each other
    i, j, d = i[free], j[free], d[free]
    kept_node = keep_first_in_order(np.ones(len(unique), bool), j, i)
    link, score = best_kept_link(kept_node, j, i, -d.astype(np.float64), len(unique))
    is_best = np.zeros(len(rows), bool)
    is_best[best] = True
    same_hash = kept_node[node] & ~is_best & ~is_fixed  # a copy of its own hash's best item
    moved = ~kept_node[node]  # its hash is within max_distance of an earlier kept hash
    target = np.where(same_hash, best[node], best[np.maximum(link[node], 0)])
    dist = np.where(same_hash, 0, -np.nan_to_num(score[node], nan=1.0))
    copies = same_hash | moved
    near[rows[copies]] = True
    copy_of[rows[copies]] = rows[target[copies]]
    distance[rows[copies]] = dist[copies].astype(np.int64)
    return near, copy_of, distance


def distributed_pairs(unique: np.ndarray, max_distance: int, tasks: int, task_cpus: float = 1.0) -> tuple[np.ndarray, ...]:
    """:func:`hamming_pairs` spread over Ray tasks: the hashes go to the object store once and
    each task runs its share of the join's passes."""
    import ray

    plan = plan_join(len(unique), max_distance)
    passes = plan.passes()
    shares = [passes[k::tasks] for k in range(max(1, min(tasks, len(passes))))]
    ref = ray.put(np.asarray(unique, np.uint64))
    task = ray.remote(num_cpus=task_cpus)(hamming_pairs)
    parts: list[Any] = ray.get([task.remote(ref, max_distance, plan, share) for share in shares])
    return tuple(np.concatenate(p) for p in zip(*parts))
