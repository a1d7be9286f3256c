"""Spherical k-means over the published ``embeddings/`` table, distributed on Ray.

Flow of :func:`run`:

1. **Plan** the embeddings Parquet into shards (groups of row groups, ~``shard_rows`` rows,
   at least 4 per fit task).
2. **Load the fit sample once**: one task per shard reads its rows, validates them (finite,
   non-zero, dimension D), keeps a seeded ``fit_fraction`` of them and leaves the float32
   matrix (and its ids) in the object store. Nothing is re-read from Parquet during the fit.
3. **Initialise** with greedy k-means++ on a small sample, inside one task (or ``random``).
4. **Lloyd iterations**: per iteration one task per shard group assigns its rows to the
   broadcast centroids and returns per-centroid sums (k x D), counts (k,), the objective and
   its worst-fitting points; the driver reduces them, re-seeds empty clusters with the
   farthest points and renormalises. Only centroids travel to the tasks; only k x D sums
   travel back. The first pass searches every row with a faiss ``IndexFlatIP`` (GPU index
   when the task has a GPU); later passes use per-row distance bounds (:class:`Bounds`,
   left in the object store between passes: Hamerly's upper/lower bound, the 8 nearest
   centroids of the last search and a bound on all others) to touch only the rows whose
   cluster may have changed, and update the per-centroid sums by the rows that moved. The
   result is exactly Lloyd's; once the clusters settle a pass costs O(n), not O(n k D).
   Stops when the relative objective change drops below ``tol`` or after ``max_iter``.
5. **Assign** every row once with the final centroids and write ``assignments`` parts:
   from the object store when the fit saw every row (``fit_fraction`` = 1), else streamed
   from Parquet shard by shard.

Output (DESIGN.md ``clusters/``)::

    R/clusters/centroids.parquet     cluster int32, centroid fixed_size_list<float32>[D] (unit
                                     norm), size int64 (members in the full assignment)
    R/clusters/assignments/part-*    id, cluster int32, distance float32 (1 - cosine)
    R/clusters/_manifest.json        k, dim, objective, iterations ... ; _SUCCESS last

The objective is the total cosine distance ``sum_i (1 - <x_i, c(x_i)>)``; lower is better.

Bad input: NaN / inf / zero-norm embeddings and an embedding width that differs from the
manifest's ``dim`` raise :class:`EmbeddingError` naming the offending ids; an empty table
raises :class:`EmptyInputError`; ``k`` larger than the number of fit rows raises
``ValueError`` (lower ``k`` or raise ``fit_fraction``). Embeddings are re-normalised to unit
norm before use (the contract says they already are; this absorbs float drift).
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from deldist import storage
from deldist.arrays import equal_runs
from deldist.config import StageConfig
from deldist.schema import ASSIGNMENTS_SCHEMA, centroids_schema

# ----------------------------------------------------------------------------- errors


class EmbeddingError(ValueError):
    """Embeddings that cannot be clustered: NaN/inf, zero vectors, wrong dimension."""


class EmptyInputError(ValueError):
    """The published input table has no rows."""


# ----------------------------------------------------------------------------- config


class Config(StageConfig):
    """``deldist cluster`` settings."""

    output: str = Field(description="run root URI; reads output/embeddings, writes output/clusters")
    embeddings: str | None = Field(None, description="embeddings dir (default: <output>/embeddings)")
    clusters: str | None = Field(None, description="output dir (default: <output>/clusters)")
    k: int = Field(1000, ge=1, description="number of clusters")
    max_iter: int = Field(20, ge=0, description="maximum Lloyd updates")
    tol: float = Field(1e-4, ge=0, description="stop when |obj_prev - obj| / obj_prev < tol (0: never early)")
    fit_fraction: float = Field(1.0, gt=0, le=1, description="fraction of rows the fit sees")
    init: Literal["k-means++", "random"] = "k-means++"
    init_sample_size: int | None = Field(
        None, ge=1, description="rows k-means++ runs on (default max(4k, 4096), capped at fit rows)")
    seed: int = 0
    shard_rows: int = Field(65_536, ge=1, description="target rows per read shard")
    num_tasks: int | None = Field(None, ge=1, description="tasks per iteration (default: cluster CPUs / task_cpus)")
    task_cpus: float = Field(1.0, gt=0, description="CPUs per fit / assign task (threads = max(1, round))")
    io_cpus: float = Field(0.5, gt=0, description="CPUs per load task")
    use_gpu: bool | None = Field(None, description="faiss GPU index in tasks (default: when the cluster has GPUs)")
    bounds: bool = Field(True, description="skip rows whose cluster provably cannot change (Hamerly bounds)")


# ----------------------------------------------------------------------------- math (pure)


def embedding_matrix(column: pa.ChunkedArray | pa.Array, dim: int | None = None) -> np.ndarray:
    """Arrow ``embedding`` column -> float32 (n, D): the fixed-size binary column of
    :func:`deldist.schema.embedding_type` (zero-copy per chunk), or a fixed_size_list / list of
    float (older runs, centroids).

    Raises :class:`EmbeddingError` on nulls or when the width differs from ``dim``.
    """
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks > 1 and pa.types.is_fixed_size_binary(column.type):
            parts = [embedding_matrix(chunk, dim) for chunk in column.chunks]
            return np.concatenate(parts)
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    n = len(column)
    if column.null_count:
        raise EmbeddingError(f"{column.null_count} of {n} embeddings are null")
    if pa.types.is_fixed_size_binary(column.type):
        width = column.type.byte_width // 4
        if dim is not None and width != dim:
            raise EmbeddingError(f"embedding width {width} does not match the expected dimension {dim}")
        data = column.buffers()[1]
        return np.frombuffer(data, dtype="<f4", count=n * width, offset=column.offset * width * 4).reshape(n, width)
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
    elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        width = int(lengths[0]) if n else (dim or 0)
        if n and (lengths != width).any():
            raise EmbeddingError(f"embeddings have mixed widths {sorted(set(lengths.tolist()))[:5]}")
    else:
        raise EmbeddingError(f"embedding column has type {column.type}, expected float32 vectors")
    if dim is not None and width != dim:
        raise EmbeddingError(f"embedding width {width} does not match the expected dimension {dim}")
    values = pc.list_flatten(column)
    flat = values.to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.reshape(n, width), dtype=np.float32)


def normalize_checked(x: np.ndarray, ids: Sequence[str] | pa.Array | None = None) -> np.ndarray:
    """Validate embeddings (n, D) and return them L2-normalised float32 (``x`` itself when
    every row is unit norm already, else a new array).

    Raises :class:`EmbeddingError` naming up to five offending ids when a row holds NaN/inf
    or has (near-)zero norm: such a row has no direction, so no cosine to anything.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise EmbeddingError(f"embeddings must be 2-D (n, D), got shape {x.shape}")
    squared = np.einsum("ij,ij->i", x, x)  # NaN / inf rows give NaN / inf
    bad_nan = np.flatnonzero(~np.isfinite(squared))
    bad_zero = np.flatnonzero(squared < 1e-24)

    def _names(rows: np.ndarray) -> list[str]:
        if ids is None:
            return [f"row {int(r)}" for r in rows[:5]]
        return [str(ids[int(r)]) for r in rows[:5]]

    if len(bad_nan):
        raise EmbeddingError(f"{len(bad_nan)} embeddings contain NaN or inf, e.g. {_names(bad_nan)}")
    if len(bad_zero):
        raise EmbeddingError(f"{len(bad_zero)} embeddings are zero vectors, e.g. {_names(bad_zero)}")
    if len(squared) and float(np.abs(squared - 1.0).max()) < 2e-6:
        return x  # unit already (what deldist embed writes): no copy, no rescaling error
    return x * (1.0 / np.sqrt(squared)).astype(np.float32)[:, None]


