"""DAD and EL2N pruning: the scores against hand-computed values on crafted predictions, every
mode on a crafted score table, and the recording in the real Ray Train finetune loop through
``deldist prune`` to a selection that finetune and report take."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from deldist import finetune, importance, labelled, prune, report, storage, verify
from deldist.layout import RunLayout

MODEL = "deldist_vit_micro_patch16"


def _logits(fg: list[list[float]]) -> torch.Tensor:
    """(1, 2, H, W) logits: background 0, foreground the given values."""
    f = torch.tensor(fg, dtype=torch.float32)
    return torch.stack([torch.zeros_like(f), f])[None]


def test_argmax_dice_by_hand():
    # predicted foreground where the logit > 0: {(0, 0), (1, 0)}; target {(0, 0), (0, 1)}
    a, ta = _logits([[2.0, -1.0], [0.5, -3.0]]), torch.tensor([[[1, 1], [0, 0]]])
    assert importance.argmax_dice(a, ta).tolist() == [pytest.approx(2 * 1 / (2 + 2))]
    empty = torch.zeros((1, 2, 2), dtype=torch.long)
    assert importance.argmax_dice(_logits([[-1.0, -1.0], [-1.0, -1.0]]), empty).tolist() == [1.0]  # nothing to find
    missed = torch.tensor([[[0, 0], [0, 1]]])
    assert importance.argmax_dice(_logits([[-1.0, -1.0], [-1.0, -1.0]]), missed).tolist() == [0.0]
    both = importance.argmax_dice(torch.cat([a, _logits([[1.0, 1.0], [1.0, 1.0]])]), torch.cat([ta, missed]))
    assert both.tolist() == [pytest.approx(0.5), pytest.approx(2 * 1 / (4 + 1))]


def test_pixel_el2n_by_hand():
    # pixel 1: logits (0, 0) -> p = (0.5, 0.5), target 0: error (-0.5, 0.5), norm sqrt(0.5)
    # pixel 2: logits (0, -ln 3) -> p = (0.75, 0.25), target 1: error (0.75, -0.75), norm 0.75 sqrt(2)
    logits = _logits([[0.0, -math.log(3.0)]])
    target = torch.tensor([[[0, 1]]])
    expected = (math.sqrt(0.5) + 0.75 * math.sqrt(2)) / 2
    assert importance.pixel_el2n(logits, target).tolist() == [pytest.approx(expected, abs=1e-6)]
    # a confident correct prediction has ~0 error
    assert importance.pixel_el2n(_logits([[30.0]]), torch.tensor([[[1]]])).item() < 1e-6


def test_window_mean_by_hand():
    sample = np.array([0, 0, 0, 1, 1, 2])
    epoch = np.array([1, 2, 3, 1, 3, 1])
    value = np.array([0.2, 0.4, 0.9, 0.5, 0.7, 0.1])
    mean, passes = importance.window_mean(sample, epoch, value, 4, (2, 3))
    assert mean[:2].tolist() == [pytest.approx(0.65), pytest.approx(0.7)] and np.isnan(mean[2:]).all()
    assert passes.tolist() == [2, 1, 0, 0]
    assert importance.window_mean(sample, epoch, value, 4, (1, 3))[0][0] == pytest.approx(0.5)
    assert importance.default_window("dad", 30) == (1, 30) and importance.default_window("el2n", 30) == (1, 6)
    with pytest.raises(ValueError):
        importance.window_mean(sample, epoch, value, 4, (3, 2))


# hardness 0 (easiest) .. 9 (hardest), in shuffled rows; one unscored sample (NaN)
HARDNESS = np.array([7, 2, np.nan, 9, 0, 5, 1, 8, 3, 6, 4], dtype=float)


def _removed(fraction: float, mode: str) -> set[int]:
    return {int(HARDNESS[i]) for i in np.flatnonzero(importance.removed_by_mode(HARDNESS, fraction, mode))}


def test_every_mode_removes_exactly_the_expected_samples():
    assert _removed(0.4, "keep_hard") == {0, 1, 2, 3}
    assert _removed(0.4, "keep_easy") == {6, 7, 8, 9}
    assert _removed(0.4, "keep_middle") == {0, 1, 8, 9}
    assert _removed(0.4, "keep_tails") == {3, 4, 5, 6}
    assert _removed(0.3, "keep_middle") == {0, 8, 9}  # the odd one from the hard end
    assert _removed(0.3, "keep_tails") == {3, 4, 5}
    assert _removed(0.0, "keep_hard") == set() and _removed(1.0, "keep_easy") == set(range(10))
    for mode in importance.MODES:  # the unscored sample is never removed
        assert not importance.removed_by_mode(HARDNESS, 0.9, mode)[2]
    with pytest.raises(ValueError):
        importance.removed_by_mode(HARDNESS, 0.4, "keep_all")
    # ties follow tie_break, not the row order
    flat = np.zeros(4)
    assert importance.removed_by_mode(flat, 0.5, "keep_hard", tie_break=np.array([3, 2, 1, 0])).tolist() == \
        [False, False, True, True]


def test_stage_rule_on_a_crafted_score_table():
    """DAD: a high Dice is easy; EL2N: a high error is hard. The stage's decision over ids."""
    ids = pa.array([f"img{i}.jpg#0" for i in range(6)])
    dice = np.array([0.9, 0.1, 0.5, 0.95, 0.3, np.nan])
    config = prune.Config(output="/x", name="d", dynamics="r", method="dad", prune_fraction=0.4, mode="keep_hard")
    gone = prune.decide(config, ids, dice).reason >= 0
    assert np.flatnonzero(gone).tolist() == [0, 3]  # the two easiest (highest Dice) of the five scored
    config = config.model_copy(update={"mode": "keep_easy"})
    assert np.flatnonzero(prune.decide(config, ids, dice).reason >= 0).tolist() == [1, 4]
    el2n = np.array([0.9, 0.1, 0.5, 0.95, 0.3, 0.2])
    config = config.model_copy(update={"method": "el2n", "mode": "keep_hard", "prune_fraction": 0.5})
    assert np.flatnonzero(prune.decide(config, ids, el2n).reason >= 0).tolist() == [1, 4, 5]
    config = config.model_copy(update={"method": "random"})
    assert int((prune.decide(config, ids, el2n).reason >= 0).sum()) == 3


