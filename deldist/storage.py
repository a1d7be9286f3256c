"""Object-storage access and atomic table publishing.

Every stage reads and writes through these functions, so a run root can be a plain path,
``file://``, ``s3://`` (endpoint and credentials from the standard AWS chain, including
``AWS_ENDPOINT_URL``) or ``gs://``.

Publishing contract (DESIGN.md): a stage writes its Parquet parts first, then a
``_manifest.json`` listing them, then ``_SUCCESS``. Readers only trust published directories
and only read the files the manifest lists, so they never see half a stage.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import posixpath
import uuid
from typing import Any, Iterable
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"


class NotPublishedError(FileNotFoundError):
    """A stage directory was read before the stage that writes it finished."""


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {"region": region}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    # transient network failures (a throttled or restarting endpoint) are retried with the
    # SDK's exponential backoff: 8 attempts wait about 20 s in all
    return pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=8),
                             connect_timeout=10, request_timeout=60, **kwargs)


# what pyarrow's S3 client says when the endpoint cannot be reached (after its retries)
_TRANSIENT_MARKERS = ("NETWORK_CONNECTION", "Couldn't connect", "Connection refused", "curlCode",
                      "SLOW_DOWN", "ServiceUnavailable", "RequestTimeout", "Timeout was reached")


def is_transient_error(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a storage failure worth retrying later rather
    than a fact about the file: an unreachable or overloaded endpoint, a timeout."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError)) or (
                isinstance(e, OSError) and any(m in str(e) for m in _TRANSIENT_MARKERS)):
            return True
        e = e.__cause__ or e.__context__
    return False


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str:
    try:
        return pafs.resolve_s3_region(bucket)
    except (OSError, ValueError) as e:  # no network, no access: the SDK's default, said once per bucket
        import logging

        logging.getLogger(__name__).warning(f"could not look up the region of s3://{bucket} ({e}); using "
                                            "us-east-1: set AWS_REGION if the bucket lives elsewhere")
        return "us-east-1"


def s3_region(bucket: str, environ: Any = os.environ, lookup: Any = _bucket_region) -> str:
    """The region to address ``bucket`` in: ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` when set;
    with a custom endpoint (MinIO, GCS's S3 interop, moto) ``us-east-1``, which such stores
    accept; else the bucket's own region, looked up once (pyarrow's ``resolve_s3_region``), so
    a node in one region reads a bucket in another without HTTP 301 errors."""
    region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    if region:
        return region
    if environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL"):
        return "us-east-1"
    return lookup(bucket)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Map a URI to ``(pyarrow filesystem, path inside it)``.

    s3:// uses ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` when set (MinIO, moto, other
    S3-protocol stores) and the region of :func:`s3_region`; credentials come from the AWS
    SDK's default chain.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return _s3_filesystem(endpoint, s3_region(parsed.netloc)), (parsed.netloc + parsed.path).rstrip("/")
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else uri
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


def join(uri: str, *parts: str) -> str:
    """Join path components onto a URI with '/' (works for local paths and URLs)."""
    if "://" in uri:
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def relative_key(uri: str, root: str) -> str:
    """Key of ``uri`` relative to ``root`` with '/' separators (the stable part of an id); a
    ``uri`` outside ``root`` keys by its whole path (its file name alone could name two files)."""
    _, path = resolve(uri)
    _, root_path = resolve(root)
    rel = posixpath.relpath(path.replace(os.sep, "/"), root_path.replace(os.sep, "/"))
    if rel == ".." or rel.startswith("../"):
        return path.replace(os.sep, "/").lstrip("/")
    return rel


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object. Local writes go through a temporary name and a rename, so a
    reader sees either the old object or the new one; S3 puts are atomic already."""
    fs, path = resolve(uri)
    parent = posixpath.dirname(path)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_array(uri: str, x: np.ndarray) -> None:
    """One array as a ``.npy`` object (a stage's scratch data, e.g. the vectors select's exact
    fallback reuses across thresholds)."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        np.save(tmp, x)  # np.save appends .npy
        os.replace(f"{tmp}.npy", path)
        return
    with fs.open_output_stream(path) as f:
        np.lib.format.write_array(f, np.ascontiguousarray(x))


