"""Within-cluster semantic dedup scores (SemDeDup / MedDEL), distributed on Ray.

For every cluster, items are ranked by their distance to the centroid (``keep="hard"``:
farthest first, the SemDeDup default; ``"easy"``: nearest first; ``"random"``: a seeded
permutation that does not depend on the input row order). Each item then gets its highest
cosine similarity to any earlier-ranked item of the same cluster (``max_sim``; 0 for the
first-ranked item) and that item's id (``duplicate_of``; null for the first). A selection
later removes an item when ``max_sim > 1 - eps``; storing scores, not booleans, makes every
threshold a cheap filter.

Math: :func:`triu_max_sim` computes, for rank-ordered rows ``x`` (n, D), the row-wise max and
argmax of the strictly lower triangle of ``x @ x.T`` blockwise: a block of ``block_rows``
rows is multiplied against the earlier rows in column tiles of ``col_block`` (no mask), and
its diagonal block in sub-blocks of ``diag_rows`` rows with only their own triangle masked,
so memory is O(block_rows x col_block), never O(n^2), and only the lower triangle is
computed: n^2/2 + n diag_rows/2 dot products, about half the full n x n matrix.

Devices: ``device="cpu"`` runs the kernels in NumPy (float32 sgemm); any other torch device
(``"cuda"``) runs the same blocks in torch: one host-to-device copy per bucket (or per split
cluster's row range), full-precision float32 matmuls (TF32 off: its 10-bit mantissa moves
cosines by ~1e-3, enough to flip a ``max_sim > 1 - eps`` decision or a tie), results back as
NumPy. Both paths give the same results up to float32 rounding, with the same tie rule.
GPU memory per scoring task: its bucket (up to ``bucket_rows`` x D x 4 bytes) or rows
[0, stop) of its split cluster, plus a few O(block_rows x col_block) tiles.

Ray wiring of :func:`run`:

1. The driver reads ``clusters/assignments`` (id, cluster, distance: metadata only), ranks
   the items and packs clusters into buckets of similar cost (sum of n_c^2); a cluster larger
   than ``split_rows`` gets a bucket of its own and is later split into row ranges.
2. Shuffle: one task per embeddings shard reads (id, embedding), looks up each row's bucket
   and returns one slice per bucket (Ray object store; the embeddings are read once).
3. Score: one task per bucket concatenates its slices in (cluster, rank) order and scores
   its clusters; a split cluster is gathered once into the object store and scored by several
   row-range tasks reading it zero-copy. Each task writes a ``dedup/scores`` part.
4. Publish ``dedup/scores/`` (manifest then ``_SUCCESS``).

Bad input: ids present in embeddings but not in assignments (or the reverse), duplicate ids,
and a dimension differing between embeddings and centroids raise errors naming the cause;
an empty assignments table raises :class:`~deldist.cluster.EmptyInputError`.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence, Union

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from deldist import storage
from deldist.arrays import equal_runs
from deldist.cluster import (
    EmbeddingError,
    EmptyInputError,
    Shard,
    as_tensor,
    embedding_matrix,
    normalize_checked,
    plan_shards,
    read_shard,
)
from deldist.config import StageConfig
from deldist.greedy import keep_first_in_order
from deldist.schema import SCORES_SCHEMA

if TYPE_CHECKING:
    import torch

KeepMode = Literal["hard", "easy", "random"]
# "cpu": the NumPy kernels; any other torch device ("cuda", "cuda:1"): the torch kernels there
Device = str
# a kernel input: NumPy rows, or a tensor already on the kernel's device (see to_device)
Matrix = Union[np.ndarray, "torch.Tensor"]


class Config(StageConfig):
    """``deldist dedup`` settings."""

    output: str = Field(description="run root URI: reads embeddings/ and clusters/, writes dedup/scores/")
    embeddings: str | None = Field(None, description="default <output>/embeddings")
    clusters: str | None = Field(None, description="default <output>/clusters")
    scores: str | None = Field(None, description="default <output>/dedup/scores")
    keep: KeepMode = Field("easy", description="rank order within a cluster: easy = nearest the centroid first "
                                               "(MedDEL), hard = farthest first (SemDeDup)")
    seed: int = Field(0, description="seed of keep=random")
    neighbours_by_similarity: int = Field(16, ge=0, description="per item, the most similar earlier items kept "
                                                                  "for the kept-aware selection")
    neighbours_by_rank: int = Field(16, ge=0, description="per item, the earliest-ranked earlier items kept (those "
                                                            "most often kept themselves)")
    neighbour_floor: float = Field(0.5, ge=-1, le=1, description="neighbours below this similarity are not kept; "
                                                                 "selections need thresholds at or above it")
    block_rows: int = Field(256, ge=1, description="rows per similarity block")
    diag_rows: int = Field(64, ge=1, description="rows per sub-block of a diagonal block")
    col_block: int = Field(16_384, ge=1, description="columns per similarity tile")
    split_rows: int = Field(50_000, ge=2, description="clusters larger than this are split over several tasks")
    bucket_rows: int = Field(200_000, ge=1, description="soft cap on rows in one packed task")
    num_buckets: int | None = Field(None, ge=1, description="packed tasks (default: 2 x cluster CPUs / task_cpus)")
    shard_rows: int = Field(65_536, ge=1, description="target rows per read shard")
    task_cpus: float = Field(1.0, gt=0, description="CPUs per scoring task (each runs single-threaded BLAS)")
    io_cpus: float = Field(1.0, gt=0, description="CPUs per shuffle (read) task: Parquet decode and routing are CPU-bound")
    use_gpu: bool | None = Field(None, description="score on GPUs (torch) (default: when the cluster has GPUs)")
    task_gpus: float = Field(0.5, gt=0, le=1, description="GPU share per scoring task when use_gpu (0.5: two tasks "
                                                           "per GPU, one's gather/write overlaps the other's matmuls)")


# ----------------------------------------------------------------------------- math (pure)


def rank_within_clusters(ids: pa.Array | pa.ChunkedArray, cluster: np.ndarray, distance: np.ndarray,
                         keep: KeepMode = "hard", seed: int = 0) -> np.ndarray:
    """Rank (int64, 0 = first) of every item inside its cluster.

    ids: (n,) strings (unique); cluster: (n,) int; distance: (n,) cosine distance to the
    centroid. ``hard`` ranks the farthest first, ``easy`` the nearest first, ``random`` by a
    seeded permutation assigned in id order (independent of the row order). Ties are broken
    by id, so the result never depends on the input order.
    """
    n = len(cluster)
    if n == 0:
        return np.empty(0, np.int64)
    ids = pa.chunked_array([ids]) if isinstance(ids, pa.Array) else ids
    if keep == "random":
        key = np.empty(n, np.float64)
        by_id = pc.sort_indices(ids).to_numpy()
        key[by_id] = np.random.default_rng(seed).permutation(n)
        direction = "ascending"
    elif keep in ("hard", "easy"):
        key = np.asarray(distance, np.float64)
        direction = "descending" if keep == "hard" else "ascending"
    else:
        raise ValueError(f"keep must be hard, easy or random, got {keep!r}")
    table = pa.table({"cluster": np.asarray(cluster), "key": key, "id": ids})
    order = pc.sort_indices(table, sort_keys=[("cluster", "ascending"), ("key", direction),
                                              ("id", "ascending")]).to_numpy()
    sorted_cluster = np.asarray(cluster)[order]
    starts, ends = equal_runs(sorted_cluster)
    run_start = np.repeat(starts, ends - starts)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - run_start
    return rank


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


@dataclass(frozen=True)
class ListSpec:
    """Which earlier neighbours a row keeps besides its max (see :class:`NeighbourLists`)."""

    by_similarity: int = 16
    by_rank: int = 16
    floor: float = 0.5


@numba.njit(cache=True)
def _merge_tile(sims, c0, r0, top_sim, top_idx, first_sim, first_idx, first_count, floor_below, best,
                arg):  # pragma: no cover - compiled
    """One pass over a similarity tile: each row's max (the first on ties), its
    ``by_similarity`` most similar columns (sorted insertion; ties keep the earlier column)
    and its first ``by_rank`` columns at or above the floor. Columns must arrive in
    increasing order per row."""
    m = top_sim.shape[1]
    mr = first_sim.shape[1]
    for r in range(sims.shape[0]):
        row = r0 + r
        cut = top_sim[row, m - 1] if m else np.inf
        row_best = best[r]
        row_arg = arg[r]
        for c in range(sims.shape[1]):
            s = sims[r, c]
            if s > row_best:
                row_best = s
                row_arg = c0 + c
            if s <= floor_below:
                continue
            if s > cut:
                pos = m - 1
                while pos > 0 and top_sim[row, pos - 1] < s:
                    top_sim[row, pos] = top_sim[row, pos - 1]
                    top_idx[row, pos] = top_idx[row, pos - 1]
                    pos -= 1
                top_sim[row, pos] = s
                top_idx[row, pos] = c0 + c
                cut = top_sim[row, m - 1]
            k = first_count[row]
            if k < mr:
                first_sim[row, k] = s
                first_idx[row, k] = c0 + c
                first_count[row] = k + 1
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

    def merge(self, r0: int, r1: int, sims: np.ndarray, c0: int, best: np.ndarray, arg: np.ndarray) -> None:
        """Fold the (r1 - r0, cols) tile ``sims`` (columns numbered from ``c0``; masked
        entries -inf) into rows [r0, r1), and into their running max ``best`` / ``arg``
        (views of rows [r0, r1))."""
        _merge_tile(sims, c0, r0, self.top_sim, self.top_idx, self.first_sim, self.first_idx, self.first_count,
                    self.floor_below, best, arg)

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(idx int64 (rows, L), sim float32 (rows, L), bound float32 (rows,)): the union of
        both lists, each row sorted by similarity (descending; ties: lower index first) and
        padded with -1 / -inf; L = by_similarity + by_rank."""
        return union_lists(self.top_idx, self.top_sim, self.first_idx, self.first_sim, self.spec.floor)


