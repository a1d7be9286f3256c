"""Similarity tiles from int8 products with exact integer sums and a proven margin: the
fast tile of :mod:`deldist.pairwise_lowp` on CPUs with AMX (and on any torch device that
runs ``torch._int_mm``).

deldist's own method (no paper has it; the splitting is the Ozaki scheme's idea, an exact
integer product of a number split into small digits). Each row is scaled to 15-bit
integers, q = round(x / s) with s = max_k |x_k| / 16255, and q is split into two int8
digits, q = 128 a + b with a in [-127, 127], b in [-64, 63]. A tile is then

    C_ij = s_i s_j (2^14 <a_i, a_j> + 2^7 <[a_i, b_i], [b_j, a_j]>)

two int8 matrix products (K = D and K = 2 D: three products' worth) with int32 sums,
which are exact, combined in float64 and rounded once to float32. On this CPU (AMX) those
run at ~2.8x the float32 sgemm rate of one core on 256 x 2048 tiles (bench/RESULTS.md), and
the margin is ~25x tighter than bfloat16's, so a row's window of candidates holds ~1 column
where bfloat16's held ~13 on the same clusters.

**The margin** (:meth:`Int8Rows.margins`). Let x^ = s q (what the integers represent),
e = x - x^ (|e_k| <= s / 2) and lo = s b. For a pair (x, y), exactly
<x, y> = <x^, y^> + <e_x, y^> + <x^, e_y> + <e_x, e_y> and <x^, y^> = C (before rounding)
+ <lo_x, lo_y>, so by Cauchy-Schwarz

    |<x, y> - C| <= |lo_x||lo_y| + |e_x||y^| + |x^||e_y| + |e_x||e_y| + 2^-24 |x^||y^|

(the last term: C's one rounding to float32; the integer sums are exact and the float64
combination adds ~2^-52). The norms are the actual ones of each row, computed in float64
(~1.3e-4 for a unit row at D = 768). Against the float32 value it is compared with (the
recheck, a float32 dot of D terms): + g_D |x||y|, g_D = D 2^-24 / (1 - D 2^-24). Row i's
``delta_i`` takes every column term at its maximum over the columns scored, about 2.6e-4
for unit rows at D = 768; ``tests/test_pairwise_lowp.py`` checks it on adversarial rows.
No value is rounded above 1 beyond that: :attr:`Int8Rows.above_one` is 0.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np

from deldist.lowp_tiles import COL_PAD, check_tile_shape, padded_shape

_SCRATCH = threading.local()
Q_MAX = 16255  # |q| <= Q_MAX keeps the high digit within [-127, 127]
HIGH = 128  # q = HIGH * a + b


@dataclass
class Int8Rows:
    """Rows prepared once for the int8 tiles (a bucket, sliced per cluster).

    digits: (n + pad, 3D) int8 tensor [b, a, b] per row, so that the high digits a, the
    rows' pairs [a, b] and the columns' pairs [b, a] are views of it (then ``COL_PAD``
    padding rows: tiles may read past a slice's end; those entries are never scanned); scale
    (n + pad,) float64 s (0 on padding); lo, err, q_norm, norm (n,) float64: |s b|,
    |x - s q|, |s q| and |x|, rounded up.
    """

    digits: Any
    scale: np.ndarray
    lo: np.ndarray
    err: np.ndarray
    q_norm: np.ndarray
    norm: np.ndarray
    above_one = 0.0  # a tile value is rounded once to float32 and that is inside delta
    spare = 0  # no extra top candidates: the bound (the first unlisted value + delta) is tight already

    @property
    def dim(self) -> int:
        return self.digits.shape[1] // 3

    @property
    def hi(self) -> Any:
        return self.digits[:, self.dim:2 * self.dim]

    @property
    def pair_rows(self) -> Any:
        return self.digits[:, self.dim:]

    @property
    def pair_cols(self) -> Any:
        return self.digits[:, :2 * self.dim]

    def margins(self, s: int, e: int, cols: "Int8Rows | None" = None) -> np.ndarray:
        """delta_i (float32 (e - s,)) for rows [s, e) scored against ``cols`` (default: the
        same rows [s, e)), every column term at its maximum over them (module docstring)."""
        if e <= s:
            return np.zeros(0, np.float32)
        d = self.dim
        g = d * 2.0 ** -24 / (1.0 - d * 2.0 ** -24)
        lo, err, q_norm, norm = (a[s:e] for a in (self.lo, self.err, self.q_norm, self.norm))
        c_lo, c_err, c_q, c_norm = (lo, err, q_norm, norm) if cols is None else (cols.lo, cols.err, cols.q_norm,
                                                                                cols.norm)
        delta = (lo * c_lo.max() + err * c_q.max() + q_norm * c_err.max() + err * c_err.max()
                 + 2.0 ** -24 * q_norm * c_q.max() + g * norm * c_norm.max())
        return (delta * (1 + 1e-6) + 1e-7).astype(np.float32)  # float32 rounding up of a float64 bound

    def products(self, block_rows: int, col_block: int) -> "Int8TileProducts":
        return Int8TileProducts(block_rows, col_block)


@numba.njit(cache=True, nogil=True, fastmath={"nnan", "ninf", "nsz", "contract", "reassoc", "arcp", "afn"})
def _split_rows(x, digits, scale, lo, err, q_norm, norm):  # pragma: no cover - compiled
    """Per row: the scale, both digits (int32 arithmetic) into [b, a, b], and the norms
    (float64 sums); every loop vectorises. q may be any integer near x / s (the margin uses
    the actual error of the one chosen): x * fl(1 / s) rounded half away from zero, so
    |q| <= Q_MAX (|x| / s <= Q_MAX, and the float32 product is off by far less than 1/2)."""
    d = x.shape[1]
    bits = x.view(np.uint32)
    q = np.empty(d, np.int32)
    b = np.empty(d, np.int32)
    top_word = np.empty(1, np.uint32)
    top_float = top_word.view(np.float32)
    for i in range(x.shape[0]):
        top_bits = np.uint32(0)  # max |x_k| through the bit patterns: an integer max vectorises
        for k in range(d):
            u = bits[i, k] & np.uint32(0x7FFFFFFF)
            top_bits = u if u > top_bits else top_bits
        top_word[0] = top_bits
        top = np.float64(top_float[0])
        s = top / Q_MAX if top > 0 else 1.0
        inv = np.float32(1.0 / s)
        for k in range(d):
            v = x[i, k] * inv
            q[k] = np.int32(v + (np.float32(0.5) if v >= 0 else np.float32(-0.5)))
        row = digits[i]  # separate loops over one row's view: each vectorises (the 2D stores did not)
        for k in range(d):
            a = (q[k] + np.int32(HIGH // 2)) >> 7  # floor((q + 64) / 128): an arithmetic shift
            b[k] = q[k] - (a << 7)
            row[d + k] = np.int8(a)
        for k in range(d):
            row[k] = np.int8(b[k])
        for k in range(d):
            row[2 * d + k] = np.int8(b[k])
        e2 = l2 = q2 = n2 = 0.0
        for k in range(d):
            v = np.float64(x[i, k])
            e = v - s * np.float64(q[k])
            e2 += e * e
            l2 += np.float64(b[k]) * np.float64(b[k])
            q2 += np.float64(q[k]) * np.float64(q[k])
            n2 += v * v
        scale[i] = s
        lo[i] = s * np.sqrt(l2)
        err[i] = np.sqrt(e2)
        q_norm[i] = s * np.sqrt(q2)
        norm[i] = np.sqrt(n2)


def _digit_rows(rows: int, width: int, reuse: bool) -> np.ndarray:
    """(rows, width) int8: fresh (zeros), or a view of this thread's scratch buffer, grown as
    needed (a cluster's fresh digits page-faulted as much as computing them cost)."""
    if not reuse:
        return np.zeros((rows, width), np.int8)
    buffer = getattr(_SCRATCH, "digits", None)
    if buffer is None or buffer.size < rows * width:
        buffer = np.zeros(max(rows * width, 1 << 23), np.int8)  # >= 4 MB: NumPy asks for huge pages
        _SCRATCH.digits = buffer
    return buffer[:rows * width].reshape(rows, width)


def prepare(x: np.ndarray, reuse: bool = False) -> Int8Rows:
    """x (n, D) float32 -> :class:`Int8Rows` in one compiled pass. The float64 norms are
    rounded up by 1e-12 relative (their own rounding, in any order, is ~D 2^-53). ``reuse``:
    the digits live in this thread's scratch buffer, valid until the next ``reuse`` call."""
    import torch

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    digits = _digit_rows(n + COL_PAD, 3 * d, reuse)
    scale = np.zeros(n + COL_PAD, np.float64)
    lo, err, q_norm, norm = (np.empty(n, np.float64) for _ in range(4))
    if n:
        _split_rows(x, digits, scale, lo, err, q_norm, norm)
    up = 1 + 1e-12
    return Int8Rows(torch.from_numpy(digits), scale, lo * up, err * up, q_norm * up, norm * up)


def int8_supported() -> bool:
    """Whether this CPU multiplies int8 in AMX tiles, where the int8 tiles beat float32 sgemm.
    Without AMX ``auto`` stays float32: on an AVX512-VNNI CPU (AMD Zen 5) the int8 max-only
    kernel was 16 % faster, but with the neighbour lists the stage was 11 % slower at 1M
    (bench/RESULTS.md, 2026-12-02)."""
    try:
        import torch

        return bool(torch.cpu._is_amx_tile_supported())
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover - other builds
        return False


@numba.njit(cache=True, nogil=True, fastmath={"nnan", "ninf", "nsz", "arcp", "contract", "afn"})
def _combine(g_hi, g_pair, scale_r, r0, scale_c, c0, out):  # pragma: no cover - compiled
    """out = s_i s_j (2^14 g_hi + 2^7 g_pair) in float64 (exact integer part), then float32."""
    for r in range(out.shape[0]):
        sr = scale_r[r0 + r]
        for c in range(out.shape[1]):
            v = np.float64(g_hi[r, c]) * (HIGH * HIGH) + np.float64(g_pair[r, c]) * HIGH
            out[r, c] = np.float32(v * (sr * scale_c[c0 + c]))


class Int8TileProducts:
    """int8 tiles ``left @ right.T`` into int32 buffers reused across tiles (fresh tiles
    would page-fault every time), combined into a reused float32 tile."""

    def __init__(self, block_rows: int, col_block: int):
        import torch

        check_tile_shape(block_rows, col_block)
        self.g_hi = torch.empty(block_rows * col_block, dtype=torch.int32)
        self.g_pair = torch.empty(block_rows * col_block, dtype=torch.int32)
        self.out = np.empty(block_rows * col_block, np.float32)

    def __call__(self, left: Int8Rows, r0: int, rows: int, right: Int8Rows, c0: int, cols: int) -> np.ndarray:
        """(rp, cp) float32: rows [r0, r0 + rp) of ``left`` against rows [c0, c0 + cp) of
        ``right``, rp and cp the counts padded to the tile multiples."""
        import torch

        rp, cp = padded_shape(rows, cols)
        g_hi, g_pair = self.g_hi[:rp * cp].view(rp, cp), self.g_pair[:rp * cp].view(rp, cp)
        torch._int_mm(left.hi[r0:r0 + rp], right.hi[c0:c0 + cp].T, out=g_hi)
        torch._int_mm(left.pair_rows[r0:r0 + rp], right.pair_cols[c0:c0 + cp].T, out=g_pair)
        out = self.out[:rp * cp].reshape(rp, cp)
        _combine(g_hi.numpy(), g_pair.numpy(), left.scale, r0, right.scale, c0, out)
        return out