def _finetune(root: str, data: str, **extra) -> dict:
    settings = {"output": root, "model": MODEL, "image_size": 64, "random_init": True, "cpus_per_worker": 1.0,
                "torch_threads": 1, "tasks": ["segmentation"], **extra}
    return finetune.run(finetune.Config.model_validate(settings))


def test_recorded_in_ray_train_pruned_and_taken_by_finetune_and_report(ray_session, tiny_sample, tmp_path):
    root, data = str(tmp_path), str(tiny_sample / "kvasir")
    seg = {"data": data, "epochs": 3, "batch_size": 2, "lr": 3e-4, "test_fraction": 0.25}
    # two Ray Train workers, each recording its own shard's passes
    summary = _finetune(root, data, name="rec", num_workers=2, cpus_per_worker=0.5, segmentation={**seg, "record_dynamics": True})
    rec = RunLayout(root).finetune("rec")
    dynamics = storage.read_published(storage.join(rec, "dynamics")).to_pandas()
    train = storage.read_published(storage.join(rec, "train_set")).to_pandas()
    assert len(train) == 9 and set(dynamics["id"]) <= set(train["id"])
    steps = summary["segmentation"]["steps"] // 3  # per epoch: 9 images // (2 x 2) = 2 steps, 4 images a step
    assert sorted(dynamics["rank"].unique()) == [0, 1]
    assert dynamics.groupby("epoch").size().tolist() == [steps * 4] * 3
    assert dynamics["dice"].between(0, 1).all() and (dynamics["el2n"] >= 0).all()

    out = {}
    for method in ("dad", "el2n", "random"):
        out[method] = prune.run(prune.Config(output=root, name=f"{method}_50", dynamics="rec", method=method,
                                             prune_fraction=0.5, mode="keep_hard"))
    sel = RunLayout(root).selection("dad_50")
    retained = storage.read_published(storage.join(sel, "retained")).to_pandas()
    removed = storage.read_published(storage.join(sel, "removed")).to_pandas()
    assert sorted([*retained["id"], *removed["id"]]) == sorted(train["id"])  # every id once
    assert set(removed["reason"]) == {"dad_pruned"}
    # by hand from the recorded table: DAD = mean Dice over all epochs; keep_hard removes the easiest
    dad = dynamics.groupby("id")["dice"].mean()
    assert removed["max_sim"].to_numpy() == pytest.approx(dad[removed["id"]].to_numpy(), abs=1e-6)
    assert dad.reindex(retained["id"]).max() <= dad[removed["id"]].min()  # NaN: never seen, kept
    summary = storage.read_json(storage.join(sel, "summary.json"))
    assert summary["unscored_kept"] == len(set(train["id"]) - set(dynamics["id"]))
    assert summary["window"] == [1, 3] and summary["rules"][0]["parameters"]["mode"] == "keep_hard"
    assert len(removed) == round(0.5 * 9) and out["el2n"]["removed_by_reason"] == {"el2n_pruned": len(removed)}
    assert out["random"]["kept_count"] == out["dad"]["kept_count"] == len(retained)
    assert storage.read_json(storage.join(RunLayout(root).selection("el2n_50"), "summary.json"))["window"] == [1, 1]
    assert not [f for f in verify.verify_run(root).failures if "selections/" in f]

    # finetune on the retained images only; report gives the selection a finetune-set row
    fine = _finetune(root, data, name="on_dad", engine="local", segmentation={**seg, "selection": "dad_50"})
    assert fine["segmentation"]["train_images"] == len(retained)
    rep = report.run(report.Config(output=root, name="t", selections=["dad_50", "random_50"], control=False,
                                   labelled_encoder="random_init", schedule="equal_epochs",
                                   finetune={"model": MODEL, "image_size": 64, "engine": "local",
                                             "torch_threads": 1, "segmentation": seg}))
    rows = {r["selection"]: r for r in rep["rows"]}
    assert rows["dad_50"]["method"] == "dad" and rows["dad_50"]["pruned"] == report.FINETUNE_SET
    assert rows["dad_50"]["frames"] == rows["random_50"]["frames"] == len(retained)
    assert "| dad_50 | dad, keep_hard | " in storage.read_bytes(rep["table"]).decode()
    assert rows[report.LABELLED_FULL]["frames"] == 9 and rows[report.LABELLED_FULL]["method"] == "full"
    # a selection that retains a test image is refused (it would train on the test split)
    test_ids = sorted({f"{p[1].rsplit('/', 1)[1]}#0" for p in labelled.segmentation_pairs(data)} - set(train["id"]))
    storage.replace_table(RunLayout(root).selection_table("dad_50", "retained"), pa.table({"id": test_ids[:1]}))
    with pytest.raises(ValueError, match="test split"):
        _finetune(root, data, name="bad", engine="local", segmentation={**seg, "selection": "dad_50"})
