"""deldist sweep: kept counts per eps and per target ratio equal ``deldist select``'s at the same
settings (both duplicate rules, filters on), the max_sim histogram equals NumPy's on dedup/scores,
the files, the CLI and the HTML report's section. One small synthetic run (no video decode)."""

from __future__ import annotations

import csv
import io

import numpy as np
import pyarrow.compute as pc
import pytest
import yaml
from test_html_report import inside, load_page
from test_select import publish_embeddings, synthetic_videos

from deldist import cli, cluster, dedup, html_render, html_report, select, storage, sweep
from deldist.layout import RunLayout

RULES = {"quality": {}, "outlier_quantile": 0.98}  # filters on: candidates differ from the input
COMPARED_EPS = (0.02, 0.05, 0.1)


@pytest.fixture(scope="module")
def run_root(ray_session, tmp_path_factory):
    """embeddings (synthetic, two datasets) -> cluster -> dedup (keep: easy); and a sweep of the
    MedDEL settings with the filters on, default grids."""
    embeddings, _ = synthetic_videos(seed=3, dim=16)
    root = str(tmp_path_factory.mktemp("sweep") / "run")
    publish_embeddings(storage.join(root, "embeddings"), embeddings, parts=2)
    cluster.run(cluster.Config(output=root, k=12, max_iter=5, task_cpus=0.5))
    dedup.run(dedup.Config(output=root, keep="easy", task_cpus=0.5))
    result = sweep.run(sweep.Config(output=root, select={"name": "meddel", "deldist_rules": RULES}))
    return root, embeddings, result


def read_csv(uri: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(storage.read_bytes(uri).decode())))


def selected(root: str, name: str, **settings) -> tuple[dict, dict[str, int]]:
    """select.run with these settings -> (its result, kept per dataset from the retained table)."""
    result = select.run(select.Config(output=root, name=name, **settings))
    retained = storage.read_published(RunLayout(root).selection_table(name, "retained"), ["id", "dataset"])
    counts = retained.group_by("dataset").aggregate([("id", "count")])
    return result, dict(zip(counts.column("dataset").to_pylist(), counts.column("id_count").to_pylist()))


def kept_of(rows: list[dict[str, str]], key: str, value: float) -> dict[str, int]:
    return {r["dataset"]: int(r["kept"]) for r in rows if float(r[key]) == value}


def test_kept_counts_equal_select_per_eps_and_ratio(run_root):
    root, _, result = run_root
    out = result["sweep"]
    by_eps, by_ratio = read_csv(storage.join(out, "kept_by_eps.csv")), read_csv(storage.join(out, "kept_by_ratio.csv"))
    for eps in COMPARED_EPS:
        chosen, per_dataset = selected(root, f"eps{eps}", eps=eps, deldist_rules=RULES)
        swept = kept_of(by_eps, "eps", eps)
        assert swept.pop(sweep.ALL) == chosen["kept_count"] == result["kept_by_eps"][str(eps)]
        assert swept == per_dataset and sum(per_dataset.values()) == chosen["kept_count"]
    for ratio in (0.05, 0.2):
        chosen, per_dataset = selected(root, f"ratio{ratio}", target_ratio=ratio, deldist_rules=RULES)
        summary = storage.read_json(RunLayout(root).selection_summary(f"ratio{ratio}"))
        row = next(r for r in by_ratio if float(r["target_ratio"]) == ratio and r["dataset"] == sweep.ALL)
        assert float(row["similarity_threshold"]) == pytest.approx(summary["similarity_threshold"], abs=1e-12)
        assert (row["reachable"] == "True") == summary["target_reachable"]
        swept = kept_of(by_ratio, "target_ratio", ratio)
        assert swept.pop(sweep.ALL) == chosen["kept_count"] and swept == per_dataset
    # the candidates are the input less the filters' removals, the same for every row
    summary = storage.read_json(storage.join(out, "summary.json"))
    assert summary["candidate_count"] == summary["input_count"] - sum(summary["removed_before_duplicates"].values())
    assert {"invalid", "outlier"} <= set(summary["removed_before_duplicates"])
    assert {int(r["candidates"]) for r in by_eps if r["dataset"] == sweep.ALL} == {summary["candidate_count"]}


def test_any_earlier_rule_equals_select(run_root):
    """SemDeDup's rule (max_sim directly) on the same scores: one eps and one target ratio."""
    root, _, _ = run_root
    result = sweep.run(sweep.Config(output=root, name="any", eps_grid=[0.05], ratio_grid=[0.1],
                                    select={"dedup_rule": "any_earlier", "deldist_rules": RULES}))
    chosen, per_dataset = selected(root, "any_eps", eps=0.05, dedup_rule="any_earlier", deldist_rules=RULES)
    rows = read_csv(storage.join(result["sweep"], "kept_by_eps.csv"))
    swept = kept_of(rows, "eps", 0.05)
    assert swept.pop(sweep.ALL) == chosen["kept_count"] and swept == per_dataset
    chosen, per_dataset = selected(root, "any_ratio", target_ratio=0.1, dedup_rule="any_earlier", deldist_rules=RULES)
    swept = kept_of(read_csv(storage.join(result["sweep"], "kept_by_ratio.csv")), "target_ratio", 0.1)
    assert swept.pop(sweep.ALL) == chosen["kept_count"] == result["kept_by_ratio"]["0.1"] and swept == per_dataset


