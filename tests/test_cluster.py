"""deldist.cluster: spherical k-means math against faiss, the Ray stage end to end, bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pytest

from deldist import cluster, kmeans, seeding, shards, storage
from deldist.schema import QUALITY_COLUMNS, embedding_array, embeddings_schema


def clustered(n: int, dim: int, centers: int, seed: int, spread: float = 0.5) -> np.ndarray:
    """Unit rows around ``centers`` random directions, float32 (n, dim)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim))
    x = c[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_embeddings(emb_dir: str, x: np.ndarray, parts: int = 3, manifest_dim: int | None = None,
                     order: np.ndarray | None = None) -> list[str]:
    """Publish ``x`` (n, D) as an ``embeddings/`` table split into ``parts`` files, rows in
    ``order`` (default: 0..n-1); ids ``v<i%5>.mp4#<i>``. Returns the ids."""
    n, dim = x.shape
    ids = [f"v{i % 5}.mp4#{i}" for i in range(n)]
    schema = embeddings_schema(dim)
    files = []
    for rows in np.array_split(np.arange(n) if order is None else order, parts):
        table = pa.table({
            "id": [ids[i] for i in rows],
            "source": [f"s3://in/v{i % 5}.mp4" for i in rows],
            "frame_index": pa.array(rows, pa.int64()),
            "timestamp_s": pa.array(rows / 15.0, pa.float64()),
            "dataset": ["a" if i % 2 else "b" for i in rows],
            "embedding": embedding_array(x[rows]),
            **{q: pa.array(np.full(len(rows), 0.5), pa.float32()) for q in QUALITY_COLUMNS},
            "phash": pa.array(np.zeros(len(rows), np.uint64)),
        }, schema=schema)
        path = storage.join(emb_dir, storage.new_part_name())
        storage.write_table(table, path)
        files.append(storage.resolve(path)[1])
    storage.publish(emb_dir, files, {"dim": manifest_dim or dim, "model": "synthetic",
                                     "schema": storage.schema_hex(schema)})
    return ids


def faiss_objective(x: np.ndarray, k: int, niter: int, seed: int = 1) -> float:
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=niter, spherical=True, seed=seed, max_points_per_centroid=10**6)
    km.train(x)
    return kmeans.objective(x, km.centroids)


# ----------------------------------------------------------------------------- pure math


def test_local_kmeans_matches_faiss_objective():
    x = clustered(2500, 32, 30, seed=0)
    centroids, history = kmeans.kmeans_local(x, 30, max_iter=10, tol=0.0, seed=0, n_shards=3)
    assert len(history) == 10  # tol=0: never stops early
    ours = kmeans.objective(x, centroids)
    assert ours <= 1.01 * faiss_objective(x, 30, 10)
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(history, history[1:]))  # Lloyd never gets worse


def test_bounds_skip_work_but_not_results():
    x = clustered(3000, 16, 20, seed=7)
    with_bounds, history = kmeans.kmeans_local(x, 20, max_iter=8, tol=0.0, seed=1, n_shards=2)
    plain, plain_history = kmeans.kmeans_local(x, 20, max_iter=8, tol=0.0, seed=1, n_shards=2, use_bounds=False)
    assert np.allclose(history, plain_history, rtol=1e-6)
    assert np.allclose(with_bounds, plain, atol=1e-5)
    # later passes search only the rows whose cluster could change
    c0 = kmeans.normalize_rows(x[:20])
    stats, bounds = kmeans.partial_stats([x], c0, n_far=0)
    c1, _ = kmeans.update_centroids(stats, c0)
    again, _ = kmeans.partial_stats([x], c1, n_far=0, bounds=bounds, shift=kmeans.centroid_shift(c0, c1))
    full, _ = kmeans.partial_stats([x], c1, n_far=0)
    assert stats.searched == 3000 and again.searched < 3000
    assert np.array_equal(again.counts, full.counts) and again.objective == pytest.approx(full.objective)
    # a group of matrices keeps one (k, D) sum, kept current by the rows that moved
    parts = np.array_split(x, 5)
    stats, bounds = kmeans.partial_stats(parts, c0, n_far=0)
    assert len(bounds.rows) == 5 and bounds.sums.shape == (20, 16)
    assert not any(hasattr(b, "sums") for b in bounds.rows)
    again, moved = kmeans.partial_stats(parts, c1, n_far=0, bounds=bounds, shift=kmeans.centroid_shift(c0, c1))
    assert np.allclose(again.sums, full.sums, atol=1e-9) and np.allclose(moved.sums, full.sums, atol=1e-9)
    assert again.searched < 3000 and np.array_equal(again.counts, full.counts)


