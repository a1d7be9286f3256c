"""The bucket shuffle: route every embedded row to the task ("bucket") that owns its group (a
cluster, a video), for the stages that work group by group (dedup, select's exact fallback,
curate-new).

- :func:`plan_buckets` / :func:`plan_waves`: groups packed into buckets of similar cost, and
  buckets into waves that fit the object store.
- :func:`sorted_lookup` / :func:`positions_in`: each expected id's bucket, found by binary search
  on a hash of the id.
- :func:`shuffle_by_bucket` (:func:`route_shard` per shard): each shard is read once and split by
  bucket in the object store.
- :class:`SortedRows` / :func:`gather_sorted`: a bucket task's slices read in key order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deldist.ids import id_hash
from deldist.shards import Shard, embedding_dtype, embedding_matrix, normalize_checked, plan_shards, read_shard


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
    return n * (n / 2.0 + 256.0)


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


def plan_waves(buckets: list[Bucket], dim: int, budget_bytes: float, itemsize: int = 4) -> list[list[int]]:
    """Group buckets (in order) into waves whose object-store vectors fit ``budget_bytes``: the
    shuffled slices (``itemsize`` bytes per value: the stored dtype, float16 or float32) and,
    for a split cluster, its gathered float32 copy. Only one wave's vectors are in the object
    store at a time. A bucket larger than the budget is a wave of its own."""
    waves: list[list[int]] = [[]]
    held = 0.0
    for b, bucket in enumerate(buckets):
        need = bucket.rows * dim * (itemsize + (4 if bucket.row_ranges else 0))
        if waves[-1] and held + need > budget_bytes:
            waves.append([])
            held = 0.0
        waves[-1].append(b)
        held += need
    return waves


def sorted_lookup(lookup: pa.Table) -> pa.Table:
    """``lookup`` (``id`` first) sorted by a 53-bit hash of each id, kept as an ``id_key``
    column: what :func:`positions_in` searches. Built once in the driver; each shard task
    then finds its rows by binary search, O(m log n), where a hash-set lookup (``index_in``)
    would rebuild a table of all n ids in every task (seconds per task at 10M ids)."""
    if "id_key" in lookup.column_names:
        return lookup
    key = id_hash(lookup.column("id"))
    order = np.argsort(key, kind="stable")
    return lookup.take(pa.array(order)).append_column("id_key", pa.array(key[order]))


def duplicate_ids(lookup: pa.Table) -> int:
    """How many rows of a :func:`sorted_lookup` table repeat an earlier row's id. Equal ids
    have equal hashes, so only rows in runs of equal ``id_key`` are compared as strings."""
    keys = lookup.column("id_key").to_numpy()
    same = np.flatnonzero(keys[1:] == keys[:-1])
    if not len(same):
        return 0
    rows = np.unique(np.r_[same, same + 1])
    ids = lookup.column("id").take(pa.array(rows))
    return len(rows) - pc.count_distinct(ids).as_py()


def positions_in(ids: pa.Array, lookup: pa.Table) -> np.ndarray:
    """(m,) int64: the row of each id in a :func:`sorted_lookup` table, -1 for ids not in it.
    Hash matches are confirmed on the strings; the rare ids whose hash meets another id's
    are looked up exactly."""
    keys = lookup.column("id_key").to_numpy()
    key = id_hash(ids)
    pos = np.minimum(np.searchsorted(keys, key), max(len(keys) - 1, 0))
    hit = np.zeros(len(ids), bool) if len(keys) == 0 else keys[pos] == key
    out = np.full(len(ids), -1, np.int64)
    rows = np.flatnonzero(hit)
    if len(rows):
        same = pc.equal(lookup.column("id").take(pa.array(pos[rows])), ids.take(pa.array(rows)))
        same = same.to_numpy(zero_copy_only=False)
        out[rows[same]] = pos[rows[same]]
        odd = rows[~same]
        if len(odd):
            exact = pc.index_in(ids.take(pa.array(odd)), value_set=lookup.column("id"))
            out[odd] = pc.fill_null(exact, -1).to_numpy(zero_copy_only=False)
    return out


def route_shard(emb_dir: str, shard: Shard, dim: int | None, lookup: pa.Table,
                n_buckets: int, reuse_buffer: bool = False) -> list[Any]:
    """Task body of the shuffle: read one embeddings shard and split its rows by bucket.

    lookup: a :func:`sorted_lookup` of ``id``, ``bucket`` int32 (-1: skip the row) and any
    extra columns (copied to every slice) for each expected id. Returns n_buckets slices ``(meta table (id, extra columns...), matrix (m, D):
    float32 unit rows, or the stored float16 rows (checked, not normalised))`` and, last, ``{"rows", "missing", "missing_examples"}`` where
    missing counts embedded ids absent from ``lookup``.

    reuse_buffer: the slices are views of one buffer this process keeps for its next call
    (:func:`_slice_buffer`). Only for a Ray task body, whose returns Ray copies into the object
    store before the worker runs anything else; a direct caller gets fresh arrays.
    """
    table = read_shard(emb_dir, shard, ["id", "embedding"])
    ids = table.column("id").combine_chunks()
    # each file's rows stay where Parquet decoded them (zero-copy views): the rows are copied
    # once, into their bucket's slice, not first into one matrix of the shard. float16 rows
    # travel as float16 (half the object store; gather_sorted widens and normalises them)
    dtype = embedding_dtype(table)
    parts, start = [], 0
    for chunk in table.column("embedding").chunks:
        part = embedding_matrix(chunk, dim, dtype, widen=False)
        checked = normalize_checked(part, ids.slice(start, len(chunk)))  # bad rows fail here, named
        parts.append(part if part.dtype == np.float16 else checked)
        start += len(chunk)
    part_starts = np.cumsum([0] + [len(p) for p in parts])
    width = max((p.shape[1] for p in parts), default=dim or 0)
    position = positions_in(ids, lookup)
    found = position >= 0
    rows = np.flatnonzero(found)
    pos = position[rows]
    bucket = lookup.column("bucket").to_numpy()[pos]
    order = np.argsort(bucket, kind="stable")  # stable: rows ascending within a bucket
    rows, pos, bucket = rows[order], pos[order], bucket[order]
    bounds = np.searchsorted(bucket, np.arange(n_buckets + 1))
    extra = {name: lookup.column(name).to_numpy() for name in lookup.column_names
             if name not in ("id", "bucket", "id_key")}
    dtype = parts[0].dtype if parts else np.dtype(np.float32)
    vectors = (_slice_buffer((len(rows), width), dtype) if reuse_buffer else np.empty((len(rows), width), dtype))
    out: list[Any] = []
    for b in range(n_buckets):
        a, e = bounds[b], bounds[b + 1]
        meta = pa.table({"id": ids.take(pa.array(rows[a:e])), **{k: v[pos[a:e]] for k, v in extra.items()}})
        out.append((meta, _gather_rows(parts, part_starts, rows[a:e], vectors[a:e])))
    missing = int((~found).sum())
    examples = ids.filter(pa.array(~found)).slice(0, 5).to_pylist() if missing else []
    out.append({"rows": len(ids), "missing": missing, "missing_examples": examples})
    return out


_SLICE_BUFFER = [np.empty(0, np.uint8)]


def _slice_buffer(shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """An uninitialised ``shape`` array in memory this process reuses from call to call.

    Why: the slices of a shard (~150 MB at 65k x 768 float32) are copied into the object store
    when the task returns, and fresh arrays of that size are mapped anew every task: on the
    VMs measured a third of a read task went to the kernel zeroing those pages (perf:
    ``clear_page_erms`` under the row copy, 0.05 s of ~0.15 s per task)."""
    need = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if _SLICE_BUFFER[0].nbytes < need:
        _SLICE_BUFFER[0] = np.empty(need, np.uint8)
    return _SLICE_BUFFER[0][:need].view(dtype).reshape(shape)


def _gather_rows(parts: list[np.ndarray], part_starts: np.ndarray, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out`` (len(rows), width) filled with the given ascending rows of the concatenation of
    ``parts`` (part p holds rows [part_starts[p], part_starts[p + 1])), one copy per row."""
    cuts = np.searchsorted(rows, part_starts)
    for p, part in enumerate(parts):
        a, e = cuts[p], cuts[p + 1]
        if e > a:
            _move_rows(_bits(part), rows[a:e] - part_starts[p], np.arange(a, e), _bits(out))
    return out


