"""Reading embedding tables in shards: the plumbing every stage that reads embeddings shares.

- :func:`plan_shards` / :func:`read_shard`: a published table cut into balanced row-group shards of about
  ``shard_rows`` rows, each read by one task.
- :func:`embedding_matrix` / :func:`normalize_checked`: an ``embedding`` column as a checked,
  unit-norm (n, D) float32 matrix.

The bucket shuffle built on them is :mod:`deldist.shuffle`.
"""

from __future__ import annotations

import concurrent.futures
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deldist import storage
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


def read_files(dir_uri: str, paths: Sequence[str], columns: list[str]) -> list[pa.Table]:
    """Whole Parquet files of a published table (paths as :func:`deldist.storage.published_paths`
    gives them), one table each, only ``columns``."""
    fs, _ = storage.resolve(dir_uri)
    tables = []
    for path in paths:
        with fs.open_input_file(path) as f:
            tables.append(pq.ParquetFile(f).read(columns=columns))
    return tables


def read_shard(dir_uri: str, shard: Shard, columns: list[str]) -> pa.Table:
    """The rows of one shard (only ``columns``)."""
    fs, _ = storage.resolve(dir_uri)
    tables = []
    for path, groups in shard.pieces:
        with fs.open_input_file(path) as f:
            tables.append(pq.ParquetFile(f).read_row_groups(list(groups), columns=columns))
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]