def test_histogram_matches_numpy_on_the_scores(run_root):
    root, embeddings, result = run_root
    out = result["sweep"]
    # the candidates, independently: every id a selection with the same rules did not remove by a filter
    selected(root, "histogram", eps=0.05, deldist_rules=RULES)
    removed = storage.read_published(RunLayout(root).selection_table("histogram", "removed"), ["id", "reason"])
    filtered = set(removed.filter(pc.not_equal(removed.column("reason"), "duplicate")).column("id").to_pylist())
    scores = storage.read_published(RunLayout(root).scores, ["id", "rank", "max_sim"])
    ids = np.asarray(scores.column("id").to_pylist())
    dataset = dict(zip(embeddings.column("id").to_pylist(), embeddings.column("dataset").to_pylist()))
    later = (scores.column("rank").to_numpy() > 0) & ~np.isin(ids, list(filtered))
    max_sim = scores.column("max_sim").to_numpy()
    # the bins, independently: 20 per decade of 1 - max_sim from 1e-4 to 2, and [1 - 1e-4, 1]
    edges = np.sort(1 - np.r_[0, np.logspace(-4, np.log10(2), 88)])
    assert np.array_equal(edges, html_render.similarity_edges())
    rows = read_csv(storage.join(out, "max_sim_histogram.csv"))
    for name in (sweep.ALL, "c0", "c1"):
        mine = np.array([int(r["count"]) for r in rows if r["dataset"] == name])
        mask = later & (np.array([dataset[i] for i in ids]) == name if name != sweep.ALL else True)
        expected, _ = np.histogram(np.clip(max_sim[mask], -1, 1), bins=edges)
        assert len(mine) == 88 and np.array_equal(mine, expected)
        assert mine.sum() == mask.sum()
    assert result["histogram_items"] == int(later.sum()) > 0
    assert float(rows[0]["bin_low"]) == -1.0 and float(rows[87]["bin_high"]) == 1.0
    assert float(rows[86]["bin_high"]) == float(rows[87]["bin_low"]) == pytest.approx(0.9999)


def test_files_columns_and_publication(run_root):
    root, _, result = run_root
    out = result["sweep"]
    assert out == RunLayout(root).sweep("meddel") and storage.is_published(out)
    manifest = storage.read_manifest(out)
    assert sorted(manifest["files"]) == sorted(sweep.FILES.values()) and manifest["fingerprint"]
    by_eps = read_csv(storage.join(out, "kept_by_eps.csv"))
    assert list(by_eps[0]) == ["eps", "similarity_threshold", "evaluated", "meddel_table2_ratio", "dataset", "input",
                               "candidates", "kept", "ratio"]
    assert len(by_eps) == 3 * len(sweep.EPS_GRID)  # (all), c0, c1
    assert {float(r["eps"]) for r in by_eps} >= {0.1, 0.15, 0.2, 0.25, 0.3}  # MedDEL Table 2's thresholds
    assert [r["meddel_table2_ratio"] for r in by_eps if float(r["eps"]) == 0.2 and r["dataset"] == sweep.ALL] == ["0.2"]
    kept = [int(r["kept"]) for r in by_eps if r["dataset"] == sweep.ALL]
    assert kept[0] >= kept[-1]  # a looser threshold keeps fewer (up to the rule's wiggles)
    by_ratio = read_csv(storage.join(out, "kept_by_ratio.csv"))
    assert list(by_ratio[0]) == ["target_ratio", "reachable", "similarity_threshold", "eps", "dataset", "input",
                                 "candidates", "kept", "ratio"]
    assert len(by_ratio) == 3 * len(sweep.RATIO_GRID)
    assert list(read_csv(storage.join(out, "max_sim_histogram.csv"))[0]) == ["dataset", "bin_low", "bin_high", "count"]
    png = storage.read_bytes(storage.join(out, "sweep.png"))
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_config_picks_a_select_entry_and_refuses_random():
    entries = [{"name": "r", "method": "random", "target_ratio": 0.2}, {"name": "m", "eps": 0.1},
               {"name": "s", "method": "semdedup"}]
    assert sweep.Config(output="x", select=entries).selection_config().name == "m"  # first non-random
    chosen = sweep.Config(output="x", select=entries, selection="s").selection_config()
    assert chosen.dedup_rule == "any_earlier" and chosen.eps is None  # the entry's eps is the grid's to set
    with pytest.raises(ValueError, match="random"):
        sweep.Config(output="x", select=entries, selection="r")
    with pytest.raises(ValueError):
        sweep.Config(output="x", eps_grid=[-0.1])
    with pytest.raises(ValueError):
        sweep.Config(output="x", select={"methd": "meddel"})  # typo in the selection: an error


