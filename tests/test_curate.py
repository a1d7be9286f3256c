"""``deldist curate`` end to end on the generator's "small" set, and selection quality on its
ground truth: MedDEL as the paper states it (no quality filter) keeps more scenes and removes
more invalid frames than the seeded random baseline at the same ratio; with deldist's rules
it removes at least the invalid frames the quality filter alone removes, and keeps more scenes
than the quality filter followed by a random sample of the same size.

Encoder: random-initialised ViT-Ti with mean pooling (``random_init: true``). Even these
features separate the synthetic scenes' tones and textures.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from deldist import storage
from deldist.config import load_config
from deldist.curate import Config, format_selection_table, run
from deldist.groundtruth import ground_truth_metrics
from invariants import assert_nothing_lost

RATIOS = (0.1, 0.2)


@pytest.fixture(scope="module")
def curated(ray_session, small_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("curate")
    cfg_path = out / "curate.yaml"
    selections = "\n".join(
        f"  - {{name: meddel_{int(r * 100)}, target_ratio: {r}}}\n"
        f"  - {{name: deldist_{int(r * 100)}, target_ratio: {r}, deldist_rules: {{quality: {{}}}}}}\n"
        f"  - {{name: random_{int(r * 100)}, method: random, match_selection: meddel_{int(r * 100)}}}"
        for r in RATIOS) + "\n  - {name: quality_only, outlier_distance: null, deldist_rules: {quality: {}}}"
    cfg_path.write_text(f"""
embed: {{model: vit_tiny_patch16_224, random_init: true, pooling: mean, stride: 2, segment_seconds: 4,
        batch_size: 32}}
cluster: {{k: 12, max_iter: 25, task_cpus: 0.5}}
dedup: {{task_cpus: 0.5}}
select:
{selections}
""")
    root = str(out / "run")
    cfg = load_config(Config, str(cfg_path), [f"input={small_sample / 'videos'}", f"output={root}",
                                              f"ground_truth={small_sample / 'ground_truth.parquet'}"],
                      section="curate")
    result = run(cfg)
    return root, result


def _summary(root: str, name: str) -> dict:
    return storage.read_json(storage.join(root, "selections", name, "summary.json"))


def test_every_id_exactly_once_in_each_selection(curated):
    root, result = curated
    all_ids = storage.read_published(storage.join(root, "embeddings"), columns=["id"]).column("id").to_pylist()
    assert len(all_ids) == len(set(all_ids)) == result["embed"]["frames"]
    for name in result["selections"]:
        sel = storage.join(root, "selections", name)
        kept = storage.read_published(storage.join(sel, "retained")).column("id").to_pylist()
        removed = storage.read_published(storage.join(sel, "removed")).column("id").to_pylist()
        assert not set(kept) & set(removed)
        assert sorted(kept + removed) == sorted(all_ids)
        summary = _summary(root, name)
        assert summary["kept_count"] == len(kept) and summary["input_count"] == len(all_ids)
        assert sum(summary["removed_by_reason"].values()) == len(removed)
        assert_nothing_lost(sel, all_ids)


@pytest.mark.parametrize("ratio", RATIOS)
def test_meddel_beats_random_on_ground_truth(curated, ratio):
    """The paper's MedDEL keeps more scenes than a random sample of the same size. Without a
    quality filter it does not remove invalid frames better than random: they are unlike the
    rest, so dedup keeps them (measured: recall 0.79 / 0.74 against random's 0.89 / 0.84)."""
    root, _ = curated
    meddel = _summary(root, f"meddel_{int(ratio * 100)}")
    random = _summary(root, f"random_{int(ratio * 100)}")
    print(format_selection_table([meddel, random]))
    assert [r["rule"] for r in meddel["rules"]] == ["outlier_distance", "duplicate"]
    assert meddel["ratio"] == pytest.approx(ratio, abs=0.005)
    assert random["kept_count"] == meddel["kept_count"]
    gt, gt_random = meddel["ground_truth"], random["ground_truth"]
    assert gt["scene_coverage"] > gt_random["scene_coverage"] + 0.1
    # the random baseline inside MedDEL's own summary is the same ablation, seeded
    assert gt["scene_coverage"] > gt["random_baseline"]["scene_coverage"] + 0.1


def test_deldist_rules_against_the_quality_filter_alone(curated):
    """MedDEL + deldist's quality filter removes every invalid frame the filter alone removes
    (more than MedDEL without it), and at the same size keeps more scenes than the filter
    followed by a random sample."""
    root, _ = curated
    ratio = RATIOS[0]
    ours = _summary(root, f"deldist_{int(ratio * 100)}")
    alone = _summary(root, "quality_only")
    print(format_selection_table([ours, alone]))
    assert [(r["rule"], r["by"]) for r in alone["rules"]] == [("quality", "deldist")]
    assert ours["ratio"] == pytest.approx(ratio, abs=0.005)
    assert ours["ground_truth"]["invalid_recall"] >= alone["ground_truth"]["invalid_recall"] > 0.5
    paper = _summary(root, f"meddel_{int(ratio * 100)}")
    assert ours["ground_truth"]["invalid_recall"] > paper["ground_truth"]["invalid_recall"]
    # the filter, then seeded samples down to our size from the frames it kept
    ids = np.asarray(storage.read_published(storage.join(root, "embeddings"), ["id"]).column("id"))
    passed = np.isin(ids, np.asarray(storage.read_published(
        storage.join(root, "selections", "quality_only", "retained")).column("id")))
    gt = pq.read_table(ours["parameters"]["ground_truth"])
    rng = np.random.default_rng(0)
    coverage = []
    for _ in range(20):
        kept = np.zeros(len(ids), bool)
        kept[rng.permutation(np.flatnonzero(passed))[: ours["kept_count"]]] = True
        coverage.append(ground_truth_metrics(ids, kept, gt, random_seed=None)["scene_coverage"])
    assert ours["ground_truth"]["scene_coverage"] > np.mean(coverage)
