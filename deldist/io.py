"""Input sources: list the videos and images under a URI prefix, or read them from a manifest.

A manifest (CSV or Parquet) has a ``uri`` column (absolute, or relative to the manifest's
directory) and optionally ``dataset`` (or ``center``) for multi-center collections. Without
one, the dataset label is the first path component under the input root.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import posixpath
from dataclasses import dataclass
from typing import IO

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from deldist import storage
from deldist.frames import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS


@dataclass(frozen=True)
class Source:
    uri: str  # full URI of the file
    key: str  # path relative to the input root: the stable prefix of every frame id
    dataset: str
    kind: str  # "video" | "image"
    size: int  # bytes


def media_kind(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(VIDEO_EXTENSIONS):
        return "video"
    if lower.endswith(IMAGE_EXTENSIONS):
        return "image"
    return None


def _dataset_of(key: str, default: str) -> str:
    return key.split("/", 1)[0] if "/" in key else default


def list_sources(input_uri: str, manifest: str | None = None) -> tuple[list[Source], list[str]]:
    """Media files to embed, sorted by key, and the URIs of files skipped as not media.

    Raises FileNotFoundError when the input prefix does not exist.
    """
    if manifest:
        return _sources_from_manifest(input_uri, manifest)
    fs, root = storage.resolve(input_uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {input_uri} does not exist")
    default = posixpath.basename(root.rstrip("/")) or "default"
    if info.type == pafs.FileType.File:
        files = [(info.path, info.size)]
        root = posixpath.dirname(root)
    elif isinstance(fs, pafs.LocalFileSystem):
        files = _local_files(root)
    else:
        files = [(i.path, i.size) for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                 if i.type == pafs.FileType.File]
    sources, skipped = [], []
    for path, size in files:
        if posixpath.basename(path).startswith("."):
            continue
        uri = storage.to_uri(input_uri, path)
        kind = media_kind(path)
        if kind is None:
            skipped.append(uri)
            continue
        key = posixpath.relpath(path, root)
        sources.append(Source(uri, key, _dataset_of(key, default), kind, size))
    return sorted(sources, key=lambda s: s.key), sorted(skipped)


def _local_files(root: str) -> list[tuple[str, int]]:
    """(path, size) of the files under a local directory. Symlinked directories are followed
    once each: a link back to an ancestor (a loop) or to a directory already listed is not
    entered again. A dangling link is listed with size -1, so it is reported when read, not lost."""
    files, entered = [], set()
    for directory, subdirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        if real in entered:
            subdirs[:] = []
            continue
        entered.add(real)
        subdirs.sort()
        for name in sorted(names):
            path = os.path.join(directory, name)
            try:
                files.append((path.replace(os.sep, "/"), os.path.getsize(path)))
            except OSError:
                files.append((path.replace(os.sep, "/"), -1))
    return files


def _read_manifest_rows(manifest: str) -> list[dict[str, str]]:
    data = storage.read_bytes(manifest)
    if manifest.lower().endswith(".parquet"):
        return pq.read_table(io.BytesIO(data)).to_pylist()
    return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))


def _sources_from_manifest(input_uri: str | None, manifest: str) -> tuple[list[Source], list[str]]:
    rows = _read_manifest_rows(manifest)
    if rows and "uri" not in rows[0]:
        raise ValueError(f"manifest {manifest} needs a 'uri' column (has {sorted(rows[0])})")
    base = manifest.rsplit("/", 1)[0] if "/" in manifest else "."
    sources, skipped, seen = [], [], set()
    for row in rows:
        uri = str(row["uri"]).strip()
        if "://" not in uri and not uri.startswith("/"):
            uri = storage.join(base, uri)
        key = storage.relative_key(uri, input_uri) if input_uri else storage.resolve(uri)[1].lstrip("/")
        if key in seen:
            continue  # listed twice: one source, one set of ids
        seen.add(key)
        kind = media_kind(uri)
        if kind is None:
            skipped.append(uri)
            continue
        dataset = str(row.get("dataset") or row.get("center") or _dataset_of(key, "default"))
        sources.append(Source(uri, key, dataset, kind, -1))
    return sorted(sources, key=lambda s: s.key), sorted(skipped)


def content_sha256(uri: str, chunk_bytes: int = 8 << 20) -> str:
    """Hex sha256 of a file's bytes, streamed (local or object store). Not the S3 ETag: a
    multipart upload's ETag depends on its part size, so identical bytes can differ there."""
    fs, path = storage.resolve(uri)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def open_source(uri: str) -> str | IO[bytes]:
    """What PyAV should open: a local path as is, else a seekable object-store file."""
    fs, path = storage.resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    return fs.open_input_file(path)
