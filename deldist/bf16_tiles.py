"""bfloat16 similarity tiles with a proven margin, one of the two tiles of
:mod:`deldist.pairwise_lowp` (the scan they share is in :mod:`deldist.lowp_tiles`).

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
similarity is at most its bfloat16 value plus delta_i. ``tests/test_pairwise_lowp.py``
checks the bound on adversarial rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numba
import numpy as np

from deldist.lowp_tiles import COL_PAD, FAST, check_tile_shape, padded_shape

HALF_ULP_BELOW_ONE = 2.0 ** -9  # rounding a tile value in (-1, 1) to bfloat16
ABOVE_ONE = 2.0 ** -9  # the extra margin of a value read as >= 1 (half an ulp is 2^-8 there)


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
    above_one = ABOVE_ONE
    spare = 8  # extra top candidates per row: their exact values tighten the bound of the unlisted

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

    def products(self, block_rows: int, col_block: int) -> "Bf16TileProducts":
        return Bf16TileProducts(block_rows, col_block)


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


class Bf16TileProducts:
    """bfloat16 products ``left @ right.T`` into buffers reused across tiles (fresh 2 MB
    tiles would page-fault every time), read back as float32 NumPy."""

    def __init__(self, block_rows: int, col_block: int):
        import torch

        check_tile_shape(block_rows, col_block)
        self.out_bf = torch.empty(block_rows * col_block, dtype=torch.bfloat16)
        self.out_f32 = torch.empty(block_rows * col_block, dtype=torch.float32)

    def __call__(self, left: Bf16Rows, r0: int, rows: int, right: Bf16Rows, c0: int, cols: int) -> np.ndarray:
        """(rp, cp) float32: rows [r0, r0 + rp) of ``left`` against rows [c0, c0 + cp) of
        ``right``, rp and cp the counts padded to the tile multiples (one kernel per shape)."""
        import torch

        rp, cp = padded_shape(rows, cols)
        out_bf, out_f32 = self.out_bf[:rp * cp].view(rp, cp), self.out_f32[:rp * cp].view(rp, cp)
        torch.mm(left.xb[r0:r0 + rp], right.xb[c0:c0 + cp].T, out=out_bf)
        out_f32.copy_(out_bf)
        return out_f32.numpy()
