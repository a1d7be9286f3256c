"""Pairwise max-similarity kernels, pure math (no Ray, no I/O).

- :func:`triu_max_sim`: for rank-ordered unit rows ``x`` (n, D), each row's highest cosine
  similarity to the rows before it, and which row (the first on exact ties).
- :func:`triu_neighbours`: the same, plus each row's neighbour lists (:class:`NeighbourLists`):
  what the kept-aware selection needs to decide, at any threshold, whether an earlier *kept*
  row is above it.
- :func:`max_sim_to`: each query row's max similarity to a set of key rows.
- :func:`keep_first_exact`: the kept-aware rule computed from the vectors.

All follow the tile plan of :mod:`deldist.tiles`. ``device="cpu"`` runs NumPy (float32 sgemm)
with the per-tile merges compiled by numba; any other torch device runs
:mod:`deldist.pairwise_torch`: one host-to-device copy per call, results back as NumPy, the
same results up to float32 rounding.
"""

from __future__ import annotations

import numba
import numpy as np

from deldist import pairwise_torch
from deldist.greedy import keep_first_in_order
from deldist.tiles import (
    Device,
    ListSpec,
    Matrix,
    check_range,
    insert_top,
    rectangle_tiles,
    triangle_tiles,
    union_lists,
)

_MASKS: dict[int, np.ndarray] = {}


def _upper_mask(size: int) -> np.ndarray:
    """Boolean (size, size) mask of j >= i: what row i of a diagonal block may not see."""
    mask = _MASKS.get(size)
    if mask is None:
        mask = np.triu(np.ones((size, size), dtype=bool))
        _MASKS[size] = mask
    return mask


def _merge_max(best: np.ndarray, arg: np.ndarray, sims: np.ndarray, offset: int) -> None:
    """Fold a (rows, cols) similarity tile into the running row max ``best`` / ``arg``
    (in place; columns are numbered from ``offset``). Larger wins; on exact ties the lower
    column wins, so the result is the first argmax whatever the tile order."""
    tile_arg = sims.argmax(axis=1)
    tile_best = sims[np.arange(len(sims)), tile_arg]
    tile_arg += offset
    better = (tile_best > best) | ((tile_best == best) & (tile_arg < arg))
    best[better] = tile_best[better]
    arg[better] = tile_arg[better]


@numba.njit(cache=True, nogil=True)
def _merge_tile(sims, c0, r0, first_row, top_sim, top_idx, first_sim, first_idx, first_count, floor_below, best,
                arg):  # pragma: no cover - compiled
    """One pass over a similarity tile: each row's max (the first on ties), its
    ``by_similarity`` most similar columns (sorted insertion; ties keep the earlier column)
    and its first ``by_rank`` columns at or above the floor. Tiles of a row must arrive in
    increasing column order. ``first_row`` >= 0: the tile reaches the diagonal and its row r
    is row ``first_row + r`` of x, which only sees columns before it (so no mask is needed).

    The by-rank list takes the row's first columns; the max and the by-similarity list then
    scan the row from its last column back (deldist's own order, the same results: ties are
    decided by column). Later-ranked items tend to be the more similar ones, so backwards the
    list's cut rises early and far fewer values are inserted (bench data, clusters of ~120
    rows: 45 % of the pairs instead of 65 %)."""
    m = top_sim.shape[1]
    mr = first_sim.shape[1]
    for r in range(sims.shape[0]):
        row = r0 + r
        cols = sims.shape[1] if first_row < 0 else min(sims.shape[1], first_row + r - c0)
        k = first_count[row]
        c = 0
        while k < mr and c < cols:
            if sims[r, c] > floor_below:
                first_sim[row, k] = sims[r, c]
                first_idx[row, k] = c0 + c
                k += 1
            c += 1
        first_count[row] = k
        cut = top_sim[row, m - 1] if m else np.inf
        cut_idx = top_idx[row, m - 1] if m else -1
        row_best = best[r]
        row_arg = arg[r]
        # below ``low`` a value changes nothing: under the max, and under the floor or the cut
        low = min(row_best, max(cut, floor_below))
        for c in range(cols - 1, -1, -1):
            s = sims[r, c]
            if s < low:
                continue
            j = c0 + c
            if s > row_best or (s == row_best and j < row_arg):
                row_best = s
                row_arg = j
            if s > floor_below and (s > cut or (s == cut and j < cut_idx)):
                cut = insert_top(top_sim, top_idx, row, s, j)
                cut_idx = top_idx[row, m - 1]
            low = min(row_best, max(cut, floor_below))
        best[r] = row_best
        arg[r] = row_arg


