"""Report: NormDEL table (CSV + Markdown), plot, reuse of finished runs (no training here)."""

from __future__ import annotations

import csv
import io

import pytest
from PIL import Image

from deldist import distill_ray, report, report_plot, storage
from deldist.layout import RunLayout
from deldist.metrics import normdel


def _rows():
    return report.table_rows([
        {"selection": "random-0.05", "method": "random", "retained": 0.05, "frames": 5, "miou": 0.70},
        {"selection": "all", "method": "full", "retained": 1.0, "frames": 100, "miou": 0.7602},
        {"selection": "meddel-0.05", "method": "meddel", "retained": 0.05, "frames": 5, "miou": 0.7545},
        {"selection": "random-init", "method": "control", "retained": None, "frames": 0, "miou": 0.5},
    ], alpha=1.0)


def test_table_rows_and_markdown(tmp_path):
    rows = _rows()
    assert [r["selection"] for r in rows] == ["all", "meddel-0.05", "random-0.05", "random-init"]
    assert round(100 * rows[0]["normdel"], 2) == 56.95 and round(100 * rows[1]["normdel"], 2) == 67.21
    assert rows[3]["normdel"] is None
    md = report.markdown_table(rows, 1.0)
    assert "| meddel-0.05 | meddel | 0.05 | 5 | - | - | 75.45 | 67.21 |" in md and "foreground" in md
    storage.write_csv(str(tmp_path / "table.csv"), rows)
    parsed = list(csv.DictReader(io.StringIO((tmp_path / "table.csv").read_text())))
    assert parsed[0]["selection"] == "all" and float(parsed[1]["normdel"]) == pytest.approx(normdel(0.7545, 0.05))


def test_plot_png():
    png, backend = report_plot.plot_png(_rows())
    assert backend in ("matplotlib", "pillow")
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.width > 400
    assert report_plot._series(_rows(), "miou")["meddel"] == [(0.05, 0.7545), (1.0, 0.7602)]


def test_equal_compute_schedule_follows_meddel_table2():
    # MedDEL Table 2: 200 epochs at 100 %, 400 at 50 %, 1,000 at 20 %, 2,000 at 10 %, 4,000 at 5 %
    assert [report.schedule_epochs(200, r, "equal_compute") for r in (1.0, 0.5, 0.2, 0.1, 0.05)] == \
        [200, 400, 1000, 2000, 4000]
    assert report.schedule_epochs(200, 0.05, "equal_epochs") == 200
    assert report.schedule_epochs(3, 0.1999, "equal_compute") == 15
    rows = [{"steps": 330}, {"steps": 352}, {"steps": 0}]
    assert report_plot.steps_caption(rows, "equal_compute") == "pretraining: 330-352 steps per selection (equal compute)"