def test_cli_help_and_a_run_from_the_curate_yaml(run_root, tmp_path, capsys):
    root, _, _ = run_root
    with pytest.raises(SystemExit):
        cli.main(["sweep", "--help"])
    text = capsys.readouterr().out
    for key in ("output", "select", "selection", "eps_grid", "ratio_grid", "histogram_min_eps"):
        assert f"  {key} (" in text
    cfg = tmp_path / "curate.yaml"
    cfg.write_text(yaml.safe_dump({"output": root, "select": [
        {"name": "random_10", "method": "random", "target_ratio": 0.1},
        {"name": "cli_sel", "target_ratio": 0.1, "deldist_rules": RULES}]}))
    assert cli.main(["sweep", "--config", str(cfg), "eps_grid=[0.05]", "ratio_grid=[0.2]"]) == 0  # verify runs too
    printed = capsys.readouterr().out
    assert '"sweep"' in printed and storage.is_published(RunLayout(root).sweep("cli_sel"))
    summary = storage.read_json(storage.join(RunLayout(root).sweep("cli_sel"), "summary.json"))
    assert summary["parameters"]["select"]["deldist_rules"]["outlier_quantile"] == 0.98
    assert [r["eps"] for r in summary["kept_by_eps"]] == [0.05]


def test_html_report_shows_the_histogram_and_the_sweeps(run_root):
    root, _, result = run_root
    index = html_report.write_html_report(root, [])  # no selections: no thumbnails to decode
    _, page = load_page(index)
    scores = storage.read_published(RunLayout(root).scores, ["rank", "max_sim"])
    later = scores.column("rank").to_numpy() > 0
    max_sim = scores.column("max_sim").to_numpy()
    part = page.find("div", class_="similarity")
    assert len(part) == 1 and int(part[0]["attrs"]["data-items"]) == int(later.sum())
    bins = {int(r["attrs"]["data-bin"]): int(c["attrs"]["data-items"]) for r in page.find("tr")
            if "data-bin" in r["attrs"] for c in page.find("td")
            if c["ancestors"][-1] is r and "data-items" in c["attrs"]}
    expected, _ = np.histogram(np.clip(max_sim[later], -1, 1), bins=html_render.similarity_edges())
    assert bins == {int(i): int(expected[i]) for i in np.flatnonzero(expected)}
    above = {float(r["attrs"]["data-threshold"]): int(c["attrs"]["data-above"]) for r in page.find("tr")
             if "data-threshold" in r["attrs"] for c in page.find("td") if c["ancestors"][-1] is r
             and "data-above" in c["attrs"]}
    assert above == {t: int((max_sim[later] > t).sum()) for t in html_report.ABOVE}
    sweeps = {d["attrs"]["data-sweep"]: d for d in page.find("div", class_="sweep")}
    assert "meddel" in sweeps
    by_eps = read_csv(storage.join(result["sweep"], "kept_by_eps.csv"))
    shown = {float(r["attrs"]["data-eps"]): int(c["attrs"]["data-kept"]) for r in page.find("tr")
             if "data-eps" in r["attrs"] and inside(r, "div", "data-sweep") == "meddel"
             for c in page.find("td") if c["ancestors"][-1] is r and "data-kept" in c["attrs"]}
    assert shown == {float(r["eps"]): int(r["kept"]) for r in by_eps if r["dataset"] == sweep.ALL}
    for img in page.find("img"):
        assert storage.exists(storage.join(RunLayout(root).html, img["attrs"]["src"]))


def test_publish_on_s3_replaces_an_earlier_sweep(s3_bucket):
    """The files go through deldist.storage: on the moto bucket, a rerun republishes in place."""
    layout = RunLayout(f"s3://{s3_bucket}/sweep-io")
    for kept in (5, 3):
        rows = {"eps": [{"eps": 0.1, "dataset": sweep.ALL, "kept": kept}], "ratio": [{"target_ratio": 0.5}],
                "histogram": [{"dataset": sweep.ALL, "bin_low": 0.0, "bin_high": 1.0, "count": 7}]}
        out = sweep.publish_sweep(layout, "io", rows, b"\x89PNG", {"selection": "io", "parameters": {}})
    assert out == f"s3://{s3_bucket}/sweep-io/sweeps/io" and storage.is_published(out)
    assert read_csv(storage.join(out, "kept_by_eps.csv")) == [{"eps": "0.1", "dataset": sweep.ALL, "kept": "3"}]
    assert sorted(storage.read_manifest(out)["files"]) == sorted(sweep.FILES.values())