def test_update_reseeds_empty_clusters_with_farthest_points():
    x = np.abs(clustered(300, 8, 3, seed=1))  # positive orthant
    away = -x.sum(axis=0, keepdims=True)  # negative cosine to every row: attracts nothing
    stale = kmeans.normalize_rows(np.vstack([x[:2], away]))
    stats, _ = kmeans.partial_stats([x], stale, n_far=4)
    assert stats.counts[2] == 0
    new, n_empty = kmeans.update_centroids(stats, stale)
    assert n_empty == 1
    farthest = stats.far_points[np.argmax(stats.far_distance)]
    assert np.allclose(new[2], farthest / np.linalg.norm(farthest), atol=1e-6)


def test_kmeans_plus_plus_picks_distinct_points_even_with_duplicates():
    x = np.repeat(clustered(5, 8, 5, seed=2), 20, axis=0)  # 5 distinct points, 100 rows
    c = seeding.kmeans_plus_plus(x, 5, np.random.default_rng(0))
    assert len(np.unique(np.round(c, 5), axis=0)) == 5


def test_bad_vectors_are_named():
    x = clustered(10, 4, 2, seed=3)
    x[3] = np.nan
    with pytest.raises(shards.EmbeddingError, match="NaN.*id-3"):
        shards.normalize_checked(x, [f"id-{i}" for i in range(10)])
    x[3] = 0.0
    with pytest.raises(shards.EmbeddingError, match="zero vectors.*id-3"):
        shards.normalize_checked(x, [f"id-{i}" for i in range(10)])
    with pytest.raises(shards.EmbeddingError, match="dimension mismatch"):
        kmeans.nearest_centroid(clustered(5, 4, 1, seed=0), clustered(3, 6, 1, seed=0))
    with pytest.raises(ValueError, match="k=9"):
        seeding.kmeans_plus_plus(x[:5], 9, np.random.default_rng(0))


def test_plan_shards_packs_row_groups(tmp_path):
    emb = str(tmp_path / "embeddings")
    write_embeddings(emb, clustered(100, 4, 2, seed=0), parts=5)
    planned = shards.plan_shards(emb, shard_rows=45)  # 5 files of 20 rows -> 3 shards of 40, 20, 40
    assert [s.num_rows for s in planned] == [40, 20, 40]
    # balanced: 26 files of 7-8 rows, at least 4 shards -> four of about 51 rows (packing files
    # greedily up to the target would leave a fifth shard of 15 rows)
    many = str(tmp_path / "many")
    write_embeddings(many, clustered(203, 4, 2, seed=0), parts=26)
    sizes = [s.num_rows for s in shards.plan_shards(many, shard_rows=1000, min_shards=4)]
    assert len(sizes) == 4 and sum(sizes) == 203 and min(sizes) >= 40, sizes
    rows = sum(shards.read_shard(emb, s, ["id"]).num_rows for s in planned)
    assert rows == 100


# ----------------------------------------------------------------------------- Ray stage


def test_run_end_to_end_matches_faiss(ray_session, tmp_path):
    x = clustered(3000, 32, 30, seed=4)
    root = str(tmp_path / "run")
    ids = write_embeddings(storage.join(root, "embeddings"), x, parts=4)
    summary = cluster.run(cluster.Config(output=root, k=30, max_iter=10, tol=0.0, shard_rows=700, task_cpus=0.5))
    assert summary["rows"] == 3000 and summary["fit_tasks"] >= 2

    centroids = cluster.read_centroids(storage.join(root, "clusters"))
    assert centroids.shape == (30, 32) and centroids.dtype == np.float32
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    assert kmeans.objective(x, centroids) <= 1.01 * faiss_objective(x, 30, 10)

    assignments = storage.read_published(storage.join(root, "clusters", "assignments"))
    assert assignments.schema.equals(cluster.ASSIGNMENTS_SCHEMA)
    assert sorted(assignments.column("id").to_pylist()) == sorted(ids)
    order = np.argsort([int(i.split("#")[1]) for i in assignments.column("id").to_pylist()])
    labels = assignments.column("cluster").to_numpy()[order]
    distance = assignments.column("distance").to_numpy()[order]
    sims = x @ centroids.T
    assert np.array_equal(labels, sims.argmax(axis=1))
    assert np.allclose(distance, 1.0 - sims.max(axis=1), atol=1e-5)
    sizes = storage.read_published(storage.join(root, "clusters", "centroids"), ["size"]).column("size").to_numpy()
    assert sizes.sum() == 3000 and np.array_equal(sizes, np.bincount(labels, minlength=30))


