"""bfloat16 similarity tiles with a proven margin, one of the two tiles of
:mod:`deldist.pairwise_lowp` (the scan they share is in :mod:`deldist.lowp_tiles`).

deldist's own method (no paper has it): the similarity tiles are computed in bfloat16 (CPU
AMX / AVX512-BF16 through oneDNN: 476 GFLOPS on one AMD Zen 5 core against OpenBLAS's 209
float32), each row keeps the candidates that bfloat16 cannot rule out, and every value that
is written or decided on is recomputed in float32. The results are those of the float32 kernel:

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

**Centred tiles** (``prepare(x, centre=True)``, what the within-cluster kernel uses). The rows
of a cluster are close to their mean m (|x - m| ~ 0.55 for unit rows whose pairwise
similarities are ~0.7), and for any vector m, exactly,

    <x_i, x_j> = <x_i - m, x_j - m> + (<x_i, m> - |m|^2) + <x_j, m>.

The tile multiplies z~ = bf16(fl32(x - m)) in bfloat16 and adds the row offset
r_i = fl32(<x_i, m> - |m|^2) and the column offset c_j = fl32(<x_j, m>) (both from float64
sums) in float32. Its error against the float32 similarity is at most:

1. inputs: |e_i| |z~_j| + |w_i| |e_j| with w = x - m (exact) and e = z~ - w, whose norm is
   at most |z~ - z| + 2^-24 |z| (z = fl32(x - m) rounds each element by <= 2^-24 |x - m|):
   the rounding errors shrink with |x - m|, ~0.55x those of the uncentred rows;
2. accumulation: g_D |z~_i| |z~_j|;
3. the bfloat16 output: the float32 sum v has |v| <= V = |z~_i| |z~_j| (1 + g_D), and a value
   below a power of two P >= V rounds by at most half an ulp there, 2^-9 P. The values are
   differences from the cluster's mean similarity (|v| ~ 0.02 for most pairs, V ~ 0.3), so
   this is 2^-10 where the uncentred tile has 2^-9;
4. the offsets and the two float32 additions: <= 2^-22 (V + |r_i| + max |c_j|) (each of the
   four roundings is <= 2^-24 of a sum of those magnitudes; float64 sums add ~1e-13);
5. the float32 value compared with: g_D |x_i| |x_j|, as above.

No value is read as bfloat16 afterwards, so :attr:`Bf16Rows.above_one` is 0. On the bench's
1M clusters delta falls from ~0.0055 to ~0.002, each row's window of possible maxima from a
median of 9 columns to 2, and the rows whose window overflowed (recomputed in float32 whole)
from 84,777 to none (bench/RESULTS.md, 2026-12-03). The tests check the centred bound on the
same adversarial rows and that it is under half the uncentred one on a tight cluster.
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
    """Rows prepared once for the bfloat16 kernel (a cluster, or any rows scored together).

    xb: (n + pad, D) bfloat16 tensor, z = x - m rounded to nearest even (m: the centre, zero
    when not centred), then ``COL_PAD`` spare rows (tiles may read past a slice's end; those
    rows are never scanned); err (n,) bounds |z~ - (x - m)|; norm (n,) |x - m|; bf_norm (n,)
    |z~|; x_norm (n,) |x|: all rounded up so they bound the exact norms. Centred rows also
    carry row_off / col_off (n + pad,) float32, <x_i, m> - |m|^2 and <x_j, m>: a tile value is
    the bfloat16 product plus both (module docstring, "centred tiles").
    """

    xb: Any
    err: np.ndarray
    norm: np.ndarray
    bf_norm: np.ndarray
    x_norm: np.ndarray
    row_off: np.ndarray | None = None
    col_off: np.ndarray | None = None
    spare = 8  # extra top candidates per row: their exact values tighten the bound of the unlisted

    @property
    def above_one(self) -> float:
        """The extra margin of a tile value read as >= 1: a bfloat16 rounding of an uncentred
        tile; a centred tile's value is a float32 sum whose rounding is inside delta."""
        return 0.0 if self.row_off is not None else ABOVE_ONE

    def margins(self, s: int, e: int, cols: "Bf16Rows | None" = None) -> np.ndarray:
        """delta_i (float32 (e - s,)) for rows [s, e) scored against ``cols`` (default: the
        same rows [s, e), scored against each other), with every column term at its maximum
        over ``cols`` (module docstring)."""
        if e <= s:
            return np.zeros(0, np.float32)
        d = self.xb.shape[1]
        g = d * 2.0 ** -24 / (1.0 - d * 2.0 ** -24)
        err, norm, bf_norm, x_norm = (a[s:e].astype(np.float64) for a in (self.err, self.norm, self.bf_norm,
                                                                          self.x_norm))
        c = (err, norm, bf_norm, x_norm) if cols is None else (cols.err, cols.norm, cols.bf_norm, cols.x_norm)
        c_err, c_norm, c_bf, c_x = (float(a.max()) for a in c)
        delta = err * c_bf + norm * c_err + g * bf_norm * c_bf + g * x_norm * c_x
        if self.row_off is None:
            delta += HALF_ULP_BELOW_ONE
        else:
            value = bf_norm * c_bf * (1 + g)  # bounds the float32 sum that is rounded to bfloat16
            delta += 2.0 ** -9 * np.exp2(np.ceil(np.log2(np.maximum(value, 2.0 ** -126))))
            c_off = float(np.abs(self.col_off[s:e] if cols is None else cols.col_off).max())
            delta += 2.0 ** -22 * (value + np.abs(self.row_off[s:e]) + c_off)
        return (delta + 1e-6).astype(np.float32)  # + 1e-6: the float32 sums that compare against it

    def products(self, block_rows: int, col_block: int) -> "Bf16TileProducts":
        return Bf16TileProducts(block_rows, col_block)