def _fake_runs(root: str, name: str, selections: dict[str, tuple[str, float, float]], base_epochs: int = 400) -> None:
    """Published frame store, pretrain and finetune results as the stages leave them (the
    pretraining epochs of the equal-compute schedule)."""
    storage.publish(storage.join(root, "frames", "all"), [], {"rows": 0})
    for sel, (method, ratio, miou) in selections.items():
        if sel != report.FULL:
            storage.write_json(storage.join(root, "selections", sel, "summary.json"),
                               {"method": method, "ratio": ratio, "kept_count": int(100 * ratio)})
        pre = RunLayout(root).pretrain(f"{name}-{sel}")
        storage.write_json(storage.join(pre, "metrics.json"), [{"epoch": 1, "loss": 0.9}])
        epochs = report.schedule_epochs(base_epochs, ratio if 0 < ratio < 1 else 1.0, "equal_compute")
        storage.publish(pre, [], {"frames": int(100 * ratio), "model": "deldist_vit_micro_patch16", "epochs": epochs,
                                  "steps": epochs * max(1, int(100 * ratio) // 64)})
        fine = RunLayout(root).finetune(f"{name}-{sel}")
        storage.write_json(storage.join(fine, "summary.json"),
                           {"segmentation": {"miou": miou, "miou_fg_bg": (miou + 0.95) / 2}})
        storage.publish(fine, [], {})


def test_report_run_reuses_finished_runs(ray_session, tmp_path):
    root = str(tmp_path)
    _fake_runs(root, "t3", {"all": ("full", 1.0, 0.7602), "m5": ("meddel", 0.05, 0.7545),
                            "r5": ("random", 0.05, 0.70), "control": ("control", 0.0, 0.5)})
    out = report.run(report.Config(output=root, name="t3", selections=["all", "m5", "r5"]))
    rows = {r["selection"]: r for r in out["rows"]}
    assert round(100 * rows["m5"]["normdel"], 2) == 67.21 and round(100 * rows["all"]["normdel"], 2) == 56.95
    assert rows["random-init"]["method"] == "control" and rows["random-init"]["normdel"] is None
    directory = RunLayout(root).report("t3")
    assert storage.is_published(directory)
    assert "| m5 | meddel | 0.05 | 5 | 8000 | 8000 | 75.45 | 67.21 |" in storage.read_bytes(out["table"]).decode()
    assert Image.open(io.BytesIO(storage.read_bytes(out["plot"]))).format == "PNG"
    # another schedule over the same runs is refused rather than mislabelled
    with pytest.raises(ValueError, match="equal_epochs schedule"):
        report.run(report.Config(output=root, name="t3", selections=["all", "m5"], schedule="equal_epochs"))


def test_finetune_set_rows_have_their_own_series_and_panel():
    """deldist prune rows (DAD / EL2N / random of the labelled set) plot against the finetune
    set's R, beside their own R = 1 row; a non-default mode stays in the table only."""
    fs = report.FINETUNE_SET
    rows = report.table_rows([
        *_rows(),
        {"selection": "finetune-all", "method": "full", "retained": 1.0, "pruned": fs, "miou": 0.62},
        {"selection": "dad-50", "method": "dad", "mode": report_plot.DEFAULT_MODE, "retained": 0.5, "pruned": fs, "miou": 0.6},
        {"selection": "dad-easy-50", "method": "dad", "mode": "keep_easy", "retained": 0.5, "pruned": fs, "miou": 0.4},
        {"selection": "el2n-50", "method": "el2n", "mode": report_plot.DEFAULT_MODE, "retained": 0.5, "pruned": fs,
         "miou": 0.5},
        {"selection": "random-50", "method": "random", "retained": 0.5, "pruned": fs, "miou": 0.55},
    ], alpha=1.0)
    assert [r["selection"] for r in rows[:4]] == ["all", "meddel-0.05", "random-0.05", "random-init"]
    series = report_plot._series(rows, "miou", fs)
    assert series == {"random": [(0.5, 0.55), (1.0, 0.62)], "dad": [(0.5, 0.6), (1.0, 0.62)],
                      "el2n": [(0.5, 0.5), (1.0, 0.62)]}
    assert report_plot._series(rows, "miou")["random"] == [(0.05, 0.70), (1.0, 0.7602)]  # pretraining rows only
    md = report.markdown_table(rows, 1.0)
    assert "| dad-easy-50 | dad, keep_easy | 0.5 |" in md and md.count(f"| {fs} |") == 5
    png, backend = report_plot.plot_png(rows)
    assert backend == "pillow" or Image.open(io.BytesIO(png)).width > 1200  # three panels of 4.5 in at 110 dpi


def test_distillation_rows_join_the_report(tmp_path):
    """A deldist distill run's summary (written by its own summarise) gives three classification
    rows (the synthetic set, the random real subset of its size, the full train split) with
    their accuracy over the seeds: a table of their own and an accuracy panel against R."""
    root = str(tmp_path)
    runs = [{"seed": s, "accuracy": {"distilled": d, "random": r, "full": f}, "loss_first": 2.0, "loss_last": 1.0}
            for s, (d, r, f) in enumerate([(0.9, 0.8, 0.95), (0.95, 0.9, 0.95), (0.96, 0.88, 0.94)])]
    sizes = {"classes": ["a", "b", "c"], "train_images": 90, "test_images": 60, "synthetic_images": 30,
             "size_fraction": 30 / 90}
    config = distill_ray.Config(output=root, name="dm10", data=root)
    storage.write_json(storage.join(RunLayout(root).distill("dm10"), "summary.json"),
                       distill_ray.summarise(runs, config, sizes))
    rows = distill_ray.report_rows(root, "dm10")
    assert [(r["method"], r["frames"], round(r["retained"], 4), round(r["accuracy"], 4)) for r in rows] == \
        [("dm", 30, 0.3333, 0.9367), ("random", 30, 0.3333, 0.86), ("full", 90, 1.0, 0.9467)]
    assert rows[0]["accuracy_spread"] == pytest.approx(0.0321, abs=1e-4) and rows[0]["seeds"] == 3
    table = report.table_rows([*_rows(), *rows], alpha=1.0)
    assert [r["method"] for r in table[-3:]] == ["full", "random", "dm"] and table[-1]["normdel"] is None
    md = report.markdown_table(table, 1.0)
    assert "| dm10:distilled | dm | 0.3333 | 30 | 93.67 | 3.21 | 3 |" in md
    assert "| dm10:random | random | 0.3333 | 30 | 86.00 | 5.29 | 3 |" in md
    assert report_plot._series(table, "accuracy", report_plot.CLASSIFY_SET) == {
        "random": [(30 / 90, 0.86), (1.0, pytest.approx(0.94667, abs=1e-4))],
        "dm": [(30 / 90, pytest.approx(0.93667, abs=1e-4)), (1.0, pytest.approx(0.94667, abs=1e-4))]}
    assert report_plot._series(table, "miou")["meddel"] == [(0.05, 0.7545), (1.0, 0.7602)]  # unchanged
    png, backend = report_plot.plot_png(table)
    assert backend == "pillow" or Image.open(io.BytesIO(png)).width > 1200  # three panels

