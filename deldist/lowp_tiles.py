"""What the low-precision pairwise kernels (:mod:`deldist.pairwise_lowp`) share: the scan that
folds a tile into each row's candidates.

A tile is computed in a low precision with a proven per-row margin delta (|tile - float32
value| <= delta_i, plus ``above_one`` for values read as >= 1): in bfloat16
(:mod:`deldist.bf16_tiles`) or from int8 digit products with exact integer sums
(:mod:`deldist.int8_tiles`). The scan keeps what the tile cannot rule out, and the kernels
recompute all of it in float32, so their results are the float32 kernel's.
"""

from __future__ import annotations

from typing import Literal

import numba
import numpy as np

from deldist.tiles import float_order_key, insert_top

# LLVM fast-math flags for the compiled loops: reassociation (vectorised sums and maxima), but
# not "ninf": the scan's state starts at -inf and must compare as such (inputs are finite)
FAST = {"nnan", "nsz", "arcp", "contract", "reassoc", "afn"}
ROW_PAD, COL_PAD = 64, 256  # tile shapes are multiples of these: oneDNN builds one kernel per shape (~5 ms each)
LowPrecision = Literal["int8", "bfloat16"]


def check_tile_shape(block_rows: int, col_block: int) -> None:
    """The tile products' buffers hold block_rows x col_block: both must be pad multiples."""
    if block_rows % ROW_PAD or col_block % COL_PAD:
        raise ValueError(f"block_rows must be a multiple of {ROW_PAD} and col_block of {COL_PAD}")


