"""Spherical k-means math, no Ray and no I/O (seeding is in :mod:`deldist.seeding`): nearest-centroid search (faiss), the
distance bounds that let a Lloyd pass touch only the rows whose cluster may change, the
per-centroid statistics a pass returns and their reduction, and a local reference loop.

Rows and centroids are unit-norm float32; the objective is the total cosine distance
``sum_i (1 - <x_i, c(x_i)>)`` (lower is better). ``deldist.cluster`` wires these into the
distributed stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from deldist.arrays import equal_runs
from deldist.seeding import init_sample, kmeans_plus_plus, random_init
from deldist.shards import EmbeddingError, as_tensor


def normalize_rows(c: np.ndarray) -> np.ndarray:
    """Rows of ``c`` (k, D) scaled to unit norm; zero rows stay zero."""
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    return (c / np.maximum(norms, 1e-30)).astype(np.float32)


def use_threads(threads: int) -> None:
    import faiss
    import torch

    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)


def _flat_ip_index(centroids: np.ndarray, use_gpu: bool) -> Any:
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    if use_gpu and faiss.get_num_gpus() > 0:  # pragma: no cover - no GPU in CI
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def _check_dims(x: np.ndarray, centroids: np.ndarray) -> None:
    if x.ndim != 2 or centroids.ndim != 2 or x.shape[1] != centroids.shape[1]:
        raise EmbeddingError(
            f"dimension mismatch: embeddings {tuple(x.shape)} vs centroids {tuple(centroids.shape)}")


def nearest_centroid(x: np.ndarray, centroids: np.ndarray, use_gpu: bool = False, precision: str = "float32",
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by inner product (faiss ``IndexFlatIP``), or with ``precision``
    ``"int8"`` / ``"bfloat16"`` (``"auto"``: the tile this CPU runs fastest, without a GPU)
    from low-precision scores with the float32 label and similarity
    (:func:`deldist.pairwise_lowp.nearest_lowp`).

    x: (n, D) float32 unit rows; centroids: (k, D) float32.
    Returns (labels int64 (n,), similarity float32 (n,)).
    """
    from deldist.pairwise_lowp import fastest_supported, nearest_lowp

    _check_dims(x, centroids)
    if len(x) == 0:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    if precision == "auto":
        precision = fastest_supported() or "float32"
    if not use_gpu and precision != "float32":
        return nearest_lowp(x, centroids, precision)
    sims, labels = _flat_ip_index(centroids, use_gpu).search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return labels[:, 0].astype(np.int64), sims[:, 0].astype(np.float32)


def _chord(sim: np.ndarray) -> np.ndarray:
    """Euclidean distance between unit vectors with cosine ``sim``: sqrt(2 - 2 sim)."""
    return np.sqrt(np.maximum(2.0 - 2.0 * np.asarray(sim, np.float64), 0.0))


@dataclass
class Bounds:
    """Per-row state a Lloyd pass leaves for the next one over the same rows (chord
    distances ``sqrt(2 - 2 cos)``, a metric on unit vectors, so centroid moves shift them by
    at most the move):

    labels: (n,) int64 assigned centroid; upper: (n,) >= distance to it; lower: (n,) <=
    distance to every other centroid; candidates: (n, m) int64 the m nearest centroids at
    the row's last full search; rest: (n,) <= distance to every centroid outside
    ``candidates``.
    """

    labels: np.ndarray
    upper: np.ndarray
    lower: np.ndarray
    candidates: np.ndarray
    rest: np.ndarray


@dataclass
class GroupBounds:
    """What a Lloyd pass over a group of matrices leaves for the next pass over the same group:
    each matrix's :class:`Bounds` and the group's (k, D) float64 sum of the rows assigned to
    each centroid, updated by moving only the rows that changed label. One sum per group, not
    per matrix: at k = 10,000 a (k, D) sum is 61 MB, and per matrix they filled the object
    store and then the disk (10M rows, 153 read shards: ~9 GB per pass)."""

    rows: list[Bounds]
    sums: np.ndarray


BOUND_CANDIDATES = 8  # m: candidates kept per row


BOUND_MOVERS = 32  # centroids that moved most: scored exactly in level 1


BOUND_MARGIN = 1e-5  # slack against float32 rounding in the bound tests


