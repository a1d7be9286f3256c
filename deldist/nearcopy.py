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

import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numba
import numpy as np

from deldist.greedy import best_kept_link, keep_first_in_order

HASH_BITS = 64


@dataclass(frozen=True)
class JoinPlan:
    """Bands (shift, width) covering the 64 bits and the per-band radius r."""

    bands: tuple[tuple[int, int], ...]
    radius: int

    def passes(self) -> list[tuple[int, int]]:
        """(band, k) passes: k = 0 pairs hashes equal on the band; k >= 1 pairs hashes whose
        band values differ in exactly k bits."""
        return [(j, k) for j in range(len(self.bands)) for k in range(self.radius + 1)]


def _bands(count: int) -> tuple[tuple[int, int], ...]:
    widths = [HASH_BITS // count + (1 if j < HASH_BITS % count else 0) for j in range(count)]
    shifts = np.r_[0, np.cumsum(widths)[:-1]]
    return tuple((int(s), int(w)) for s, w in zip(shifts, widths))


def plan_join(n: int, max_distance: int) -> JoinPlan:
    """The cheapest exact plan for ``n`` hashes and pairs within ``max_distance``. Cost model
    of the compiled join, measured on 2M pHash-like codes: a partner lookup (every present band
    value x every mask of <= r bits; a random access, binary search for bands over 24 bits)
    costs ~2.5 candidate checks; candidates of uniformly spread hashes: n^2 / 2 x sum over bands
    of (band values within r of a value) / 2^width."""
    best: tuple[float, JoinPlan] | None = None
    for radius in range(4):
        for count in range(max(1, math.ceil((max_distance + 1) / (radius + 1))), 33):
            bands = _bands(count)
            if count * (radius + 1) <= max_distance or max(w for _, w in bands) > 32:
                continue
            near = [sum(math.comb(w, k) for k in range(radius + 1)) for _, w in bands]
            values = [min(n, 2 ** w) for _, w in bands]
            probes = sum(u * v * (1.0 if w <= 24 else math.log2(max(u, 2))) for (_, w), u, v in zip(bands, values, near))
            candidates = n * (n - 1) / 2 * sum(v / 2.0 ** w for (_, w), v in zip(bands, near))
            cost = 2.5 * probes + candidates
            if best is None or cost < best[0]:
                best = (cost, JoinPlan(bands, radius))
    assert best is not None
    return best[1]


def chance_pairs(n: int, max_distance: int) -> float:
    """Expected pairs within ``max_distance`` among n unrelated frames, modelled as
    independent random 64-bit pHashes (each has exactly 32 bits set, so distances are even):
    n (n - 1) / 2 x sum_{k <= d / 2} C(32, k)^2 / C(64, 32). Unrelated real images sit a little
    closer than that (measured on scikit-image's photographs: 1st percentile 22, mean ~32)."""
    within = sum(math.comb(32, k) ** 2 for k in range(max_distance // 2 + 1)) / math.comb(64, 32)
    return n * (n - 1) / 2 * within


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance of uint64 arrays (broadcast)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


def _band(hashes: np.ndarray, shift: int, width: int) -> np.ndarray:
    return ((hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.uint32)


def _flip_masks(width: int, radius: int) -> np.ndarray:
    """Every width-bit mask with 0..radius bits set (uint32), the empty mask first."""
    return np.array([sum(1 << b for b in bits) for k in range(radius + 1)
                     for bits in itertools.combinations(range(width), k)], np.uint32)


@numba.njit(cache=True)
def _popcount(x: np.uint64) -> np.int64:  # pragma: no cover - compiled
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


@numba.njit(cache=True)
def _band_join(hashes, order, values, starts, sizes, run_of, masks, max_distance, earlier_shifts, earlier_widths,
               radius, out_i, out_j, out_d):  # pragma: no cover - compiled
    """Compiled core of :func:`band_pairs`: pairs of runs whose band values differ by a mask,
    verified on all bits and on the earlier bands. ``run_of``: band value -> run (-1 none),
    dense, or empty to search ``values``. Writes into out_* while they have room; returns how
    many pairs qualified (call again with larger arrays when it exceeds them)."""
    found = 0
    cap = out_i.shape[0]
    u = values.shape[0]
    dense = run_of.shape[0] > 0
    for m in range(masks.shape[0]):  # mask outside: partners of ascending values stay close in memory
        mask = masks[m]
        for a in range(u):
            if mask == 0:
                b = a
            else:
                partner = values[a] ^ mask
                if partner <= values[a]:
                    continue
                if dense:
                    b = run_of[partner]
                    if b < 0:
                        continue
                else:
                    b = np.searchsorted(values, partner)
                    if b >= u or values[b] != partner:
                        continue
            for p in range(starts[a], starts[a] + sizes[a]):
                first = p + 1 if b == a else starts[b]
                x = order[p]
                hx = hashes[x]
                for q in range(first, starts[b] + sizes[b]):
                    y = order[q]
                    diff = hx ^ hashes[y]
                    d = _popcount(diff)
                    if d > max_distance:
                        continue
                    earlier = False
                    for e in range(earlier_shifts.shape[0]):
                        part = (diff >> np.uint64(earlier_shifts[e])) & np.uint64((1 << earlier_widths[e]) - 1)
                        if _popcount(part) <= radius:
                            earlier = True
                            break
                    if earlier:
                        continue
                    if found < cap:
                        out_i[found] = min(x, y)
                        out_j[found] = max(x, y)
                        out_d[found] = d
                    found += 1
    return found


def band_pairs(hashes: np.ndarray, plan: JoinPlan, band: int, flips: Sequence[int], max_distance: int,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs passes (band, k) for k in ``flips`` of one band report: candidates whose band
    values differ in exactly k bits, within ``max_distance`` on all 64 bits, that no earlier
    band qualifies (so each pair is reported once overall). hashes: (n,) uint64. Returns
    (i, j, distance) int64 with i < j."""
    shift, width = plan.bands[band]
    key = _band(hashes, shift, width)
    order = np.argsort(key, kind="stable")
    values, starts, sizes = np.unique(key[order], return_index=True, return_counts=True)
    masks = np.array([m for m in _flip_masks(width, plan.radius) if bin(int(m)).count("1") in flips], np.uint32)
    earlier = np.array(plan.bands[:band], np.int64).reshape(-1, 2)
    run_of = np.zeros(0, np.int64)
    if width <= 24:  # a dense value -> run table: O(1) partner lookups
        run_of = np.full(1 << width, -1, np.int32)
        run_of[values] = np.arange(len(values))
    args = (np.ascontiguousarray(hashes, np.uint64), order.astype(np.int64), values.astype(np.uint32),
            starts.astype(np.int64), sizes.astype(np.int64), run_of, masks, np.int64(max_distance),
            np.ascontiguousarray(earlier[:, 0]), np.ascontiguousarray(earlier[:, 1]), np.int64(plan.radius))
    room = max(1024, len(hashes))
    while True:
        out = (np.empty(room, np.int64), np.empty(room, np.int64), np.empty(room, np.int64))
        found = _band_join(*args, *out)
        if found <= room:
            return tuple(o[:found] for o in out)  # type: ignore[return-value]
        room = found


def hamming_pairs(hashes: np.ndarray, max_distance: int, plan: JoinPlan | None = None,
                  passes: Sequence[tuple[int, int]] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of ``hashes`` (n,) uint64 within ``max_distance``, each once -> (i, j,
    distance) int64 with i < j. ``passes``: a subset of ``plan.passes()`` (a task's share)."""
    hashes = np.asarray(hashes, np.uint64)
    plan = plan or plan_join(len(hashes), max_distance)
    by_band: dict[int, list[int]] = {}
    for band, k in (plan.passes() if passes is None else passes):
        by_band.setdefault(band, []).append(k)
    parts = [band_pairs(hashes, plan, band, flips, max_distance) for band, flips in by_band.items()]
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


def ray_pair_finder(task_cpus: float) -> Any:
    """:func:`distributed_pairs` as a ``pair_finder`` for :func:`near_copies`: over as many
    tasks of ``task_cpus`` as the cluster holds now."""
    from deldist.runtime import task_slots

    tasks = task_slots(task_cpus)
    return lambda unique, max_distance: distributed_pairs(unique, max_distance, tasks, task_cpus)