@numba.njit(cache=True)
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


def triu_neighbours(x: Matrix, start: int = 0, stop: int | None = None, spec: ListSpec = ListSpec(),
                    block_rows: int = 256, col_block: int = 16_384, diag_rows: int = 64,
                    device: Device = "cpu") -> tuple[np.ndarray, ...]:
    """:func:`triu_max_sim` plus each row's neighbour lists (:class:`NeighbourLists`), from
    the same tiles. Returns (max_sim (r,), argmax (r,), idx int64 (r, L), sim float32 (r, L),
    bound float32 (r,)) for the r = stop - start rows; idx are row numbers of ``x``."""
    if device == "cpu":
        return _triu_max_sim_numpy(np.asarray(x), start, stop, block_rows, col_block, diag_rows, spec)
    return _triu_max_sim_torch(x, start, stop, block_rows, col_block, diag_rows, device, spec)


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
    return _triu_max_sim_torch(x, start, stop, block_rows, col_block, diag_rows, device)


def max_sim_to(q: Matrix, keys: Matrix, block_rows: int = 256,
               col_block: int = 16_384, device: Device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Max similarity of each query row to any key row, blockwise.

    q: (m, D), keys: (p, D) float32 unit rows (NumPy, or tensors on ``device``); device as in
    :func:`triu_max_sim`. Returns (max_sim float32 (m,), argmax int64 (m,) into keys, the
    first on exact ties); -inf and -1 when there are no keys.
    """
    if device == "cpu":
        return _max_sim_to_numpy(np.asarray(q), np.asarray(keys), block_rows, col_block)
    return _max_sim_to_torch(q, keys, block_rows, col_block, device)


def _check_range(n: int, start: int, stop: int | None) -> int:
    stop = n if stop is None else stop
    if not 0 <= start <= stop <= n:
        raise ValueError(f"row range [{start}, {stop}) outside [0, {n})")
    return stop


def _triangle_tiles(start: int, stop: int, block_rows: int, col_block: int, diag_rows: int,
                    ) -> Iterator[tuple[int, int, int, int, bool]]:
    """The tiles of the strict lower triangle for rows [start, stop), in the order both
    kernels (NumPy, torch) compute them: (r0, r1, c0, c1, diagonal) = rows r0:r1 against
    columns c0:c1. A block of ``block_rows`` rows meets every earlier row in column tiles of
    ``col_block`` (no mask); its diagonal block is cut into sub-blocks of ``diag_rows`` rows,
    each against the block's rows up to itself (``diagonal``: columns from r0 on, the
    sub-block's own triangle j >= i, must be masked)."""
    for b0 in range(start, stop, block_rows):
        b1 = min(b0 + block_rows, stop)
        for c0 in range(0, b0, col_block):
            yield b0, b1, c0, min(c0 + col_block, b0), False
        for s0 in range(b0, b1, diag_rows):
            s1 = min(s0 + diag_rows, b1)
            yield s0, s1, b0, s1, True


def _rectangle_tiles(m: int, p: int, block_rows: int, col_block: int) -> Iterator[tuple[int, int, int, int]]:
    """Tiles (r0, r1, c0, c1) covering an m x p query-key product."""
    for r0 in range(0, m, block_rows):
        for c0 in range(0, p, col_block):
            yield r0, min(r0 + block_rows, m), c0, min(c0 + col_block, p)


def _triu_max_sim_numpy(x: np.ndarray, start: int = 0, stop: int | None = None, block_rows: int = 256,
                        col_block: int = 16_384, diag_rows: int = 64, spec: ListSpec | None = None,
                        ) -> tuple[np.ndarray, ...]:
    """:func:`triu_max_sim` in NumPy (float32 sgemm); with ``spec``, :func:`triu_neighbours`."""
    n = len(x)
    stop = _check_range(n, start, stop)
    out_sim = np.full(stop - start, -np.inf, np.float32)
    out_arg = np.full(stop - start, -1, np.int64)
    lists = NeighbourLists(stop - start, spec) if spec is not None else None
    if stop > start:
        x = np.ascontiguousarray(x, dtype=np.float32)
        for r0, r1, c0, c1, diagonal in _triangle_tiles(start, stop, block_rows, col_block, diag_rows):
            sims = x[r0:r1] @ x[c0:c1].T
            if diagonal:
                np.copyto(sims[:, r0 - c0:], -np.inf, where=_upper_mask(diag_rows)[: r1 - r0, : r1 - r0])
            if lists is None:
                _merge_max(out_sim[r0 - start:r1 - start], out_arg[r0 - start:r1 - start], sims, c0)
            else:
                lists.merge(r0 - start, r1 - start, sims, c0, out_sim[r0 - start:r1 - start],
                            out_arg[r0 - start:r1 - start])
        if start == 0:
            out_sim[0], out_arg[0] = 0.0, -1
    return (out_sim, out_arg) if lists is None else (out_sim, out_arg, *lists.result())


def _max_sim_to_numpy(q: np.ndarray, keys: np.ndarray, block_rows: int = 256, col_block: int = 16_384,
                      ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`max_sim_to` in NumPy (float32 sgemm)."""
    best = np.full(len(q), -np.inf, np.float32)
    arg = np.full(len(q), -1, np.int64)
    q = np.ascontiguousarray(q, dtype=np.float32)
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    for r0, r1, c0, c1 in _rectangle_tiles(len(q), len(keys), block_rows, col_block):
        _merge_max(best[r0:r1], arg[r0:r1], q[r0:r1] @ keys[c0:c1].T, c0)
    return best, arg


# torch versions of the same blocks: same loops, same merge rule, so the same results up to
# float32 rounding. Written for CUDA; they run on any torch device, so the tests check them
# on the CPU by calling _triu_max_sim_torch / _max_sim_to_torch with device="cpu".


def to_device(x: np.ndarray, device: Device) -> Matrix:
    """The matrix the kernels on ``device`` read: ``x`` itself for ``"cpu"`` (NumPy), else a
    float32 tensor on ``device`` (one host-to-device copy; callers then slice it per
    cluster instead of copying every cluster)."""
    return x if device == "cpu" else _as_device_tensor(x, device)


def _as_device_tensor(x: Matrix, device: str) -> torch.Tensor:
    """(n, D) float32 tensor on ``device``; one already there is returned as is (no copy)."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32)
    return as_tensor(np.ascontiguousarray(x, dtype=np.float32)).to(device)


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


class _NeighbourListsTorch:
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


def _triu_max_sim_torch(x: Matrix, start: int = 0, stop: int | None = None,
                        block_rows: int = 256, col_block: int = 16_384, diag_rows: int = 64,
                        device: str = "cuda", spec: ListSpec | None = None) -> tuple[np.ndarray, ...]:
    """:func:`triu_max_sim` (with ``spec``: :func:`triu_neighbours`) in torch on ``device``
    (any torch device, also ``"cpu"``)."""
    import torch

    stop = _check_range(len(x), start, stop)
    xt = _as_device_tensor(x[:stop], device)  # rows from stop on are never read: not copied
    out_sim = torch.full((stop - start,), -math.inf, dtype=torch.float32, device=xt.device)
    out_arg = torch.full((stop - start,), -1, dtype=torch.int64, device=xt.device)
    lists = _NeighbourListsTorch(stop - start, spec, xt.device) if spec is not None else None
    mask = _upper_mask_torch(diag_rows, xt.device)
    if stop > start:
        with _ieee_fp32_matmul():
            for r0, r1, c0, c1, diagonal in _triangle_tiles(start, stop, block_rows, col_block, diag_rows):
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


def _max_sim_to_torch(q: Matrix, keys: Matrix, block_rows: int = 256,
                      col_block: int = 16_384, device: str = "cuda") -> tuple[np.ndarray, np.ndarray]:
    """:func:`max_sim_to` in torch on ``device`` (any torch device, also ``"cpu"``)."""
    import torch

    qt, kt = _as_device_tensor(q, device), _as_device_tensor(keys, device)
    best = torch.full((len(qt),), -math.inf, dtype=torch.float32, device=qt.device)
    arg = torch.full((len(qt),), -1, dtype=torch.int64, device=qt.device)
    with _ieee_fp32_matmul():
        for r0, r1, c0, c1 in _rectangle_tiles(len(qt), len(kt), block_rows, col_block):
            _merge_max_torch(best[r0:r1], arg[r0:r1], qt[r0:r1] @ kt[c0:c1].T, c0)
    return best.cpu().numpy(), arg.cpu().numpy()


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


def score_sorted_clusters(x: np.ndarray, ids: pa.Array, cluster: np.ndarray, rank: np.ndarray,
                          spec: ListSpec = ListSpec(), block_rows: int = 256, col_block: int = 16_384,
                          diag_rows: int = 64, device: Device = "cpu") -> pa.Table:
    """Scores table (SCORES_SCHEMA) for rows already sorted by (cluster, rank).

    x: (n, D) float32 unit rows; ids: (n,) strings; cluster: (n,) int; rank: (n,) int64 that
    must be 0..n_c-1 inside each cluster (checked: the ranking and the data must agree).
    spec: the neighbour lists kept per row; device: as in :func:`triu_max_sim` (``x`` is
    copied there once for all its clusters).
    """
    n = len(x)
    width = spec.by_similarity + spec.by_rank
    max_sim = np.zeros(n, np.float32)
    dup = np.full(n, -1, np.int64)
    nbr = np.full((n, width), -1, np.int64)
    nbr_sim = np.full((n, width), -np.inf, np.float32)
    bound = np.full(n, spec.floor, np.float32)
    if n:
        starts, ends = equal_runs(cluster)
        expected = np.arange(n) - np.repeat(starts, ends - starts)
        if not np.array_equal(np.asarray(rank), expected):
            raise ValueError("ranks are not 0..n-1 within each cluster: assignments and embeddings disagree")
        xd = to_device(x, device)  # one copy per bucket; each cluster is a slice of it
        for s, e in zip(starts, ends):
            sims, arg, nbr[s:e], nbr_sim[s:e], bound[s:e] = triu_neighbours(
                xd[s:e], spec=spec, block_rows=block_rows, col_block=col_block, diag_rows=diag_rows, device=device)
            max_sim[s:e] = sims
            dup[s:e] = np.where(arg >= 0, arg + s, -1)
    return scores_table(ids, cluster, rank, max_sim, dup, nbr, nbr_sim, bound)


def scores_table(ids: pa.Array, cluster: np.ndarray, rank: np.ndarray, max_sim: np.ndarray,
                 dup_row: np.ndarray, neighbours: np.ndarray, neighbour_sims: np.ndarray, bound: np.ndarray,
                 dup_ids: pa.Array | None = None) -> pa.Table:
    """Assemble SCORES_SCHEMA rows; ``dup_row`` indexes ``dup_ids`` (default ``ids``), -1 = none.
    neighbours / neighbour_sims: (n, L) ranks within the cluster and similarities, each row
    valid entries first (-1 padding); bound: (n,) ``unlisted_max_sim``."""
    dup_ids = ids if dup_ids is None else dup_ids
    has_dup = dup_row >= 0
    taken = pc.take(dup_ids, pa.array(np.where(has_dup, dup_row, 0)))
    duplicate_of = pc.if_else(pa.array(has_dup), taken, pa.nulls(len(dup_row), pa.string()))
    valid = np.asarray(neighbours) >= 0
    offsets = pa.array(np.r_[0, np.cumsum(valid.sum(axis=1))].astype(np.int32))
    return pa.table({
        "id": ids,
        "cluster": pa.array(np.asarray(cluster, np.int32)),
        "rank": pa.array(np.asarray(rank, np.int64)),
        "max_sim": pa.array(np.asarray(max_sim, np.float32)),
        "duplicate_of": duplicate_of,
        "neighbours": pa.ListArray.from_arrays(offsets, pa.array(np.asarray(neighbours)[valid].astype(np.int32))),
        "neighbour_sims": pa.ListArray.from_arrays(offsets, pa.array(np.asarray(neighbour_sims)[valid],
                                                                     pa.float32())),
        "unlisted_max_sim": pa.array(np.asarray(bound, np.float32)),
    }, schema=SCORES_SCHEMA)


def split_rows_by_area(n: int, parts: int) -> list[tuple[int, int]]:
    """Row ranges of a lower-triangle computation on n rows with about equal work each
    (row i costs ~i, so boundaries go at n * sqrt(p / parts))."""
    parts = max(1, min(parts, n))
    bounds = sorted({0, n, *(int(round(n * math.sqrt(p / parts))) for p in range(1, parts))})
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


@dataclass
class Bucket:
    """A scoring unit: several small clusters, or one split cluster (``row_ranges``)."""

    clusters: list[int] = field(default_factory=list)
    rows: int = 0
    cost: float = 0.0
    row_ranges: list[tuple[int, int]] = field(default_factory=list)


def cluster_cost(n: int | np.ndarray) -> Any:
    """Relative work of scoring a cluster of n rows: n^2/2 pair dot products plus per-row cost."""
    return n * (n / 2.0 + 64.0)


def plan_buckets(sizes: np.ndarray, n_buckets: int, split_rows: int, bucket_rows: int) -> list[Bucket]:
    """Pack clusters (sizes: (k,) members per cluster id) into scoring buckets.

    Clusters larger than ``split_rows`` get a bucket of their own, cut into row ranges of
    about the average packed bucket's work (at least 2 ranges). The rest are packed
    largest-first into the least-loaded of ``n_buckets`` buckets (more when the rows would
    exceed ``bucket_rows`` per bucket).
    """
    sizes = np.asarray(sizes)
    present = np.flatnonzero(sizes > 0)
    small = [int(c) for c in present if sizes[c] <= split_rows]
    huge = [int(c) for c in present if sizes[c] > split_rows]
    total_cost = float(cluster_cost(sizes[present].astype(np.float64)).sum())
    small_rows = int(sizes[small].sum()) if small else 0
    n_packed = max(1, n_buckets, math.ceil(small_rows / bucket_rows)) if small else 0
    n_packed = min(n_packed, len(small))
    target = total_cost / max(1, n_buckets)
    buckets: list[Bucket] = []
    for c in huge:
        n = int(sizes[c])
        ranges = split_rows_by_area(n, max(2, math.ceil(cluster_cost(n) / max(target, 1.0))))
        buckets.append(Bucket([c], n, float(cluster_cost(n)), ranges))
    packed = [Bucket() for _ in range(n_packed)]
    for c in sorted(small, key=lambda c: -int(sizes[c])):
        b = min(packed, key=lambda b: b.cost)
        b.clusters.append(c)
        b.rows += int(sizes[c])
        b.cost += float(cluster_cost(int(sizes[c])))
    return buckets + [b for b in packed if b.clusters]


# ----------------------------------------------------------------------------- Ray wiring


def route_shard(emb_dir: str, shard: Shard, dim: int | None, lookup: pa.Table,
                n_buckets: int) -> list[Any]:
    """Task body of the shuffle: read one embeddings shard and split its rows by bucket.

    lookup: ``id``, ``bucket`` int32 and any extra columns (copied to every slice) for each
    expected id. Returns n_buckets slices ``(meta table (id, extra columns...), matrix (m, D)
    float32 unit rows)`` and, last, ``{"rows", "missing", "missing_examples"}`` where
    missing counts embedded ids absent from ``lookup``.
    """
    table = read_shard(emb_dir, shard, ["id", "embedding"])
    ids = table.column("id").combine_chunks()
    x = normalize_checked(embedding_matrix(table.column("embedding"), dim), ids)
    position = pc.index_in(ids, value_set=lookup.column("id"))
    found = pc.is_valid(position).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(found)
    pos = position.filter(pa.array(found)).to_numpy(zero_copy_only=False).astype(np.int64)
    bucket = lookup.column("bucket").to_numpy()[pos]
    order = np.argsort(bucket, kind="stable")
    rows, pos, bucket = rows[order], pos[order], bucket[order]
    bounds = np.searchsorted(bucket, np.arange(n_buckets + 1))
    extra = {name: lookup.column(name).to_numpy() for name in lookup.column_names
             if name not in ("id", "bucket")}
    out: list[Any] = []
    for b in range(n_buckets):
        r, p = rows[bounds[b]:bounds[b + 1]], pos[bounds[b]:bounds[b + 1]]
        meta = pa.table({"id": ids.take(pa.array(r)), **{k: v[p] for k, v in extra.items()}})
        out.append((meta, np.ascontiguousarray(x[r])))
    missing = int((~found).sum())
    examples = ids.filter(pa.array(~found)).slice(0, 5).to_pylist() if missing else []
    out.append({"rows": len(x), "missing": missing, "missing_examples": examples})
    return out


def gather_sorted(slices: Sequence[tuple[pa.Table, np.ndarray]], keys: tuple[str, str] = ("cluster", "rank"),
                  ) -> tuple[np.ndarray, pa.Table]:
    """Concatenate shuffle slices ordered by ``keys`` (primary, secondary) with a single copy
    of the vectors -> (matrix (n, D) float32, meta table in the same order)."""
    meta = pa.concat_tables([m for m, _ in slices])
    n = meta.num_rows
    dim = max((x.shape[1] for _, x in slices if x.ndim == 2), default=0)
    order = np.lexsort((meta.column(keys[1]).to_numpy(), meta.column(keys[0]).to_numpy()))
    destination = np.empty(n, np.int64)
    destination[order] = np.arange(n)
    x = np.empty((n, dim), np.float32)
    offset = 0
    for _, part in slices:
        m = len(part)
        if m:
            x[destination[offset:offset + m]] = part
        offset += m
    return x, meta.take(pa.array(order))


def shuffle_by_bucket(emb_dir: str, dim: int | None, lookup: pa.Table, n_buckets: int, shard_rows: int,
                      io_cpus: float) -> tuple[list[list[Any]], Any]:
    """Start the shuffle of ``embeddings/`` rows into ``n_buckets`` buckets (Ray tasks).

    Returns (per bucket: the list of slice refs, one per shard; a ref-list of the per-shard
    stats). Raises nothing itself: call :func:`check_shuffle` on the stats.
    """
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0)
    shards = plan_shards(emb_dir, shard_rows, min_shards=max(1, int(2 * cpus / io_cpus)))
    lookup_ref = ray.put(lookup)
    route = ray.remote(num_cpus=io_cpus, num_returns=n_buckets + 1)(route_shard)
    routed = [route.remote(emb_dir, s, dim, lookup_ref, n_buckets) for s in shards]
    per_bucket = [[r[b] for r in routed] for b in range(n_buckets)]
    return per_bucket, [r[-1] for r in routed]


def check_shuffle(stats: list[dict[str, Any]], expected: int, what: str) -> None:
    """Every embedded id must be in the lookup and every lookup id embedded."""
    missing = sum(s["missing"] for s in stats)
    embedded = sum(s["rows"] for s in stats)
    if missing or embedded != expected:
        examples = [e for s in stats for e in s["missing_examples"]][:5]
        raise ValueError(f"embeddings and {what} disagree: {embedded} embedded rows, {expected} in {what}, "
                         f"{missing} embedded ids missing from {what} (e.g. {examples}); re-run the stage "
                         f"that wrote {what}")


def _score_bucket(out_dir: str, spec: ListSpec, block_rows: int, col_block: int, diag_rows: int, device: Device,
                  *slices: tuple[pa.Table, np.ndarray]) -> dict[str, Any]:
    """Task body: score every (small) cluster of one bucket on ``device`` and write a scores part."""
    began = time.perf_counter()
    x, meta = gather_sorted(slices)
    del slices
    ids = meta.column("id").combine_chunks()
    gathered = time.perf_counter()
    table = score_sorted_clusters(x, ids, meta.column("cluster").to_numpy(), meta.column("rank").to_numpy(),
                                  spec, block_rows, col_block, diag_rows, device)
    return write_scores_part(out_dir, table, time.perf_counter() - gathered, gathered - began)


def _gather_cluster(*slices: tuple[pa.Table, np.ndarray]) -> tuple[np.ndarray, pa.Array]:
    """Task body: one split cluster's rows in rank order -> ((n, D) float32, ids (n,))."""
    x, meta = gather_sorted(slices)
    rank = meta.column("rank").to_numpy()
    if not np.array_equal(rank, np.arange(len(rank))):
        raise ValueError("ranks of a split cluster are not 0..n-1: assignments and embeddings disagree")
    return x, meta.column("id").combine_chunks()


def _score_rows(out_dir: str, x: np.ndarray, ids: pa.Array, cluster: int, start: int, stop: int, spec: ListSpec,
                block_rows: int, col_block: int, diag_rows: int, device: Device = "cpu") -> dict[str, Any]:
    """Task body: rows [start, stop) of one split cluster -> a scores part (on ``device``: only
    rows [0, stop) are copied there)."""
    began = time.perf_counter()
    sims, arg, nbr, nbr_sim, bound = triu_neighbours(x, start, stop, spec, block_rows, col_block, diag_rows, device)
    table = scores_table(ids.slice(start, stop - start), np.full(stop - start, cluster),
                         np.arange(start, stop), sims, arg, nbr, nbr_sim, bound, dup_ids=ids)
    return write_scores_part(out_dir, table, time.perf_counter() - began, 0.0)


def write_scores_part(out_dir: str, table: pa.Table, score_seconds: float, gather_seconds: float) -> dict[str, Any]:
    began = time.perf_counter()
    path = storage.join(out_dir, storage.new_part_name())
    storage.write_table(table, path)
    return {"path": storage.resolve(path)[1], "rows": table.num_rows, "score_seconds": score_seconds,
            "gather_seconds": gather_seconds, "write_seconds": time.perf_counter() - began}


def _check_unique(ids: pa.ChunkedArray, what: str) -> None:
    distinct = pc.count_distinct(ids).as_py()
    if distinct != len(ids):
        raise ValueError(f"{what} holds {len(ids) - distinct} duplicate ids; ids must be unique")


def run(config: Config) -> dict[str, Any]:
    """Score every embedded item against the earlier-ranked items of its cluster and publish
    ``dedup/scores/`` (see the module doc)."""
    import ray

    from deldist.runtime import cluster_gpus, init_ray

    init_ray()
    started = time.perf_counter()
    emb_dir = config.embeddings or storage.join(config.output, "embeddings")
    clusters_dir = config.clusters or storage.join(config.output, "clusters")
    out_dir = config.scores or storage.join(config.output, "dedup", "scores")
    emb_manifest = storage.read_manifest(emb_dir)
    clusters_manifest = storage.read_manifest(clusters_dir)
    dim = emb_manifest.get("dim")
    if dim is not None and clusters_manifest.get("dim") is not None and int(dim) != int(clusters_manifest["dim"]):
        raise EmbeddingError(f"dimension mismatch: {emb_dir} has D={dim} but the centroids in "
                             f"{clusters_dir} have D={clusters_manifest['dim']}; re-run cluster")
    assign_dir = storage.join(clusters_dir, clusters_manifest.get("assignments", "assignments"))
    assignments = storage.read_published(assign_dir, columns=["id", "cluster", "distance"])
    n = assignments.num_rows
    if n == 0:
        raise EmptyInputError(f"{assign_dir} has no rows: nothing to deduplicate")
    _check_unique(assignments.column("id"), assign_dir)
    cluster = assignments.column("cluster").to_numpy().astype(np.int64)
    if cluster.min() < 0:
        raise ValueError(f"{assign_dir} has negative cluster ids")
    rank = rank_within_clusters(assignments.column("id"), cluster,
                                assignments.column("distance").to_numpy(), config.keep, config.seed)
    sizes = np.bincount(cluster)
    n_buckets = config.num_buckets or max(1, 2 * int(ray.cluster_resources().get("CPU", 1.0) // config.task_cpus))
    buckets = plan_buckets(sizes, n_buckets, config.split_rows, config.bucket_rows)
    bucket_of_cluster = np.full(len(sizes), -1, np.int32)
    for b, bucket in enumerate(buckets):
        bucket_of_cluster[bucket.clusters] = b
    lookup = pa.table({"id": assignments.column("id"), "bucket": bucket_of_cluster[cluster],
                       "cluster": cluster.astype(np.int32), "rank": rank})
    del assignments
    planned = time.perf_counter()

    # shuffle: each embeddings shard is read once and split by bucket
    slices_of, route_stats = shuffle_by_bucket(emb_dir, dim, lookup, len(buckets), config.shard_rows,
                                               config.io_cpus)

    # score: packed buckets directly, split clusters gathered once then row-range tasks
    use_gpu = cluster_gpus() > 0 if config.use_gpu is None else config.use_gpu
    device = "cuda" if use_gpu else "cpu"
    gpu_opts = {"num_gpus": config.task_gpus} if use_gpu else {}
    spec = ListSpec(config.neighbours_by_similarity, config.neighbours_by_rank, config.neighbour_floor)
    score_bucket = ray.remote(num_cpus=config.task_cpus, **gpu_opts)(_score_bucket)
    gather = ray.remote(num_cpus=config.io_cpus, num_returns=2)(_gather_cluster)
    score_rows = ray.remote(num_cpus=config.task_cpus, **gpu_opts)(_score_rows)
    pending = []
    for b, bucket in enumerate(buckets):
        slices = slices_of[b]
        if bucket.row_ranges:
            x_ref, ids_ref = gather.remote(*slices)
            pending += [score_rows.remote(out_dir, x_ref, ids_ref, bucket.clusters[0], a, e, spec,
                                          config.block_rows, config.col_block, config.diag_rows, device)
                        for a, e in bucket.row_ranges]
        else:
            pending.append(score_bucket.remote(out_dir, spec, config.block_rows, config.col_block,
                                               config.diag_rows, device, *slices))
    try:
        check_shuffle(ray.get(route_stats), n, "assignments")
    except ValueError:
        for ref in pending:
            ray.cancel(ref)
        raise
    parts = ray.get(pending)
    scored = sum(p["rows"] for p in parts)
    if scored != n:
        raise RuntimeError(f"scored {scored} rows but {n} were assigned")
    storage.publish(out_dir, [p["path"] for p in parts],
                    {"schema": storage.schema_hex(SCORES_SCHEMA), "rows": n, "keep": config.keep,
                     "seed": config.seed, "clusters": clusters_dir, "use_gpu": use_gpu,
                     "neighbours_by_similarity": spec.by_similarity, "neighbours_by_rank": spec.by_rank,
                     "neighbour_floor": spec.floor})
    finished = time.perf_counter()
    return {
        "scores": out_dir, "rows": n, "clusters": int((sizes > 0).sum()), "keep": config.keep,
        "largest_cluster": int(sizes.max()), "pairs": int((sizes.astype(np.int64) * (sizes - 1) // 2).sum()),
        "buckets": len(buckets), "split_clusters": sum(1 for b in buckets if b.row_ranges),
        "tasks": len(pending), "shards": len(route_stats), "use_gpu": use_gpu,
        "seconds": {"plan": planned - started, "shuffle_and_score": finished - planned,
                    **{f"{what}_tasks_total": sum(p[f"{what}_seconds"] for p in parts)
                       for what in ("gather", "score", "write")}},
    }