def test_run_with_fit_fraction_fits_a_sample_and_assigns_everything(ray_session, tmp_path):
    x = clustered(2000, 16, 10, seed=5)
    root = str(tmp_path / "run")
    write_embeddings(storage.join(root, "embeddings"), x, parts=2)
    summary = cluster.run(cluster.Config(output=root, k=10, max_iter=5, fit_fraction=0.25, task_cpus=0.5))
    assert 350 < summary["fit_rows"] < 650 and summary["rows"] == 2000
    assert storage.read_published(storage.join(root, "clusters", "assignments")).num_rows == 2000


def test_run_depends_on_the_rows_not_on_their_order(ray_session, tmp_path):
    """The fit sample and the k-means++ candidates are chosen by a seeded hash of the ids, and
    each shard is read in id order: the same embeddings written in another row order (as two
    embed runs write them) give byte-identical centroids; split into other parts, the same
    clusters."""
    x = clustered(2000, 16, 10, seed=7)
    shuffled = np.random.default_rng(0).permutation(2000)
    results = []
    for name, parts, order in (("plain", 1, None), ("shuffled", 1, shuffled), ("split", 3, shuffled)):
        root = str(tmp_path / name)
        write_embeddings(storage.join(root, "embeddings"), x, parts=parts, order=order)
        cluster.run(cluster.Config(output=root, k=10, max_iter=20, fit_fraction=0.6, init_sample_size=100,
                                   task_cpus=0.5))
        table = storage.read_published(storage.join(root, "clusters", "assignments"))
        labels = dict(zip(table.column("id").to_pylist(), table.column("cluster").to_pylist()))
        results.append((cluster.read_centroids(storage.join(root, "clusters")), labels))
    (plain, plain_labels), (shuf, shuf_labels), (split, split_labels) = results
    assert plain.tobytes() == shuf.tobytes() and plain_labels == shuf_labels
    np.testing.assert_allclose(split, plain, atol=1e-5)
    assert split_labels == plain_labels


def test_id_hash_is_seeded_uniform_and_order_free():
    from deldist.ids import id_hash

    ids = pa.array([f"center_a/vid_{i:03d}.mp4#{i * 3}" for i in range(20000)])
    h = id_hash(ids, 0)
    assert h.min() >= 0 and h.max() < 1 and abs((h < 0.25).mean() - 0.25) < 0.02
    perm = np.random.default_rng(1).permutation(20000)
    np.testing.assert_array_equal(id_hash(ids.take(pa.array(perm)), 0), h[perm])
    np.testing.assert_array_equal(id_hash(pa.chunked_array([ids.slice(0, 7), ids.slice(7)]), 0), h)
    assert np.corrcoef(h, id_hash(ids, 1))[0, 1] < 0.05


def _fnv_splitmix_reference(text: str, seed: int) -> float:
    """FNV-1a 64 then splitmix64's finaliser, in Python integers, top 53 bits / 2^64."""
    mask = 2**64 - 1
    h = 0xCBF29CE484222325 ^ seed
    for byte in text.encode():
        h = ((h ^ byte) * 0x100000001B3) & mask
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & mask
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & mask
    h ^= h >> 31
    return (h >> 11) * 2.0**11 / 2.0**64


def test_id_hash_matches_a_python_reference():
    from deldist.ids import id_hash

    ids = ["", "a", "center_a/vid_001.mp4#3", "ü/é.mp4#12", "x" * 300, "v2/site_x/fresh.mp4#1000"]
    for seed in (0, 1, 2**63 + 5):
        expected = [_fnv_splitmix_reference(i, seed) for i in ids]
        assert id_hash(pa.array(ids), seed).tolist() == expected


