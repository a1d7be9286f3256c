"""The pairwise kernels of :mod:`deldist.pairwise` (within-cluster max and neighbour lists)
and the k-means assignment from low-precision tiles, with float32 results.

deldist's own method. ``precision`` picks the tile: ``"int8"`` (:mod:`deldist.int8_tiles`:
int8 digit products with exact integer sums, margin ~2.6e-4 at D = 768, ~2.8x the float32
rate on AMX) or ``"bfloat16"`` (:mod:`deldist.bf16_tiles`: margin ~0.006; measured slower
than float32 on dense clusters). The scan that keeps each row's candidates is in
:mod:`deldist.lowp_tiles`; here every candidate is recomputed in float32 and the row's
results are derived from those values (a row whose window overflowed is recomputed in
float32 whole). So:

- ``max_sim`` / ``argmax`` are the float32 kernel's (the float32 dot of the true argmax);
- every listed similarity is an exact float32 value; list membership follows the tile's
  order, so a list may name other items than the float32 kernel's among near-equal ones,
  and ``bound`` is a proven upper bound of every unlisted earlier item's float32 value. The
  kept-aware selection (:func:`deldist.greedy.resolve_kept`) only needs exact listed values
  and a sound bound, so its kept / removed decisions are those of the float32 run.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from deldist import bf16_tiles, int8_tiles
from deldist.lowp_tiles import Candidates, LowPrecision, dot_float32
from deldist.tiles import ListSpec, check_range, union_lists


def prepare_rows(x: np.ndarray, precision: LowPrecision, reuse: bool = False, centre: bool = False) -> Any:
    """x (n, D) float32 unit rows -> the prepared rows of ``precision``'s tiles
    (:class:`~deldist.int8_tiles.Int8Rows` or :class:`~deldist.bf16_tiles.Bf16Rows`):
    ``margins(s, e, cols)``, ``above_one``, ``spare`` and ``products(block_rows, col_block)``.
    ``reuse`` (int8): in this thread's scratch buffer, valid until its next reuse; ``centre``
    (bfloat16): tiles of the rows minus their mean, for rows scored against each other."""
    if precision == "int8":
        return int8_tiles.prepare(x, reuse)
    if precision == "bfloat16":
        return bf16_tiles.prepare(x, centre)
    raise ValueError(f"unknown low precision {precision!r}")


def fastest_supported() -> LowPrecision | None:
    """The low-precision tile this CPU runs faster than float32 sgemm, or None (measured:
    bench/RESULTS.md): int8 on CPUs with AMX (2026-11-30: 0.53x the float32 floor at 1M);
    bfloat16 on CPUs with AVX512-BF16 and no AMX (2026-12-03, AMD Zen 5: the pairwise kernel
    with centred tiles 0.43x the floor at 1M, the k-means assignment 0.55x faiss's float32
    time with the same labels)."""
    if int8_tiles.int8_supported():
        return "int8"
    if bf16_tiles.bf16_supported():
        return "bfloat16"
    return None


@numba.njit(cache=True, nogil=True)
def _add_candidates(x, i, idx, count, cand_idx, cand_sim, n, slot):  # pragma: no cover - compiled
    """Append idx[:count] not yet among cand_idx[:n] (``slot[j]``: j's place there, -1 if
    absent), with their float32 dot to row i."""
    for e in range(count):
        j = idx[e]
        if j >= 0 and slot[j] < 0:
            slot[j] = n
            cand_idx[n] = j
            cand_sim[n] = dot_float32(x[i], x[j])
            n += 1
    return n


@numba.njit(cache=True, nogil=True)
def _finish_rows(x, first_row, top_idx, excluded, win_idx, win_count, rank_idx, rank_count, delta, above_one, floor, by_sim,
                 by_rank, out_max, out_arg, out_top_idx, out_top_sim, out_first_idx, out_first_sim, out_bound,
                 certified, slot):  # pragma: no cover - compiled
    """Recompute every candidate in float32 and derive each row's exact max / argmax, lists
    and bound; ``certified[r]``: the window did not overflow, so it holds the argmax.
    ``slot``: (len(x),) int32 scratch, all -1 (and left so)."""
    k_top = top_idx.shape[1]
    size = k_top + win_idx.shape[1] + rank_idx.shape[1]
    cand_idx = np.empty(size, np.int64)
    cand_sim = np.empty(size, np.float32)
    listed = np.zeros(size, np.bool_)
    for r in range(top_idx.shape[0]):
        i = first_row + r
        n = _add_candidates(x, i, top_idx[r], k_top, cand_idx, cand_sim, 0, slot)
        certified[r] = win_count[r] >= 0
        n = _add_candidates(x, i, win_idx[r], max(win_count[r], 0), cand_idx, cand_sim, n, slot)
        n = _add_candidates(x, i, rank_idx[r], rank_count[r], cand_idx, cand_sim, n, slot)
        best, arg = -np.inf, -1
        for p in range(n):
            if cand_sim[p] > best or (cand_sim[p] == best and cand_idx[p] < arg):
                best, arg = cand_sim[p], cand_idx[p]
        out_max[r] = best
        out_arg[r] = arg
        # top list: the by_sim largest exact values >= floor (ties: lower index)
        m = 0
        for p in range(n if by_sim > 0 else 0):
            v, j = cand_sim[p], cand_idx[p]
            if v < floor:
                continue
            if m == by_sim and not (v > out_top_sim[r, m - 1] or (v == out_top_sim[r, m - 1]
                                                                  and j < out_top_idx[r, m - 1])):
                continue
            pos = m if m < by_sim else by_sim - 1
            while pos > 0 and (out_top_sim[r, pos - 1] < v or (out_top_sim[r, pos - 1] == v
                                                               and out_top_idx[r, pos - 1] > j)):
                out_top_sim[r, pos] = out_top_sim[r, pos - 1]
                out_top_idx[r, pos] = out_top_idx[r, pos - 1]
                pos -= 1
            out_top_sim[r, pos] = v
            out_top_idx[r, pos] = j
            if m < by_sim:
                m += 1
        for e in range(m):
            listed[slot[out_top_idx[r, e]]] = True
        # rank list: the first by_rank buffered columns (column order) with exact value >= floor
        f = 0
        for e in range(rank_count[r]):
            if f == by_rank:
                break
            j = rank_idx[r, e]
            p = slot[j]
            if cand_sim[p] >= floor:
                out_first_idx[r, f] = j
                out_first_sim[r, f] = cand_sim[p]
                listed[p] = True
                f += 1
        # bound: every unlisted column's float32 value is at most this
        over = delta[r] + (above_one if excluded[r] >= 1 else np.float32(0))
        bound = max(np.float32(floor), excluded[r] + over)
        for p in range(n):
            if not listed[p] and cand_sim[p] > bound:
                bound = cand_sim[p]
            listed[p] = False
            slot[cand_idx[p]] = -1
        out_bound[r] = bound


def _exact_rows(x: np.ndarray, rows: np.ndarray, spec: ListSpec | None, chunk: int = 256,
                ) -> tuple[np.ndarray, ...]:
    """The float32 kernel's results for the given (ascending) rows, each against all rows
    before it, ``chunk`` rows at a time (memory O(chunk x n))."""
    from deldist.pairwise import NeighbourLists, _merge_max

    best = np.full(len(rows), -np.inf, np.float32)
    arg = np.full(len(rows), -1, np.int64)
    lists = NeighbourLists(len(rows), spec) if spec is not None else None
    for a in range(0, len(rows), chunk):
        part = rows[a:a + chunk]
        stop = int(part.max()) + 1
        sims = x[part] @ x[:stop].T
        sims[np.arange(stop)[None, :] >= part[:, None]] = -np.inf
        if lists is None:
            _merge_max(best[a:a + chunk], arg[a:a + chunk], sims, 0)
        else:
            lists.merge(a, a + len(part), sims, 0, best[a:a + chunk], arg[a:a + chunk])
    return (best, arg) if lists is None else (best, arg, *lists.result())


def triu_neighbours_lowp(x: np.ndarray, start: int = 0, stop: int | None = None, spec: ListSpec | None = ListSpec(),
                         precision: LowPrecision = "int8", block_rows: int = 256, col_block: int = 2048,
                         window: int = 64, prepared: tuple[Any, int] | None = None,
                         stats: dict[str, int] | None = None) -> tuple[np.ndarray, ...]:
    """:func:`deldist.pairwise.triu_neighbours` (``spec``) or :func:`~deldist.pairwise.triu_max_sim`
    (``spec=None``) from ``precision``'s tiles, with float32 results (module docstring).

    x: (n, D) float32 unit rows in rank order; rows [start, stop) are scored. ``prepared``:
    (rows, offset) when x is rows [offset, offset + n) of a bucket prepared by
    :func:`prepare_rows` in ``precision`` (else x is prepared here). Tiles are ``block_rows`` (a multiple of 64) rows against column chunks of
    ``col_block`` (a multiple of 256) of all earlier rows, padded to multiples of 64 x 256
    (the diagonal triangle is masked in the scan). Each row keeps its ``by_similarity`` +
    the rows' ``spare`` largest tile values (bfloat16: 8, which tighten ``bound`` where the margin
    is wide; int8: 0), the columns within 2
    delta of its largest (up to ``window``; a row whose window overflows is recomputed in
    float32 whole) and its by-rank buffer; all are recomputed in float32. ``stats`` (if given) gets ``candidates`` (float32 dots) and
    ``fallback_rows``. Returns what the float32 kernel returns: (max_sim, argmax[, idx, sim, bound]).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    stop = check_range(n, start, stop)
    rows = stop - start
    lp, offset = prepared if prepared is not None else (prepare_rows(x, precision, reuse=True, centre=True), 0)
    products = lp.products(block_rows, col_block)
    delta = lp.margins(offset, offset + n)[start:stop]
    above_one = np.float32(lp.above_one)
    by_sim = spec.by_similarity if spec is not None else 0
    by_rank = spec.by_rank if spec is not None else 0
    floor = np.float32(spec.floor if spec is not None else np.inf)
    cand = Candidates(rows, by_sim + lp.spare if by_sim else 1, window, 2 * by_rank)
    out_max = np.full(rows, -np.inf, np.float32)
    out_arg = np.full(rows, -1, np.int64)
    top_out = (np.full((rows, by_sim), -1, np.int64), np.full((rows, by_sim), -np.inf, np.float32))
    first_out = (np.full((rows, by_rank), -1, np.int64), np.full((rows, by_rank), -np.inf, np.float32))
    bound = np.full(rows, floor, np.float32)
    certified = np.ones(rows, np.bool_)
    slot = np.full(n, -1, np.int32)  # _finish_rows' scratch: a column's place among a row's candidates
    for b0 in range(start, stop, block_rows):
        b1 = min(b0 + block_rows, stop)
        s0, s1 = b0 - start, b1 - start
        for c0 in range(0, b1 - 1, col_block):
            tile = products(lp, offset + b0, b1 - b0, lp, offset + c0, min(c0 + col_block, b1 - 1) - c0)
            cand.scan(tile, s0, s1, b0, c0, stop, delta, above_one, floor, by_rank)
        _finish_rows(x, b0, cand.top_idx[s0:s1], cand.excluded[s0:s1], cand.win_idx[s0:s1], cand.win_count[s0:s1],
                     cand.rank_idx[s0:s1], cand.rank_count[s0:s1], delta[s0:s1], above_one, floor, by_sim, by_rank,
                     out_max[s0:s1], out_arg[s0:s1], top_out[0][s0:s1], top_out[1][s0:s1], first_out[0][s0:s1],
                     first_out[1][s0:s1], bound[s0:s1], certified[s0:s1], slot)
    if start == 0 and rows:
        out_max[0], out_arg[0] = 0.0, -1
        certified[0] = True
    redo = np.flatnonzero(~certified)
    if stats is not None:
        stats["candidates"] = stats.get("candidates", 0) + cand.count()
        stats["fallback_rows"] = stats.get("fallback_rows", 0) + len(redo)
    if spec is None:
        if len(redo):
            out_max[redo], out_arg[redo] = _exact_rows(x, redo + start, None)
        return out_max, out_arg
    idx, sim, _ = union_lists(top_out[0], top_out[1], first_out[0], first_out[1], spec.floor)
    if len(redo):
        out_max[redo], out_arg[redo], idx[redo], sim[redo], bound[redo] = _exact_rows(x, redo + start, spec)
    return out_max, out_arg, idx, sim, bound


