"""deldist.select: thresholds, target ratios, filters, the partition invariant, ground-truth
metrics, and the whole cluster -> dedup -> select chain on the moto S3 bucket."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from deldist import cluster, dedup, select, storage
from deldist.schema import QUALITY_COLUMNS, embeddings_schema

# ----------------------------------------------------------------------------- pure functions


def test_threshold_for_ratio_keeps_the_requested_fraction():
    rng = np.random.default_rng(0)
    n = 1000
    max_sim = rng.random(n).astype(np.float32)
    first = np.zeros(n, bool)
    first[::50] = True  # 20 first-ranked items
    for ratio in (0.05, 0.10, 0.20, 0.33, 0.50):
        reason, info = select.decide(n, first=first, max_sim=max_sim, target_ratio=ratio)
        kept = reason < 0
        assert kept.sum() == round(ratio * n)
        assert kept[first].all()
        # the same threshold given as eps reproduces the same selection
        again, _ = select.decide(n, first=first, max_sim=max_sim, eps=info["eps"])
        assert np.array_equal(again, reason)


def test_threshold_for_ratio_reports_unreachable_targets():
    first = np.array([True, False, True, False])
    max_sim = np.array([0, 0.5, 0, 0.9], np.float32)
    reason, info = select.decide(4, first=first, max_sim=max_sim, target_ratio=0.25)
    assert (reason < 0).sum() == 2 and not info["target_reachable"]  # first-ranked items always stay
    invalid = np.array([False, True, False, True])
    reason, info = select.decide(4, first=first, max_sim=max_sim, target_ratio=1.0, invalid=invalid)
    assert (reason < 0).sum() == 2 and not info["target_reachable"]


def test_eps_threshold_and_filter_order():
    max_sim = np.array([0, 0.95, 0.85, 0.99, 0.5], np.float32)
    first = np.array([True, False, False, False, False])
    outlier = np.array([False, False, False, True, True])
    invalid = np.array([False, False, False, False, True])
    reason, info = select.decide(5, first=first, max_sim=max_sim, eps=0.1, invalid=invalid, outlier=outlier)
    names = [None if r < 0 else select.REASONS[r] for r in reason]
    assert names == [None, "duplicate", None, "outlier", "invalid"]
    assert info["similarity_threshold"] == pytest.approx(0.9)


def test_outlier_mask_absolute_and_per_cluster_quantile():
    cluster_ids = np.array([0, 0, 0, 0, 0, 1, 1, 2])
    distance = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.05, 0.5, 0.7])
    assert select.outlier_mask(cluster_ids, distance, max_distance=0.45).tolist() == \
        [False, False, False, False, True, False, True, True]
    q = select.outlier_mask(cluster_ids, distance, quantile=0.75)
    # cluster 0: 75th percentile 0.4 -> only 0.9 above; cluster 1: 0.3875 -> 0.5 above; singleton never
    assert q.tolist() == [False, False, False, False, True, False, True, False]


def test_invalid_rules():
    quality = {"brightness": np.array([0.5, 0.01, 0.97, 0.5, 0.5, np.nan]),
               "dark": np.array([0.1, 0.99, 0.0, 0.1, 0.1, np.nan]),
               "saturated": np.array([0.0, 0.0, 0.8, 0.0, 0.0, np.nan]),
               "contrast": np.array([0.2, 0.0, 0.01, 0.005, 0.2, np.nan]),
               "blur": np.array([500.0, 0.0, 1.0, 300.0, 3.0, np.nan])}
    rules = select.InvalidThresholds(min_blur=10.0)
    masks = select.invalid_mask(quality, rules)
    assert masks["dark"].tolist() == [False, True, False, False, False, False]
    assert masks["overexposed"].tolist() == [False, False, True, False, False, False]
    assert masks["flat"].tolist() == [False, True, False, True, False, False]
    assert masks["blurred"].tolist() == [False, True, True, False, True, False]  # unknown (NaN) never fires
    assert "blurred" not in select.invalid_mask(quality, select.InvalidThresholds())


def test_temporal_collapse_compares_to_the_kept_frame():
    e = np.eye(4, dtype=np.float32)
    drift = [e[0], (e[0] + 0.2 * e[1]), (e[0] + 0.4 * e[1]), (e[0] + 0.8 * e[1]), e[2], e[2], e[3]]
    x = np.array([v / np.linalg.norm(v) for v in drift], np.float32)
    rep, sim = select.temporal_collapse(x, threshold=0.9)
    # frames 1, 2 collapse into 0; 3 drifted too far from 0 (not from 2): kept; 5 into 4
    assert rep.tolist() == [-1, 0, 0, -1, -1, 4, -1]
    assert sim[1] == pytest.approx(float(x[1] @ x[0])) and sim[0] == 0
    long_static = np.repeat(x[:1], 100, axis=0)
    rep, _ = select.temporal_collapse(long_static, threshold=0.99)
    assert rep[0] == -1 and (rep[1:] == 0).all()


def test_random_decision_is_exact_seeded_and_order_free():
    ids = pa.array([f"id{i}" for i in range(200)])
    reason = select.random_decision(ids, 0.2, seed=4)
    assert (reason < 0).sum() == 40
    perm = np.random.default_rng(1).permutation(200)
    again = select.random_decision(ids.take(pa.array(perm)), 0.2, seed=4)
    assert np.array_equal(again, reason[perm])
    assert not np.array_equal(select.random_decision(ids, 0.2, seed=5), reason)


def test_check_partition():
    ids = pa.array(["a", "b", "c"])
    select.check_partition(ids, pa.array(["a"]), pa.array(["c", "b"]))
    with pytest.raises(select.SelectionInvariantError):
        select.check_partition(ids, pa.array(["a", "b"]), pa.array(["b"]))
    with pytest.raises(select.SelectionInvariantError):
        select.check_partition(ids, pa.array(["a", "b"]), pa.array(["x"]))
    with pytest.raises(select.SelectionInvariantError):
        select.check_partition(ids, pa.array(["a"]), pa.array(["b"]))


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
    m = select.ground_truth_metrics(ids, kept, gt)
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
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), dim),
        "brightness": pa.array(rows["brightness"], pa.float32()),
        "contrast": pa.array(np.full(n, 0.2), pa.float32()), "blur": pa.array(np.full(n, 200.0), pa.float32()),
        "saturated": pa.array(np.zeros(n), pa.float32()), "dark": pa.array(rows["dark"], pa.float32()),
    }, schema=embeddings_schema(dim))
    assert set(QUALITY_COLUMNS) <= set(embeddings.column_names)
    ground_truth = pa.table({"source_key": rows["source_key"], "frame_index": pa.array(rows["frame_index"], pa.int64()),
                             "scene_id": rows["scene_id"], "segment_id": rows["segment_id"],
                             "invalid": rows["invalid"], "invalid_kind": rows["invalid_kind"]})
    return embeddings, ground_truth


def publish_embeddings(emb_dir: str, table: pa.Table, parts: int = 3) -> None:
    files = []
    for rows in np.array_split(np.arange(table.num_rows), parts):
        path = storage.join(emb_dir, storage.new_part_name())
        storage.write_table(table.take(pa.array(rows)), path)
        files.append(storage.resolve(path)[1])
    dim = table.schema.field("embedding").type.list_size
    storage.publish(emb_dir, files, {"dim": dim, "model": "synthetic", "schema": storage.schema_hex(table.schema)})


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


def test_chain_on_s3_beats_random_on_ground_truth(ray_session, s3_bucket):
    root = f"s3://{s3_bucket}/select-chain"
    embeddings, ground_truth = synthetic_videos()
    publish_embeddings(storage.join(root, "embeddings"), embeddings)
    gt_uri = f"s3://{s3_bucket}/gt/ground_truth.parquet"
    storage.write_table(ground_truth, gt_uri)
    all_ids = set(embeddings.column("id").to_pylist())

    cluster.run(cluster.Config(output=root, k=30, max_iter=10, task_cpus=0.5))
    dedup.run(dedup.Config(output=root, keep="hard", task_cpus=0.5))

    summary = select.run(select.Config(output=root, name="meddel5", target_ratio=0.05, ground_truth=gt_uri,
                                       outlier_quantile=0.999))
    retained, removed, full = read_selection(root, "meddel5")
    assert_partition(all_ids, retained, removed, full)
    assert summary["ratio"] == pytest.approx(0.05, abs=0.005)
    assert full["target_reachable"] and {"invalid", "duplicate", "outlier"} <= set(full["removed_by_reason"])
    dup = removed.filter(pa.compute.equal(removed.column("reason"), "duplicate"))
    assert dup.column("duplicate_of").null_count == 0
    assert pa.compute.min(dup.column("max_sim")).as_py() > full["similarity_threshold"]

    random_summary = select.run(select.Config(output=root, name="random5", method="random",
                                              match_selection="meddel5", ground_truth=gt_uri, seed=1))
    retained_r, removed_r, full_r = read_selection(root, "random5")
    assert_partition(all_ids, retained_r, removed_r, full_r)
    assert random_summary["kept_count"] == round(full["ratio"] * len(all_ids))

    ours, rand = full["ground_truth"], full_r["ground_truth"]
    print("COVERAGE", ours["scene_coverage"], rand["scene_coverage"], ours["random_baseline"]["scene_coverage"], full["removed_by_reason"])
    assert ours["frames"] == len(all_ids) and ours["invalid_recall"] == 1.0
    assert ours["scene_coverage"] > rand["scene_coverage"]
    assert ours["invalid_recall"] > rand["invalid_recall"]
    assert ours["scene_coverage"] > ours["random_baseline"]["scene_coverage"]

    select.run(select.Config(output=root, name="temporal", eps=0.1, temporal_threshold=0.98, task_cpus=0.5))
    retained_t, removed_t, full_t = read_selection(root, "temporal")
    assert_partition(all_ids, retained_t, removed_t, full_t)
    saved = full_t["temporal"]
    assert saved["collapsed_frames"] >= full_t["removed_by_reason"]["temporal"] > 0  # some were invalid first
    assert 0 < saved["pairwise_work_saved"] < 1 and 0 <= saved["also_semantic_duplicates"] <= 1
    temporal_rows = removed_t.filter(pa.compute.equal(removed_t.column("reason"), "temporal"))
    assert temporal_rows.column("duplicate_of").null_count == 0
    assert pa.compute.min(temporal_rows.column("max_sim")).as_py() > 0.98


def test_eps_selection_and_bad_config(ray_session, tmp_path):
    embeddings, _ = synthetic_videos(seed=1, dim=16)
    root = str(tmp_path / "run")
    publish_embeddings(storage.join(root, "embeddings"), embeddings, parts=2)
    with pytest.raises(storage.NotPublishedError):
        select.run(select.Config(output=root, eps=0.1))
    cluster.run(cluster.Config(output=root, k=12, max_iter=5, task_cpus=0.5))
    dedup.run(dedup.Config(output=root, keep="easy", task_cpus=0.5))
    select.run(select.Config(output=root, name="eps", eps=0.1, invalid=None))
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


def test_relative_blur_rule_adapts_per_source():
    from deldist.select import InvalidThresholds, group_median, invalid_mask, local_median

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
    from deldist.select import InvalidThresholds, invalid_mask, local_median

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