def normalize_rows(c: np.ndarray) -> np.ndarray:
    """Rows of ``c`` (k, D) scaled to unit norm; zero rows stay zero."""
    norms = np.linalg.norm(c, axis=1, keepdims=True)
    return (c / np.maximum(norms, 1e-30)).astype(np.float32)


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator,
                     local_trials: int | None = None) -> np.ndarray:
    """Greedy k-means++ seeding on unit rows ``x`` (m, D) with cosine distance -> (k, D).

    For unit vectors ``||a - b||^2 = 2 (1 - cos)``, so sampling proportional to the cosine
    distance to the nearest chosen centre is the D^2 weighting of k-means++. Greedy variant
    (as in scikit-learn): each step draws ``local_trials`` (default 2 + ln k) candidates and
    keeps the one that lowers the total distance most; the candidates are scored with one
    (trials, D) x (D, m) product. k steps in all, each a pass over ``x``: keep m modest (see
    :func:`default_init_sample_size`); :func:`run` seeds inside a 1-CPU Ray task.
    Rows at zero distance from a chosen centre (duplicates) are never drawn while any row at
    positive distance remains; when none remains, the rest are drawn uniformly.
    """
    m = len(x)
    if k > m:
        raise ValueError(f"k-means++ needs at least k={k} rows, got {m}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    trials = local_trials or 2 + int(np.log(k))
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(m)
    closest = np.maximum(1.0 - x @ x[chosen[0]], 0.0).astype(np.float64)
    closest[chosen[0]] = 0.0
    taken = np.zeros(m, dtype=bool)
    taken[chosen[0]] = True
    for i in range(1, k):
        cumulative = np.cumsum(closest)
        total = cumulative[-1]
        if total <= 0:
            pick = int(rng.choice(np.flatnonzero(~taken)))
            distance = np.maximum(1.0 - x @ x[pick], 0.0)
        else:
            picks = np.searchsorted(cumulative, rng.random(trials) * total, side="right")
            picks = np.unique(np.minimum(picks, m - 1))
            picks = picks[closest[picks] > 0]
            if len(picks) == 0:  # float edge: only zero-weight rows were hit
                picks = np.flatnonzero(closest > 0)[:1]
            candidate = np.maximum(1.0 - x[picks] @ x.T, 0.0)  # (trials, m)
            potential = np.minimum(closest[None, :], candidate).sum(axis=1)
            best = int(np.argmin(potential))
            pick = int(picks[best])
            distance = candidate[best]
        chosen[i] = pick
        taken[pick] = True
        closest = np.minimum(closest, distance)
        closest[pick] = 0.0
    return x[chosen].copy()


def random_init(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct rows of ``x`` (m, D) chosen uniformly (faiss' default seeding) -> (k, D)."""
    if k > len(x):
        raise ValueError(f"random init needs at least k={k} rows, got {len(x)}")
    return x[rng.choice(len(x), size=k, replace=False)].astype(np.float32, copy=True)


def as_tensor(a: np.ndarray) -> Any:
    """Zero-copy torch view of a numpy array, also of read-only ones (Ray object-store
    arrays): torch warns that writes would be undefined; nothing here writes to them."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _use_threads(threads: int) -> None:
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


def nearest_centroid(x: np.ndarray, centroids: np.ndarray, use_gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by inner product (faiss ``IndexFlatIP``).

    x: (n, D) float32 unit rows; centroids: (k, D) float32.
    Returns (labels int64 (n,), similarity float32 (n,)).
    """
    _check_dims(x, centroids)
    if len(x) == 0:
        return np.empty(0, np.int64), np.empty(0, np.float32)
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
    ``candidates``; sums: (k, D) float64 sum of the rows assigned to each centroid.
    """

    labels: np.ndarray
    upper: np.ndarray
    lower: np.ndarray
    candidates: np.ndarray
    rest: np.ndarray
    sums: np.ndarray


BOUND_CANDIDATES = 8  # m: candidates kept per row
BOUND_MOVERS = 32  # centroids that moved most: scored exactly in level 1
BOUND_MARGIN = 1e-5  # slack against float32 rounding in the bound tests


def assign_with_bounds(x: np.ndarray, centroids: np.ndarray, bounds: Bounds | None,
                       shift: np.ndarray | None, use_gpu: bool = False, m: int = BOUND_CANDIDATES,
                       movers: int = BOUND_MOVERS) -> tuple[Bounds, int]:
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

    Returns (new bounds with the labels and per-centroid sums, rows that needed level 2).
    Labels equal :func:`nearest_centroid`'s up to exact ties.
    """
    import torch

    _check_dims(x, centroids)
    n, k = len(x), len(centroids)
    m = min(m, k)
    if bounds is None or shift is None or n == 0:
        out = Bounds(np.zeros(n, np.int64), np.zeros(n), np.zeros(n), np.zeros((n, m), np.int64), np.zeros(n),
                     np.zeros((k, x.shape[1])))
        _full_search(x, centroids, np.arange(n), out, use_gpu)
        out.sums = torch.zeros((k, x.shape[1]), dtype=torch.float32).index_add_(
            0, torch.from_numpy(out.labels), as_tensor(np.asarray(x))).numpy().astype(np.float64)
        return out, n
    by_shift = np.argsort(-shift, kind="stable")
    top, max1 = by_shift[0], float(shift[by_shift[0]])
    max2 = float(shift[by_shift[1]]) if k > 1 else 0.0
    old_labels = bounds.labels
    out = Bounds(old_labels.copy(), bounds.upper + shift[old_labels],
                 bounds.lower - np.where(old_labels == top, max2, max1),
                 bounds.candidates.copy(), bounds.rest - max1, bounds.sums.copy())
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
    if len(changed):  # move the changed rows between the per-centroid sums
        moved_rows = torch.from_numpy(np.asarray(x)[changed].astype(np.float64))
        sums = torch.from_numpy(out.sums)
        sums.index_add_(0, torch.from_numpy(old_labels[changed]), moved_rows, alpha=-1.0)
        sums.index_add_(0, torch.from_numpy(out.labels[changed]), moved_rows)
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
                  use_gpu: bool = False, bounds: Sequence[Bounds] | None = None,
                  shift: np.ndarray | None = None) -> tuple[PartialStats, list[Bounds]]:
    """Assign every row of ``matrices`` (each (n_i, D) unit float32) to ``centroids`` (k, D)
    and accumulate the Lloyd statistics (see :class:`PartialStats`).

    bounds / shift: the :class:`Bounds` this returned last time for the same matrices and
    how far each centroid moved since (None: full search). Returns (stats, new bounds).
    """
    k, dim = centroids.shape
    sums = np.zeros((k, dim))
    counts = np.zeros(k, dtype=np.int64)
    searched = 0
    far_points: list[np.ndarray] = []
    far_distance: list[np.ndarray] = []
    new_bounds: list[Bounds] = []
    for i, x in enumerate(matrices):
        b, n_searched = assign_with_bounds(x, centroids, bounds[i] if bounds else None, shift, use_gpu)
        new_bounds.append(b)
        searched += n_searched
        sums += b.sums
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
    return stats, new_bounds


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
    sample = _init_sample(x, k, init_sample_size, rng)
    centroids = kmeans_plus_plus(sample, k, rng) if init == "k-means++" else random_init(sample, k, rng)
    shards = np.array_split(x, n_shards)
    bounds: list[list[Bounds] | None] = [None] * n_shards
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
        if _converged(history, tol):
            break
    return centroids, history


def objective(x: np.ndarray, centroids: np.ndarray) -> float:
    """Total cosine distance of rows ``x`` (n, D) to their nearest centroid (k, D)."""
    _, sims = nearest_centroid(x, centroids)
    return float((1.0 - sims.astype(np.float64)).sum())


def default_init_sample_size(k: int, n_fit: int) -> int:
    """Rows k-means++ seeds from: 4 per cluster, at least 4096 (k passes over them)."""
    return min(n_fit, max(4 * k, 4096))


def _init_sample(x: np.ndarray, k: int, size: int | None, rng: np.random.Generator) -> np.ndarray:
    size = size or default_init_sample_size(k, len(x))
    size = max(min(size, len(x)), min(k, len(x)))
    if size >= len(x):
        return x
    return x[np.sort(rng.choice(len(x), size=size, replace=False))]


def _converged(history: list[float], tol: float) -> bool:
    if len(history) < 2:
        return False
    prev, cur = history[-2], history[-1]
    return abs(prev - cur) < tol * max(abs(prev), 1e-30)


# ----------------------------------------------------------------------------- shards (I/O)


@dataclass(frozen=True)
class Shard:
    """A read unit: row groups of one or more Parquet files (paths inside the run root's fs)."""

    pieces: tuple[tuple[str, tuple[int, ...]], ...]
    num_rows: int


def _file_row_groups(fs: Any, path: str) -> list[int]:
    with fs.open_input_file(path) as f:
        meta = pq.ParquetFile(f).metadata
        return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def plan_shards(dir_uri: str, shard_rows: int, min_shards: int = 1) -> list[Shard]:
    """Split a published table into shards of at most ``shard_rows`` rows, smaller when
    needed to get about ``min_shards`` shards (parallelism). Shards hold whole row groups
    (consecutive small files are packed together), so a row group larger than the target is
    one shard on its own. Reads only the Parquet footers."""
    fs, paths = storage.published_paths(dir_uri)
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        row_groups = list(pool.map(lambda p: _file_row_groups(fs, p), paths))
    total = sum(sum(g) for g in row_groups)
    shard_rows = max(1, min(shard_rows, math.ceil(total / max(1, min_shards))))
    shards: list[Shard] = []
    pieces: list[tuple[str, tuple[int, ...]]] = []
    rows = 0
    for path, groups in zip(paths, row_groups):
        current: list[int] = []
        for i, n in enumerate(groups):
            if n == 0:
                continue
            if rows and rows + n > shard_rows:
                if current:
                    pieces.append((path, tuple(current)))
                    current = []
                shards.append(Shard(tuple(pieces), rows))
                pieces, rows = [], 0
            current.append(i)
            rows += n
        if current:
            pieces.append((path, tuple(current)))
    if rows:
        shards.append(Shard(tuple(pieces), rows))
    return shards


def read_shard(dir_uri: str, shard: Shard, columns: list[str]) -> pa.Table:
    """The rows of one shard (only ``columns``)."""
    fs, _ = storage.resolve(dir_uri)
    tables = []
    for path, groups in shard.pieces:
        with fs.open_input_file(path) as f:
            tables.append(pq.ParquetFile(f).read_row_groups(list(groups), columns=columns))
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def proportional_counts(sizes: Sequence[int], total: int) -> list[int]:
    """Split ``total`` over ``sizes`` proportionally (largest remainder), each <= its size."""
    n = sum(sizes)
    if n == 0:
        return [0] * len(sizes)
    exact = [total * s / n for s in sizes]
    counts = [min(int(e), s) for e, s in zip(exact, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: counts[i] - exact[i])
    short = total - sum(counts)
    for i in order:
        if short <= 0:
            break
        if counts[i] < sizes[i]:
            counts[i] += 1
            short -= 1
    return counts


def balanced_groups(sizes: Sequence[int], n_groups: int) -> list[list[int]]:
    """Indices of ``sizes`` split into ``n_groups`` groups of similar total (LPT greedy)."""
    n_groups = max(1, min(n_groups, len(sizes)))
    totals = [0] * n_groups
    groups: list[list[int]] = [[] for _ in range(n_groups)]
    for i in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
        g = min(range(n_groups), key=totals.__getitem__)
        groups[g].append(i)
        totals[g] += sizes[i]
    return [sorted(g) for g in groups if g]


def centroids_table(centroids: np.ndarray, sizes: np.ndarray) -> pa.Table:
    k, dim = centroids.shape
    flat = pa.array(np.ascontiguousarray(centroids, dtype=np.float32).reshape(-1), pa.float32())
    return pa.table({
        "cluster": pa.array(np.arange(k, dtype=np.int32)),
        "centroid": pa.FixedSizeListArray.from_arrays(flat, dim),
        "size": pa.array(np.asarray(sizes, dtype=np.int64)),
    }, schema=centroids_schema(dim))


def read_centroids(clusters_uri: str) -> np.ndarray:
    """Centroids (k, D) float32 of a published ``clusters/`` directory, ordered by cluster."""
    table = storage.read_published(clusters_uri, columns=["cluster", "centroid"]).sort_by("cluster")
    return embedding_matrix(table.column("centroid"))


# ----------------------------------------------------------------------------- Ray wiring


def _threads(cpus: float) -> int:
    return max(1, int(round(cpus)))


def _load_fit_shard(emb_dir: str, shard: Shard, dim: int, fraction: float, seed: int,
                    shard_index: int) -> tuple[np.ndarray, int, pa.Array]:
    """Task body: read, validate, normalise and subsample one shard -> ((m, D) float32, m,
    the m ids)."""
    table = read_shard(emb_dir, shard, ["id", "embedding"])
    ids = table.column("id").combine_chunks()
    x = normalize_checked(embedding_matrix(table.column("embedding"), dim), ids)
    if fraction < 1.0:
        keep = np.random.default_rng([seed, shard_index]).random(len(x)) < fraction
        x = np.ascontiguousarray(x[keep])
        ids = ids.filter(pa.array(keep))
    return x, len(x), ids


def _sample_rows(x: np.ndarray, m: int, seed: int, shard_index: int) -> np.ndarray:
    if m >= len(x):
        return np.asarray(x)
    rows = np.sort(np.random.default_rng([seed, shard_index, 1]).choice(len(x), m, replace=False))
    return np.asarray(x)[rows]


def _init_task(k: int, init: str, seed: int, *samples: np.ndarray) -> np.ndarray:
    """Task body: seed k centroids (k, D) from the concatenated samples."""
    sample = np.concatenate(samples)
    rng = np.random.default_rng(seed)
    return kmeans_plus_plus(sample, k, rng) if init == "k-means++" else random_init(sample, k, rng)


def _stats_task(centroids: np.ndarray, shift: np.ndarray | None, n_far: int, use_gpu: bool, threads: int,
                bounds: list[Bounds] | None, *matrices: np.ndarray) -> tuple[PartialStats, list[Bounds]]:
    """Task body of one Lloyd pass over a shard group -> (stats, bounds for the next pass)."""
    _use_threads(threads)
    return partial_stats(matrices, centroids, n_far, use_gpu, bounds, shift)


def _assignments_part(out_dir: str, ids: pa.Array | pa.ChunkedArray, labels: np.ndarray, sims: np.ndarray,
                      k: int) -> dict[str, Any]:
    """Write one ``assignments`` part -> {path, rows, counts (k,), objective}."""
    distance = np.clip(1.0 - sims, 0.0, 2.0).astype(np.float32)
    out = pa.table({"id": ids, "cluster": pa.array(labels.astype(np.int32)),
                    "distance": pa.array(distance)}, schema=ASSIGNMENTS_SCHEMA)
    path = storage.join(out_dir, storage.new_part_name())
    storage.write_table(out, path)
    return {"path": storage.resolve(path)[1], "rows": len(labels), "counts": np.bincount(labels, minlength=k),
            "objective": float(distance.astype(np.float64).sum())}


def assign_shard(emb_dir: str, shard: Shard, dim: int, centroids: np.ndarray, out_dir: str,
                  use_gpu: bool, threads: int) -> dict[str, Any]:
    """Task body: read one shard from Parquet, assign it, write its ``assignments`` part."""
    _use_threads(threads)
    table = read_shard(emb_dir, shard, ["id", "embedding"])
    ids = table.column("id")
    x = normalize_checked(embedding_matrix(table.column("embedding"), dim), ids)
    labels, sims = nearest_centroid(x, centroids, use_gpu)
    return _assignments_part(out_dir, ids, labels, sims, len(centroids))


def _assign_loaded(out_dir: str, centroids: np.ndarray, shift: np.ndarray | None, bounds: list[Bounds] | None,
                   use_gpu: bool, threads: int, n_matrices: int, *refs: Any) -> dict[str, Any]:
    """Task body of the final assignment when the fit saw every row: the group's matrices
    and ids are still in the object store and its bounds spare most of the search.
    refs: n_matrices matrices, then their n_matrices id arrays."""
    _use_threads(threads)
    matrices, ids = refs[:n_matrices], refs[n_matrices:]
    labels, sims = [], []
    for i, x in enumerate(matrices):
        b, _ = assign_with_bounds(x, centroids, bounds[i] if bounds else None, shift, use_gpu)
        labels.append(b.labels)
        sims.append(_rowwise_dot(np.asarray(x), centroids, b.labels))
    return _assignments_part(out_dir, pa.chunked_array(list(ids), pa.string()), np.concatenate(labels),
                             np.concatenate(sims), len(centroids))


def _rowwise_dot(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """<x_i, centroids[labels_i]> for every row (n,) float32, in chunks."""
    out = np.empty(len(x), np.float32)
    for s in range(0, len(x), chunk):
        out[s:s + chunk] = np.einsum("ij,ij->i", x[s:s + chunk], centroids[labels[s:s + chunk]])
    return out


def _default_tasks(task_cpus: float) -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1.0) // task_cpus))


def run(config: Config) -> dict[str, Any]:
    """Fit spherical k-means on ``embeddings/`` and publish ``clusters/`` (see module doc)."""
    import ray

    from deldist.runtime import cluster_gpus, init_ray

    init_ray()
    started = time.perf_counter()
    emb_dir = config.embeddings or storage.join(config.output, "embeddings")
    out_dir = config.clusters or storage.join(config.output, "clusters")
    assign_dir = storage.join(out_dir, "assignments")
    manifest = storage.read_manifest(emb_dir)
    dim = manifest.get("dim")
    n_tasks = config.num_tasks or _default_tasks(config.task_cpus)
    shards = plan_shards(emb_dir, config.shard_rows, min_shards=4 * n_tasks)
    n_total = sum(s.num_rows for s in shards)
    if n_total == 0:
        raise EmptyInputError(f"{emb_dir} has no rows: nothing to cluster")
    if config.k > n_total:
        raise ValueError(f"k={config.k} exceeds the number of embeddings ({n_total}); lower k")
    use_gpu = cluster_gpus() > 0 if config.use_gpu is None else config.use_gpu
    threads = _threads(config.task_cpus)
    gpu_opts = {"num_gpus": 1} if use_gpu else {}

    # 1-2. load the fit sample once into the object store
    load = ray.remote(num_cpus=config.io_cpus, num_returns=3)(_load_fit_shard)
    loads = [load.remote(emb_dir, s, dim, config.fit_fraction, config.seed, i)
             for i, s in enumerate(shards)]
    matrices = [ref for ref, _, _ in loads]
    id_refs = [ref for _, _, ref in loads]
    row_counts = [int(c) for c in ray.get([count for _, count, _ in loads])]
    del loads  # the matrices must be freed once the fit is done
    n_fit = int(sum(row_counts))
    if config.k > n_fit:
        raise ValueError(f"k={config.k} exceeds the {n_fit} rows of the fit sample "
                         f"(fit_fraction={config.fit_fraction} of {n_total}); lower k or raise fit_fraction")
    loaded = time.perf_counter()

    # 3. initialisation on a small sample, in a task (the driver never holds the data)
    m = max(config.k, config.init_sample_size or default_init_sample_size(config.k, n_fit))
    m = min(m, n_fit)
    take = proportional_counts(row_counts, m)
    sample_task = ray.remote(num_cpus=0.01)(_sample_rows)
    samples = [sample_task.remote(mat, t, config.seed, i)
               for i, (mat, t) in enumerate(zip(matrices, take)) if t > 0]
    init_task = ray.remote(num_cpus=config.task_cpus)(_init_task)
    centroids = ray.get(init_task.remote(config.k, config.init, config.seed, *samples))
    del samples
    initialised = time.perf_counter()

    # 4. Lloyd iterations: only centroids (and their shifts) go out, only k x D sums come
    #    back; each group's bounds stay in the object store between passes
    groups = balanced_groups(row_counts, n_tasks)
    stats_task = ray.remote(num_cpus=config.task_cpus, num_returns=2, **gpu_opts)(_stats_task)
    n_far = min(config.k, 256)
    history: list[float] = []
    searched: list[float] = []
    reseeded = 0
    converged = False
    bounds_refs: list[Any] = [None] * len(groups)
    shift = None
    pass_seconds: list[float] = []
    for _ in range(config.max_iter):
        pass_started = time.perf_counter()
        c_ref, s_ref = ray.put(centroids), ray.put(shift)
        calls = [stats_task.remote(c_ref, s_ref, n_far, use_gpu, threads, bounds_refs[g] if config.bounds else None,
                                   *[matrices[i] for i in group])
                 for g, group in enumerate(groups)]
        bounds_refs = [b for _, b in calls]
        stats = reduce_stats(ray.get([p for p, _ in calls]))
        new_centroids, n_empty = update_centroids(stats, centroids)
        shift, centroids = centroid_shift(centroids, new_centroids), new_centroids
        reseeded += n_empty
        history.append(stats.objective)
        searched.append(stats.searched / n_fit)
        pass_seconds.append(time.perf_counter() - pass_started)
        if _converged(history, config.tol):
            converged = True
            break
    fitted = time.perf_counter()

    # 5. one full assignment pass with the final centroids
    c_ref, s_ref = ray.put(centroids), ray.put(shift)
    if config.fit_fraction >= 1.0:  # every row is in the object store: no re-read, bounds apply
        assign = ray.remote(num_cpus=config.task_cpus, **gpu_opts)(_assign_loaded)
        results = ray.get([assign.remote(assign_dir, c_ref, s_ref, bounds_refs[g] if config.bounds else None,
                                         use_gpu, threads, len(group), *[matrices[i] for i in group],
                                         *[id_refs[i] for i in group])
                           for g, group in enumerate(groups)])
    else:  # stream every row from Parquet once
        assign = ray.remote(num_cpus=config.task_cpus, **gpu_opts)(assign_shard)
        results = ray.get([assign.remote(emb_dir, s, dim, c_ref, assign_dir, use_gpu, threads) for s in shards])
    del bounds_refs, matrices, id_refs
    sizes = np.sum([r["counts"] for r in results], axis=0).astype(np.int64)
    full_objective = float(sum(r["objective"] for r in results))
    storage.publish(assign_dir, [r["path"] for r in results],
                    {"schema": storage.schema_hex(ASSIGNMENTS_SCHEMA), "rows": n_total})
    centroids_path = storage.join(out_dir, "centroids.parquet")
    storage.write_table(centroids_table(centroids, sizes), centroids_path)
    summary = {
        "k": config.k, "dim": int(centroids.shape[1]), "rows": n_total, "fit_rows": n_fit,
        "iterations": len(history), "converged": converged, "objective": full_objective,
        "searched_fraction": [round(f, 4) for f in searched],
        "pass_seconds": [round(t, 3) for t in pass_seconds],
        "mean_distance": full_objective / n_total, "fit_objective_history": history,
        "reseeded_clusters": reseeded, "empty_clusters": int((sizes == 0).sum()),
        "largest_cluster": int(sizes.max()), "init": config.init, "seed": config.seed,
        "fit_fraction": config.fit_fraction, "use_gpu": use_gpu, "fit_tasks": len(groups),
        "seconds": {"load": loaded - started, "init": initialised - loaded,
                    "fit": fitted - initialised, "assign": time.perf_counter() - fitted},
    }
    storage.publish(out_dir, [storage.resolve(centroids_path)[1]],
                    {**summary, "assignments": "assignments", "embeddings": emb_dir,
                     "schema": storage.schema_hex(centroids_schema(int(centroids.shape[1])))})
    summary["clusters"] = out_dir
    return summary