def _bits(x: np.ndarray) -> np.ndarray:
    """float16 rows as uint16 (a bit copy; numba does not take float16), others as they are."""
    return x.view(np.uint16) if x.dtype == np.float16 else x


@numba.njit(cache=True, nogil=True)
def _move_rows(source, rows, dest, out):  # pragma: no cover - compiled
    """out[dest[j]] = source[rows[j]] (np.take with ``out`` took twice as long)."""
    for j in range(len(rows)):
        out[dest[j], :] = source[rows[j], :]


class SortedRows:
    """A bucket task's shuffle slices in ``keys`` order (primary, secondary), read a range of
    rows at a time into one reused buffer (``rows[p0:p1]``): a scoring task holds no gathered
    copy of its whole bucket, and the rows it copies are still in cache when the kernels read
    them (deldist's own layout: a whole-bucket gather wrote every vector once more into fresh
    memory, 6 s of task CPU at 1M).

    ``meta``: the slices' metadata in that order. ``rows[p0:p1]`` -> (p1 - p0, D) float32 unit
    rows (float16 slices widened and normalised, :func:`unit_rows`), valid until the next read.
    """

    def __init__(self, slices: Sequence[tuple[pa.Table, np.ndarray]], keys: tuple[str, str] = ("cluster", "rank")):
        meta = pa.concat_tables([m for m, _ in slices])
        order = np.lexsort((meta.column(keys[1]).to_numpy(), meta.column(keys[0]).to_numpy()))
        destination = np.empty(len(order), np.int64)
        destination[order] = np.arange(len(order))
        self.meta = meta.take(pa.array(order))
        self.dim = max((x.shape[1] for _, x in slices if x.ndim == 2), default=0)
        self.dtype = np.dtype(np.float16 if any(x.dtype == np.float16 for _, x in slices) else np.float32)
        self._parts = []  # per non-empty slice: (vectors, its rows by destination, their destinations)
        offset = 0
        for _, part in slices:
            dest = destination[offset:offset + len(part)]
            if len(part):
                by_dest = np.argsort(dest)
                self._parts.append((_bits(part), by_dest, dest[by_dest]))
            offset += len(part)
        self._buffer = np.empty((0, self.dim), self.dtype)

    def __len__(self) -> int:
        return self.meta.num_rows

    def __getitem__(self, span: slice) -> np.ndarray:
        return self.read(*span.indices(len(self))[:2])

    def read(self, p0: int, p1: int, widen: bool = True) -> np.ndarray:
        """Rows [p0, p1) in key order: float32 unit rows, or with ``widen=False`` as stored."""
        if len(self._buffer) < p1 - p0:
            self._buffer = np.empty((p1 - p0, self.dim), self.dtype)
        out = self._buffer[: max(p1 - p0, 0)]
        for part, rows, dest in self._parts:
            lo, hi = np.searchsorted(dest, [p0, p1])
            if hi > lo:
                _move_rows(part, rows[lo:hi], dest[lo:hi] - p0, _bits(out))
        return unit_rows(out) if widen else out


