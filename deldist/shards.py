"""Reading embedding tables in shards, and the bucket shuffle: the plumbing several stages share.

- :func:`plan_shards` / :func:`read_shard`: a published table cut into balanced row-group shards of about
  ``shard_rows`` rows, each read by one task.
- :func:`embedding_matrix` / :func:`normalize_checked`: an ``embedding`` column as a checked,
  unit-norm (n, D) float32 matrix.
- :func:`plan_buckets` / :func:`shuffle_by_bucket` / :func:`gather_sorted`: route every embedded
  row to the task ("bucket") that owns its group (a cluster, a video): each shard is read once,
  split by bucket in the object store, and each bucket task gathers its slices in key order.
"""

from __future__ import annotations

import concurrent.futures
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deldist import storage
from deldist.ids import id_hash
from deldist.schema import EMBEDDING_DTYPES


class EmbeddingError(ValueError):
    """Embeddings that cannot be clustered: NaN/inf, zero vectors, wrong dimension."""


class EmptyInputError(ValueError):
    """The published input table has no rows."""


def table_matrix(table: pa.Table, dim: int | None = None) -> np.ndarray:
    """The ``embedding`` column of a table read from ``embeddings/`` -> float32 (n, D), in the
    dtype its field metadata names (float32 when none)."""
    return embedding_matrix(table.column("embedding"), dim, embedding_dtype(table))


def embedding_dtype(table: pa.Table) -> str:
    """The dtype the ``embedding`` field's metadata names (float32 when none)."""
    metadata = table.schema.field("embedding").metadata or {}
    return metadata.get(b"dtype", b"float32").decode()


def embedding_matrix(column: pa.ChunkedArray | pa.Array, dim: int | None = None, dtype: str = "float32",
                     widen: bool = True) -> np.ndarray:
    """Arrow ``embedding`` column -> float32 (n, D): the fixed-size binary column of
    :func:`deldist.schema.embedding_type` holding ``dtype`` values (zero-copy per chunk for
    float32; float16 is widened, or with ``widen=False`` returned as a zero-copy float16
    view), or a fixed_size_list / list of float (older runs, centroids).

    Raises :class:`EmbeddingError` on nulls or when the width differs from ``dim``.
    """
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks > 1 and pa.types.is_fixed_size_binary(column.type):
            parts = [embedding_matrix(chunk, dim, dtype, widen) for chunk in column.chunks]
            return np.concatenate(parts)
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    n = len(column)
    if column.null_count:
        raise EmbeddingError(f"{column.null_count} of {n} embeddings are null")
    if pa.types.is_fixed_size_binary(column.type):
        itemsize = np.dtype(EMBEDDING_DTYPES[dtype]).itemsize
        width = column.type.byte_width // itemsize
        if dim is not None and width != dim:
            raise EmbeddingError(f"embedding width {width} does not match the expected dimension {dim}")
        data = column.buffers()[1]
        x = np.frombuffer(data, dtype=f"<f{itemsize}", count=n * width, offset=column.offset * width * itemsize)
        return x.reshape(n, width) if itemsize == 4 or not widen else x.reshape(n, width).astype(np.float32)
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
    elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        width = int(lengths[0]) if n else (dim or 0)
        if n and (lengths != width).any():
            raise EmbeddingError(f"embeddings have mixed widths {sorted(set(lengths.tolist()))[:5]}")
    else:
        raise EmbeddingError(f"embedding column has type {column.type}, expected float32 vectors")
    if dim is not None and width != dim:
        raise EmbeddingError(f"embedding width {width} does not match the expected dimension {dim}")
    values = pc.list_flatten(column)
    flat = values.to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat.reshape(n, width), dtype=np.float32)


