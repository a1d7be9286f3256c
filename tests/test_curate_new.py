"""``deldist curate-new``: a second batch of uploads curated against a curated corpus.

The corpus is the generator's tiny set curated with a random-initialised ViT-Ti (mean pooled,
``random_init: true``). The uploads hold (a) a byte-exact re-upload of a corpus video under a
new container (remuxed: the same frames, other bytes), (b) a re-encoded, slightly brightened
copy of another corpus video (near-duplicates of its frames), (c) a video of new content (the
generator with another seed) and (d) a byte-identical copy of a corpus video under a new name.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from deldist import sample, sample_scenes, storage, versions
from deldist.config import load_config
from deldist.curate import Config as CurateConfig
from deldist.curate import run as run_curate
from deldist.curate_new import Config, run
from deldist.rules import cluster_quantiles
from deldist.versions import read_version, retained_roots
from invariants import assert_tables_open_everywhere

SELECTION = "meddel_30"


def test_retained_roots_follows_chains():
    ids = pa.array(["r1", "r2", "a", "b", "c", "d", "x", "e"])
    parent = pa.array([None, None, "r1", "a", "b", "x", None, "missing"])
    retained = np.array([1, 1, 0, 0, 0, 0, 0, 0], bool)
    # c -> b -> a -> r1; d -> x (x removed for another reason: no root); e -> an unknown id
    assert retained_roots(ids, parent, retained).to_pylist() == ["r1", "r2", "r1", "r1", "r1", None, None, None]
    cyc = retained_roots(pa.array(["p", "q"]), pa.array(["q", "p"]), np.zeros(2, bool))
    assert cyc.to_pylist() == [None, None]


def test_cluster_quantiles_match_numpy():
    rng = np.random.default_rng(0)
    cluster = rng.integers(0, 5, 200)
    distance = rng.random(200)
    got = cluster_quantiles(cluster, distance, 0.9, k=6)
    for c in range(5):
        assert got[c] == pytest.approx(np.quantile(distance[cluster == c], 0.9), abs=1e-12)
    assert np.isnan(got[5])


def _transcode(src, dst, delta: int = 1) -> None:
    """Decode ``src``, add ``delta`` to every pixel and encode with other settings: near-duplicates."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        vin = inp.streams.video[0]
        stream = out.add_stream("libx264", rate=int(round(vin.average_rate)))
        stream.width, stream.height, stream.pix_fmt = vin.width, vin.height, "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast"}
        for frame in inp.decode(vin):
            rgb = np.clip(frame.to_ndarray(format="rgb24").astype(np.int16) + delta, 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _remux(src, dst) -> None:
    """Re-export ``src`` into a new container without re-encoding (a tagged title): the same
    frames, other bytes, as an export tool writes them."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mp4") as out:
        out.metadata["title"] = f"re-export {Path(dst).name}"
        vin = inp.streams.video[0]
        stream = out.add_stream_from_template(vin)
        for packet in inp.demux(vin):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    assert Path(dst).read_bytes() != Path(src).read_bytes()


def _new_content(dst) -> int:
    """One video of content the corpus has never seen (the tiny plan with another seed)."""
    plan = sample_scenes.plan_dataset("tiny", seed=123)[0]
    frames = (f for f, _ in sample_scenes.iter_video_frames(plan))
    return sample.encode_video(dst, frames, plan.width, plan.height, sample_scenes.FPS, sample.video_codec())


@pytest.fixture(scope="module")
def corpus(ray_session, tiny_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("curate_new")
    cfg_path = out / "curate.yaml"
    cfg_path.write_text(f"""
embed: {{model: vit_tiny_patch16_224, random_init: true, pooling: mean, stride: 2, segment_seconds: 4,
        batch_size: 32}}
cluster: {{k: 4, max_iter: 20, task_cpus: 0.5}}
dedup: {{task_cpus: 0.5}}
select:
  - {{name: {SELECTION}, target_ratio: 0.3,
     deldist_rules: {{quality: {{}}, outlier_quantile: 0.98, near_copy: {{}}}}}}
""")
    root = str(out / "run")
    cfg = load_config(CurateConfig, str(cfg_path), [f"input={tiny_sample / 'videos'}", f"output={root}"],
                      section="curate")
    run_curate(cfg)
    videos = sorted((tiny_sample / "videos").rglob("*.mp4"))
    uploads = out / "uploads"
    (uploads / "site_x").mkdir(parents=True)
    _remux(videos[0], uploads / "site_x" / "reupload.mp4")  # (a)
    _transcode(videos[1], uploads / "site_x" / "reencoded.mp4")  # (b)
    _new_content(uploads / "site_x" / "fresh.mp4")  # (c)
    shutil.copy(videos[2], uploads / "site_x" / "same_bytes.mp4")  # (d)
    new_cfg = Config(corpus=root, selection=SELECTION, input=str(uploads), embed={"batch_size": 32},
                     task_cpus=0.5)
    first = run(new_cfg)
    return {"root": root, "cfg": cfg, "new_cfg": new_cfg, "first": first, "uploads": uploads, "videos": videos,
            "sample": tiny_sample}


def _key(frame_id: str) -> str:
    return frame_id.split("#")[0]


def test_second_batch_removes_copies_and_keeps_new_content(corpus):
    root, first = corpus["root"], corpus["first"]
    assert first["version"] == 2 and first["changed"] and first["new_sources"] == 3
    assert first["identical_sources"] == 1
    v1_retained = set(read_version(root, SELECTION, "retained", 1).column("id").to_pylist())
    v1_removed = read_version(root, SELECTION, "removed", 1)
    removed = read_version(root, SELECTION, "removed", 2).to_pylist()
    retained = set(read_version(root, SELECTION, "retained", 2).column("id").to_pylist())
    new_removed = {r["id"]: r for r in removed if r["id"].startswith("v2/")}
    new_retained = {i for i in retained if i.startswith("v2/")}
    batch_ids = storage.read_published(storage.join(root, "curated", SELECTION, "batches", "v2",
                                                    "embeddings"), ["id"]).column("id").to_pylist()
    by_video = {name: [i for i in batch_ids if _key(i) == f"v2/site_x/{name}.mp4"]
                for name in ("reupload", "reencoded", "fresh")}
    assert all(by_video.values())
    threshold = storage.read_json(storage.join(versions.version_dir(root, SELECTION, 2), "summary.json"))[
        "similarity_threshold"]
    for name in ("reupload", "reencoded"):  # (a), (b): every frame removed
        frames = by_video[name]
        assert not set(frames) & new_retained, name
        copies = [new_removed[i] for i in frames if new_removed[i]["reason"] in ("duplicate", "near_copy")]
        assert len(copies) >= 0.8 * len(frames), (name, [new_removed[i]["reason"] for i in frames])
        for r in copies:  # each stands for an old retained frame (nothing lost)
            assert r["duplicate_of"] in v1_retained, r
            if r["reason"] == "duplicate":  # a duplicate of a kept frame, above the corpus threshold
                assert r["max_sim"] > threshold
    # (a): the re-uploads of retained frames are near copies at Hamming distance 0
    exact = [new_removed[i] for i in by_video["reupload"] if new_removed[i]["reason"] == "near_copy"]
    assert exact and all(r["max_sim"] == 1.0 for r in exact)
    summary = storage.read_json(storage.join(versions.version_dir(root, SELECTION, 2), "summary.json"))
    rules = [r["rule"] for r in summary["batch"]["rules"]]
    assert rules[:3] == ["quality", "outlier_distance", "outlier_quantile"] and rules[-2:] == ["near_copy", "duplicate"]
    assert set(rules[3:-2]) <= {"copy_of_rejected"}
    # (a) frame by frame: a re-upload of a frame the corpus rejected for its own sake is rejected
    # again for that reason (deldist's copy_of_rejected); every other one is a copy
    original = corpus["videos"][0].relative_to(corpus["sample"] / "videos").as_posix()
    v1_reason = dict(zip(v1_removed.column("id").to_pylist(), v1_removed.column("reason").to_pylist()))
    for i in by_video["reupload"]:
        before = v1_reason.get(f"{original}#{i.split('#')[1]}")
        expected = {before} if before in ("invalid", "outlier") else {"near_copy", "duplicate"}
        assert new_removed[i]["reason"] in expected, (i, before, new_removed[i])
    # (c): new content is kept: every scene with frames that pass the filters keeps one, and no
    # frame is removed as a duplicate of a corpus frame
    fresh = by_video["fresh"]
    old_ids = v1_retained | set(v1_removed.column("id").to_pylist())
    assert not [i for i in fresh if i in new_removed and new_removed[i]["duplicate_of"] in old_ids]
    scene_of = sample_scenes.frame_labels(sample_scenes.plan_dataset("tiny", seed=123)[0])["scene_id"]
    passed = {scene_of[int(i.split("#")[1])] for i in fresh
              if i in new_retained or new_removed[i]["reason"] in ("duplicate", "near_copy")}
    covered = {scene_of[int(i.split("#")[1])] for i in fresh if i in new_retained}
    assert passed and covered == passed


def test_versions_readable_and_every_id_once(corpus):
    root = corpus["root"]
    sel = storage.join(root, "selections", SELECTION)
    for table in ("retained", "removed"):  # v1 is the selection, untouched
        assert sorted(read_version(root, SELECTION, table, 1).column("id").to_pylist()) == \
            sorted(storage.read_published(storage.join(sel, table)).column("id").to_pylist())
    corpus_ids = storage.read_published(storage.join(root, "embeddings"), ["id"]).column("id").to_pylist()
    batch_ids = storage.read_published(storage.join(root, "curated", SELECTION, "batches", "v2",
                                                    "embeddings"), ["id"]).column("id").to_pylist()
    kept = read_version(root, SELECTION, "retained", 2).column("id").to_pylist()
    removed = read_version(root, SELECTION, "removed", 2).column("id").to_pylist()
    assert not set(kept) & set(removed)
    assert sorted(kept + removed) == sorted(corpus_ids + batch_ids)
    summary = storage.read_json(storage.join(versions.version_dir(root, SELECTION), "summary.json"))
    assert summary["version"] == 2 and summary["kept_count"] == len(kept)
    assert summary["input_count"] == len(corpus_ids) + len(batch_ids)
    assert sum(summary["removed_by_reason"].values()) == len(removed)
    batch = summary["batch"]
    assert batch["frames"] == len(batch_ids) and 0.0 <= batch["drift_fraction"] <= 1.0
    sources = read_version(root, SELECTION, "sources", 2)
    assert sources.num_rows == len(corpus["videos"]) + 4
    # (d) was not embedded: reported with the corpus video it copies, and every hash is the file's
    rows = {r["source"]: r for r in sources.to_pylist()}
    same = rows[str(corpus["uploads"] / "site_x" / "same_bytes.mp4")]
    assert same["status"] == "identical" and same["frames"] == 0 and same["copy_of"] == str(corpus["videos"][2])
    assert not [i for i in batch_ids if "same_bytes" in i]
    for uri in (str(corpus["videos"][2]), str(corpus["uploads"] / "site_x" / "reupload.mp4")):
        assert rows[uri]["sha256"] == hashlib.sha256(Path(uri).read_bytes()).hexdigest()
    assert same["sha256"] == rows[same["copy_of"]]["sha256"]
    assert summary["batch"]["identical_sources"] == [{"source": same["source"], "copy_of": same["copy_of"]}]


def test_rerun_is_a_noop_and_a_new_upload_makes_v3(corpus):
    root, cfg = corpus["root"], corpus["new_cfg"]
    cur = storage.join(root, "curated", SELECTION)
    before = sorted(storage.list_files(cur))
    again = run(cfg)
    assert again == {"version": 2, "changed": False, "new_sources": 0, "identical_sources": 0,
                     "path": versions.version_dir(root, SELECTION)}
    assert sorted(storage.list_files(cur)) == before
    # one more upload: only it is embedded; v2 stays as it was
    _remux(corpus["videos"][2], corpus["uploads"] / "site_x" / "another_copy.mp4")
    third = run(cfg)
    assert third["version"] == 3 and third["new_sources"] == 1
    assert versions.latest_version(root, SELECTION) == 3
    v3_ids = read_version(root, SELECTION, "removed", 3).column("id").to_pylist()
    assert not [i for i in read_version(root, SELECTION, "retained", 3).column("id").to_pylist() if i.startswith("v3/")]
    assert any(i.startswith("v3/site_x/another_copy.mp4#") for i in v3_ids)
    assert sorted(storage.list_files(storage.join(cur, "v2"))) == sorted(f for f in before if "/v2/" in f and "/batches/" not in f)


def test_other_encoder_is_refused(corpus):
    cfg = corpus["new_cfg"].model_copy(update={"embed": {"pooling": "cls"}})
    _remux(corpus["videos"][0], corpus["uploads"] / "site_x" / "zz_other.mp4")
    try:
        with pytest.raises(ValueError, match="other settings"):
            run(cfg)
    finally:
        (corpus["uploads"] / "site_x" / "zz_other.mp4").unlink()


def test_recluster_by_flag_publishes_a_reclustered_version(corpus):
    root = corpus["root"]
    before = versions.latest_version(root, SELECTION)
    _remux(corpus["videos"][1], corpus["uploads"] / "site_x" / "late_copy.mp4")
    cfg = corpus["new_cfg"].model_copy(update={"recluster": True, "recluster_above": 0.0,
                                               "cluster": {"k": 4, "max_iter": 10, "task_cpus": 0.5},
                                               "dedup": {"task_cpus": 0.5}})
    result = run(cfg)
    assert result["recluster_recommended"] and result["version"] == before + 2
    assert versions.latest_version(root, SELECTION) == before + 2
    manifest = storage.read_manifest(versions.version_dir(root, SELECTION))
    assert manifest["reclustered_from"] == before + 1 and "recluster-v" in manifest["clusters"]
    batch_ids = []
    for v in range(2, before + 2):
        emb = storage.join(root, "curated", SELECTION, "batches", f"v{v}", "embeddings")
        if storage.is_published(emb):
            batch_ids += storage.read_published(emb, ["id"]).column("id").to_pylist()
    corpus_ids = storage.read_published(storage.join(root, "embeddings"), ["id"]).column("id").to_pylist()
    kept = read_version(root, SELECTION, "retained").column("id").to_pylist()
    removed = read_version(root, SELECTION, "removed").column("id").to_pylist()
    assert sorted(kept + removed) == sorted(corpus_ids + batch_ids)
    summary = storage.read_json(storage.join(versions.version_dir(root, SELECTION), "summary.json"))
    # the selection's own rules on the union: 30 %, unless the copies leave fewer candidates,
    # then every candidate stays and the summary says so
    if summary["target_reachable"]:
        assert summary["ratio"] == pytest.approx(0.3, abs=0.005)
    else:
        assert summary["ratio"] < 0.3 and "duplicate" not in summary["removed_by_reason"]
        assert "pass the earlier rules" in summary["target_unreachable_because"]
    # the sources ledger carries over: the same uploads are a no-op now
    assert run(corpus["new_cfg"])["changed"] is False


def test_every_published_table_opens_on_its_own(corpus):
    """Corpus tables, curated versions (their parent's rows copied in, not referenced through
    ``../``), batches and the recluster run: pandas, pyarrow.dataset, duckdb and polars each
    read the rows the manifest lists, and no progress records sit inside a table."""
    root = corpus["root"]
    checked = assert_tables_open_everywhere(root)
    assert checked >= 12
    for v in range(1, versions.latest_version(root, SELECTION) + 1):
        for table in ("retained", "removed", "sources"):
            manifest = storage.read_manifest(storage.join(versions.version_dir(root, SELECTION, v), table))
            assert not [f for f in manifest["files"] if f.startswith("..")]
    # v2 holds v1's rows itself: deleting v1 leaves v2 whole
    v2_retained = storage.join(versions.version_dir(root, SELECTION, 2), "retained")
    v1_ids = set(read_version(root, SELECTION, "retained", 1).column("id").to_pylist())
    assert v1_ids <= set(pd.read_parquet(v2_retained).id)
    assert not list(Path(root, "embeddings").rglob("*progress*"))


def test_dry_run_of_dedup_reads_the_real_cluster_sizes(corpus, tmp_path):
    from deldist import cli

    root = corpus["root"]
    assert cli.main(["dedup", f"output={root}", "--dry-run", "--json", str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    clusters = storage.read_published(storage.join(root, "clusters", "assignments"), ["cluster"]).column("cluster")
    sizes = np.bincount(clusters.to_numpy())
    assert plan["estimate"]["dedup"]["sum_cluster_size_squared"] == float((sizes.astype(float) ** 2).sum())
    assert plan["inputs"]["frames"] == len(clusters)


def test_cli_chain_reports_progress_on_stderr(corpus, tmp_path, capsys):
    """cluster, dedup and select from the CLI on the corpus's embeddings: a line per Lloyd
    pass, the scoring tasks counted, each rule's removals, the JSON alone on stdout."""
    from deldist import cli

    common = [f"output={tmp_path / 'run'}", f"embeddings={storage.join(corpus['root'], 'embeddings')}",
              "--no-verify"]
    assert cli.main(["cluster", *common, "k=4", "max_iter=5", "tol=0", "task_cpus=0.5"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["k"] == 4
    assert [line for line in err.splitlines() if "deldist cluster: pass " in line][-1].startswith(
        "deldist cluster: pass 5/5: objective ")
    assert "deldist cluster: assignment tasks: " in err
    assert cli.main(["dedup", *common, "task_cpus=0.5"]) == 0
    out, err = capsys.readouterr()
    tasks = re.findall(r"deldist dedup: scoring tasks: (\d+)/(\d+) done", err)  # the last line: all done
    assert tasks and tasks[-1][0] == tasks[-1][1] and json.loads(out)
    assert cli.main(["select", *common, "name=s", "eps=0.1", "deldist_rules.quality={}"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert f"deldist select s: kept {result['kept_count']} of {result['input_count']}" in err
    assert re.search(r"deldist select s: quality \(deldist\) removed \d+", err)
    assert re.search(r"deldist select s: duplicate \(.*\) removed \d+", err)