class NeighbourLists:
    """Per row, the earlier items the kept-aware selection needs (NumPy accumulator).

    Two lists over the earlier items with similarity >= ``floor``: the ``by_similarity``
    most similar (ties: the earlier) and the ``by_rank`` earliest-ranked. The first finds a
    row's closest copies; the second its earliest neighbours, which are the ones most often
    kept (with every sweep threshold the earliest member of a group of copies stays).
    Tiles of one row must be merged in increasing column order (as the kernels do).
    :meth:`result` gives the union and ``bound``: no unlisted earlier item has similarity
    above it, so at a threshold t >= bound a row's list holds every earlier item above t.
    """

    def __init__(self, rows: int, spec: ListSpec):
        self.spec = spec
        self.floor_below = np.float32(np.nextafter(np.float32(spec.floor), np.float32(-np.inf)))
        self.top_sim = np.full((rows, spec.by_similarity), -np.inf, np.float32)
        self.top_idx = np.full((rows, spec.by_similarity), -1, np.int64)
        self.first_sim = np.full((rows, spec.by_rank), -np.inf, np.float32)
        self.first_idx = np.full((rows, spec.by_rank), -1, np.int64)
        self.first_count = np.zeros(rows, np.int64)

    def merge(self, r0: int, r1: int, sims: np.ndarray, c0: int, best: np.ndarray, arg: np.ndarray,
              first_row: int = -1) -> None:
        """Fold the (r1 - r0, cols) tile ``sims`` (columns numbered from ``c0``; masked
        entries -inf) into rows [r0, r1), and into their running max ``best`` / ``arg``
        (views of rows [r0, r1)). ``first_row`` >= 0: the tile's row r is row ``first_row +
        r`` of x and sees only the columns before it (a diagonal tile, unmasked)."""
        _merge_tile(sims, c0, r0, first_row, self.top_sim, self.top_idx, self.first_sim, self.first_idx,
                    self.first_count, self.floor_below, best, arg)

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(idx int64 (rows, L), sim float32 (rows, L), bound float32 (rows,)): the union of
        both lists, each row sorted by similarity (descending; ties: lower index first) and
        padded with -1 / -inf; L = by_similarity + by_rank."""
        return union_lists(self.top_idx, self.top_sim, self.first_idx, self.first_sim, self.spec.floor)


def triu_neighbours(x: Matrix, start: int = 0, stop: int | None = None, spec: ListSpec = ListSpec(),
                    block_rows: int = 256, col_block: int = 16_384, diag_rows: int = 64,
                    device: Device = "cpu") -> tuple[np.ndarray, ...]:
    """:func:`triu_max_sim` plus each row's neighbour lists (:class:`NeighbourLists`), from
    the same tiles. Returns (max_sim (r,), argmax (r,), idx int64 (r, L), sim float32 (r, L),
    bound float32 (r,)) for the r = stop - start rows; idx are row numbers of ``x``."""
    if device == "cpu":
        return _triu_max_sim_numpy(np.asarray(x), start, stop, block_rows, col_block, diag_rows, spec)
    return pairwise_torch.triu_max_sim_torch(x, start, stop, block_rows, col_block, diag_rows, device, spec)


def triu_max_sim(x: Matrix, start: int = 0, stop: int | None = None, block_rows: int = 256,
                 col_block: int = 16_384, diag_rows: int = 64, device: Device = "cpu",
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Max similarity of each row to the rows before it.

    x: (n, D) float32 rows in rank order (unit norm). For rows i in [start, stop):
    ``max_sim[i - start] = max_{j < i} <x_i, x_j>`` and ``argmax[i - start]`` that j (the
    first one on exact ties); row 0 gets max_sim 0 and argmax -1.

    Blockwise (float32 matmuls): a block of ``block_rows`` rows is multiplied against all
    rows before it in column tiles of ``col_block`` (large, efficient products, no mask); its
    own diagonal block is covered by sub-blocks of ``diag_rows`` rows, each against the
    block's rows up to itself with only its own triangle masked. Work: n^2 / 2 + n * diag_rows
    / 2 dot products (about half of the full n x n matrix); memory: O(block_rows x col_block)
    besides ``x``.

    device: ``"cpu"`` runs NumPy's BLAS; another torch device (``"cuda"``) runs the same
    blocks in torch there, rows [0, stop) of ``x`` copied once (``x`` may also be a tensor
    already on that device, e.g. a bucket moved once by :func:`to_device`).
    Returns (max_sim float32 (stop - start,), argmax int64 (stop - start,)), NumPy.
    """
    if device == "cpu":
        return _triu_max_sim_numpy(np.asarray(x), start, stop, block_rows, col_block, diag_rows)
    return pairwise_torch.triu_max_sim_torch(x, start, stop, block_rows, col_block, diag_rows, device)