def assign_with_bounds(x: np.ndarray, centroids: np.ndarray, bounds: Bounds | None,
                       shift: np.ndarray | None, use_gpu: bool = False, m: int = BOUND_CANDIDATES,
                       movers: int = BOUND_MOVERS, sums: np.ndarray | None = None) -> tuple[Bounds, int]:
    """Exact nearest-centroid assignment that does only the work the bounds cannot rule out.

    x: (n, D) unit float32; centroids: (k, D) unit float32; bounds: left by the previous
    pass over the same rows (None: search every row); shift: (k,) distance each centroid
    moved since. Three levels, each row stopping at the first that settles it:

    0. Hamerly: ``upper + shift[label] <= lower - max other shift`` -> label unchanged, no
       vector touched.
    1. exact scores against the row's m candidates and the ``movers`` centroids that moved
       most; settled when the best beats ``rest`` (every other centroid moved at most the
       largest remaining shift).
    2. faiss search for the m + 1 nearest (GPU index when asked and present), which also
       renews the candidates.

    sums: (k, D) float64 per-centroid sums to keep current in place (None: not kept): every
    row is added after a full search (no bounds), else only the rows that changed label move.
    Returns (new bounds with the labels, rows that needed level 2). Labels equal
    :func:`nearest_centroid`'s up to exact ties.
    """
    import torch

    _check_dims(x, centroids)
    n, k = len(x), len(centroids)
    m = min(m, k)
    if bounds is None or shift is None or n == 0:
        out = Bounds(np.zeros(n, np.int64), np.zeros(n), np.zeros(n), np.zeros((n, m), np.int64), np.zeros(n))
        _full_search(x, centroids, np.arange(n), out, use_gpu)
        if sums is not None:
            sums += torch.zeros((k, x.shape[1]), dtype=torch.float32).index_add_(
                0, torch.from_numpy(out.labels), as_tensor(np.asarray(x))).numpy().astype(np.float64)
        return out, n
    by_shift = np.argsort(-shift, kind="stable")
    top, max1 = by_shift[0], float(shift[by_shift[0]])
    max2 = float(shift[by_shift[1]]) if k > 1 else 0.0
    old_labels = bounds.labels
    out = Bounds(old_labels.copy(), bounds.upper + shift[old_labels],
                 bounds.lower - np.where(old_labels == top, max2, max1),
                 bounds.candidates.copy(), bounds.rest - max1)
    # level 0, then the same test with the exact distance to the current centroid
    open_rows = np.flatnonzero(out.upper > out.lower - BOUND_MARGIN)
    if len(open_rows):
        exact = _chord(np.einsum("ij,ij->i", x[open_rows], centroids[out.labels[open_rows]]))
        out.upper[open_rows] = exact
        open_rows = open_rows[exact > out.lower[open_rows] - BOUND_MARGIN]
    searched = 0
    if len(open_rows) and k > m:
        # level 1: candidates + movers, exactly
        moved = np.sort(by_shift[:min(movers, k)])
        rest_shift = float(shift[by_shift[len(moved)]]) if len(moved) < k else 0.0
        best, label, second, nearest_mover = _best_candidate(x[open_rows], centroids, out.candidates[open_rows], moved)
        rest = np.minimum(bounds.rest[open_rows] - rest_shift, nearest_mover)
        out.rest[open_rows] = rest
        settled = _chord(best) <= rest - BOUND_MARGIN
        rows = open_rows[settled]
        out.labels[rows] = label[settled]
        out.upper[rows] = _chord(best[settled])
        out.lower[rows] = np.minimum(second[settled], rest[settled])
        open_rows = open_rows[~settled]
    if len(open_rows):  # level 2
        _full_search(x, centroids, open_rows, out, use_gpu)
        searched = len(open_rows)
    changed = np.flatnonzero(out.labels != old_labels)
    if len(changed) and sums is not None:  # move the changed rows between the per-centroid sums
        moved_rows = torch.from_numpy(np.asarray(x)[changed].astype(np.float64))
        totals = torch.from_numpy(sums)
        totals.index_add_(0, torch.from_numpy(old_labels[changed]), moved_rows, alpha=-1.0)
        totals.index_add_(0, torch.from_numpy(out.labels[changed]), moved_rows)
    return out, searched


