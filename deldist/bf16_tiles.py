"""bfloat16 similarity tiles with a proven margin: what :mod:`deldist.pairwise_bf16` builds on.

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

from deldist.tiles import insert_top

HALF_ULP_BELOW_ONE = 2.0 ** -9  # rounding a tile value in (-1, 1) to bfloat16
ABOVE_ONE = 2.0 ** -9  # the extra margin of a value read as >= 1 (half an ulp is 2^-8 there)
# LLVM fast-math flags for the compiled loops: reassociation (vectorised sums and maxima), but
# not "ninf": the scan's state starts at -inf and must compare as such (inputs are finite)
FAST = {"nnan", "nsz", "arcp", "contract", "reassoc", "afn"}
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

    def margins(self, s: int, e: int, cols: "Bf16Rows | None" = None) -> np.ndarray:
        """delta_i (float32 (e - s,)) for rows [s, e) scored against ``cols`` (default: the
        same rows [s, e), scored against each other), with every column term at its maximum
        over ``cols`` (module docstring)."""
        if e <= s:
            return np.zeros(0, np.float32)
        d = self.xb.shape[1]
        g = d * 2.0 ** -24 / (1.0 - d * 2.0 ** -24)
        err, norm, bf_norm = (a[s:e].astype(np.float64) for a in (self.err, self.norm, self.bf_norm))
        c_err, c_norm, c_bf = (err, norm, bf_norm) if cols is None else (cols.err, cols.norm, cols.bf_norm)
        delta = (err * c_bf.max() + norm * c_err.max() + g * bf_norm * c_bf.max() + g * norm * c_norm.max()
                 + HALF_ULP_BELOW_ONE)
        return (delta + 1e-6).astype(np.float32)  # + 1e-6: the float32 sums that compare against it


@numba.njit(cache=True, fastmath=FAST, nogil=True)
def _round_rows(x, out, err, norm, bf_norm):  # pragma: no cover - compiled
    """One pass: out = the bfloat16 bits of x (round to nearest even, as torch), and per row
    the float32 norms of x, of its rounding and of the rounding error."""
    d = x.shape[1]
    rounded_bits = np.empty(d, np.uint32)
    rounded = rounded_bits.view(np.float32)
    for i in range(x.shape[0]):
        bits = x[i].view(np.uint32)
        for k in range(d):
            u = bits[k]
            r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
            rounded_bits[k] = r
            out[i, k] = np.uint16(r >> np.uint32(16))
        e2, n2, b2 = np.float32(0.0), np.float32(0.0), np.float32(0.0)
        for k in range(d):
            v, w = x[i, k], rounded[k]
            e2 += (w - v) * (w - v)
            n2 += v * v
            b2 += w * w
        err[i], norm[i], bf_norm[i] = np.sqrt(e2), np.sqrt(n2), np.sqrt(b2)


def prepare(x: np.ndarray) -> Bf16Rows:
    """x (n, D) float32 -> :class:`Bf16Rows` in one compiled pass (0.18 s for 200k x 768;
    torch's own conversion took 1.2 s single-threaded). The float32 norm sums have relative
    error <= g_D, covered by rounding them up."""
    import torch

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    padded = np.zeros((n + COL_PAD, d), np.uint16)
    err, norm, bf_norm = (np.empty(n, np.float32) for _ in range(3))
    if n:
        _round_rows(x, padded, err, norm, bf_norm)
    up = 1 + 2 * d * 2.0 ** -24 + 1e-7
    return Bf16Rows(torch.from_numpy(padded).view(torch.bfloat16), err * up, norm * up, bf_norm * up)


def bf16_supported() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX512-BF16): elsewhere oneDNN
    emulates it and the float32 kernel is faster."""
    try:
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover - other builds
        return False


@numba.njit(cache=True, fastmath=FAST, nogil=True)
def dot_float32(a, b):  # pragma: no cover - compiled
    s = np.float32(0.0)
    for k in range(a.shape[0]):
        s += a[k] * b[k]
    return s


@numba.njit(cache=True, fastmath=FAST, nogil=True)  # lets the row max vectorise
def scan_tile(sims, rows, first_row, c0, col_stop, top_sim, top_idx, excluded, win_idx, win_sim, win_count,
               win_top, rank_idx, rank_count, rank_sure, delta, floor, by_rank):  # pragma: no cover - compiled
    """Fold a bfloat16 tile (as float32) into the candidates of rows [first_row, first_row +
    rows) (state rows 0..rows-1 of the views), columns numbered from ``c0``; only columns
    j < min(row, col_stop) count (the strict lower triangle; a query-key product passes a
    ``first_row`` beyond every column). Per row:

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
        ncols = min(sims.shape[1], i - c0, col_stop - c0)
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
                    cut = insert_top(top_sim, top_idx, r, s, c0 + c)
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


class Candidates:
    """The per-row state :func:`scan_tile` folds tiles into (rows of a scored range)."""

    def __init__(self, rows: int, k_top: int, window: int, rank_cap: int):
        self.top_sim = np.full((rows, k_top), -np.inf, np.float32)
        self.top_idx = np.full((rows, k_top), -1, np.int64)
        self.excluded = np.full(rows, -np.inf, np.float32)
        self.win_idx = np.full((rows, window), -1, np.int64)
        self.win_sim = np.full((rows, window), -np.inf, np.float32)
        self.win_count = np.zeros(rows, np.int64)
        self.win_top = np.full(rows, -np.inf, np.float32)
        self.rank_idx = np.full((rows, max(rank_cap, 1)), -1, np.int64)
        self.rank_count = np.zeros(rows, np.int64)
        self.rank_sure = np.zeros(rows, np.int64)

    def scan(self, tile: np.ndarray, s0: int, s1: int, first_row: int, c0: int, col_stop: int, delta: np.ndarray,
             floor: float, by_rank: int) -> None:
        """Fold ``tile`` (rows s0:s1 of the state; matrix rows from ``first_row``, columns
        from ``c0``, valid below ``col_stop``) into the state (:func:`scan_tile`)."""
        scan_tile(tile, s1 - s0, first_row, c0, col_stop, self.top_sim[s0:s1], self.top_idx[s0:s1],
                  self.excluded[s0:s1], self.win_idx[s0:s1], self.win_sim[s0:s1], self.win_count[s0:s1],
                  self.win_top[s0:s1], self.rank_idx[s0:s1], self.rank_count[s0:s1], self.rank_sure[s0:s1],
                  delta[s0:s1], np.float32(floor), by_rank)

    def count(self) -> int:
        """Candidates recomputed in float32 (at most: the lists may share some)."""
        return int((self.top_idx >= 0).sum() + np.maximum(self.win_count, 0).sum() + self.rank_count.sum())


class TileProducts:
    """bfloat16 products ``left @ right.T`` into buffers reused across tiles (fresh 2 MB
    tiles would page-fault every time), read back as float32 NumPy."""

    def __init__(self, block_rows: int, col_block: int):
        import torch

        if block_rows % ROW_PAD or col_block % COL_PAD:
            raise ValueError(f"block_rows must be a multiple of {ROW_PAD} and col_block of {COL_PAD}")
        self.out_bf = torch.empty(block_rows * col_block, dtype=torch.bfloat16)
        self.out_f32 = torch.empty(block_rows * col_block, dtype=torch.float32)

    def __call__(self, xb: Any, r0: int, rows: int, keys: Any, c0: int, cols: int) -> np.ndarray:
        """(rp, cp) float32: rows [r0, r0 + rp) of ``xb`` against rows [c0, c0 + cp) of
        ``keys``, rp and cp the counts padded to the tile multiples (one kernel per shape)."""
        import torch

        rp = int(math.ceil(rows / ROW_PAD) * ROW_PAD)
        cp = int(math.ceil(cols / COL_PAD) * COL_PAD)
        out_bf, out_f32 = self.out_bf[:rp * cp].view(rp, cp), self.out_f32[:rp * cp].view(rp, cp)
        torch.mm(xb[r0:r0 + rp], keys[c0:c0 + cp].T, out=out_bf)
        out_f32.copy_(out_bf)
        return out_f32.numpy()