def padded_shape(rows: int, cols: int) -> tuple[int, int]:
    """A tile's rows and columns rounded up to the pad multiples (one oneDNN kernel per shape)."""
    return -(-rows // ROW_PAD) * ROW_PAD, -(-cols // COL_PAD) * COL_PAD


@numba.njit(cache=True, fastmath=FAST, nogil=True)
def dot_float32(a, b):  # pragma: no cover - compiled
    s = np.float32(0.0)
    for k in range(a.shape[0]):
        s += a[k] * b[k]
    return s


INT32_MIN = np.int32(-2 ** 31)
# columns whose max the scan compares first: 64 for a max alone (fewer maxima to compare), 16 for
# lists (fine enough that the k-th largest chunk max is close to the row's k-th largest value)
CHUNK_MAX, CHUNK_LISTS = 64, 16


@numba.njit(cache=True, inline="always")
def _fill_rank_buffer(row, ncols, c0, r, rank_idx, rank_count, rank_sure, floor_low, floor_high,
                      by_rank):  # pragma: no cover - compiled
    """In column order, buffer the columns that may be at or above the floor until ``by_rank``
    of them surely are (or the buffer is full)."""
    cap = rank_idx.shape[1]
    for c in range(ncols):
        s = row[c]
        if s >= floor_low:
            rank_idx[r, rank_count[r]] = c0 + c
            rank_count[r] += 1
            if s >= floor_high:
                rank_sure[r] += 1
            if rank_sure[r] >= by_rank or rank_count[r] >= cap:
                break


def _chunk_maxima_of(width: int):  # type: ignore[no-untyped-def]
    """A compiled ``chunk_maxima(row_bits, ncols, chunk_max)`` for chunks of ``width``
    columns: each chunk's max as :func:`deldist.tiles.float_order_key` keys; returns the
    chunks. ``width`` is a compile-time constant: the loop with its fixed trip count is the one
    that vectorises (a run-time width does not, measured 3.5x slower)."""

    @numba.njit(cache=True, inline="always")
    def chunk_maxima(row_bits, ncols, chunk_max):  # pragma: no cover - compiled
        n_chunks = (ncols + width - 1) // width
        for h in range(n_chunks):
            top_key = INT32_MIN
            base = h * width
            if base + width <= ncols:
                for c in range(width):
                    key = float_order_key(row_bits[base + c])
                    top_key = key if key > top_key else top_key
            else:
                for c in range(base, ncols):
                    key = float_order_key(row_bits[c])
                    top_key = key if key > top_key else top_key
            chunk_max[h] = top_key
        return n_chunks

    return chunk_maxima


_chunk_maxima_wide, _chunk_maxima_narrow = _chunk_maxima_of(CHUNK_MAX), _chunk_maxima_of(CHUNK_LISTS)


@numba.njit(cache=True, inline="always")
def _add_to_window(win_idx, win_sim, win_count, r, s, j, top, two_delta):  # pragma: no cover - compiled
    """Add column j (value s, within 2 delta of the row's largest ``top``) to row r's window;
    a new largest drops the entries it leaves behind; a full window overflows (count -1).
    Returns the row's largest value."""
    if s > top:
        top = s
        kept = 0
        for e in range(win_count[r]):
            if win_sim[r, e] >= s - two_delta:
                win_sim[r, kept] = win_sim[r, e]
                win_idx[r, kept] = win_idx[r, e]
                kept += 1
        win_count[r] = kept
    if win_count[r] == win_idx.shape[1]:
        win_count[r] = -1
    else:
        win_sim[r, win_count[r]] = s
        win_idx[r, win_count[r]] = j
        win_count[r] += 1
    return top


@numba.njit(cache=True, fastmath=FAST, nogil=True)
def scan_tile(sims, rows, first_row, c0, col_stop, top_sim, top_idx, excluded, win_idx, win_sim, win_count,
               win_top, rank_idx, rank_count, rank_sure, delta, above_one, floor, by_rank):  # pragma: no cover - compiled
    """Fold a low-precision tile (as float32) into the candidates of rows [first_row, first_row +
    rows) (state rows 0..rows-1 of the views), columns numbered from ``c0``; only columns
    j < min(row, col_stop) count (the strict lower triangle; a query-key product passes a
    ``first_row`` beyond every column). Per row:

    - the ``K`` largest values (ties: the earlier column) and ``excluded``, the largest value
      not among them (bounds every unlisted column);
    - the window: every column within 2 (delta + ``above_one``) of the row's largest
      tile value (``win_top``), which holds the float32 argmax; ``win_count`` -1 when it
      overflowed;
    - in column order, the columns that may be at or above ``floor`` until ``by_rank`` of
      them surely are (or the buffer is full).
    """
    k_top = top_sim.shape[1]
    cap = rank_idx.shape[1]
    bits = sims.view(np.int32)
    chunk = CHUNK_MAX if k_top == 1 else CHUNK_LISTS
    chunk_max = np.empty((sims.shape[1] + chunk - 1) // chunk, np.int32)
    word = np.empty(1, np.float32)
    word_bits = word.view(np.int32)
    for r in range(rows):
        i = first_row + r
        ncols = min(sims.shape[1], i - c0, col_stop - c0)
        if ncols <= 0:
            continue
        row = sims[r]
        margin = delta[r] + above_one
        floor_low, floor_high = floor - margin, floor + margin
        two_delta = 2 * margin
        cut = top_sim[r, k_top - 1]
        ex, wt = excluded[r], win_top[r]
        # one vectorised pass: each chunk's max, as integers that order like the floats
        # (float maxima do not vectorise in numba)
        n_chunks = _chunk_maxima_wide(bits[r], ncols, chunk_max) if k_top == 1 else \
            _chunk_maxima_narrow(bits[r], ncols, chunk_max)
        word_bits[0] = float_order_key(chunk_max[:n_chunks].max())
        top = max(wt, word[0])  # the row's largest value once this tile is in
        # below ``low`` a value can only raise ``ex``: it is under the list's cut (or under
        # k_top chunk maxima of this tile), and more than 2 delta under the row's largest
        sure = cut
        if k_top == 1:  # the tile's largest is one of its values: the list's one entry ends at least there
            sure = max(sure, word[0])
        elif n_chunks >= k_top and cut == -np.inf:  # (a full list's cut is usually higher)
            word_bits[0] = float_order_key(np.partition(chunk_max[:n_chunks], n_chunks - k_top)[n_chunks - k_top])
            sure = max(sure, word[0])
        low = min(sure, top - two_delta)
        for h in range(n_chunks - 1, -1, -1):
            word_bits[0] = float_order_key(chunk_max[h])
            if word[0] < low:
                if word[0] > ex:
                    ex = word[0]
                continue
            for c in range(min(ncols, (h + 1) * chunk) - 1, h * chunk - 1, -1):
                s = row[c]
                if s < low:
                    if s > ex:
                        ex = s
                    continue
                if s > cut:
                    out = top_sim[r, k_top - 1]
                    if out > ex:
                        ex = out
                    cut = insert_top(top_sim, top_idx, r, s, c0 + c)
                elif s > ex:
                    ex = s
                if s >= wt - two_delta and win_count[r] >= 0:
                    wt = _add_to_window(win_idx, win_sim, win_count, r, s, c0 + c, wt, two_delta)
                low = min(max(cut, sure), top - two_delta)
        excluded[r], win_top[r] = ex, wt
        if by_rank > 0 and rank_sure[r] < by_rank and rank_count[r] < cap:
            _fill_rank_buffer(row, ncols, c0, r, rank_idx, rank_count, rank_sure, floor_low, floor_high, by_rank)


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
             above_one: float, floor: float, by_rank: int) -> None:
        """Fold ``tile`` (rows s0:s1 of the state; matrix rows from ``first_row``, columns
        from ``c0``, valid below ``col_stop``) into the state (:func:`scan_tile`)."""
        scan_tile(tile, s1 - s0, first_row, c0, col_stop, self.top_sim[s0:s1], self.top_idx[s0:s1],
                  self.excluded[s0:s1], self.win_idx[s0:s1], self.win_sim[s0:s1], self.win_count[s0:s1],
                  self.win_top[s0:s1], self.rank_idx[s0:s1], self.rank_count[s0:s1], self.rank_sure[s0:s1],
                  delta[s0:s1], np.float32(above_one), np.float32(floor), by_rank)

    def count(self) -> int:
        """Candidates recomputed in float32 (at most: the lists may share some)."""
        return int((self.top_idx >= 0).sum() + np.maximum(self.win_count, 0).sum() + self.rank_count.sum())
