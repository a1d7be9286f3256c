"""deldist.select: thresholds, target ratios, filters, the partition invariant, ground-truth
metrics, and the whole cluster -> dedup -> select chain on the moto S3 bucket."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from deldist import (
    cluster,
    dedup,
    dedup_scores,
    greedy,
    groundtruth,
    kept_rule,
    pairwise,
    rules,
    select,
    select_ray,
    storage,
    tiles,
)
from deldist.schema import QUALITY_COLUMNS, embedding_array, embeddings_schema
from deldist.shards import embedding_matrix, table_matrix

# ----------------------------------------------------------------------------- pure functions


def test_any_earlier_rule_threshold_for_ratio():
    """SemDeDup's rule: the order statistic of max_sim keeps the requested count."""
    rng = np.random.default_rng(0)
    n = 1000
    max_sim = rng.random(n).astype(np.float32)
    first = np.zeros(n, bool)
    first[::50] = True  # 20 first-ranked items
    everyone = np.ones(n, bool)
    for ratio in (0.05, 0.10, 0.20, 0.33, 0.50):
        t, reachable = greedy.threshold_for_ratio(max_sim, first, everyone, round(ratio * n))
        kept = ~greedy.any_earlier_duplicates(everyone, first, max_sim, t)
        assert reachable and kept.sum() == round(ratio * n) and kept[first].all()
    # first-ranked items always stay; removed candidates cannot be kept
    t, reachable = greedy.threshold_for_ratio(np.array([0, 0.5, 0, 0.9]), np.array([1, 0, 1, 0], bool),
                                              np.ones(4, bool), 1)
    assert not reachable and t == -np.inf


def test_config_method_defaults_and_deldist_rules():
    meddel = select.Config(output="x", eps=0.1)
    assert meddel.outlier_distance == 0.9 and meddel.dedup_rule == "kept"  # the paper's 0.9, kept-aware
    assert meddel.deldist_rules.quality is None and meddel.deldist_rules.near_copy is None  # off unless named
    semdedup = select.Config(output="x", method="semdedup", eps=0.1)
    assert semdedup.outlier_distance is None and semdedup.dedup_rule == "any_earlier"
    chosen = select.Config(output="x", eps=0.1, outlier_distance=None, dedup_rule="any_earlier",
                           deldist_rules={"quality": {}, "near_copy": {}})
    assert chosen.outlier_distance is None and chosen.deldist_rules.near_copy.max_hamming == 10
    with pytest.raises(ValueError):
        select.Config(output="x", eps=0.1, deldist_rules={"qualty": {}})  # typo: unknown keys are errors


