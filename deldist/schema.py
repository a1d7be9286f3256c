"""Arrow schemas of the tables in DESIGN.md's data contracts (one place for all of them)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

# Cheap per-frame statistics computed at decode time (deldist.frames.quality_stats).
QUALITY_COLUMNS: tuple[str, ...] = ("brightness", "contrast", "blur", "saturated", "dark")


# embed's ``embedding_dtype`` -> the little-endian NumPy type of the stored values
EMBEDDING_DTYPES: dict[str, str] = {"float32": "<f4", "float16": "<f2"}


def stored_itemsize(manifest: dict) -> int:
    """Bytes per stored embedding value of an ``embeddings/`` manifest (2: float16, 4: float32)."""
    return np.dtype(EMBEDDING_DTYPES[manifest.get("embedding_dtype") or "float32"]).itemsize


def embedding_type(dim: int, dtype: str = "float32") -> pa.DataType:
    """The ``embedding`` column: D little-endian float32 (or float16) values as one fixed-size
    binary value. Parquet reads it as one byte copy, ~10x faster than a fixed_size_list<float32>[D]
    column, whose repetition levels are decoded value by value (0.07 vs 0.7 s per 50k x 768 here).
    A float16 column says so in its field metadata (``dtype``: the width alone cannot tell
    float16 x 2D from float32 x D). :func:`embedding_array` writes it;
    ``deldist.shards.table_matrix`` reads either (and list columns) back as (n, D) float32."""
    return pa.binary(np.dtype(EMBEDDING_DTYPES[dtype]).itemsize * dim)


def embedding_array(x: np.ndarray, dtype: str = "float32") -> pa.FixedSizeBinaryArray:
    """(n, D) float -> the ``embedding`` column (zero-copy from a little-endian matrix of ``dtype``)."""
    x = np.ascontiguousarray(x, dtype=EMBEDDING_DTYPES[dtype])
    n, dim = x.shape
    return pa.FixedSizeBinaryArray.from_buffers(embedding_type(dim, dtype), n, [None, pa.py_buffer(x)])


def embeddings_schema(dim: int, dtype: str = "float32") -> pa.Schema:
    """``embeddings/``: one row per sampled frame."""
    return pa.schema(
        [
            ("id", pa.string()),
            ("source", pa.string()),
            ("frame_index", pa.int64()),
            ("timestamp_s", pa.float64()),
            ("dataset", pa.string()),
            pa.field("embedding", embedding_type(dim, dtype), metadata={"dtype": dtype} if dtype != "float32" else None),
            *[(name, pa.float32()) for name in QUALITY_COLUMNS],
            ("phash", pa.uint64()),  # 64-bit perceptual hash (deldist.frames.perceptual_hash)
        ]
    )


# ``errors/``: one row per file (or unit of one) that could not be read, and why
ERRORS_SCHEMA = pa.schema([("source", pa.string()), ("stage", pa.string()), ("error_type", pa.string()),
                           ("message", pa.string())])

# ``sources/``: every file the embed stage listed, and what became of it
SOURCES_SCHEMA = pa.schema(
    [
        ("source", pa.string()),  # URI
        ("key", pa.string()),  # the id prefix of its frames ("" for a file skipped as not media)
        ("dataset", pa.string()),
        ("kind", pa.string()),  # video | image | skipped
        ("frames", pa.int64()),  # frames it has in embeddings/
        ("errors", pa.int64()),  # rows it has in errors/
        ("sha256", pa.string()),  # of its bytes ("" when unreadable or skipped)
    ]
)


def centroids_schema(dim: int) -> pa.Schema:
    """``clusters/centroids.parquet``: one row per cluster (unit-norm centroid, member count)."""
    return pa.schema([("cluster", pa.int32()), ("centroid", pa.list_(pa.float32(), dim)),
                      ("size", pa.int64())])


ASSIGNMENTS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("cluster", pa.int32()),
        ("distance", pa.float32()),  # cosine distance to the centroid, 1 - cos
    ]
)

# max_sim / duplicate_of: the highest similarity to any earlier-ranked item of the cluster
# (SemDeDup's score). neighbours / neighbour_sims: ranks (within the cluster) and similarities
# of the earlier items a kept-aware selection needs (deldist.pairwise.NeighbourLists), most
# similar first; unlisted_max_sim: no unlisted earlier item is more similar than this.
SCORES_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("cluster", pa.int32()),
        ("rank", pa.int64()),
        ("max_sim", pa.float32()),
        ("duplicate_of", pa.string()),
        ("neighbours", pa.list_(pa.int32())),
        ("neighbour_sims", pa.list_(pa.float32())),
        ("unlisted_max_sim", pa.float32()),
    ]
)

# ``retained/``: the kept frames, with what a reader needs without joining back to embeddings/
RETAINED_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("frame_index", pa.int64()),
                             ("timestamp_s", pa.float64()), ("dataset", pa.string())])
RETAINED_META = ("source", "frame_index", "timestamp_s", "dataset")  # from embeddings/, beside the id

REMOVED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("reason", pa.string()),
        ("duplicate_of", pa.string()),
        ("max_sim", pa.float32()),
    ]
)


# ``curated/<selection>/v<N>/sources``: every source a corpus version has seen (so a rerun on the
# same uploads embeds nothing), with the version that brought it in.
VERSION_SOURCES_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("version", pa.int32()),
        ("status", pa.string()),  # embedded | error | identical (its bytes are copy_of's: not embedded)
        ("frames", pa.int64()),
        ("sha256", pa.string()),  # of its bytes ("" when unreadable)
        ("copy_of", pa.string()),  # identical: the source already curated with the same bytes
    ]
)