def _full_search(x: np.ndarray, centroids: np.ndarray, rows: np.ndarray, out: Bounds, use_gpu: bool) -> None:
    """Level 2 for ``rows``: their m + 1 nearest centroids, written into ``out``."""
    k, m = len(centroids), out.candidates.shape[1]
    if len(rows) == 0:
        return
    width = min(m + 1, k)
    found_sims, found = _flat_ip_index(centroids, use_gpu).search(
        np.ascontiguousarray(np.asarray(x)[rows], dtype=np.float32), width)
    out.labels[rows] = found[:, 0]
    out.upper[rows] = _chord(found_sims[:, 0])
    out.lower[rows] = _chord(found_sims[:, 1]) if width > 1 else np.inf
    out.candidates[rows] = found[:, :m]
    out.rest[rows] = _chord(found_sims[:, m]) if k > m else np.inf


def _best_candidate(x: np.ndarray, centroids: np.ndarray, candidates: np.ndarray, movers: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact scores against each row's candidates and the ``movers`` (sorted ids).

    Rows are grouped by their first candidate; a group is scored against the union of its
    candidates and the movers with one matrix product (a superset of each row's own set,
    which only helps). Returns (best similarity float32 (n,), its label int64 (n,), chord
    distance to the second best of the union (n,), chord distance to the nearest mover that
    is not one of the row's candidates (n,)).
    """
    n = len(x)
    sims = np.empty(n, np.float32)
    second = np.full(n, -np.inf, np.float32)
    labels = np.empty(n, np.int64)
    mover_sim = np.full(n, -np.inf, np.float32)
    order = np.argsort(candidates[:, 0], kind="stable")
    for s, e in zip(*equal_runs(candidates[order, 0])):
        rows = order[s:e]
        own = candidates[rows]
        union = np.union1d(own, movers)
        block = x[rows] @ centroids[union].T  # (rows, |union|)
        picked = np.arange(e - s)
        best = block.argmax(axis=1)
        sims[rows] = block[picked, best]
        labels[rows] = union[best]
        if len(movers):
            mover_block = block[:, np.searchsorted(union, movers)]  # (rows, movers)
            mover_block[(own[:, :, None] == movers[None, None, :]).any(axis=1)] = -np.inf
            mover_sim[rows] = mover_block.max(axis=1)
        if block.shape[1] > 1:
            block[picked, best] = -np.inf
            second[rows] = block.max(axis=1)
    return sims, labels, _chord(second), _chord(mover_sim)


def centroid_shift(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Chord distance each centroid moved: ||new_j - old_j|| -> float64 (k,)."""
    return np.linalg.norm(new.astype(np.float64) - old.astype(np.float64), axis=1)


@dataclass
class PartialStats:
    """What one shard group contributes to a Lloyd update.

    sums: (k, D) float64 sum of member vectors; counts: (k,) int64; objective: sum of
    (1 - cos) to the assigned centroid (= counts - <sums_j, c_j> summed, exact); far_points:
    (m, D) float32 rows with the largest distance bound and far_distance: (m,) those bounds
    as cosine distances (candidates to re-seed empty clusters); searched: rows that needed
    the k-way search.
    """

    sums: np.ndarray
    counts: np.ndarray
    objective: float
    far_points: np.ndarray
    far_distance: np.ndarray
    searched: int = 0


def partial_stats(matrices: Sequence[np.ndarray], centroids: np.ndarray, n_far: int,
                  use_gpu: bool = False, bounds: GroupBounds | None = None,
                  shift: np.ndarray | None = None) -> tuple[PartialStats, GroupBounds]:
    """Assign every row of ``matrices`` (each (n_i, D) unit float32) to ``centroids`` (k, D)
    and accumulate the Lloyd statistics (see :class:`PartialStats`).

    bounds / shift: the :class:`GroupBounds` this returned last time for the same matrices and
    how far each centroid moved since (None: full search). Returns (stats, new bounds).
    """
    k, dim = centroids.shape
    incremental = bounds is not None and shift is not None
    sums = bounds.sums.copy() if incremental else np.zeros((k, dim))
    counts = np.zeros(k, dtype=np.int64)
    searched = 0
    far_points: list[np.ndarray] = []
    far_distance: list[np.ndarray] = []
    new_bounds: list[Bounds] = []
    for i, x in enumerate(matrices):
        b, n_searched = assign_with_bounds(x, centroids, bounds.rows[i] if incremental else None, shift, use_gpu,
                                           sums=sums)
        new_bounds.append(b)
        searched += n_searched
        counts += np.bincount(b.labels, minlength=k)
        if n_far > 0 and len(x):
            top = np.argpartition(-b.upper, min(n_far, len(x)) - 1)[:n_far]
            far_points.append(np.asarray(x)[top])
            far_distance.append(b.upper[top] ** 2 / 2.0)  # chord -> cosine distance
    objective = float((counts - np.einsum("kd,kd->k", sums, centroids.astype(np.float64))).sum())
    stats = PartialStats(
        sums=sums,
        counts=counts,
        objective=objective,
        far_points=np.concatenate(far_points) if far_points else np.empty((0, dim), np.float32),
        far_distance=np.concatenate(far_distance) if far_distance else np.empty(0),
        searched=searched,
    )
    return stats, GroupBounds(new_bounds, sums)


def reduce_stats(parts: Sequence[PartialStats]) -> PartialStats:
    """Sum the partial statistics of all shard groups."""
    return PartialStats(
        sums=np.sum([p.sums for p in parts], axis=0),
        counts=np.sum([p.counts for p in parts], axis=0),
        objective=float(sum(p.objective for p in parts)),
        far_points=np.concatenate([p.far_points for p in parts]),
        far_distance=np.concatenate([p.far_distance for p in parts]),
        searched=sum(p.searched for p in parts),
    )


def update_centroids(stats: PartialStats, previous: np.ndarray) -> tuple[np.ndarray, int]:
    """Spherical Lloyd update -> (centroids (k, D) unit float32, number of re-seeded clusters).

    A cluster with members moves to the normalised mean of its members. An empty cluster is
    re-seeded with the worst-fitting point not used yet (farthest from its centroid); if there
    are more empty clusters than candidates, it keeps its previous centroid.
    """
    centroids = previous.astype(np.float32, copy=True)
    filled = stats.counts > 0
    centroids[filled] = normalize_rows(stats.sums[filled])
    # A member sum can cancel to ~0 (antipodal members): treat it as empty.
    degenerate = filled & (np.linalg.norm(stats.sums, axis=1) < 1e-12)
    empty = np.flatnonzero(~filled | degenerate)
    if len(empty):
        order = np.argsort(-stats.far_distance, kind="stable")
        candidates = stats.far_points[order]
        n = min(len(empty), len(candidates))
        centroids[empty[:n]] = normalize_rows(candidates[:n])
    return centroids, int(len(empty))


def kmeans_local(x: np.ndarray, k: int, max_iter: int = 20, tol: float = 1e-4, seed: int = 0,
                 init: str = "k-means++", init_sample_size: int | None = None,
                 n_shards: int = 1, use_bounds: bool = True) -> tuple[np.ndarray, list[float]]:
    """Single-process spherical k-means with exactly the distributed code path's math.

    x: (n, D) unit float32. Returns (centroids (k, D), objective per iteration).
    ``use_bounds=False`` searches every row every iteration (plain Lloyd, for tests).
    """
    rng = np.random.default_rng(seed)
    sample = init_sample(x, k, init_sample_size, rng)
    centroids = kmeans_plus_plus(sample, k, rng) if init == "k-means++" else random_init(sample, k, rng)
    shards = np.array_split(x, n_shards)
    bounds: list[GroupBounds | None] = [None] * n_shards
    shift = None
    history: list[float] = []
    for _ in range(max_iter):
        parts = []
        for i, shard in enumerate(shards):
            stats, bounds[i] = partial_stats([shard], centroids, n_far=k, bounds=bounds[i] if use_bounds else None,
                                             shift=shift)
            parts.append(stats)
        stats = reduce_stats(parts)
        new_centroids, _ = update_centroids(stats, centroids)
        shift, centroids = centroid_shift(centroids, new_centroids), new_centroids
        history.append(stats.objective)
        if has_converged(history, tol):
            break
    return centroids, history


def objective(x: np.ndarray, centroids: np.ndarray) -> float:
    """Total cosine distance of rows ``x`` (n, D) to their nearest centroid (k, D)."""
    _, sims = nearest_centroid(x, centroids)
    return float((1.0 - sims.astype(np.float64)).sum())


def has_converged(history: list[float], tol: float) -> bool:
    if len(history) < 2:
        return False
    prev, cur = history[-2], history[-1]
    return abs(prev - cur) < tol * max(abs(prev), 1e-30)