def brute_force_kept(x: np.ndarray, cluster: np.ndarray, rank: np.ndarray, candidate: np.ndarray,
                     threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """float64 reference of the ``kept`` rule: per cluster in rank order, a candidate is removed
    iff its similarity to an earlier kept candidate exceeds the threshold -> (kept, duplicate_of
    row: the most similar such, earliest-ranked on ties)."""
    x64 = x.astype(np.float64)
    kept = np.zeros(len(x), bool)
    dup = np.full(len(x), -1)
    for c in np.unique(cluster):
        members = np.flatnonzero(cluster == c)
        members = members[np.argsort(rank[members])]
        chosen: list[int] = []
        for i in members:
            if not candidate[i]:
                continue
            sims = x64[chosen] @ x64[i] if chosen else np.zeros(0)
            if len(sims) and sims.max() > threshold:
                dup[i] = chosen[int(np.argmax(sims))]
            else:
                kept[i] = True
                chosen.append(i)
    return kept, dup


def scored(x: np.ndarray, cluster: np.ndarray, spec) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """dedup scores (real kernel) of rows x, ranked by row order within each cluster -> (scores
    table aligned with the rows, rank, position order)."""
    ids = pa.array([f"r{i:05d}" for i in range(len(x))])
    rank = dedup_scores.rank_within_clusters(ids, cluster, np.zeros(len(x)), "random", seed=1)
    order = np.lexsort((rank, cluster))
    table = dedup_scores.score_sorted_clusters(x[order], ids.take(pa.array(order)), cluster[order], rank[order], spec,
                                        block_rows=32, col_block=48, diag_rows=8)
    back = np.argsort(order)
    return table.take(pa.array(back)), rank, order


def as_scores(table: pa.Table) -> select_ray.Scores:
    """A scores table as select reads it, its lists stored in reverse row order in three chunks
    (as Parquet parts arrive: not aligned with the ids)."""
    n = table.num_rows
    back = np.arange(n)[::-1].copy()
    stored = table.select(["neighbours", "neighbour_sims"]).take(pa.array(back))
    chunked = pa.Table.from_batches(stored.to_batches(max_chunksize=max(1, n // 3 + 1)))
    return select_ray.Scores(table, chunked, back, {})


@pytest.mark.parametrize("spec", [tiles.ListSpec(2, 2, 0.3), tiles.ListSpec(16, 16, 0.3)])
def test_kept_rule_from_lists_matches_brute_force(spec):
    """The neighbour lists + exact fallback give the float64 reference's kept set, with
    filtered items and exact-duplicate ties, at several thresholds."""
    rng = np.random.default_rng(2)
    n, dim = 400, 12
    cluster = rng.integers(0, 5, n)
    x = rng.standard_normal((5, dim))[cluster] + 0.45 * rng.standard_normal((n, dim))
    copies, sources = rng.choice(n, 60, replace=False), rng.integers(0, n, 60)
    x[copies], cluster[copies] = x[sources], cluster[sources]  # exact copies in the same cluster: ties
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    scores, rank, order = scored(x, cluster, spec)
    candidate = rng.random(n) < 0.85  # earlier rules removed the others
    sizes = np.bincount(cluster)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    position = np.argsort(order)
    edges = select_ray.neighbour_edges(as_scores(scores), order, starts, spec.floor)
    for threshold in (0.5, 0.8, 0.9, 0.97):
        kept_pos, dup_pos, sim_pos, unresolved = greedy.resolve_kept(candidate[order], edges, threshold)
        for c in np.unique(cluster[order][unresolved]):  # the exact fallback of those clusters
            span = slice(starts[c], starts[c] + sizes[c])
            k, d, v = pairwise.keep_first_exact(x[order][span], candidate[order][span], threshold, block_rows=16)
            kept_pos[span], dup_pos[span] = k, np.where(d >= 0, d + starts[c], -1)
        kept = kept_pos[position]
        dup = np.where(dup_pos[position] >= 0, order[np.maximum(dup_pos[position], 0)], -1)
        ref_kept, ref_dup = brute_force_kept(x, cluster, rank, candidate, threshold)
        assert np.array_equal(kept, ref_kept), threshold
        sims = np.einsum("ij,ij->i", x.astype(np.float64), x[np.maximum(dup, 0)].astype(np.float64))
        removed = candidate & ~kept
        assert np.all(dup[removed] >= 0) and kept[dup[removed]].all()  # every removal names a kept item
        assert np.all(sims[removed] > threshold - 1e-6)
        assert np.array_equal(ref_dup >= 0, candidate & ~ref_kept)
    if spec.by_similarity == 16:
        assert not unresolved.any() or unresolved.sum() < n // 10
    with pytest.raises(ValueError, match="below the scores' neighbour floor"):
        greedy.resolve_kept(candidate[order], edges, 0.2)


def test_kept_rule_keeps_a_group_whose_first_member_was_filtered():
    """Three near-identical frames, the first-ranked an outlier: SemDeDup's rule removes the other
    two as its duplicates (the group vanishes); the kept rule keeps the second."""
    x = np.array([[1, 0.01, 0], [1, 0.02, 0], [1, 0.03, 0], [0, 1, 0]], np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cluster = np.zeros(4, np.int64)
    scores, rank, order = scored(x, cluster, tiles.ListSpec())
    candidate = np.ones(4, bool)
    candidate[np.flatnonzero(rank == 0)[0]] = False
    first = scores.column("rank").to_numpy() == 0
    any_earlier = greedy.any_earlier_duplicates(candidate, first, scores.column("max_sim").to_numpy(), 0.9)
    edges = select_ray.neighbour_edges(as_scores(scores), order, np.array([0]), 0.5)
    kept_pos, _, _, _ = greedy.resolve_kept(candidate[order], edges, 0.9)
    kept = kept_pos[np.argsort(order)]
    group = np.arange(3)
    if candidate[3]:
        assert (candidate & ~any_earlier)[group].sum() <= 1
    assert kept[group].sum() == 1 and kept[3] == candidate[3]


def test_plan_kept_shards_keeps_split_clusters_whole_and_balances_rows():
    """Parts sharing a cluster (dedup split it) land in one shard, each part in exactly one,
    and the shards' rows are balanced largest-first."""
    parts = [np.array([0, 0, 1]), np.array([1, 1]), np.array([2] * 6), np.array([3, 4]), np.array([4, 5]),
             np.array([6]), np.array([7, 7, 7])]
    shards = kept_rule.plan_kept_shards(parts, 3)
    assert sorted(p for s in shards for p in s) == list(range(len(parts)))
    shard_of = {p: i for i, s in enumerate(shards) for p in s}
    assert shard_of[0] == shard_of[1] and shard_of[3] == shard_of[4]
    rows = sorted(sum(len(parts[p]) for p in s) for s in shards)
    assert rows == [6, 6, 7]  # groups of 6, 5 (parts 0+1), 4 (parts 3+4), 3, 1 rows, largest first
    assert sorted(kept_rule.plan_kept_shards(parts, 100)) == [[0, 1], [2], [3, 4], [5], [6]]


def test_search_threshold_and_follow_to_kept():
    counts = {0.5: 10, 0.6: 30, 0.7: 28, 0.8: 55, 0.9: 90, 1.0: 100}  # not quite monotone
    grid = np.array(sorted(counts))
    t, count, ok = greedy.search_threshold(lambda t: counts[round(t, 1)], grid, 29, tolerance=1)
    assert (t, count, ok) in ((0.7, 28, True), (0.6, 30, True))
    t, count, ok = greedy.search_threshold(lambda t: counts[round(t, 1)], grid, 5, tolerance=1)
    assert (t, count, ok) == (0.5, 10, False)
    # every float32 between two values, bisected without materialising them
    grid = greedy.FloatGrid(0.5, 0.9)
    assert grid[0] == 0.5 and grid[len(grid) - 2] == float(np.float32(0.9)) and grid[len(grid) - 1] == np.inf
    assert grid[1] == float(np.nextafter(np.float32(0.5), np.float32(1)))
    values = np.sort(np.random.default_rng(0).random(1000) * 0.4 + 0.5).astype(np.float32)
    t, count, ok = greedy.search_threshold(lambda t: int((values <= t).sum()), grid, 300, tolerance=0)
    assert ok and count == 300 and values[299] <= t < values[300]
    assert list(greedy.FloatGrid(-0.25, -0.25)) == [-0.25, np.inf]
    # from a start index near the answer (a cheaper count's), only thresholds near it are counted
    tried = []
    count_at = lambda t: tried.append(t) or int((values <= t).sum())  # noqa: E731
    for start in (grid.index(float(values[290])), grid.index(float(values[310]))):
        tried.clear()
        found, count, ok = greedy.search_threshold(count_at, grid, 300, 0, start=start)
        assert ok and count == 300 and values[299] <= found < values[300]
        assert values[285] <= min(tried) and max(tried) <= values[315] and len(tried) < 40
    link = np.array([-1, 0, 1, -1, 3, 5, 4, -1])
    kept = np.array([1, 0, 0, 0, 0, 0, 0, 1], bool)
    # 2 -> 1 -> 0 (kept); 4 -> 3 (removed, no link): none; 5 <-> 6 via 4: none
    assert greedy.follow_to_kept(link, kept).tolist() == [0, 0, 0, -1, -1, -1, -1, 7]


def test_outlier_mask_absolute_and_per_cluster_quantile():
    cluster_ids = np.array([0, 0, 0, 0, 0, 1, 1, 2])
    distance = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.05, 0.5, 0.7])
    assert rules.outlier_mask(cluster_ids, distance, max_distance=0.45).tolist() == \
        [False, False, False, False, True, False, True, True]
    q = rules.outlier_mask(cluster_ids, distance, quantile=0.75)
    # cluster 0: 75th percentile 0.4 -> only 0.9 above; cluster 1: 0.3875 -> 0.5 above; singleton never
    assert q.tolist() == [False, False, False, False, True, False, True, False]


def test_invalid_rules():
    quality = {"brightness": np.array([0.5, 0.01, 0.97, 0.5, 0.5, np.nan]),
               "dark": np.array([0.1, 0.99, 0.0, 0.1, 0.1, np.nan]),
               "saturated": np.array([0.0, 0.0, 0.8, 0.0, 0.0, np.nan]),
               "contrast": np.array([0.2, 0.0, 0.01, 0.005, 0.2, np.nan]),
               "blur": np.array([500.0, 0.0, 1.0, 300.0, 3.0, np.nan])}
    thresholds = rules.InvalidThresholds(min_blur=10.0)
    masks = rules.invalid_mask(quality, thresholds)
    assert masks["dark"].tolist() == [False, True, False, False, False, False]
    assert masks["overexposed"].tolist() == [False, False, True, False, False, False]
    assert masks["flat"].tolist() == [False, True, False, True, False, False]
    assert masks["blurred"].tolist() == [False, True, True, False, True, False]  # unknown (NaN) never fires
    assert "blurred" not in rules.invalid_mask(quality, rules.InvalidThresholds())


def test_temporal_collapse_compares_to_the_kept_frame():
    e = np.eye(4, dtype=np.float32)
    drift = [e[0], (e[0] + 0.2 * e[1]), (e[0] + 0.4 * e[1]), (e[0] + 0.8 * e[1]), e[2], e[2], e[3]]
    x = np.array([v / np.linalg.norm(v) for v in drift], np.float32)
    rep, sim = rules.temporal_collapse(x, threshold=0.9)
    # frames 1, 2 collapse into 0; 3 drifted too far from 0 (not from 2): kept; 5 into 4
    assert rep.tolist() == [-1, 0, 0, -1, -1, 4, -1]
    assert sim[1] == pytest.approx(float(x[1] @ x[0])) and sim[0] == 0
    long_static = np.repeat(x[:1], 100, axis=0)
    rep, _ = rules.temporal_collapse(long_static, threshold=0.99)
    assert rep[0] == -1 and (rep[1:] == 0).all()


def test_random_decision_is_exact_seeded_and_order_free():
    ids = pa.array([f"id{i}" for i in range(200)])
    reason = rules.random_decision(ids, 0.2, seed=4)
    assert (reason < 0).sum() == 40
    perm = np.random.default_rng(1).permutation(200)
    again = rules.random_decision(ids.take(pa.array(perm)), 0.2, seed=4)
    assert np.array_equal(again, reason[perm])
    assert not np.array_equal(rules.random_decision(ids, 0.2, seed=5), reason)


def test_check_partition():
    ids = pa.array(["a", "b", "c"])
    rules.check_partition(ids, pa.array(["a"]), pa.array(["c", "b"]))
    with pytest.raises(rules.SelectionInvariantError):
        rules.check_partition(ids, pa.array(["a", "b"]), pa.array(["b"]))
    with pytest.raises(rules.SelectionInvariantError):
        rules.check_partition(ids, pa.array(["a", "b"]), pa.array(["x"]))
    with pytest.raises(rules.SelectionInvariantError):
        rules.check_partition(ids, pa.array(["a"]), pa.array(["b"]))


def test_ground_truth_metrics_by_hand():
    gt = pa.table({
        "source_key": ["c/v.mp4"] * 6 + ["c/w.mp4"] * 2,
        "frame_index": [0, 1, 2, 3, 4, 5, 0, 1],
        "scene_id": ["s0", "s0", "s1", "s1", "s1", "s2", "s3", "s3"],
        "segment_id": ["g0", "g0", "g1", "g1", "g2", "g3", "g4", "g4"],
        "invalid": [False, False, False, True, True, False, False, False],
        "invalid_kind": ["", "", "", "black", "blur", "", "", ""],
    })
    ids = ["videos/c/v.mp4#0", "videos/c/v.mp4#1", "videos/c/v.mp4#2", "videos/c/v.mp4#3", "videos/c/v.mp4#4",
           "videos/c/w.mp4#0", "images/x.jpg#0"]  # v#5 and w#1 not embedded; x.jpg has no ground truth
    kept = np.array([True, False, False, True, False, False, True])
    m = groundtruth.ground_truth_metrics(ids, kept, gt)
    assert m["frames"] == 6 and m["frames_without_ground_truth"] == 1
    assert m["scenes"] == 3 and m["scene_coverage"] == pytest.approx(1 / 3)  # s1 only has a kept invalid frame
    assert m["invalid_frames"] == 2 and m["invalid_recall"] == 0.5
    assert m["invalid_recall_by_kind"] == {"black": 0.0, "blur": 1.0}
    assert m["valid_removed"] == pytest.approx(3 / 4)
    assert "scene_coverage" in m["random_baseline"]


# ----------------------------------------------------------------------------- chain on S3


def synthetic_videos(seed: int = 0, dim: int = 32):
    """Endoscopy-like toy data: 6 videos of scenes of very different lengths (near-static
    frames around a scene direction) with short runs of black frames.
    Returns (embeddings table, ground-truth table)."""
    rng = np.random.default_rng(seed)
    black = rng.standard_normal(dim)
    rows: dict[str, list] = {k: [] for k in ("id", "source", "frame_index", "dataset", "embedding", "brightness",
                                             "dark", "source_key", "scene_id", "segment_id", "invalid",
                                             "invalid_kind")}
    for v in range(6):
        center = f"c{v % 2}"
        key = f"{center}/vid_{v}.mp4"
        frame = 0
        scene_lengths = [rng.integers(3, 12), rng.integers(80, 200), rng.integers(3, 12), rng.integers(80, 200)]
        for s, length in enumerate(scene_lengths):
            direction = rng.standard_normal(dim)
            drift = 0.05 * np.cumsum(rng.standard_normal((length, dim)), axis=0)
            runs = [("scene", direction + drift + 0.02 * rng.standard_normal((length, dim)))]
            if s == 1:
                runs.append(("black", black + 0.05 * rng.standard_normal((15, dim))))
            for kind, vectors in runs:
                for vec in vectors:
                    rows["id"].append(f"videos/{key}#{frame}")
                    rows["source"].append(f"s3://in/videos/{key}")
                    rows["frame_index"].append(frame)
                    rows["dataset"].append(center)
                    rows["embedding"].append(vec / np.linalg.norm(vec))
                    rows["brightness"].append(0.01 if kind == "black" else 0.45)
                    rows["dark"].append(0.97 if kind == "black" else 0.2)
                    rows["source_key"].append(key)
                    rows["scene_id"].append(f"{key}/s{s}")
                    rows["segment_id"].append(f"{key}/s{s}/{kind}")
                    rows["invalid"].append(kind == "black")
                    rows["invalid_kind"].append(kind if kind == "black" else "")
                    frame += 2  # every second decoded frame was sampled
    n = len(rows["id"])
    x = np.asarray(rows["embedding"], np.float32)
    embeddings = pa.table({
        "id": rows["id"], "source": rows["source"], "frame_index": pa.array(rows["frame_index"], pa.int64()),
        "timestamp_s": pa.array(np.asarray(rows["frame_index"]) / 30.0), "dataset": rows["dataset"],
        "embedding": embedding_array(x),
        "brightness": pa.array(rows["brightness"], pa.float32()),
        "contrast": pa.array(np.full(n, 0.2), pa.float32()), "blur": pa.array(np.full(n, 200.0), pa.float32()),
        "saturated": pa.array(np.zeros(n), pa.float32()), "dark": pa.array(rows["dark"], pa.float32()),
        "phash": pa.array(rng.integers(0, 2**63, n).astype(np.uint64)),
    }, schema=embeddings_schema(dim))
    assert set(QUALITY_COLUMNS) <= set(embeddings.column_names)
    ground_truth = pa.table({"source_key": rows["source_key"], "frame_index": pa.array(rows["frame_index"], pa.int64()),
                             "scene_id": rows["scene_id"], "segment_id": rows["segment_id"],
                             "invalid": rows["invalid"], "invalid_kind": rows["invalid_kind"]})
    return embeddings, ground_truth


def publish_embeddings(emb_dir: str, table: pa.Table, parts: int = 3, dtype: str = "float32") -> None:
    files = []
    for rows in np.array_split(np.arange(table.num_rows), parts):
        path = storage.join(emb_dir, storage.new_part_name())
        storage.write_table(table.take(pa.array(rows)), path)
        files.append(storage.resolve(path)[1])
    dim = table.schema.field("embedding").type.byte_width // (2 if dtype == "float16" else 4)
    storage.publish(emb_dir, files, {"dim": dim, "model": "synthetic", "embedding_dtype": dtype,
                                     "schema": storage.schema_hex(table.schema)})


def read_selection(root: str, name: str) -> tuple[pa.Table, pa.Table, dict]:
    sel = storage.join(root, "selections", name)
    assert storage.is_published(sel)
    return (storage.read_published(storage.join(sel, "retained")),
            storage.read_published(storage.join(sel, "removed")),
            storage.read_json(storage.join(sel, "summary.json")))


def assert_partition(all_ids: set[str], retained: pa.Table, removed: pa.Table, summary: dict) -> None:
    kept = retained.column("id").to_pylist()
    gone = removed.column("id").to_pylist()
    assert set(kept) | set(gone) == all_ids
    assert not set(kept) & set(gone) and len(kept) + len(gone) == len(all_ids)
    assert summary["input_count"] == len(all_ids) and summary["kept_count"] == len(kept)
    reasons = removed.column("reason").to_pylist()
    assert summary["removed_by_reason"] == {r: reasons.count(r) for r in set(reasons)}
    assert sum(d["input"] for d in summary["per_dataset"].values()) == len(all_ids)
    assert sum(d["kept"] for d in summary["per_dataset"].values()) == len(kept)


def assert_duplicates_point_at_retained(root: str, retained: pa.Table, removed: pa.Table, threshold: float | None,
                                        embeddings: pa.Table) -> None:
    """Nothing lost: every removed item with a duplicate_of names a retained id; a duplicate's
    similarity to it (float64, from the embeddings) exceeds the threshold."""
    kept = set(retained.column("id").to_pylist())
    linked = removed.filter(pa.compute.is_valid(removed.column("duplicate_of")))
    assert set(linked.column("duplicate_of").to_pylist()) <= kept
    if threshold is None:
        return
    dup = linked.filter(pa.compute.equal(linked.column("reason"), "duplicate"))
    row = {i: r for r, i in enumerate(embeddings.column("id").to_pylist())}
    x = table_matrix(embeddings).astype(np.float64)  # float32 or float16, as stored
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    a = np.array([row[i] for i in dup.column("id").to_pylist()], int)
    b = np.array([row[i] for i in dup.column("duplicate_of").to_pylist()], int)
    sims = np.einsum("ij,ij->i", x[a], x[b]) if len(a) else np.zeros(0)
    assert np.all(sims > threshold - 1e-6)


def test_chain_on_s3_beats_random_on_ground_truth(ray_session, s3_bucket):
    root = f"s3://{s3_bucket}/select-chain"
    embeddings, ground_truth = synthetic_videos()
    publish_embeddings(storage.join(root, "embeddings"), embeddings)
    gt_uri = f"s3://{s3_bucket}/gt/ground_truth.parquet"
    storage.write_table(ground_truth, gt_uri)
    all_ids = set(embeddings.column("id").to_pylist())

    cluster.run(cluster.Config(output=root, k=30, max_iter=10, task_cpus=0.5))
    dedup.run(dedup.Config(output=root, task_cpus=0.5))  # keep: easy (MedDEL)

    extra = {"quality": {}, "outlier_quantile": 0.999}
    summary = select.run(select.Config(output=root, name="meddel5", target_ratio=0.05, ground_truth=gt_uri,
                                       deldist_rules=extra))
    retained, removed, full = read_selection(root, "meddel5")
    assert_partition(all_ids, retained, removed, full)
    assert summary["ratio"] == pytest.approx(0.05, abs=0.005)
    assert full["target_reachable"] and {"invalid", "duplicate"} <= set(full["removed_by_reason"])
    assert [(r["rule"], r["by"].split()[0]) for r in full["rules"]] == [
        ("quality", "deldist"), ("outlier_distance", "MedDEL"), ("outlier_quantile", "deldist"),
        ("duplicate", "MedDEL")]
    assert sum(r["removed"] for r in full["rules"]) == full["removed_count"]
    dup = removed.filter(pa.compute.equal(removed.column("reason"), "duplicate"))
    assert dup.column("duplicate_of").null_count == 0
    assert pa.compute.min(dup.column("max_sim")).as_py() > full["similarity_threshold"]
    assert_duplicates_point_at_retained(root, retained, removed, full["similarity_threshold"], embeddings)

    random_summary = select.run(select.Config(output=root, name="random5", method="random",
                                              match_selection="meddel5", ground_truth=gt_uri, seed=1))
    retained_r, removed_r, full_r = read_selection(root, "random5")
    assert_partition(all_ids, retained_r, removed_r, full_r)
    assert random_summary["kept_count"] == round(full["ratio"] * len(all_ids))

    ours, rand = full["ground_truth"], full_r["ground_truth"]
    assert ours["frames"] == len(all_ids) and ours["invalid_recall"] == 1.0
    assert ours["scene_coverage"] > rand["scene_coverage"]
    assert ours["invalid_recall"] > rand["invalid_recall"]
    assert ours["scene_coverage"] > ours["random_baseline"]["scene_coverage"]

    # the kept rule against a float64 brute force of the same rule, filters on
    select.run(select.Config(output=root, name="eps", eps=0.05, deldist_rules=extra))
    retained_e, removed_e, full_e = read_selection(root, "eps")
    assert_partition(all_ids, retained_e, removed_e, full_e)
    scores = storage.read_published(storage.join(root, "dedup", "scores"), ["id", "cluster", "rank"])
    scores = scores.take(pa.compute.index_in(embeddings.column("id"), value_set=scores.column("id")))
    x = embedding_matrix(embeddings.column("embedding"))
    filtered = set(removed_e.filter(pa.compute.not_equal(removed_e.column("reason"), "duplicate"))
                   .column("id").to_pylist())
    candidate = np.array([i not in filtered for i in embeddings.column("id").to_pylist()])
    ref_kept, _ = brute_force_kept(x, scores.column("cluster").to_numpy(), scores.column("rank").to_numpy(),
                                   candidate, 0.95)
    assert set(retained_e.column("id").to_pylist()) == set(np.asarray(embeddings.column("id"))[ref_kept])
    assert_duplicates_point_at_retained(root, retained_e, removed_e, 0.95, embeddings)
    # SemDeDup's rule on the same scores removes at least as much: also duplicates of removed items
    select.run(select.Config(output=root, name="any", eps=0.05, deldist_rules=extra, dedup_rule="any_earlier"))
    retained_a, removed_a, full_a = read_selection(root, "any")
    assert set(retained_a.column("id").to_pylist()) <= set(retained_e.column("id").to_pylist())
    assert full_a["dedup_rule"] == "any_earlier" and full_e["dedup_rule"] == "kept"

    select.run(select.Config(output=root, name="temporal", eps=0.1, task_cpus=0.5,
                             deldist_rules={**extra, "temporal_threshold": 0.98}))
    retained_t, removed_t, full_t = read_selection(root, "temporal")
    assert_partition(all_ids, retained_t, removed_t, full_t)
    saved = full_t["temporal"]
    assert saved["collapsed_frames"] == full_t["removed_by_reason"]["temporal"] > 0  # candidates only
    assert 0 < saved["pairwise_work_saved"] < 1
    temporal_rows = removed_t.filter(pa.compute.equal(removed_t.column("reason"), "temporal"))
    assert temporal_rows.column("duplicate_of").null_count == 0
    assert pa.compute.min(temporal_rows.column("max_sim")).as_py() > 0.98
    assert_duplicates_point_at_retained(root, retained_t, removed_t, 0.9, embeddings)


def test_eps_selection_and_bad_config(ray_session, tmp_path):
    embeddings, _ = synthetic_videos(seed=1, dim=16)
    root = str(tmp_path / "run")
    publish_embeddings(storage.join(root, "embeddings"), embeddings, parts=2)
    with pytest.raises(storage.NotPublishedError):
        select.run(select.Config(output=root, eps=0.1))
    cluster.run(cluster.Config(output=root, k=12, max_iter=5, task_cpus=0.5))
    dedup.run(dedup.Config(output=root, keep="easy", task_cpus=0.5))
    select.run(select.Config(output=root, name="eps", eps=0.1, outlier_distance=None))
    retained, removed, summary = read_selection(root, "eps")
    assert_partition(set(embeddings.column("id").to_pylist()), retained, removed, summary)
    assert set(summary["removed_by_reason"]) == {"duplicate"}
    assert summary["meddel_table2_ratio_at_this_threshold"] == 0.5
    with pytest.raises(ValueError, match="not both"):
        select.Config(output=root, eps=0.1, target_ratio=0.2)
    with pytest.raises(ValueError, match="exactly one"):
        select.Config(output=root, method="random")
    with pytest.raises(ValueError):
        select.Config(output=root, epsilon=0.1)  # typo: unknown keys are errors


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_kept_rule_run_with_the_exact_fallback_matches_brute_force(ray_session, tmp_path, dtype):
    """A select run whose short neighbour lists (2 + 2) leave clusters undecided: the Ray-wired
    exact fallback (vectors gathered once into scratch files, float16 kept as float16) gives
    the float64 reference's kept set at eps, in one wave or in many, and a target_ratio within
    its tolerance."""
    embeddings, _ = synthetic_videos(seed=2, dim=16)
    x = embedding_matrix(embeddings.column("embedding"))
    if dtype == "float16":
        x = x.astype(np.float16).astype(np.float32)  # what the stages read back
        embeddings = embeddings.set_column(embeddings.schema.get_field_index("embedding"),
                                           embeddings_schema(16, "float16").field("embedding"),
                                           embedding_array(x, "float16")).cast(embeddings_schema(16, "float16"))
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    root = str(tmp_path / "run")
    publish_embeddings(storage.join(root, "embeddings"), embeddings, parts=2, dtype=dtype)
    cluster.run(cluster.Config(output=root, k=6, max_iter=5, task_cpus=0.5))
    dedup.run(dedup.Config(output=root, keep="easy", neighbours_by_similarity=2, neighbours_by_rank=2,
                           task_cpus=0.5))
    select.run(select.Config(output=root, name="eps", eps=0.1, outlier_distance=None))
    retained, removed, summary = read_selection(root, "eps")
    assert summary["exact_fallback_clusters"] > 0 and summary["exact_fallback_gathers"] >= 1
    scores = storage.read_published(storage.join(root, "dedup", "scores"), ["id", "cluster", "rank"])
    row = {i: r for r, i in enumerate(embeddings.column("id").to_pylist())}
    order = np.array([row[i] for i in scores.column("id").to_pylist()])
    cluster_of, rank = np.empty(len(x), np.int64), np.empty(len(x), np.int64)
    cluster_of[order], rank[order] = scores.column("cluster").to_numpy(), scores.column("rank").to_numpy()
    ref_kept, _ = brute_force_kept(x, cluster_of, rank, np.ones(len(x), bool), 0.9)
    ids = np.array(embeddings.column("id").to_pylist())
    assert set(retained.column("id").to_pylist()) == set(ids[ref_kept])
    assert_duplicates_point_at_retained(root, retained, removed, 0.9, embeddings)
    assert not storage.exists(storage.join(root, "_scratch", "select", "eps"))  # the gathered vectors are gone

    # a budget of a few KB: the fallback's shuffle runs in several waves, one bucket file each
    select.run(select.Config(output=root, name="waves", eps=0.1, outlier_distance=None, memory_budget_gb=4e-6))
    waved, waved_removed, waved_summary = read_selection(root, "waves")
    assert waved_summary["exact_fallback_waves"] > 1 == summary["exact_fallback_waves"]
    assert set(waved.column("id").to_pylist()) == set(ids[ref_kept])
    assert sorted(waved_removed.column("duplicate_of").to_pylist(), key=str) == \
        sorted(removed.column("duplicate_of").to_pylist(), key=str)

    select.run(select.Config(output=root, name="ratio", target_ratio=0.3, outlier_distance=None))
    retained, removed, summary = read_selection(root, "ratio")
    assert summary["target_reachable"] and abs(summary["ratio"] - 0.3) <= 0.005 + 1 / len(x)
    assert_duplicates_point_at_retained(root, retained, removed, summary["similarity_threshold"], embeddings)


def test_kept_rule_on_many_shards_with_split_clusters_matches_brute_force(ray_session, tmp_path):
    """dedup splits the large clusters over several parts and select spreads the clusters over
    eight shards: the split clusters' parts meet in one shard and the kept set is the float64
    reference's, with filtered items and the exact fallback, at eps and at a target ratio (the
    other tests' small inputs run the one default shard in the driver)."""
    embeddings, _ = synthetic_videos(seed=5, dim=16)
    x = embedding_matrix(embeddings.column("embedding"))
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    root = str(tmp_path / "run")
    publish_embeddings(storage.join(root, "embeddings"), embeddings, parts=3)
    cluster.run(cluster.Config(output=root, k=5, max_iter=5, task_cpus=0.5))
    dedup.run(dedup.Config(output=root, keep="easy", neighbours_by_similarity=2, neighbours_by_rank=2,
                           split_rows=40, task_cpus=0.5))
    scores = storage.read_published(storage.join(root, "dedup", "scores"), ["id", "cluster", "rank"])
    sizes = np.bincount(scores.column("cluster").to_numpy())
    assert sizes.max() > 40  # a split cluster
    select.run(select.Config(output=root, name="shards", eps=0.1, kept_shards=8, deldist_rules={"quality": {}}))
    retained, removed, summary = read_selection(root, "shards")
    assert summary["kept_rule_shards"] > 1 and summary["exact_fallback_clusters"] > 0
    row = {i: r for r, i in enumerate(embeddings.column("id").to_pylist())}
    order = np.array([row[i] for i in scores.column("id").to_pylist()])
    cluster_of, rank = np.empty(len(x), np.int64), np.empty(len(x), np.int64)
    cluster_of[order], rank[order] = scores.column("cluster").to_numpy(), scores.column("rank").to_numpy()
    ids = np.array(embeddings.column("id").to_pylist())
    invalid = set(removed.filter(pa.compute.equal(removed.column("reason"), "invalid")).column("id").to_pylist())
    assert invalid and not set(retained.column("id").to_pylist()) & invalid
    candidate = ~np.isin(ids, list(invalid))
    ref_kept, _ = brute_force_kept(x, cluster_of, rank, candidate, 0.9)
    assert set(retained.column("id").to_pylist()) == set(ids[ref_kept])
    assert_duplicates_point_at_retained(root, retained, removed, 0.9, embeddings)

    select.run(select.Config(output=root, name="shards_ratio", target_ratio=0.4, kept_shards=8))
    retained, removed, summary = read_selection(root, "shards_ratio")
    assert summary["target_reachable"] and abs(summary["ratio"] - 0.4) <= 0.005 + 1 / len(x)
    assert_duplicates_point_at_retained(root, retained, removed, summary["similarity_threshold"], embeddings)


def test_relative_blur_rule_adapts_per_source():
    from deldist.rules import InvalidThresholds, group_median, invalid_mask, local_median

    groups = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    frames = np.array([0, 1, 2, 3, 0, 5, 10, 0])
    blur = np.array([100.0, 90.0, 10.0, 110.0, 8.0, 9.0, 1.0, 0.5])
    np.testing.assert_allclose(group_median(blur, groups), [95, 95, 95, 95, 8, 8, 8, 0.5])
    # a window wider than every source: the source's median
    np.testing.assert_allclose(local_median(blur, groups, frames, 8), [95, 95, 95, 95, 8, 8, 8, 0.5])
    rules = InvalidThresholds(min_brightness=None, max_dark=None, max_brightness=None,
                              max_saturated=None, min_contrast=None, blur_relative=0.2)
    quality = {"blur": blur}
    # 10 < 0.2 * 95 in source 0; 1 < 0.2 * 8 in source 1; a one-frame source is never flagged;
    # 8 and 9 are sharp for their (smooth) source though below source 0's blurred frame
    assert invalid_mask(quality, rules, groups, frames)["blurred"].tolist() == [False, False, True, False,
                                                                                 False, False, True, False]
    assert "blurred" not in invalid_mask(quality, rules, None)


def test_relative_blur_rule_judges_each_scene_by_its_own_texture():
    """One video: a textured scene (blur ~100) then a shorter smooth one (~8), one motion-blurred
    frame in each. The source median (~90) flags the whole smooth scene; with ``blur_window`` the
    median of the frames around each frame flags the two blurred frames only, in any order."""
    from deldist.rules import InvalidThresholds, invalid_mask, local_median

    rng = np.random.default_rng(0)
    blur = np.r_[rng.uniform(90, 110, 24), rng.uniform(7, 9, 16)]
    blur[5], blur[30] = 10.0, 1.0
    frames = np.arange(40) * 3  # every third decoded frame was sampled
    shuffle = rng.permutation(40)
    rules = InvalidThresholds(min_brightness=None, max_dark=None, max_brightness=None,
                              max_saturated=None, min_contrast=None, blur_relative=0.2, blur_window=8)
    flagged = invalid_mask({"blur": blur[shuffle]}, rules, np.zeros(40, np.int64), frames[shuffle])["blurred"]
    assert sorted(shuffle[flagged].tolist()) == [5, 30]
    # the default, whole-source median flags the smooth scene
    whole = rules.model_copy(update={"blur_window": None})
    flagged = invalid_mask({"blur": blur[shuffle]}, whole, np.zeros(40, np.int64), frames[shuffle])["blurred"]
    assert set(range(24, 40)) <= set(shuffle[flagged].tolist())
    # against a brute-force float64 reference
    ref = [np.median([blur[j] for j in range(max(0, i - 8), min(40, i + 9))]) for i in range(40)]
    got = local_median(blur[shuffle], np.zeros(40, np.int64), frames[shuffle], 8, chunk=7)
    np.testing.assert_allclose(got, np.asarray(ref)[shuffle])


def test_tables_written_by_shard_tasks_equal_the_in_memory_tables(ray_session, s3_bucket):
    """select writes retained/ with one Ray task per embeddings shard (each reads its own frame
    columns) and removed/ one range at a time: the published tables equal the in-memory ones
    row for row, the per-dataset counts equal a direct count, and ids that no longer match the
    embeddings are refused, not written."""
    from deldist import selection_tables
    from deldist.layout import RunLayout

    layout = RunLayout(f"s3://{s3_bucket}/tables-by-shard")  # the tasks write their parts to the bucket
    publish_embeddings(layout.embeddings, synthetic_videos()[0], parts=7)  # shards hold whole row groups: 7 tasks
    embeddings = storage.read_published(layout.embeddings)  # in the manifest's order, as select reads it
    ids = embeddings.column("id").combine_chunks()
    n = len(ids)
    rng = np.random.default_rng(3)
    decision = rules.Decision.empty(n)
    decision.remove(rng.random(n) < 0.2, "invalid", "quality", "deldist", {})
    duplicate = (rng.random(n) < 0.5) & (decision.reason < 0)
    link = rng.choice(np.flatnonzero((decision.reason < 0) & ~duplicate), n)
    decision.remove(duplicate, "duplicate", "duplicate", "test", {}, link=link,
                    score=rng.random(n).astype(np.float32))
    # a temporal removal linked to a frame removed later: its stand-in is that frame's stand-in
    later = np.flatnonzero(duplicate)[0]
    first_kept = np.flatnonzero((decision.reason < 0) & (np.arange(n) != link[later]))[0]
    decision.reason[first_kept], decision.link[first_kept] = rules.REASONS.index("temporal"), later
    stand_in = selection_tables.stand_in_rows(decision)
    assert stand_in[first_kept] == link[later] and (stand_in[decision.reason < 0] == -1).all()

    written = selection_tables.write_tables(layout, "parts", ids, decision, stand_in, part_rows=n // 7)
    expected = selection_tables.build_tables(ids, decision, selection_tables.ids_at(ids, stand_in), embeddings)
    for sub in ("retained", "removed"):
        table = storage.read_published(layout.selection_table("parts", sub))
        assert len(storage.read_manifest(layout.selection_table("parts", sub))["files"]) == 7
        assert table.equals(expected[sub]), sub
    kept = decision.reason < 0
    assert (written.retained, written.removed) == (int(kept.sum()), int((~kept).sum()))
    direct = selection_tables.dataset_counts(embeddings.column("dataset"), decision.reason)
    assert sorted(written.per_dataset) == sorted(direct) == ["c0", "c1"]
    for name in direct:
        assert np.array_equal(written.per_dataset[name], direct[name])
    summary = selection_tables.per_dataset_summary(written.per_dataset)
    assert sum(d["kept"] for d in summary.values()) == int(kept.sum())
    assert sum(sum(d["removed_by_reason"].values()) for d in summary.values()) == int((~kept).sum())

    shuffled = ids.take(pa.array(np.r_[np.arange(1, n), 0]))  # the same ids, another order
    with pytest.raises(rules.SelectionInvariantError, match="differ"):
        selection_tables.write_tables(layout, "stale", shuffled, decision, stand_in, part_rows=n // 7)
    with pytest.raises(rules.SelectionInvariantError, match="holds"):
        selection_tables.write_tables(layout, "stale", ids.slice(1), decision, stand_in, part_rows=n // 7)
    assert not storage.is_published(layout.selection("stale"))