@numba.njit(cache=True, fastmath=FAST, nogil=True)
def _round_rows(x, m, out, err, norm, bf_norm, x_norm, offset):  # pragma: no cover - compiled
    """One pass: z = x - m in float32, out = the bfloat16 bits of z (round to nearest even, as
    torch), and per row the float32 norms of z, of its rounding, of its rounding error and of
    x, and offset = <x, m> in float64."""
    d = x.shape[1]
    z = np.empty(d, np.float32)
    rounded_bits = np.empty(d, np.uint32)
    rounded = rounded_bits.view(np.float32)
    z_bits = z.view(np.uint32)
    for i in range(x.shape[0]):
        a = 0.0
        for k in range(d):
            z[k] = x[i, k] - m[k]
            a += np.float64(x[i, k]) * np.float64(m[k])
        for k in range(d):
            u = z_bits[k]
            r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
            rounded_bits[k] = r
            out[i, k] = np.uint16(r >> np.uint32(16))
        e2, n2, b2, x2 = np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0)
        for k in range(d):
            v, w = z[k], rounded[k]
            e2 += (w - v) * (w - v)
            n2 += v * v
            b2 += w * w
            x2 += x[i, k] * x[i, k]
        err[i], norm[i], bf_norm[i], x_norm[i], offset[i] = np.sqrt(e2), np.sqrt(n2), np.sqrt(b2), np.sqrt(x2), a


def prepare(x: np.ndarray, centre: bool = False) -> Bf16Rows:
    """x (n, D) float32 -> :class:`Bf16Rows` in one compiled pass (0.18 s for 200k x 768;
    torch's own conversion took 1.2 s single-threaded). ``centre``: the rows minus their mean
    (for rows scored against each other: a cluster). The float32 norm sums have relative error
    <= g_D, covered by rounding them up; z = x - m is itself rounded (<= 2^-24 |x - m| per
    element), added to err."""
    import torch

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    m = x.mean(axis=0, dtype=np.float64).astype(np.float32) if centre and n else np.zeros(d, np.float32)
    padded = np.zeros((n + COL_PAD, d), np.uint16)
    err, norm, bf_norm, x_norm = (np.empty(n, np.float32) for _ in range(4))
    offset = np.zeros(n + COL_PAD, np.float64)
    if n:
        _round_rows(x, m, padded, err, norm, bf_norm, x_norm, offset)
    up = 1 + 2 * d * 2.0 ** -24 + 1e-7
    norm = norm * up * (1 + 2.0 ** -23)  # |x - m| from |z|: z's own rounding
    err = err * up + 2.0 ** -23 * norm
    rows = Bf16Rows(torch.from_numpy(padded).view(torch.bfloat16), err, norm, bf_norm * up, x_norm * up)
    if centre:
        rows.row_off = (offset - float(m.astype(np.float64) @ m.astype(np.float64))).astype(np.float32)
        rows.col_off = offset.astype(np.float32)
        rows.row_off[n:] = 0.0
    return rows


def bf16_supported() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): elsewhere oneDNN
    emulates it (on plain AVX-512 too) and the float32 kernel is faster."""
    try:
        import torch

        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover - other builds
        return False


class Bf16TileProducts:
    """bfloat16 products ``left @ right.T`` into buffers reused across tiles (fresh 2 MB
    tiles would page-fault every time), read back as float32 NumPy (centred rows: plus their
    row and column offsets, added in float32)."""

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
        out = out_f32.numpy()
        if left.row_off is None or right.col_off is None:
            out_f32.copy_(out_bf)
        else:
            _widen_add(out_bf.view(torch.int16).numpy(), left.row_off[r0:r0 + rp], right.col_off[c0:c0 + cp], out)
        return out


@numba.njit(cache=True, fastmath=FAST, nogil=True)
def _widen_add(bits, row_off, col_off, out):  # pragma: no cover - compiled
    """out = float32(bfloat16 ``bits``) + col_off[j] + row_off[i], two float32 additions."""
    word = np.empty(bits.shape[1], np.uint32)
    value = word.view(np.float32)
    for i in range(bits.shape[0]):
        for j in range(bits.shape[1]):
            word[j] = np.uint32(np.uint16(bits[i, j])) << np.uint32(16)
        for j in range(bits.shape[1]):
            out[i, j] = (value[j] + col_off[j]) + row_off[i]
