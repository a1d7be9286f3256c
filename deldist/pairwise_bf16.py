"""The pairwise kernel of :mod:`deldist.pairwise` with bfloat16 matmuls and float32 results.

deldist's own method (no paper has it): the similarity tiles are computed in bfloat16 (CPU
AMX / AVX512-BF16 through oneDNN: 6-7x the float32 rate of one core here), each row keeps
the candidates that bfloat16 cannot rule out, and every value that is written or decided on
is recomputed in float32. The results are those of the float32 kernel:

- ``max_sim`` / ``argmax``: exact (the float32 dot of the true argmax) for every row whose
  candidates *certify* it (below); the other rows are recomputed in float32 whole.
- neighbour lists: every listed similarity is an exact float32 value; membership follows the
  bfloat16 order, so a list may name other items than the float32 kernel's, and ``bound``
  is a proven upper bound of every unlisted earlier item's float32 similarity. The kept-aware
  selection (:func:`deldist.greedy.resolve_kept`) only needs exact listed values and a sound
  bound, so its kept / removed decisions are those of the float32 run (an item whose bound
  is above the threshold goes to the exact fallback, as there).

**The margin** (:func:`prepare`). Let x~ = bf16(x) (round to nearest even), e_x = x~ - x
(exact in float32), g_D = D 2^-24 / (1 - D 2^-24) (float32 summation of D terms in any
order). For a pair (x, y):

1. inputs: <x~, y~> - <x, y> = <e_x, y~> + <x, e_y>, so by Cauchy-Schwarz
   |...| <= |e_x| |y~| + |x| |e_y| (the norms of the actual rounding errors, ~0.0016 for a
   unit row, not the worst case u = 2^-8 per element);
2. products of two bfloat16 numbers are exact in float32 and oneDNN accumulates them in
   float32: <= g_D sum |x~_i y~_i| <= g_D |x~| |y~|;
3. the tile is written as bfloat16 (8 significand bits): half an ulp, <= 2^-9 while the
   value is below 1 and 2^-8 from 1 on (a value rounds to >= 1 only if it was >= 1 - 2^-9,
   so values read as >= 1 get the extra 2^-9: :data:`ABOVE_ONE`);
4. the float32 value it is compared with has its own rounding: <= g_D |x| |y|.

Row i's margin ``delta_i`` is the sum with every column term at its maximum over the rows
scored together (about 0.006 for unit rows at D = 768), so |s_bf16(i, j) - s_fp32(i, j)|
<= delta_i (+ 2^-9 for values >= 1) for every column j. A column whose bfloat16 value is more
than 2 delta_i below the row's largest cannot be its max; an unlisted column's float32
similarity is at most its bfloat16 value plus delta_i. ``tests/test_pairwise_bf16.py``
checks the bound on adversarial rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np

from deldist.tiles import ListSpec, check_range, union_lists

HALF_ULP_BELOW_ONE = 2.0 ** -9  # rounding a tile value in (-1, 1) to bfloat16
ABOVE_ONE = 2.0 ** -9  # the extra margin of a value read as >= 1 (half an ulp is 2^-8 there)
ROW_PAD, COL_PAD = 64, 256  # tile shapes are multiples of these: oneDNN builds one kernel per shape (~5 ms each)


@dataclass
class Bf16Rows:
    """Rows prepared once for the bfloat16 kernel (a bucket, sliced per cluster).

    xb: (n + pad, D) bfloat16 tensor, x rounded to nearest even, then ``COL_PAD`` spare rows
    (tiles may read past a slice's end; those rows are never scanned); err (n,) |x~ - x|;
    norm (n,) |x|; bf_norm (n,) |x~|: rounded up so they bound the exact norms.
    """

    xb: Any
    err: np.ndarray
    norm: np.ndarray
    bf_norm: np.ndarray

    def margins(self, s: int, e: int) -> np.ndarray:
        """delta_i (float32 (e - s,)) for rows [s, e) scored against each other (docstring)."""
        d = self.xb.shape[1]
        g = d * 2.0 ** -24 / (1.0 - d * 2.0 ** -24)
        err, norm, bf_norm = (a[s:e].astype(np.float64) for a in (self.err, self.norm, self.bf_norm))
        if e <= s:
            return np.zeros(0, np.float32)
        delta = (err * bf_norm.max() + norm * err.max() + g * bf_norm * bf_norm.max() + g * norm * norm.max()
                 + HALF_ULP_BELOW_ONE)
        return (delta + 1e-6).astype(np.float32)  # + 1e-6: the float32 sums that compare against it


def prepare(x: np.ndarray, chunk: int = 16_384) -> Bf16Rows:
    """x (n, D) float32 -> :class:`Bf16Rows`: torch's round to nearest even, and the norms
    as float32 sums (relative error <= g_D, covered by the rounding up)."""
    import torch

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    xb = torch.zeros((n + COL_PAD, d), dtype=torch.bfloat16)
    err, norm, bf_norm = (np.empty(n, np.float64) for _ in range(3))
    up = 1 + 2 * d * 2.0 ** -24 + 1e-7
    for a in range(0, n, chunk):
        rows = torch.from_numpy(x[a:a + chunk])
        xb[a:a + len(rows)] = rows
        rounded = xb[a:a + len(rows)].float()
        err[a:a + len(rows)] = torch.linalg.vector_norm(rounded - rows, dim=1).numpy()
        norm[a:a + len(rows)] = torch.linalg.vector_norm(rows, dim=1).numpy()
        bf_norm[a:a + len(rows)] = torch.linalg.vector_norm(rounded, dim=1).numpy()
    return Bf16Rows(xb, err * up, norm * up, bf_norm * up)


def bf16_supported() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX512-BF16): elsewhere oneDNN
    emulates it and the float32 kernel is faster."""
    try:
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover - other builds
        return False


@numba.njit(cache=True, fastmath=True)
def _dot(a, b):  # pragma: no cover - compiled
    s = np.float32(0.0)
    for k in range(a.shape[0]):
        s += a[k] * b[k]
    return s


@numba.njit(cache=True, fastmath=True)  # finite inputs; lets the row max vectorise
def _scan_tile(sims, rows, first_row, c0, top_sim, top_idx, excluded, win_idx, win_sim, win_count, win_top,
               rank_idx, rank_count, rank_sure, delta, floor, by_rank):  # pragma: no cover - compiled
    """Fold a bfloat16 tile (as float32) into the candidates of rows [first_row, first_row +
    rows) (state rows 0..rows-1 of the views), columns numbered from ``c0``; only columns
    j < row (the strict lower triangle) count. Per row:

    - the ``K`` largest values (ties: the earlier column) and ``excluded``, the largest value
      not among them (bounds every unlisted column);
    - the window: every column within 2 delta (+ 2^-8 above 1) of the row's largest
      bfloat16 value (``win_top``), which holds the float32 argmax; ``win_count`` -1 when it
      overflowed;
    - in column order, the columns that may be at or above ``floor`` until ``by_rank`` of
      them surely are (or the buffer is full).
    """
    k_top = top_sim.shape[1]
    cap = rank_idx.shape[1]
    w_cap = win_idx.shape[1]
    for r in range(rows):
        i = first_row + r
        ncols = min(sims.shape[1], i - c0)
        if ncols <= 0:
            continue
        row = sims[r]
        margin = delta[r] + np.float32(ABOVE_ONE)
        floor_low, floor_high = floor - margin, floor + margin
        two_delta = 2 * margin
        cut = top_sim[r, k_top - 1]
        tile_max = -np.inf
        for c in range(ncols):
            if row[c] > tile_max:
                tile_max = row[c]
        if tile_max <= cut and tile_max < win_top[r] - two_delta:
            if tile_max > excluded[r]:
                excluded[r] = tile_max
        else:
            for c in range(ncols):
                s = row[c]
                if s > cut:
                    out = top_sim[r, k_top - 1]
                    if out > excluded[r]:
                        excluded[r] = out
                    pos = k_top - 1
                    while pos > 0 and top_sim[r, pos - 1] < s:
                        top_sim[r, pos] = top_sim[r, pos - 1]
                        top_idx[r, pos] = top_idx[r, pos - 1]
                        pos -= 1
                    top_sim[r, pos] = s
                    top_idx[r, pos] = c0 + c
                    cut = top_sim[r, k_top - 1]
                elif s > excluded[r]:
                    excluded[r] = s
                if s >= win_top[r] - two_delta and win_count[r] >= 0:
                    if s > win_top[r]:
                        win_top[r] = s
                        kept = 0  # drop the entries the new top leaves behind
                        for e in range(win_count[r]):
                            if win_sim[r, e] >= s - two_delta:
                                win_sim[r, kept] = win_sim[r, e]
                                win_idx[r, kept] = win_idx[r, e]
                                kept += 1
                        win_count[r] = kept
                    if win_count[r] == w_cap:
                        win_count[r] = -1
                    else:
                        win_sim[r, win_count[r]] = s
                        win_idx[r, win_count[r]] = c0 + c
                        win_count[r] += 1
        if by_rank > 0 and rank_sure[r] < by_rank and rank_count[r] < cap:
            for c in range(ncols):
                s = row[c]
                if s >= floor_low:
                    rank_idx[r, rank_count[r]] = c0 + c
                    rank_count[r] += 1
                    if s >= floor_high:
                        rank_sure[r] += 1
                    if rank_sure[r] >= by_rank or rank_count[r] >= cap:
                        break


@numba.njit(cache=True)
def _add_candidates(x, i, idx, count, cand_idx, cand_sim, n):  # pragma: no cover - compiled
    """Append idx[:count] not yet among cand_idx[:n], with their float32 dot to row i."""
    n0 = n
    for e in range(count):
        j = idx[e]
        seen = False
        for p in range(n0):
            if cand_idx[p] == j:
                seen = True
                break
        if not seen:
            cand_idx[n] = j
            cand_sim[n] = _dot(x[i], x[j])
            n += 1
    return n


@numba.njit(cache=True)
def _finish_rows(x, first_row, top_idx, excluded, win_idx, win_count, rank_idx, rank_count, delta, floor, by_sim,
                 by_rank, out_max, out_arg, out_top_idx, out_top_sim, out_first_idx, out_first_sim, out_bound,
                 certified):  # pragma: no cover - compiled
    """Recompute every candidate in float32 and derive each row's exact max / argmax, lists
    and bound; ``certified[r]``: the window did not overflow, so it holds the argmax."""
    k_top = top_idx.shape[1]
    size = k_top + win_idx.shape[1] + rank_idx.shape[1]
    cand_idx = np.empty(size, np.int64)
    cand_sim = np.empty(size, np.float32)
    for r in range(top_idx.shape[0]):
        i = first_row + r
        n = 0
        for e in range(k_top):
            j = top_idx[r, e]
            if j >= 0:
                cand_idx[n] = j
                cand_sim[n] = _dot(x[i], x[j])
                n += 1
        certified[r] = win_count[r] >= 0
        n = _add_candidates(x, i, win_idx[r], max(win_count[r], 0), cand_idx, cand_sim, n)
        n = _add_candidates(x, i, rank_idx[r], rank_count[r], cand_idx, cand_sim, n)
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
        # rank list: the first by_rank buffered columns (column order) with exact value >= floor
        f = 0
        for e in range(rank_count[r]):
            if f == by_rank:
                break
            j = rank_idx[r, e]
            for p in range(n):
                if cand_idx[p] == j:
                    if cand_sim[p] >= floor:
                        out_first_idx[r, f] = j
                        out_first_sim[r, f] = cand_sim[p]
                        f += 1
                    break
        # bound: every unlisted column's float32 value is at most this
        over = delta[r] + (np.float32(ABOVE_ONE) if excluded[r] >= 1 else np.float32(0))
        bound = max(np.float32(floor), excluded[r] + over)
        for p in range(n):
            j = cand_idx[p]
            listed = False
            for e in range(m):
                if out_top_idx[r, e] == j:
                    listed = True
            for e in range(f):
                if out_first_idx[r, e] == j:
                    listed = True
            if not listed and cand_sim[p] > bound:
                bound = cand_sim[p]
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


def triu_neighbours_bf16(x: np.ndarray, start: int = 0, stop: int | None = None, spec: ListSpec | None = ListSpec(),
                         block_rows: int = 256, col_block: int = 2048, window: int = 64, spare: int = 8,
                         prepared: tuple[Bf16Rows, int] | None = None,
                         stats: dict[str, int] | None = None) -> tuple[np.ndarray, ...]:
    """:func:`deldist.pairwise.triu_neighbours` (``spec``) or :func:`~deldist.pairwise.triu_max_sim`
    (``spec=None``) from bfloat16 tiles, with float32 results (module docstring).

    x: (n, D) float32 unit rows in rank order; rows [start, stop) are scored. ``prepared``:
    (rows, offset) when x is rows [offset, offset + n) of a :func:`prepare`d bucket (else x is
    prepared here). Tiles are ``block_rows`` (a multiple of 64) rows against column chunks of
    ``col_block`` (a multiple of 256) of all earlier rows, padded to multiples of 64 x 256
    (the diagonal triangle is masked in the scan). Each row keeps its ``by_similarity`` +
    ``spare`` largest bfloat16 values (the spares tighten ``bound``), the columns within 2 delta of its largest (up to ``window``; a
    row whose window overflows is recomputed in float32 whole) and its by-rank buffer; all
    are recomputed in float32. ``stats`` (if given) gets ``candidates`` (float32 dots) and
    ``fallback_rows``. Returns what the float32 kernel returns: (max_sim, argmax[, idx, sim, bound]).
    """
    import torch

    if block_rows % ROW_PAD or col_block % COL_PAD:
        raise ValueError(f"block_rows must be a multiple of {ROW_PAD} and col_block of {COL_PAD}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    stop = check_range(n, start, stop)
    rows = stop - start
    bf, offset = prepared if prepared is not None else (prepare(x), 0)
    xb = bf.xb[offset:]
    delta = bf.margins(offset, offset + n)[start:stop]
    by_sim = spec.by_similarity if spec is not None else 0
    by_rank = spec.by_rank if spec is not None else 0
    floor = np.float32(spec.floor if spec is not None else np.inf)
    k_top = by_sim + spare if by_sim else 1
    top_sim = np.full((rows, k_top), -np.inf, np.float32)
    top_idx = np.full((rows, k_top), -1, np.int64)
    excluded = np.full(rows, -np.inf, np.float32)
    win_idx = np.full((rows, window), -1, np.int64)
    win_sim = np.full((rows, window), -np.inf, np.float32)
    win_count = np.zeros(rows, np.int64)
    win_top = np.full(rows, -np.inf, np.float32)
    rank_idx = np.full((rows, max(2 * by_rank, 1)), -1, np.int64)
    rank_count = np.zeros(rows, np.int64)
    rank_sure = np.zeros(rows, np.int64)
    out_max = np.full(rows, -np.inf, np.float32)
    out_arg = np.full(rows, -1, np.int64)
    top_out = (np.full((rows, by_sim), -1, np.int64), np.full((rows, by_sim), -np.inf, np.float32))
    first_out = (np.full((rows, by_rank), -1, np.int64), np.full((rows, by_rank), -np.inf, np.float32))
    bound = np.full(rows, floor, np.float32)
    certified = np.ones(rows, np.bool_)
    tile_bf = torch.empty(block_rows * col_block, dtype=torch.bfloat16)
    tile_f32 = torch.empty(block_rows * col_block, dtype=torch.float32)
    for b0 in range(start, stop, block_rows):
        b1 = min(b0 + block_rows, stop)
        rp = int(math.ceil((b1 - b0) / ROW_PAD) * ROW_PAD)
        s0, s1 = b0 - start, b1 - start
        left = xb[b0:b0 + rp]
        for c0 in range(0, b1 - 1, col_block):
            cp = int(math.ceil((min(c0 + col_block, b1 - 1) - c0) / COL_PAD) * COL_PAD)
            out_bf, out_f32 = tile_bf[:rp * cp].view(rp, cp), tile_f32[:rp * cp].view(rp, cp)
            torch.mm(left, xb[c0:c0 + cp].T, out=out_bf)
            out_f32.copy_(out_bf)
            _scan_tile(out_f32.numpy(), b1 - b0, b0, c0, top_sim[s0:s1], top_idx[s0:s1], excluded[s0:s1],
                       win_idx[s0:s1], win_sim[s0:s1], win_count[s0:s1], win_top[s0:s1], rank_idx[s0:s1],
                       rank_count[s0:s1], rank_sure[s0:s1], delta[s0:s1], floor, by_rank)
        _finish_rows(x, b0, top_idx[s0:s1], excluded[s0:s1], win_idx[s0:s1], win_count[s0:s1], rank_idx[s0:s1],
                     rank_count[s0:s1], delta[s0:s1], floor, by_sim, by_rank, out_max[s0:s1], out_arg[s0:s1],
                     top_out[0][s0:s1], top_out[1][s0:s1], first_out[0][s0:s1], first_out[1][s0:s1],
                     bound[s0:s1], certified[s0:s1])
    if start == 0 and rows:
        out_max[0], out_arg[0] = 0.0, -1
        certified[0] = True
    redo = np.flatnonzero(~certified)
    if stats is not None:
        stats["candidates"] = stats.get("candidates", 0) + int((top_idx >= 0).sum() + np.maximum(win_count, 0).sum()
                                                               + rank_count.sum())
        stats["fallback_rows"] = stats.get("fallback_rows", 0) + len(redo)
    if spec is None:
        if len(redo):
            out_max[redo], out_arg[redo] = _exact_rows(x, redo + start, None)
        return out_max, out_arg
    idx, sim, _ = union_lists(top_out[0], top_out[1], first_out[0], first_out[1], spec.floor)
    if len(redo):
        out_max[redo], out_arg[redo], idx[redo], sim[redo], bound[redo] = _exact_rows(x, redo + start, spec)
    return out_max, out_arg, idx, sim, bound