@numba.njit(cache=True, nogil=True)
def _finish_nearest(q, keys, first, top_idx, win_idx, win_count, out_best, out_arg):  # pragma: no cover - compiled
    """Rows [first, first + len(out_best)) of q: the float32 max over their window (and top)
    keys, ties to the lower key index."""
    for r in range(out_best.shape[0]):
        best, arg = -np.inf, -1
        for e in range(max(win_count[r], 0) + 1):
            j = top_idx[r, 0] if e == 0 else win_idx[r, e - 1]
            if j < 0:
                continue
            v = dot_float32(q[first + r], keys[j])
            if v > best or (v == best and j < arg):
                best, arg = v, j
        out_best[r], out_arg[r] = best, arg


def nearest_lowp(q: np.ndarray, keys: np.ndarray, precision: LowPrecision = "int8", block_rows: int = 256,
                 col_block: int = 2048, window: int = 64, stats: dict[str, int] | None = None,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Each query row's most similar key (the k-means assignment) from ``precision``'s
    tiles, with the float32 result: for every row, each key within 2 delta of its largest
    tile score is recomputed in float32 (the margin of the module docstring, with the norms of
    both sides), so the label is the float32 argmax (ties: the lower key index) and the
    similarity its float32 value; a row whose window overflows is searched in float32.

    q: (m, D), keys: (k, D) float32 unit rows. Returns (argmax int64 (m,), similarity
    float32 (m,)); -1 / -inf when there are no keys.
    """
    q = np.ascontiguousarray(q, dtype=np.float32)
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    m, k = len(q), len(keys)
    best = np.full(m, -np.inf, np.float32)
    arg = np.full(m, -1, np.int64)
    if m == 0 or k == 0:
        return arg, best
    qb, kb = prepare_rows(q, precision), prepare_rows(keys, precision)
    products = qb.products(block_rows, col_block)
    delta = qb.margins(0, m, cols=kb)
    cand = Candidates(m, 1, window, 0)
    beyond = 1 << 62  # a "row" after every key column: no triangle
    for r0 in range(0, m, block_rows):
        r1 = min(r0 + block_rows, m)
        for c0 in range(0, k, col_block):
            cand.scan(products(qb, r0, r1 - r0, kb, c0, min(c0 + col_block, k) - c0), r0, r1, beyond, c0, k,
                      delta, qb.above_one, np.inf, 0)
        _finish_nearest(q, keys, r0, cand.top_idx[r0:r1], cand.win_idx[r0:r1], cand.win_count[r0:r1], best[r0:r1],
                        arg[r0:r1])
    redo = np.flatnonzero(cand.win_count < 0)
    if len(redo):
        from deldist.pairwise import max_sim_to

        best[redo], arg[redo] = max_sim_to(q[redo], keys)
    if stats is not None:
        stats["candidates"] = stats.get("candidates", 0) + cand.count()
        stats["fallback_rows"] = stats.get("fallback_rows", 0) + len(redo)
    return arg, best