def normalize_checked(x: np.ndarray, ids: Sequence[str] | pa.Array | None = None) -> np.ndarray:
    """Validate embeddings (n, D) and return them L2-normalised float32 (``x`` itself when
    every row is unit norm already, else a new array).

    Raises :class:`EmbeddingError` naming up to five offending ids when a row holds NaN/inf
    or has (near-)zero norm: such a row has no direction, so no cosine to anything.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise EmbeddingError(f"embeddings must be 2-D (n, D), got shape {x.shape}")
    squared = np.einsum("ij,ij->i", x, x)  # NaN / inf rows give NaN / inf
    bad_nan = np.flatnonzero(~np.isfinite(squared))
    bad_zero = np.flatnonzero(squared < 1e-24)

    def _names(rows: np.ndarray) -> list[str]:
        if ids is None:
            return [f"row {int(r)}" for r in rows[:5]]
        return [str(ids[int(r)]) for r in rows[:5]]

    if len(bad_nan):
        raise EmbeddingError(f"{len(bad_nan)} embeddings contain NaN or inf, e.g. {_names(bad_nan)}")
    if len(bad_zero):
        raise EmbeddingError(f"{len(bad_zero)} embeddings are zero vectors, e.g. {_names(bad_zero)}")
    if len(squared) and float(np.abs(squared - 1.0).max()) < 2e-6:
        return x  # unit already (what deldist embed writes): no copy, no rescaling error
    return x * (1.0 / np.sqrt(squared)).astype(np.float32)[:, None]


def as_tensor(a: np.ndarray) -> Any:
    """Zero-copy torch view of a numpy array, also of read-only ones (Ray object-store
    arrays): torch warns that writes would be undefined; nothing here writes to them."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


@dataclass(frozen=True)
class Shard:
    """A read unit: row groups of one or more Parquet files (paths inside the run root's fs)."""

    pieces: tuple[tuple[str, tuple[int, ...]], ...]
    num_rows: int


