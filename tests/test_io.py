"""Source listing: prefixes, manifests with dataset/center labels, non-media files."""

from __future__ import annotations

import os

import numpy as np
import pytest

from deldist import storage
from deldist.io import content_sha256, list_sources


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_prefix_listing_labels_by_first_component(tmp_path):
    for rel in ["center_a/v1.MP4", "center_a/sub/v2.mkv", "center_b/img.png", "loose.jpg", "readme.txt",
                ".hidden.mp4"]:
        _touch(tmp_path / rel)
    sources, skipped = list_sources(str(tmp_path))
    assert [(s.key, s.dataset, s.kind) for s in sources] == [
        ("center_a/sub/v2.mkv", "center_a", "video"),
        ("center_a/v1.MP4", "center_a", "video"),
        ("center_b/img.png", "center_b", "image"),
        ("loose.jpg", tmp_path.name, "image"),
    ]
    assert skipped == [str(tmp_path / "readme.txt")]
    with pytest.raises(FileNotFoundError):
        list_sources(str(tmp_path / "missing"))


def test_manifest_csv_with_centers(tmp_path):
    for rel in ["data/x/a.mp4", "data/y/b.jpg"]:
        _touch(tmp_path / rel)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"uri,center\ndata/x/a.mp4,hospital_1\n{tmp_path}/data/y/b.jpg,hospital_2\n"
                        "data/x/a.mp4,hospital_1\n")
    sources, _ = list_sources(str(tmp_path / "data"), manifest=str(manifest))
    assert [(s.key, s.dataset, s.uri) for s in sources] == [
        ("x/a.mp4", "hospital_1", str(tmp_path / "data/x/a.mp4")),
        ("y/b.jpg", "hospital_2", str(tmp_path / "data/y/b.jpg")),
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("path\nx.mp4\n")
    with pytest.raises(ValueError, match="uri"):
        list_sources(str(tmp_path), manifest=str(bad))


def test_write_table_leaves_vectors_and_jpegs_uncompressed(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deldist import storage
    from deldist.schema import embedding_array
    from deldist.shards import embedding_matrix

    x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    table = pa.table({"id": [f"a#{i}" for i in range(64)],
                      "embedding": embedding_array(x),
                      "jpeg": pa.array([b"\xff\xd8" * 8] * 64, pa.binary())})
    path = tmp_path / "t.parquet"
    storage.write_table(table, str(path))
    meta = pq.ParquetFile(path).metadata.row_group(0)
    codecs = {meta.column(i).path_in_schema.split(".")[0]: meta.column(i).compression for i in range(meta.num_columns)}
    assert codecs == {"id": "ZSTD", "embedding": "UNCOMPRESSED", "jpeg": "UNCOMPRESSED"}
    assert pq.read_table(path).equals(table)
    np.testing.assert_array_equal(embedding_matrix(pq.read_table(path).column("embedding")), x)
    encodings = {meta.column(i).path_in_schema.split(".")[0]: meta.column(i).encodings for i in range(meta.num_columns)}
    assert not any("DICTIONARY" in e for e in encodings["embedding"] + encodings["jpeg"])  # vectors: plain


def test_drop_repeated_ids_keeps_each_id_once(tmp_path):
    """A retried task writes its rows a second time; the first copy of each id stays."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deldist import storage

    storage.write_table(pa.table({"id": ["a", "b", "c"], "v": [1, 2, 3]}), str(tmp_path / "part-0.parquet"))
    storage.write_table(pa.table({"id": ["c", "d", "a"], "v": [30, 4, 10]}), str(tmp_path / "part-1.parquet"))
    assert storage.drop_repeated_ids(str(tmp_path)) == 2
    table = pa.concat_tables([pq.read_table(tmp_path / f"part-{i}.parquet") for i in range(2)])
    assert table.to_pydict() == {"id": ["a", "b", "c", "d"], "v": [1, 2, 3, 4]}
    assert storage.drop_repeated_ids(str(tmp_path)) == 0


def test_drop_repeated_ids_at_scale_against_a_set(tmp_path):
    """200k ids over 7 parts with repeats across and within parts (and a part of nothing but
    repeats): the same rows go as with a plain set, first copy kept."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deldist import storage

    rng = np.random.default_rng(3)
    names = np.array([f"site_{i % 13}/v{i // 97}.mp4#{i}" for i in range(150_000)])
    parts = [names[rng.integers(0, len(names), 30_000)] for _ in range(6)] + [names[:10]]
    for k, ids in enumerate(parts):
        storage.write_table(pa.table({"id": ids, "k": np.full(len(ids), k)}), str(tmp_path / f"part-{k}.parquet"))
    seen, expected = set(), []
    for ids in parts:
        for i in ids:
            expected.append(i not in seen)
            seen.add(i)
    assert storage.drop_repeated_ids(str(tmp_path)) == expected.count(False)
    kept = pa.concat_tables([pq.read_table(tmp_path / f"part-{k}.parquet") for k in range(7)])
    assert kept.column("id").to_pylist() == [i for i, e in zip(np.concatenate(parts), expected) if e]


def test_s3_region_from_the_environment_the_endpoint_or_the_bucket():
    asked = []

    def lookup(bucket):
        asked.append(bucket)
        return "eu-west-1"

    assert storage.s3_region("b", {"AWS_REGION": "ap-south-1", "AWS_DEFAULT_REGION": "x"}, lookup) == "ap-south-1"
    assert storage.s3_region("b", {"AWS_DEFAULT_REGION": "us-west-2"}, lookup) == "us-west-2"
    # MinIO / GCS interop / moto: their own region rules, no AWS lookup
    assert storage.s3_region("b", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}, lookup) == "us-east-1"
    assert not asked
    # AWS without a region set: the bucket's own
    assert storage.s3_region("videos", {}, lookup) == "eu-west-1" and asked == ["videos"]


def test_content_sha256_local_and_on_s3(tmp_path, s3_bucket):
    import hashlib

    data = os.urandom(3 * 1024 * 1024 + 17)
    (tmp_path / "v.mp4").write_bytes(data)
    storage.write_bytes(f"s3://{s3_bucket}/hash/v.mp4", data)
    expected = hashlib.sha256(data).hexdigest()
    assert content_sha256(str(tmp_path / "v.mp4"), chunk_bytes=1 << 20) == expected
    assert content_sha256(f"s3://{s3_bucket}/hash/v.mp4", chunk_bytes=1 << 20) == expected


@pytest.mark.parametrize("where", ["local", "s3"])
def test_array_scratch_files_round_trip_and_delete(tmp_path, s3_bucket, where):
    """select's exact fallback spills vectors with write_array: float16 stays float16, a local
    file is memory-mapped (nothing read until touched), an S3 object comes back whole."""
    root = str(tmp_path / "scratch") if where == "local" else f"s3://{s3_bucket}/scratch"
    x = np.random.default_rng(0).standard_normal((300, 24)).astype(np.float16)
    storage.write_array(storage.join(root, "a.npy"), x)
    back = storage.read_array(storage.join(root, "a.npy"))
    assert back.dtype == np.float16 and np.array_equal(back, x)
    assert isinstance(back, np.memmap) == (where == "local")
    storage.delete_dir(root)
    assert not storage.exists(storage.join(root, "a.npy"))
    storage.delete_dir(root)  # absent: nothing to do
