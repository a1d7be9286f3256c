"""The tile plan every pairwise kernel follows (NumPy and torch), and the neighbour lists'
shape: pure bookkeeping, no matmuls.

A row range [start, stop) of rank-ordered rows meets the rows before it in tiles: each block
of ``block_rows`` rows against every earlier row in column tiles of ``col_block`` (no mask),
and its own diagonal block in sub-blocks of ``diag_rows`` rows with only their own triangle
masked. Memory O(block_rows x col_block); work n^2/2 + n diag_rows/2 dot products.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Union

import numba
import numpy as np

if TYPE_CHECKING:
    import torch

# "cpu": the NumPy kernels; any other torch device ("cuda", "cuda:1"): the torch kernels there
Device = str
# a kernel input: NumPy rows, or a tensor already on the kernel's device
Matrix = Union[np.ndarray, "torch.Tensor"]


@dataclass(frozen=True)
class ListSpec:
    """Which earlier neighbours a row keeps besides its max (``deldist.pairwise.NeighbourLists``)."""

    by_similarity: int = 16
    by_rank: int = 16
    floor: float = 0.5

    @property
    def keeps_lists(self) -> bool:
        """Whether any list is kept (else the kernels compute the max alone)."""
        return self.by_similarity > 0 or self.by_rank > 0


def check_range(n: int, start: int, stop: int | None) -> int:
    stop = n if stop is None else stop
    if not 0 <= start <= stop <= n:
        raise ValueError(f"row range [{start}, {stop}) outside [0, {n})")
    return stop


def triangle_tiles(start: int, stop: int, block_rows: int, col_block: int, diag_rows: int,
                   ) -> Iterator[tuple[int, int, int, int, bool]]:
    """The tiles of the strict lower triangle for rows [start, stop), in the order both
    kernels (NumPy, torch) compute them: (r0, r1, c0, c1, diagonal) = rows r0:r1 against
    columns c0:c1; ``diagonal``: columns from r0 on, the sub-block's own triangle j >= i,
    must be masked. Columns arrive in increasing order for every row."""
    for b0 in range(start, stop, block_rows):
        b1 = min(b0 + block_rows, stop)
        for c0 in range(0, b0, col_block):
            yield b0, b1, c0, min(c0 + col_block, b0), False
        for s0 in range(b0, b1, diag_rows):
            s1 = min(s0 + diag_rows, b1)
            yield s0, s1, b0, s1, True


def rectangle_tiles(m: int, p: int, block_rows: int, col_block: int) -> Iterator[tuple[int, int, int, int]]:
    """Tiles (r0, r1, c0, c1) covering an m x p query-key product."""
    for r0 in range(0, m, block_rows):
        for c0 in range(0, p, col_block):
            yield r0, min(r0 + block_rows, m), c0, min(c0 + col_block, p)


@numba.njit(cache=True, inline="always")
def float_order_key(bits):  # pragma: no cover - compiled
    """float32 bits (as int32) -> an int32 in the floats' order (finite values, +-inf), and
    back: the same map (flip the magnitude bits of negatives), its own inverse."""
    return bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))


@numba.njit(cache=True, nogil=True, inline="always")  # inlined into both kernels' loops
def insert_top(top_sim, top_idx, row, s, j):  # pragma: no cover - compiled
    """Insert (s, j) into row ``row`` of a top list sorted by similarity descending, then
    column ascending (the last entry drops out; columns may arrive in any order); returns the
    list's new last value, the next cut."""
    m = top_sim.shape[1]
    pos = m - 1
    while pos > 0 and (top_sim[row, pos - 1] < s or (top_sim[row, pos - 1] == s and top_idx[row, pos - 1] > j)):
        top_sim[row, pos] = top_sim[row, pos - 1]
        top_idx[row, pos] = top_idx[row, pos - 1]
        pos -= 1
    top_sim[row, pos] = s
    top_idx[row, pos] = j
    return top_sim[row, m - 1]


@numba.njit(cache=True, nogil=True)
def _union_rows(top_idx, top_sim, first_idx, first_sim, out_idx, out_sim):  # pragma: no cover - compiled
    """Per row: the by-similarity list, then the by-rank entries it lacks, sorted by
    similarity descending (ties: lower index first) by insertion; -1 / -inf padding."""
    m, mr = top_idx.shape[1], first_idx.shape[1]
    for r in range(top_idx.shape[0]):
        k = 0
        for e in range(m + mr):
            i = top_idx[r, e] if e < m else first_idx[r, e - m]
            v = top_sim[r, e] if e < m else first_sim[r, e - m]
            if i < 0:
                continue
            seen = False
            for p in range(k):
                if out_idx[r, p] == i:
                    seen = True
                    break
            if seen:
                continue
            p = k
            while p > 0 and (out_sim[r, p - 1] < v or (out_sim[r, p - 1] == v and out_idx[r, p - 1] > i)):
                out_idx[r, p] = out_idx[r, p - 1]
                out_sim[r, p] = out_sim[r, p - 1]
                p -= 1
            out_idx[r, p] = i
            out_sim[r, p] = v
            k += 1


def union_lists(top_idx: np.ndarray, top_sim: np.ndarray, first_idx: np.ndarray, first_sim: np.ndarray,
                floor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Union of the by-similarity and by-rank lists (see :meth:`NeighbourLists.result`)."""
    rows = len(top_idx)
    idx = np.full((rows, top_idx.shape[1] + first_idx.shape[1]), -1, np.int64)
    sim = np.full(idx.shape, -np.inf, np.float32)
    _union_rows(np.ascontiguousarray(top_idx, np.int64), np.ascontiguousarray(top_sim, np.float32),
                np.ascontiguousarray(first_idx, np.int64), np.ascontiguousarray(first_sim, np.float32), idx, sim)
    full = (top_idx[:, -1] >= 0 if top_idx.shape[1] else np.ones(rows, bool)) & \
           (first_idx[:, -1] >= 0 if first_idx.shape[1] else np.ones(rows, bool))
    last_top = top_sim[:, -1] if top_sim.shape[1] else np.full(rows, np.inf, np.float32)
    bound = np.where(full, last_top, np.float32(floor)).astype(np.float32)
    return idx, sim, bound