def max_sim_to(q: Matrix, keys: Matrix, block_rows: int = 256,
               col_block: int = 16_384, device: Device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Max similarity of each query row to any key row, blockwise.

    q: (m, D), keys: (p, D) float32 unit rows (NumPy, or tensors on ``device``); device as in
    :func:`triu_max_sim`. Returns (max_sim float32 (m,), argmax int64 (m,) into keys, the
    first on exact ties); -inf and -1 when there are no keys.
    """
    if device == "cpu":
        return _max_sim_to_numpy(np.asarray(q), np.asarray(keys), block_rows, col_block)
    return pairwise_torch.max_sim_to_torch(q, keys, block_rows, col_block, device)


def _triu_max_sim_numpy(x: np.ndarray, start: int = 0, stop: int | None = None, block_rows: int = 256,
                        col_block: int = 16_384, diag_rows: int = 64, spec: ListSpec | None = None,
                        ) -> tuple[np.ndarray, ...]:
    """:func:`triu_max_sim` in NumPy (float32 sgemm); with ``spec``, :func:`triu_neighbours`."""
    n = len(x)
    stop = check_range(n, start, stop)
    if spec is not None:
        return triu_neighbours_clusters(x, np.array([0]), np.array([start]), np.array([stop]), spec, block_rows,
                                        col_block, diag_rows)
    out_sim = np.full(stop - start, -np.inf, np.float32)
    out_arg = np.full(stop - start, -1, np.int64)
    if stop > start:
        x = np.ascontiguousarray(x, dtype=np.float32)
        for r0, r1, c0, c1, diagonal in triangle_tiles(start, stop, block_rows, col_block, diag_rows):
            sims = x[r0:r1] @ x[c0:c1].T
            if diagonal:
                np.copyto(sims[:, r0 - c0:], -np.inf, where=_upper_mask(diag_rows)[: r1 - r0, : r1 - r0])
            _merge_max(out_sim[r0 - start:r1 - start], out_arg[r0 - start:r1 - start], sims, c0)
        if start == 0:
            out_sim[0], out_arg[0] = 0.0, -1
    return out_sim, out_arg


def triu_neighbours_clusters(x: np.ndarray, cluster_starts: np.ndarray, starts: np.ndarray, stops: np.ndarray,
                             spec: ListSpec = ListSpec(), block_rows: int = 256, col_block: int = 16_384,
                             diag_rows: int = 64) -> tuple[np.ndarray, ...]:
    """:func:`triu_neighbours` (float32, NumPy) of many row ranges at once: rows [starts[i],
    stops[i]) of ``x``, each against the rows before it in its cluster, which begins at row
    ``cluster_starts[i]`` of x (clusters stored one after another, each in rank order).
    Argmax and neighbour indices count from the cluster's first row.

    One accumulator, one reused tile buffer and one list union serve every range, so a
    bucket of small clusters pays the per-call costs once. Diagonal tiles need no mask: the
    merge stops each row at its own column. Returns (max_sim (r,), argmax (r,), idx int64
    (r, L), sim float32 (r, L), bound (r,)) for the r = stops[-1] - starts[0] rows from
    ``starts[0]`` on (ranges ascending); rows outside every range keep -inf / -1 / empty
    lists / bound = floor. A cluster's first row gets max_sim 0 and argmax -1.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    first = int(starts[0]) if len(starts) else 0
    rows = int(stops[-1]) - first if len(starts) else 0
    best = np.full(rows, -np.inf, np.float32)
    arg = np.full(rows, -1, np.int64)
    lists = NeighbourLists(rows, spec)
    buffer = np.empty(block_rows * min(col_block, max(len(x), 1)), np.float32)  # one tile, reused
    for base, start, stop in zip(cluster_starts.tolist(), starts.tolist(), stops.tolist()):
        cluster = x[base:stop]
        for r0, r1, c0, c1, _ in triangle_tiles(start - base, stop - base, block_rows, col_block, diag_rows):
            sims = buffer[: (r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0)
            np.matmul(cluster[r0:r1], cluster[c0:c1].T, out=sims)
            l0 = base + r0 - first
            lists.merge(l0, l0 + r1 - r0, sims, c0, best[l0:l0 + r1 - r0], arg[l0:l0 + r1 - r0], first_row=r0)
        if start == base < stop:
            best[start - first], arg[start - first] = 0.0, -1
    return (best, arg, *lists.result())


def _max_sim_to_numpy(q: np.ndarray, keys: np.ndarray, block_rows: int = 256, col_block: int = 16_384,
                      ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`max_sim_to` in NumPy (float32 sgemm)."""
    best = np.full(len(q), -np.inf, np.float32)
    arg = np.full(len(q), -1, np.int64)
    q = np.ascontiguousarray(q, dtype=np.float32)
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    for r0, r1, c0, c1 in rectangle_tiles(len(q), len(keys), block_rows, col_block):
        _merge_max(best[r0:r1], arg[r0:r1], q[r0:r1] @ keys[c0:c1].T, c0)
    return best, arg


def to_device(x: np.ndarray, device: Device) -> Matrix:
    """The matrix the kernels on ``device`` read: ``x`` itself for ``"cpu"`` (NumPy), else a
    float32 tensor on ``device`` (one host-to-device copy; callers then slice it per
    cluster instead of copying every cluster)."""
    return x if device == "cpu" else pairwise_torch.as_device_tensor(x, device)


def keep_first_exact(x: np.ndarray, candidate: np.ndarray, threshold: float, n_fixed: int = 0,
                     block_rows: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kept-aware rule computed from the vectors (no neighbour lists): rows in rank
    order; a candidate row is removed iff its similarity to an earlier *kept* row exceeds
    ``threshold`` (:mod:`deldist.greedy`). Rows [0, n_fixed) are kept as given (a curated
    corpus's retained items).

    x: (n, D) float32 unit rows; candidate: (n,) bool. Work: each block of ``block_rows``
    rows against the rows kept before it, plus its own (block, block) triangle: O(n x kept x
    D), never O(n^2) memory. Returns (kept bool (n,), duplicate_of int64 (n,): the most
    similar earlier kept row of a removed candidate (ties: the earliest), else -1;
    similarity float32 (n,) to it, NaN for none).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    candidate = np.asarray(candidate, bool).copy()
    candidate[:n_fixed] = True
    kept = np.zeros(n, bool)
    kept[:n_fixed] = True
    dup_of = np.full(n, -1, np.int64)
    dup_sim = np.full(n, np.nan, np.float32)
    kept_rows = np.empty((max(n, 1), x.shape[1] if x.ndim == 2 else 0), np.float32)
    kept_pos = np.empty(max(n, 1), np.int64)
    kept_rows[:n_fixed], kept_pos[:n_fixed] = x[:n_fixed], np.arange(n_fixed)
    n_kept = n_fixed
    for b0 in range(n_fixed, n, block_rows):
        b1 = min(b0 + block_rows, n)
        block = x[b0:b1]
        before_sim = np.full(b1 - b0, -np.inf, np.float32)
        before_arg = np.full(b1 - b0, -1, np.int64)
        if n_kept:
            _merge_max(before_sim, before_arg, block @ kept_rows[:n_kept].T, 0)
        own = block @ block.T
        src, dst = np.nonzero(np.tril(own > threshold, -1))
        open_rows = candidate[b0:b1] & ~(before_sim > threshold)
        kept_here = keep_first_in_order(open_rows, src, dst)
        # the best kept link of each row: kept before the block, or kept earlier in it
        inside = np.where(np.tril(np.ones_like(own, bool), -1) & kept_here[None, :], own, -np.inf)
        in_arg = inside.argmax(axis=1)
        in_sim = inside[np.arange(b1 - b0), in_arg]
        use_inside = in_sim > before_sim  # ties: the row kept before the block (earlier)
        best_sim = np.where(use_inside, in_sim, before_sim)
        best_pos = np.where(use_inside, b0 + in_arg, kept_pos[np.maximum(before_arg, 0)])
        removed = candidate[b0:b1] & ~kept_here
        kept[b0:b1] = kept_here
        dup_of[b0:b1] = np.where(removed, best_pos, -1)
        dup_sim[b0:b1] = np.where(removed, best_sim, np.nan)
        new = np.flatnonzero(kept_here)
        kept_rows[n_kept:n_kept + len(new)] = block[new]
        kept_pos[n_kept:n_kept + len(new)] = b0 + new
        n_kept += len(new)
    return kept, dup_of, dup_sim