def gather_sorted(slices: Sequence[tuple[pa.Table, np.ndarray]], keys: tuple[str, str] = ("cluster", "rank"),
                  widen: bool = True) -> tuple[np.ndarray, pa.Table]:
    """All of a bucket's rows in one matrix (:class:`SortedRows`, read whole) -> (matrix (n,
    D) float32 unit rows, or with ``widen=False`` as stored (the caller applies
    :func:`unit_rows` to the rows it uses); meta table in the same order)."""
    rows = SortedRows(slices, keys)
    return rows.read(0, len(rows), widen), rows.meta


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Shuffled rows as the kernels take them: float32 as they are (route_shard normalised
    them), float16 (checked there) widened and normalised, the same float32 rows either way."""
    return normalize_checked(x.astype(np.float32)) if x.dtype == np.float16 else x


def shuffle_by_bucket(emb_dir: str, dim: int | None, lookup: pa.Table, n_buckets: int, shard_rows: int,
                      io_cpus: float) -> tuple[list[list[Any]], Any]:
    """Start the shuffle of ``embeddings/`` rows into ``n_buckets`` buckets (Ray tasks).

    Returns (per bucket: the list of slice refs, one per shard; a ref-list of the per-shard
    stats). Raises nothing itself: call :func:`check_shuffle` on the stats.
    """
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0)
    shards = plan_shards(emb_dir, shard_rows, min_shards=max(1, int(2 * cpus / io_cpus)))
    lookup_ref = ray.put(sorted_lookup(lookup))
    route = ray.remote(num_cpus=io_cpus, num_returns=n_buckets + 1)(route_shard)
    routed = [route.remote(emb_dir, s, dim, lookup_ref, n_buckets, reuse_buffer=True) for s in shards]
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


def bucket_count(num_buckets: int | None, task_cpus: float) -> int:
    """Buckets of a shuffle: ``num_buckets``, or two per task the cluster's CPUs hold now (two,
    so one bucket's gather overlaps another's work)."""
    from deldist.runtime import task_slots

    return num_buckets or 2 * task_slots(task_cpus)


def bucket_of_groups(buckets: Sequence[Bucket], n_groups: int) -> np.ndarray:
    """(n_groups,) int32: the bucket each group (cluster) was packed into, -1 for none."""
    out = np.full(n_groups, -1, np.int32)
    for b, bucket in enumerate(buckets):
        out[bucket.clusters] = b
    return out
