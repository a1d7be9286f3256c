"""The pairwise kernels of :mod:`deldist.pairwise` in torch, for GPUs: the same tiles
(:mod:`deldist.tiles`), the same merge and tie rules, full-precision float32 matmuls (TF32
off: its 10-bit mantissa moves cosines by ~1e-3, enough to flip a ``max_sim > 1 - eps``
decision or a tie). They run on any torch device, so the tests check them on the CPU.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from deldist.tiles import ListSpec, Matrix, check_range, rectangle_tiles, triangle_tiles, union_lists

if TYPE_CHECKING:
    import torch


def as_device_tensor(x: Matrix, device: str) -> Any:
    """(n, D) float32 tensor on ``device``; one already there is returned as is (no copy)."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)


@contextmanager
def _ieee_fp32_matmul() -> Iterator[None]:
    """Full float32 CUDA matmuls while inside (TF32 off), whatever the process had set; the
    previous setting is restored on exit. No effect on CPU matmuls."""
    import torch

    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9; never read allow_tf32 there (mixing APIs raises)
        previous = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = previous
    else:  # pragma: no cover - older torch
        previous = matmul.allow_tf32
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = previous


_TORCH_MASKS: dict[tuple[int, str], torch.Tensor] = {}


def _upper_mask_torch(size: int, device: torch.device) -> torch.Tensor:
    """:func:`_upper_mask` as a bool tensor on ``device`` (cached: built once per size)."""
    import torch

    key = (size, str(device))
    mask = _TORCH_MASKS.get(key)
    if mask is None:
        mask = torch.ones((size, size), dtype=torch.bool, device=device).triu()
        _TORCH_MASKS[key] = mask
    return mask


def _merge_max_torch(best: torch.Tensor, arg: torch.Tensor, sims: torch.Tensor, offset: int) -> None:
    """:func:`_merge_max` in torch (in place into the views ``best`` / ``arg``). ``max(dim=1)``
    returns the first index on ties (documented); ``where`` instead of boolean indexing keeps
    the merge on the device (boolean indexing syncs with the host)."""
    import torch

    tile_best, tile_arg = sims.max(dim=1)
    tile_arg += offset
    better = (tile_best > best) | ((tile_best == best) & (tile_arg < arg))
    best.copy_(torch.where(better, tile_best, best))
    arg.copy_(torch.where(better, tile_arg, arg))


class NeighbourListsTorch:
    """:class:`NeighbourLists` with its state on a torch device (one tile merge = a few
    kernels, no host sync but the by-rank scatter). Exact ties at the by-similarity cut may
    keep a different one of the tied items than the NumPy path."""

    def __init__(self, rows: int, spec: ListSpec, device: Any):
        import torch

        self.spec = spec
        full = lambda m, v, dtype: torch.full((rows, m), v, dtype=dtype, device=device)  # noqa: E731
        self.top_sim, self.top_idx = full(spec.by_similarity, -math.inf, torch.float32), \
            full(spec.by_similarity, -1, torch.int64)
        self.first_sim, self.first_idx = full(spec.by_rank, -math.inf, torch.float32), \
            full(spec.by_rank, -1, torch.int64)
        self.first_count = torch.zeros(rows, dtype=torch.int64, device=device)

    def merge(self, r0: int, r1: int, sims: Any, c0: int) -> None:
        import torch

        above = sims >= self.spec.floor
        m = self.spec.by_similarity
        if m:
            vals, inds = torch.topk(sims.masked_fill(~above, -math.inf), min(m, sims.shape[1]), dim=1)
            inds = torch.where(torch.isfinite(vals), inds + c0, torch.full_like(inds, -1))
            val = torch.cat([self.top_sim[r0:r1], vals], 1)
            idx = torch.cat([self.top_idx[r0:r1], inds], 1)
            by_idx = torch.argsort(torch.where(idx < 0, torch.iinfo(torch.int64).max, idx), dim=1, stable=True)
            val, idx = val.gather(1, by_idx), idx.gather(1, by_idx)
            by_val = torch.argsort(-val, dim=1, stable=True)[:, :m]
            self.top_sim[r0:r1], self.top_idx[r0:r1] = val.gather(1, by_val), idx.gather(1, by_val)
        if self.spec.by_rank:
            need = self.spec.by_rank - self.first_count[r0:r1]
            nth = above.cumsum(1)
            take = above & (nth <= need[:, None])
            r, c = take.nonzero(as_tuple=True)
            slot = self.first_count[r0 + r] + nth[r, c] - 1
            self.first_sim[r0 + r, slot] = sims[r, c]
            self.first_idx[r0 + r, slot] = c + c0
            self.first_count[r0:r1] += take.sum(1)

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        host = lambda t: t.cpu().numpy()  # noqa: E731
        return union_lists(host(self.top_idx), host(self.top_sim), host(self.first_idx), host(self.first_sim),
                           self.spec.floor)


def triu_max_sim_torch(x: Matrix, start: int = 0, stop: int | None = None,
                        block_rows: int = 256, col_block: int = 16_384, diag_rows: int = 64,
                        device: str = "cuda", spec: ListSpec | None = None) -> tuple[np.ndarray, ...]:
    """:func:`triu_max_sim` (with ``spec``: :func:`triu_neighbours`) in torch on ``device``
    (any torch device, also ``"cpu"``)."""
    import torch

    stop = check_range(len(x), start, stop)
    xt = as_device_tensor(x[:stop], device)  # rows from stop on are never read: not copied
    out_sim = torch.full((stop - start,), -math.inf, dtype=torch.float32, device=xt.device)
    out_arg = torch.full((stop - start,), -1, dtype=torch.int64, device=xt.device)
    lists = NeighbourListsTorch(stop - start, spec, xt.device) if spec is not None else None
    mask = _upper_mask_torch(diag_rows, xt.device)
    if stop > start:
        with _ieee_fp32_matmul():
            for r0, r1, c0, c1, diagonal in triangle_tiles(start, stop, block_rows, col_block, diag_rows):
                sims = xt[r0:r1] @ xt[c0:c1].T
                if diagonal:
                    sims[:, r0 - c0:].masked_fill_(mask[: r1 - r0, : r1 - r0], -math.inf)
                _merge_max_torch(out_sim[r0 - start:r1 - start], out_arg[r0 - start:r1 - start], sims, c0)
                if lists is not None:
                    lists.merge(r0 - start, r1 - start, sims, c0)
        if start == 0:
            out_sim[0], out_arg[0] = 0.0, -1
    result = (out_sim.cpu().numpy(), out_arg.cpu().numpy())
    return result if lists is None else (*result, *lists.result())


def max_sim_to_torch(q: Matrix, keys: Matrix, block_rows: int = 256,
                      col_block: int = 16_384, device: str = "cuda") -> tuple[np.ndarray, np.ndarray]:
    """:func:`max_sim_to` in torch on ``device`` (any torch device, also ``"cpu"``)."""
    import torch

    qt, kt = as_device_tensor(q, device), as_device_tensor(keys, device)
    best = torch.full((len(qt),), -math.inf, dtype=torch.float32, device=qt.device)
    arg = torch.full((len(qt),), -1, dtype=torch.int64, device=qt.device)
    with _ieee_fp32_matmul():
        for r0, r1, c0, c1 in rectangle_tiles(len(qt), len(kt), block_rows, col_block):
            _merge_max_torch(best[r0:r1], arg[r0:r1], qt[r0:r1] @ kt[c0:c1].T, c0)
    return best.cpu().numpy(), arg.cpu().numpy()
