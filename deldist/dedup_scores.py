"""The dedup stage's math (pure: no Ray, no I/O): rank the items of each cluster, score each
rank-ordered cluster (every item's max similarity to the items ranked before it, its
neighbour lists and their bound) and assemble the scores table. :mod:`deldist.dedup` runs
it on Ray.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deldist.arrays import equal_runs
from deldist.pairwise import to_device, triu_neighbours, triu_neighbours_clusters
from deldist.pairwise_lowp import fastest_supported, triu_neighbours_lowp
from deldist.schema import SCORES_SCHEMA
from deldist.tiles import Device, ListSpec

KeepMode = Literal["hard", "easy", "random"]
Precision = Literal["auto", "float32", "int8", "bfloat16"]
# clusters from these sizes on use the low-precision tiles under precision="auto", per tile and
# per whether neighbour lists are kept (bench/dedup.py: int8 on AMX 2026-11-30, bfloat16 on
# AVX512-BF16 2026-12-03): below them the padded tiles, the scan and the float32 rechecks
# outweigh the faster products; with lists every row rechecks ~22 candidates, not ~2
LOWP_MIN_ROWS: dict[tuple[str, bool], int] = {("int8", False): 1536, ("int8", True): 1536,
                                              ("bfloat16", False): 1024, ("bfloat16", True): 2560}
# rows a CPU scoring call takes at once (6 MB of float32 at D = 768: its cache, not DRAM, feeds
# the products); a larger cluster is a group of its own
GROUP_ROWS = 2048


def rank_within_clusters(ids: pa.Array | pa.ChunkedArray, cluster: np.ndarray, distance: np.ndarray,
                         keep: KeepMode = "hard", seed: int = 0) -> np.ndarray:
    """Rank (int64, 0 = first) of every item inside its cluster.

    ids: (n,) strings (unique); cluster: (n,) int; distance: (n,) cosine distance to the
    centroid. ``hard`` ranks the farthest first, ``easy`` the nearest first, ``random`` by a
    seeded permutation assigned in id order (independent of the row order). Ties are broken
    by id, so the result never depends on the input order.
    """
    n = len(cluster)
    if n == 0:
        return np.empty(0, np.int64)
    ids = pa.chunked_array([ids]) if isinstance(ids, pa.Array) else ids
    if keep == "random":
        key = np.empty(n, np.float64)
        by_id = pc.sort_indices(ids).to_numpy()
        key[by_id] = np.random.default_rng(seed).permutation(n)
        direction = "ascending"
    elif keep in ("hard", "easy"):
        key = np.asarray(distance, np.float64)
        direction = "descending" if keep == "hard" else "ascending"
    else:
        raise ValueError(f"keep must be hard, easy or random, got {keep!r}")
    table = pa.table({"cluster": np.asarray(cluster), "key": key, "id": ids})
    order = pc.sort_indices(table, sort_keys=[("cluster", "ascending"), ("key", direction),
                                              ("id", "ascending")]).to_numpy()
    sorted_cluster = np.asarray(cluster)[order]
    starts, ends = equal_runs(sorted_cluster)
    run_start = np.repeat(starts, ends - starts)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - run_start
    return rank


def score_sorted_clusters(x: Any, ids: pa.Array, cluster: np.ndarray, rank: np.ndarray,
                          spec: ListSpec = ListSpec(), block_rows: int = 256, col_block: int = 16_384,
                          diag_rows: int = 64, device: Device = "cpu", precision: Precision = "float32") -> pa.Table:
    """Scores table (SCORES_SCHEMA) for rows already sorted by (cluster, rank).

    x: (n, D) float32 unit rows, or a row source (:func:`sorted_cluster_neighbours`); ids: (n,)
    strings; cluster: (n,) int; rank: (n,) int64 that must be 0..n_c-1 inside each cluster
    (checked: the ranking and the data must agree).
    spec, device, precision: as in :func:`sorted_cluster_neighbours`.
    """
    n = len(x)
    starts, ends = equal_runs(cluster)
    expected = np.arange(n) - np.repeat(starts, ends - starts)
    if not np.array_equal(np.asarray(rank), expected):
        raise ValueError("ranks are not 0..n-1 within each cluster: assignments and embeddings disagree")
    scores = sorted_cluster_neighbours(x, starts, ends, spec, (block_rows, col_block, diag_rows), device, precision)
    return scores_table(ids, cluster, rank, *scores)


def sorted_cluster_neighbours(x: Any, starts: np.ndarray, ends: np.ndarray, spec: ListSpec = ListSpec(),
                              tiles: tuple[int, int, int] = (256, 16_384, 64), device: Device = "cpu",
                              precision: Precision = "float32", stats: dict[str, int] | None = None,
                              ) -> tuple[np.ndarray, ...]:
    """Every row's max similarity, duplicate row and neighbour lists within its cluster, for
    rank-ordered clusters stored one after another: cluster i is rows [starts[i], ends[i]),
    which together cover rows [0, n).

    x: (n, D) float32 unit rows, or a row source sliced the same way (``x[p0:p1]`` -> that
    array; :class:`deldist.shuffle.SortedRows` reads the rows there). On the CPU the clusters
    are scored in groups of about ``GROUP_ROWS`` rows, each group's rows taken once (deldist's
    own layout: they are still in cache for the products); on a GPU in one group (one copy
    to the device). spec: the neighbour lists kept per row; device: as in
    :func:`~deldist.pairwise.triu_max_sim`; precision: per cluster as in
    :func:`cluster_neighbours`. stats: the low-precision tiles' recheck counts are added to it
    (benchmarks). Returns (max_sim float32 (n,), duplicate row int64 (n,) (-1: none),
    neighbours int64 (n, L) ranks within the cluster, their similarities float32 (n, L),
    bound float32 (n,)).
    """
    n = len(x)
    width = spec.by_similarity + spec.by_rank
    out = (np.zeros(n, np.float32), np.full(n, -1, np.int64), np.full((n, width), -1, np.int64),
           np.full((n, width), -np.inf, np.float32), np.full(n, spec.floor, np.float32))
    for c0, c1 in cluster_groups(ends - starts, GROUP_ROWS if device == "cpu" else n):
        p0, p1 = int(starts[c0]), int(ends[c1 - 1])
        _score_group(x[p0:p1], starts[c0:c1] - p0, ends[c0:c1] - p0, spec, tiles, device, precision, stats,
                     tuple(o[p0:p1] for o in out))
        dup = out[1][p0:p1]
        dup[dup >= 0] += p0
    return out


def cluster_groups(sizes: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """Consecutive clusters packed into groups of at most ``limit`` rows (a larger cluster
    alone): [(first cluster, end), ...]."""
    groups, first, rows = [], 0, 0
    for c, size in enumerate(np.asarray(sizes).tolist()):
        if rows and rows + size > limit:
            groups.append((first, c))
            first, rows = c, 0
        rows += size
    if len(sizes):
        groups.append((first, len(sizes)))
    return groups


def _score_group(x: np.ndarray, starts: np.ndarray, ends: np.ndarray, spec: ListSpec, tiles: tuple[int, int, int],
                 device: Device, precision: Precision, stats: dict[str, int] | None, out: tuple[np.ndarray, ...]) -> None:
    """:func:`sorted_cluster_neighbours` of one group of clusters (rows [0, len(x))), into
    ``out``. On the CPU its float32 clusters are scored in one call
    (:func:`~deldist.pairwise.triu_neighbours_clusters`: per-call costs paid once per group,
    which matters for clusters of a few hundred rows)."""
    max_sim, dup, nbr, nbr_sim, bound = out
    sizes = ends - starts
    # clusters scored one call each: low precision on the CPU, every cluster on a GPU
    one_by_one = _resolve_precision(precision, sizes, spec.keeps_lists) != "float32" if device == "cpu" else \
        np.ones(len(sizes), bool)
    if not one_by_one.all():  # float32 clusters on the CPU: one call for all of them
        s32, e32 = starts[~one_by_one], ends[~one_by_one]
        # rows [a, b) from the first to the last of them; the others in between are overwritten below
        a, b = int(s32[0]), int(e32[-1])
        max_sim[a:b], arg, nbr[a:b], nbr_sim[a:b], bound[a:b] = triu_neighbours_clusters(x, s32, s32, e32, spec,
                                                                                        *tiles)
        dup[a:b] = np.where(arg >= 0, arg + np.repeat(starts, sizes)[a:b], -1)
    xd = to_device(x, device) if one_by_one.any() else x  # one copy per group; each cluster is a slice of it
    for s, e in zip(starts[one_by_one], ends[one_by_one]):
        sims, arg, nbr[s:e], nbr_sim[s:e], bound[s:e] = cluster_neighbours(xd[s:e], 0, e - s, spec, tiles, device,
                                                                           precision, stats)
        max_sim[s:e] = sims
        dup[s:e] = np.where(arg >= 0, arg + s, -1)


def cluster_neighbours(x: Any, start: int, stop: int, spec: ListSpec, tiles: tuple[int, int, int], device: Device,
                       precision: Precision, stats: dict[str, int] | None = None) -> tuple[np.ndarray, ...]:
    """Rows [start, stop) of one rank-ordered cluster -> :func:`triu_neighbours`'s results,
    from float32 tiles or (``precision``) from int8 / bfloat16 tiles with float32 values
    (:mod:`deldist.pairwise_lowp`: the same max, argmax and decisions). ``"auto"``: the tile
    this CPU runs fastest (:func:`~deldist.pairwise_lowp.fastest_supported`), for clusters of at
    least ``LOWP_MIN_ROWS`` rows."""
    precision = _resolve_precision(precision, np.array([stop]), spec.keeps_lists)[0]
    if precision != "float32" and device == "cpu":
        return triu_neighbours_lowp(np.asarray(x), start, stop, spec, precision, stats=stats)
    return triu_neighbours(x, start, stop, spec, *tiles, device=device)


def _resolve_precision(precision: Precision, rows: np.ndarray, lists: bool) -> np.ndarray:
    """(len(rows),) the tiles each cluster of ``rows`` rows runs on a CPU: ``auto`` is this
    CPU's fastest low precision for clusters of at least ``LOWP_MIN_ROWS`` rows (of that tile,
    with or without ``lists``), else float32."""
    if precision != "auto":
        return np.full(len(rows), precision, dtype=object)
    low = fastest_supported()
    if low is None:
        return np.full(len(rows), "float32", dtype=object)
    return np.where(np.asarray(rows) >= LOWP_MIN_ROWS[low, lists], low, "float32").astype(object)


def scores_table(ids: pa.Array, cluster: np.ndarray, rank: np.ndarray, max_sim: np.ndarray,
                 dup_row: np.ndarray, neighbours: np.ndarray, neighbour_sims: np.ndarray, bound: np.ndarray,
                 dup_ids: pa.Array | None = None) -> pa.Table:
    """Assemble SCORES_SCHEMA rows; ``dup_row`` indexes ``dup_ids`` (default ``ids``), -1 = none.
    neighbours / neighbour_sims: (n, L) ranks within the cluster and similarities, each row
    valid entries first (-1 padding); bound: (n,) ``unlisted_max_sim``."""
    dup_ids = ids if dup_ids is None else dup_ids
    has_dup = dup_row >= 0
    taken = pc.take(dup_ids, pa.array(np.where(has_dup, dup_row, 0)))
    duplicate_of = pc.if_else(pa.array(has_dup), taken, pa.nulls(len(dup_row), pa.string()))
    valid = np.asarray(neighbours) >= 0
    offsets = pa.array(np.r_[0, np.cumsum(valid.sum(axis=1))].astype(np.int32))
    return pa.table({
        "id": ids,
        "cluster": pa.array(np.asarray(cluster, np.int32)),
        "rank": pa.array(np.asarray(rank, np.int64)),
        "max_sim": pa.array(np.asarray(max_sim, np.float32)),
        "duplicate_of": duplicate_of,
        "neighbours": pa.ListArray.from_arrays(offsets, pa.array(np.asarray(neighbours)[valid].astype(np.int32))),
        "neighbour_sims": pa.ListArray.from_arrays(offsets, pa.array(np.asarray(neighbour_sims)[valid],
                                                                     pa.float32())),
        "unlisted_max_sim": pa.array(np.asarray(bound, np.float32)),
    }, schema=SCORES_SCHEMA)