def _file_row_groups(fs: Any, path: str) -> list[int]:
    with fs.open_input_file(path) as f:
        meta = pq.ParquetFile(f).metadata
        return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def plan_shards(dir_uri: str, shard_rows: int, min_shards: int = 1) -> list[Shard]:
    """Split a published table into shards of about ``shard_rows`` rows, smaller when needed
    to get about ``min_shards`` shards (parallelism). Shards hold whole row groups
    (consecutive small files are packed together) and are balanced: each row group goes to
    the shard its middle row falls in, so no shard is a small remainder (a wave of read tasks
    with one task left over wastes the other CPUs) and none exceeds the target by more than
    half a row group; a row group larger than the target is one shard on its own. Reads only
    the Parquet footers."""
    fs, paths = storage.published_paths(dir_uri)
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        row_groups = list(pool.map(lambda p: _file_row_groups(fs, p), paths))
    total = sum(sum(g) for g in row_groups)
    target = max(1, min(shard_rows, math.ceil(total / max(1, min_shards))))
    n_shards = max(1, math.ceil(total / target))
    shards: list[Shard] = []
    pieces: list[tuple[str, list[int]]] = []
    rows = before = 0
    current = 0  # the shard being filled
    for path, groups in zip(paths, row_groups):
        for i, n in enumerate(groups):
            if n == 0:
                continue
            index = min(n_shards - 1, int((before + n / 2) * n_shards // total))
            if index != current and rows:
                shards.append(Shard(tuple((p, tuple(g)) for p, g in pieces), rows))
                pieces, rows = [], 0
            current = index
            if pieces and pieces[-1][0] == path:
                pieces[-1][1].append(i)
            else:
                pieces.append((path, [i]))
            rows += n
            before += n
    if rows:
        shards.append(Shard(tuple((p, tuple(g)) for p, g in pieces), rows))
    return shards


def read_shard(dir_uri: str, shard: Shard, columns: list[str]) -> pa.Table:
    """The rows of one shard (only ``columns``)."""
    fs, _ = storage.resolve(dir_uri)
    tables = []
    for path, groups in shard.pieces:
        with fs.open_input_file(path) as f:
            tables.append(pq.ParquetFile(f).read_row_groups(list(groups), columns=columns))
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


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
                n_buckets: int) -> list[Any]:
    """Task body of the shuffle: read one embeddings shard and split its rows by bucket.

    lookup: a :func:`sorted_lookup` of ``id``, ``bucket`` int32 (-1: skip the row) and any
    extra columns (copied to every slice) for each expected id. Returns n_buckets slices ``(meta table (id, extra columns...), matrix (m, D):
    float32 unit rows, or the stored float16 rows (checked, not normalised))`` and, last, ``{"rows", "missing", "missing_examples"}`` where
    missing counts embedded ids absent from ``lookup``.
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
    out: list[Any] = []
    for b in range(n_buckets):
        r, p = rows[bounds[b]:bounds[b + 1]], pos[bounds[b]:bounds[b + 1]]
        meta = pa.table({"id": ids.take(pa.array(r)), **{k: v[p] for k, v in extra.items()}})
        out.append((meta, _gather_rows(parts, part_starts, r, width)))
    missing = int((~found).sum())
    examples = ids.filter(pa.array(~found)).slice(0, 5).to_pylist() if missing else []
    out.append({"rows": len(ids), "missing": missing, "missing_examples": examples})
    return out


def _gather_rows(parts: list[np.ndarray], part_starts: np.ndarray, rows: np.ndarray, width: int) -> np.ndarray:
    """(len(rows), width) in the parts' dtype: the given ascending rows of the concatenation of
    ``parts`` (part p holds rows [part_starts[p], part_starts[p + 1])), one copy per row."""
    dtype = parts[0].dtype if parts else np.dtype(np.float32)
    out = np.empty((len(rows), width), dtype)
    cuts = np.searchsorted(rows, part_starts)
    for p, part in enumerate(parts):
        a, e = cuts[p], cuts[p + 1]
        if e > a:
            _copy_rows(_bits(part), rows[a:e] - part_starts[p], _bits(out[a:e]))
    return out


def _bits(x: np.ndarray) -> np.ndarray:
    """float16 rows as uint16 (a bit copy; numba does not take float16), others as they are."""
    return x.view(np.uint16) if x.dtype == np.float16 else x


@numba.njit(cache=True, nogil=True)
def _scatter_rows(source, rows, out):  # pragma: no cover - compiled
    """out[rows[j]] = source[j]."""
    for j in range(len(rows)):
        out[rows[j], :] = source[j, :]


@numba.njit(cache=True, nogil=True)
def _copy_rows(source, rows, out):  # pragma: no cover - compiled
    """out[j] = source[rows[j]] (np.take with ``out`` took twice as long)."""
    for j in range(len(rows)):
        out[j, :] = source[rows[j], :]


def gather_sorted(slices: Sequence[tuple[pa.Table, np.ndarray]], keys: tuple[str, str] = ("cluster", "rank"),
                  widen: bool = True) -> tuple[np.ndarray, pa.Table]:
    """Concatenate shuffle slices ordered by ``keys`` (primary, secondary) with a single copy
    of the vectors -> (matrix (n, D) float32 unit rows, meta table in the same order); float16
    slices are widened and normalised after the copy (:func:`unit_rows`), or with ``widen=False``
    returned as float16 (the caller applies :func:`unit_rows` to the rows it uses)."""
    meta = pa.concat_tables([m for m, _ in slices])
    n = meta.num_rows
    dim = max((x.shape[1] for _, x in slices if x.ndim == 2), default=0)
    order = np.lexsort((meta.column(keys[1]).to_numpy(), meta.column(keys[0]).to_numpy()))
    destination = np.empty(n, np.int64)
    destination[order] = np.arange(n)
    half = any(part.dtype == np.float16 for _, part in slices)
    x = np.empty((n, dim), np.float16 if half else np.float32)
    offset = 0
    for _, part in slices:
        m = len(part)
        if m:
            _scatter_rows(_bits(part), destination[offset:offset + m], _bits(x))
        offset += m
    return (unit_rows(x) if widen else x), meta.take(pa.array(order))


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