def read_array(uri: str) -> np.ndarray:
    """An array :func:`write_array` wrote: memory-mapped (read-only) on a local disk, so a reader
    pages in only the rows it touches; read whole from an object store."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return np.load(path, mmap_mode="r")
    return np.lib.format.read_array(io.BytesIO(read_bytes(uri)))


def delete_dir(uri: str) -> None:
    """Remove a directory and everything under it; nothing when absent."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def list_files(uri: str, recursive: bool = True) -> list[str]:
    """Paths (inside the filesystem, sorted) of the files under a prefix; [] when absent."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    if info.type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)


def to_uri(uri_like_root: str, path: str) -> str:
    """Re-attach the scheme of ``uri_like_root`` to a filesystem path returned by ``list_files``."""
    scheme = urlparse(uri_like_root).scheme
    if scheme in ("", "file"):
        return path
    return f"{scheme}://{path}"


def write_csv(uri: str, rows: list[dict[str, Any]]) -> None:
    """Write dict rows as CSV; columns in first-seen order across all rows."""
    import csv
    import io

    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(uri, buf.getvalue().encode())


def column_codecs(schema: pa.Schema) -> dict[str, str]:
    """Parquet codec per column: none for float vectors (embeddings, centroids: zstd saves ~8 %
    of their size but makes every read 4-5x slower, measured 0.77 vs 0.17 s per 50k x 768) and
    for binary columns (JPEG bytes are compressed already); zstd for everything else."""
    def incompressible(t: pa.DataType) -> bool:
        if pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t):
            return pa.types.is_floating(t.value_type)
        return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)

    return {f.name: "none" if incompressible(f.type) else "zstd" for f in schema}


def write_table(table: pa.Table, uri: str) -> None:
    """Write one Parquet file atomically: codecs per :func:`column_codecs`, dictionary encoding
    only for the compressed scalar columns. A dictionary of distinct vectors or JPEGs is waste,
    and one over list values (dedup's neighbour ranks) is tried, outgrows its page and is
    dropped: trying took half the time of writing a scores part (0.084 vs 0.034 s per 50k
    rows) for a larger file."""
    sink = pa.BufferOutputStream()
    codecs = column_codecs(table.schema)
    nested = {f.name for f in table.schema if pa.types.is_nested(f.type)}
    pq.write_table(table, sink, compression=codecs or "zstd",
                   use_dictionary=[name for name, codec in codecs.items() if codec != "none" and name not in nested])
    write_bytes(uri, sink.getvalue().to_pybytes())


def new_part_name(prefix: str = "part") -> str:
    return f"{prefix}-{uuid.uuid4().hex}.parquet"


def drop_repeated_ids(parts_dir: str) -> int:
    """Rewrite the Parquet parts under ``parts_dir`` that hold an ``id`` an earlier row holds
    (parts in listing order; a retried task wrote it twice): the first copy stays. Returns the
    rows dropped.

    The driver holds 16 bytes per row, not the ids: a 53-bit hash of each id and a sorted copy,
    then the exact strings only of rows whose hash repeats (at 100M ids ~0.5 pairs collide by
    chance). A Python set of the ids takes ~110 bytes per id (``bench/driver_memory.py``)."""
    from deldist.ids import id_hash

    fs, _ = resolve(parts_dir)
    paths = [p for p in list_files(parts_dir) if p.endswith(".parquet")]
    sizes = np.array([pq.ParquetFile(p, filesystem=fs).metadata.num_rows for p in paths], np.int64)
    starts = np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64)
    h = np.empty(int(sizes.sum()), np.float64)
    for k, p in enumerate(paths):
        h[starts[k]:starts[k] + sizes[k]] = id_hash(pq.read_table(p, columns=["id"], filesystem=fs).column("id"))
    ordered = np.sort(h)
    repeats = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    del ordered
    if not len(repeats):
        return 0
    where = np.minimum(np.searchsorted(repeats, h), len(repeats) - 1)
    suspects = np.flatnonzero(repeats[where] == h)  # global row numbers, ascending
    part_of = np.searchsorted(starts, suspects, side="right") - 1
    strings = np.empty(len(suspects), object)
    for k in np.unique(part_of):
        ids = pq.read_table(paths[k], columns=["id"], filesystem=fs).column("id")
        mine = part_of == k
        strings[mine] = ids.take(pa.array(suspects[mine] - starts[k])).to_pylist()
    seen: set[str] = set()
    repeated = np.zeros(len(suspects), bool)
    for i, s in enumerate(strings):  # ascending global order: the first copy is seen first
        repeated[i] = s in seen
        seen.add(s)
    dropped = 0
    for k in np.unique(part_of[repeated]):
        drop = suspects[repeated & (part_of == k)] - starts[k]
        keep = np.ones(sizes[k], bool)
        keep[drop] = False
        write_table(pq.read_table(paths[k], filesystem=fs).filter(pa.array(keep)), to_uri(parts_dir, paths[k]))
        dropped += len(drop)
    return dropped


def replace_table(dir_uri: str, table: pa.Table, meta: dict[str, Any] | None = None) -> None:
    """Publish ``table`` as the one part of ``dir_uri`` (:func:`publish` deletes the parts an
    earlier run published there)."""
    part = join(dir_uri, new_part_name(posixpath.basename(dir_uri.rstrip("/"))))
    write_table(table, part)
    publish(dir_uri, [resolve(part)[1]], {"rows": table.num_rows, "schema": schema_hex(table.schema), **(meta or {})})


def copy_into(dir_uri: str, paths: Iterable[str]) -> list[str]:
    """Copy Parquet parts (filesystem paths on ``dir_uri``'s filesystem) into ``dir_uri``
    under their own names -> the new paths. On S3 a server-side copy: no bytes pass through
    this process. A table that shares another table's parts this way stays readable on its
    own by readers that ignore manifests."""
    fs, root = resolve(dir_uri)
    fs.create_dir(root, recursive=True)
    copied = []
    for path in paths:
        target = posixpath.join(root, posixpath.basename(path))
        if path != target:
            fs.copy_file(path, target)
        copied.append(target)
    return copied


def publish(dir_uri: str, files: Iterable[str], meta: dict[str, Any]) -> None:
    """Publish a stage directory: the manifest (files relative to ``dir_uri`` + ``meta``),
    then ``_SUCCESS``. Call only after every listed file is fully written.

    Every file must lie under ``dir_uri`` (copy shared parts in with :func:`copy_into`). A
    table with a ``schema`` and no files gets one empty part carrying it. Afterwards, Parquet
    files in the listed files' directories that the manifest does not list (a retried task's
    part, an earlier run's table) are deleted: the directory is the table for readers that
    ignore manifests too (pandas, pyarrow.dataset, duckdb and polars globs)."""
    fs, root = resolve(dir_uri)
    root = root.replace(os.sep, "/")
    files = [f.replace(os.sep, "/") for f in files]
    if not files and meta.get("schema"):
        empty = join(dir_uri, new_part_name("empty"))
        write_table(schema_from_hex(meta["schema"]).empty_table(), empty)
        files = [resolve(empty)[1].replace(os.sep, "/")]
    rel = sorted(posixpath.relpath(f, root) for f in files)
    outside = [f for f in rel if f.startswith("../")]
    if outside:
        raise ValueError(f"{dir_uri}: a published table holds its own parts, not {outside[:3]} (storage.copy_into)")
    write_json(join(dir_uri, MANIFEST), {**meta, "files": rel})
    write_bytes(join(dir_uri, SUCCESS), b"")
    listed = {posixpath.join(root, f) for f in rel}
    for folder in {posixpath.dirname(f) for f in listed}:
        for path in list_files(to_uri(dir_uri, folder), recursive=False):
            if path.endswith(".parquet") and path not in listed:
                fs.delete_file(path)


def is_published(dir_uri: str) -> bool:
    return exists(join(dir_uri, SUCCESS))


def read_manifest(dir_uri: str) -> dict[str, Any]:
    if not is_published(dir_uri):
        raise NotPublishedError(
            f"{dir_uri} is not a published stage output (no {SUCCESS}); run the stage that writes it first"
        )
    return read_json(join(dir_uri, MANIFEST))


def published_paths(dir_uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """``(filesystem, paths)`` of the Parquet files a published stage directory lists;
    pass both to ``ray.data.read_parquet(paths, filesystem=fs)``."""
    manifest = read_manifest(dir_uri)
    fs, root = resolve(dir_uri)
    # normpath: a manifest may list files of an older published directory ("../v1/part-...")
    # that a newer version shares instead of copying
    return fs, [posixpath.normpath(posixpath.join(root, f)) for f in manifest["files"]]


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file (local or object store) into memory."""
    fs, path = resolve(uri)
    return pq.read_table(path, columns=columns, filesystem=fs)


def read_published(dir_uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read a whole published table into memory (for small tables and tests)."""
    fs, paths = published_paths(dir_uri)
    manifest = read_manifest(dir_uri)
    if not paths:
        schema = manifest.get("schema")
        if schema is not None:
            empty = schema_from_hex(schema)
            return empty.empty_table().select(columns) if columns else empty.empty_table()
        return pa.table({})
    return pq.ParquetDataset(paths, filesystem=fs).read(columns=columns)


class StaleInputError(RuntimeError):
    """A stage's input was rewritten after the stage ran (its outputs came from other data)."""


def content_token(dir_uri: str) -> str:
    """What a published directory holds, as a short token: its manifest's ``fingerprint`` when
    it records one, else a hash of its file list and row count (a rewrite changes either)."""
    manifest = read_manifest(dir_uri)
    if manifest.get("fingerprint"):
        return manifest["fingerprint"]
    listed = {"files": manifest.get("files", []), "rows": manifest.get("rows")}
    return hashlib.sha256(json.dumps(listed, sort_keys=True).encode()).hexdigest()[:16]


def stage_fingerprint(settings: dict[str, Any], inputs: Iterable[str]) -> dict[str, Any]:
    """``{"fingerprint": ..., "inputs": {dir: token}}`` for a stage's manifest: the settings that
    fix its result and the content tokens of the published directories it read."""
    tokens = {d: content_token(d) for d in inputs}
    digest = hashlib.sha256(json.dumps({"settings": settings, "inputs": sorted(tokens.values())}, sort_keys=True,
                                       default=str).encode()).hexdigest()[:16]
    return {"fingerprint": digest, "inputs": tokens}


def is_current(dir_uri: str, fingerprint: dict[str, Any]) -> bool:
    """Whether ``dir_uri`` is published from exactly these settings and inputs (a rerun may skip it)."""
    return is_published(dir_uri) and read_manifest(dir_uri).get("fingerprint") == fingerprint["fingerprint"]


def check_inputs_current(dir_uri: str, rerun: str) -> None:
    """Raise :class:`StaleInputError` when a directory the stage at ``dir_uri`` read has been
    rewritten since (e.g. scores from clusters that a later ``deldist cluster`` replaced)."""
    for source, token in read_manifest(dir_uri).get("inputs", {}).items():
        if is_published(source) and content_token(source) != token:
            raise StaleInputError(f"{dir_uri} was computed from an earlier {source}, which has been rewritten "
                                  f"since: rerun {rerun}")


def schema_hex(schema: pa.Schema) -> str:
    """Serialise a schema for the manifest, so an empty published table still has columns."""
    return schema.serialize().to_pybytes().hex()


def schema_from_hex(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(bytes.fromhex(text)))