def test_run_rejects_bad_input(ray_session, tmp_path):
    x = clustered(50, 8, 2, seed=6)
    empty = str(tmp_path / "empty")
    write_embeddings(storage.join(empty, "embeddings"), x[:0], parts=1)
    with pytest.raises(shards.EmptyInputError):
        cluster.run(cluster.Config(output=empty, k=2))

    small = str(tmp_path / "small")
    write_embeddings(storage.join(small, "embeddings"), x, parts=1)
    with pytest.raises(ValueError, match="k=60 exceeds"):
        cluster.run(cluster.Config(output=small, k=60))
    assert not storage.is_published(storage.join(small, "clusters"))

    wrong_dim = str(tmp_path / "dim")
    write_embeddings(storage.join(wrong_dim, "embeddings"), x, parts=1, manifest_dim=16)
    with pytest.raises(shards.EmbeddingError, match="does not match"):
        cluster.run(cluster.Config(output=wrong_dim, k=2, task_cpus=0.5))

    nan = str(tmp_path / "nan")
    bad = x.copy()
    bad[7] = np.nan
    write_embeddings(storage.join(nan, "embeddings"), bad, parts=1)
    with pytest.raises(shards.EmbeddingError, match="v2.mp4#7"):
        cluster.run(cluster.Config(output=nan, k=2, task_cpus=0.5))
    assert not storage.is_published(storage.join(nan, "clusters"))


def test_stage_fingerprints_skip_unchanged_and_refuse_stale_inputs(ray_session, tmp_path):
    """cluster and dedup record what fixed their result (settings + the content of what they
    read); a chain rerun may skip a stage whose record matches, and a stage whose input was
    rewritten since refuses to run on it."""
    from deldist import dedup, select

    x = clustered(600, 16, 6, seed=8)
    root = str(tmp_path / "run")
    write_embeddings(storage.join(root, "embeddings"), x, parts=2)
    cfg = cluster.Config(output=root, k=6, task_cpus=0.5)
    cluster.run(cfg)
    dedup_cfg = dedup.Config(output=root, task_cpus=0.5)
    dedup.run(dedup_cfg)
    assert storage.is_current(storage.join(root, "clusters"), cluster.fingerprint(cfg))
    assert storage.is_current(storage.join(root, "dedup", "scores"), dedup.fingerprint(dedup_cfg))
    assert not storage.is_current(storage.join(root, "clusters"), cluster.fingerprint(cfg.model_copy(update={"k": 5})))
    assert storage.is_current(storage.join(root, "clusters"), cluster.fingerprint(cfg.model_copy(update={"task_cpus": 1})))
    select.run(select.Config(output=root, name="before", eps=0.2))

    cluster.run(cfg.model_copy(update={"k": 5}))  # clusters rewritten: the scores are stale
    assert not storage.is_current(storage.join(root, "dedup", "scores"), dedup.fingerprint(dedup_cfg))
    with pytest.raises(storage.StaleInputError, match="rerun deldist dedup"):
        select.run(select.Config(output=root, name="stale", eps=0.2))
    dedup.run(dedup_cfg)
    assert select.run(select.Config(output=root, name="fresh", eps=0.2))

    shutil.rmtree(tmp_path / "run" / "embeddings")  # embeddings rewritten: the clusters are stale
    write_embeddings(storage.join(root, "embeddings"), clustered(700, 16, 6, seed=9), parts=2)
    with pytest.raises(storage.StaleInputError, match="rerun deldist cluster"):
        dedup.run(dedup_cfg)


def test_seeding_over_threads_gives_the_same_centroids():
    """kmeans_plus_plus with its candidates' product split over threads (what the seeding task
    does with a node's CPUs) picks exactly the centroids of the one-thread run."""
    from deldist.seeding import kmeans_plus_plus

    rng = np.random.default_rng(4)
    x = rng.standard_normal((3001, 32)).astype(np.float32)
    x[100:110] = x[5]  # exact duplicates: never drawn while other rows are at positive distance
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    one = kmeans_plus_plus(x, 60, np.random.default_rng(9))
    for threads in (2, 3):
        assert np.array_equal(kmeans_plus_plus(x, 60, np.random.default_rng(9), threads=threads), one)
    assert len(np.unique(one, axis=0)) == 60
