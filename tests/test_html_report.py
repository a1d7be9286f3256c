"""HTML curation report: the pure gathering functions, and whole pages from a real curate run
(tiny sample plus a copy of one video under a name full of HTML-special characters), from a
frame store, through the CLI, and on the moto S3 bucket.

Acceptance is parsing: the page must be well-formed for ``html.parser``, every ``<img src>``
must be a relative path to a decodable JPEG / PNG, and everything from the data must be
escaped. When a headless Chromium is installed, it renders the page too.
"""

from __future__ import annotations

import html
import io
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from deldist import cli, curate, html_render, html_report, materialize, storage, thumbnails
from deldist.layout import RunLayout

SPECIAL = "a<b>&\"c'.mp4"  # a video file name that breaks any unescaped HTML
SELECTION = "meddel&<50>"  # and a selection name that does too
VOID = {"img", "meta", "br", "hr", "link", "input"}


# ----------------------------------------------------------------------------- page parsing


class Page(HTMLParser):
    """Collects every element (tag, attrs, text, open ancestors) and nesting errors."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[dict] = []
        self.elements: list[dict] = []
        self.errors: list[str] = []
        self.feed(text)
        self.close()
        self.errors += [f"unclosed <{e['tag']}>" for e in self.open]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = {"tag": tag, "attrs": dict(attrs), "text": "", "ancestors": list(self.open)}
        self.elements.append(element)
        if tag not in VOID:
            self.open.append(element)

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1]["tag"] != tag:
            self.errors.append(f"</{tag}> does not close {self.open[-1]['tag'] if self.open else 'anything'}")
            return
        self.open.pop()

    def handle_data(self, data: str) -> None:
        for element in self.open:
            element["text"] += data

    def find(self, tag: str | None = None, **attrs: str) -> list[dict]:
        """Elements with this tag whose attributes hold these values (``class_`` for class)."""
        want = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
        return [e for e in self.elements if (tag is None or e["tag"] == tag)
                and all(v in (e["attrs"].get(k) or "").split() if k == "class" else e["attrs"].get(k) == v
                        for k, v in want.items())]


def inside(element: dict, tag: str, attr: str) -> str | None:
    """``attr`` of the nearest open ancestor with this tag."""
    for parent in reversed(element["ancestors"]):
        if parent["tag"] == tag and attr in parent["attrs"]:
            return parent["attrs"][attr]
    return None


def load_page(index: str) -> tuple[str, Page]:
    text = storage.read_bytes(index).decode("utf-8")
    page = Page(text)
    assert page.errors == [], page.errors[:5]
    assert text.startswith("<!DOCTYPE html>")
    return text, page


def assert_images_exist(index: str, page: Page) -> int:
    """Every <img src> is relative, inside the report directory and a decodable image."""
    base = index.rsplit("/", 1)[0]
    images = page.find("img")
    for img in images:
        src = img["attrs"]["src"]
        assert "://" not in src and not src.startswith("/") and ".." not in src, src
        img_bytes = storage.read_bytes(storage.join(base, *src.split("/")))
        picture = Image.open(io.BytesIO(img_bytes))
        picture.load()  # decodes the pixels, not only the header
        assert picture.format in ("JPEG", "PNG"), src
        if src.startswith("thumbs/"):
            assert picture.size == (128, 128) and picture.format == "JPEG"
    return len(images)


def read_selection(root: str, name: str) -> tuple[dict, pa.Table, set[str]]:
    sel = storage.join(root, "selections", name)
    return (storage.read_json(storage.join(sel, "summary.json")), storage.read_published(storage.join(sel, "removed")),
            set(storage.read_published(storage.join(sel, "retained")).column("id").to_pylist()))


# ----------------------------------------------------------------------------- pure functions


def _removed_table() -> pa.Table:
    rows = [("k1#1", "duplicate", "k1#0", 0.97), ("k1#2", "duplicate", "k1#0", 0.99),
            ("k1#3", "temporal", "k1#0", 0.995),
            ("k2#1", "duplicate", "k2#0", 0.95), ("k2#2", "duplicate", "k2#0", 0.96),
            ("k3#1", "duplicate", "bad#0", 0.93), ("bad#0", "invalid", None, None),
            ("o#1", "outlier", None, None), ("o#2", "outlier", None, None), ("o#3", "outlier", None, None)]
    return pa.table({"id": [r[0] for r in rows], "reason": [r[1] for r in rows], "duplicate_of": [r[2] for r in rows],
                     "max_sim": pa.array([r[3] for r in rows], pa.float32())})


def test_duplicate_groups_largest_first_bounded_with_anchor_status():
    groups = html_report.duplicate_groups(_removed_table(), max_groups=3, max_per_group=2)
    assert [(g.anchor, g.size, g.anchor_status) for g in groups] == [
        ("k1#0", 3, "kept"), ("k2#0", 2, "kept"), ("bad#0", 1, "invalid")]  # ties by anchor id
    assert [m[0] for m in groups[0].members] == ["k1#3", "k1#2"]  # most similar first, bounded to 2
    assert groups[0].members[0][2] == "temporal" and groups[0].members[1][1] == pytest.approx(0.99)
    assert html_report.duplicate_groups(_removed_table(), max_groups=1, max_per_group=9)[0].size == 3
    assert html_report.duplicate_groups(_removed_table().slice(6), 5, 5) == []  # no duplicates
    assert html_report.duplicate_groups(_removed_table(), 0, 5) == []


def test_galleries_counts_and_dataset_rows():
    removed = _removed_table()
    assert html_report.removed_ids(removed, "outlier") == ["o#1", "o#2", "o#3"]
    assert html_report.farthest_first(["o#1", "o#2", "o#3"], {"o#2": 0.9, "o#1": 0.5}, 2) == ["o#2", "o#1"]
    assert html_report.spread_evenly([f"f{i:02d}" for i in range(10)], 3) == ["f00", "f04", "f09"]
    assert html_report.spread_evenly(["b", "a"], 5) == ["a", "b"]
    summary = {"name": "s", "method": "meddel", "input_count": 10, "kept_count": 4, "ratio": 0.4,
               "removed_by_reason": {"duplicate": 5, "outlier": 1},
               "per_dataset": {"z": {"input": 6, "kept": 2, "ratio": 1 / 3},
                               "a": {"input": 4, "kept": 2, "ratio": 0.5}},
               "parameters": {"target_ratio": 0.4, "eps": None}, "similarity_threshold": 0.93}
    assert html_report.selection_counts(summary) == {"input": 10, "kept": 4, "removed": 6, "ratio": 0.4,
                                                     "removed_by_reason": {"duplicate": 5, "outlier": 1}}
    assert [d["dataset"] for d in html_report.dataset_rows(summary)] == ["a", "z"]
    view = html_report.selection_view(summary, removed, max_per_gallery=2, max_groups=2, max_per_group=5,
                                      outlier_distance={"o#3": 0.8, "o#1": 0.7})
    assert view.outliers == ["o#3", "o#1"] and view.invalid == ["bad#0"] and len(view.groups) == 2
    assert view.parameters == {"target_ratio": 0.4, "similarity_threshold": 0.93}
    shown = view.frame_ids()
    assert shown[:4] == ["k1#0", "k1#3", "k1#2", "k1#1"] and len(set(shown)) == len(shown)


def test_cluster_size_histogram():
    labels = pa.chunked_array([pa.array([0, 0, 0, 2, 2, 5], pa.int32()), pa.array([0], pa.int32())])
    sizes = html_report.cluster_sizes(labels, k=7)
    assert sizes.tolist() == [4, 0, 2, 0, 0, 1, 0]
    edges, counts = html_render.size_histogram(sizes)
    assert edges.tolist() == [0, 1, 2, 3, 4, 5] and counts.tolist() == [4, 1, 1, 0, 1]
    edges, counts = html_render.size_histogram(np.arange(1000), max_bins=30)
    assert len(counts) <= 30 and counts.sum() == 1000 and edges[0] == 0 and edges[-1] > 999
    png = html_render.histogram_png(sizes)
    assert Image.open(io.BytesIO(png)).format == "PNG"


def test_max_sim_histogram_parts_add_up_and_sweep_rows():
    edges = html_render.similarity_edges(min_eps=0.01, per_decade=2)
    assert edges[0] == -1.0 and edges[-1] == 1.0 and edges[-2] == pytest.approx(0.99)
    rank = np.array([0, 1, 2, 3, 1, 0])
    sims = np.array([0.0, 0.995, 0.95, 1.0000001, 0.5, 0.3], np.float32)  # past 1: the last bin
    counts, above, span = html_report.similarity_counts(rank, sims, edges, thresholds=(0.99, 0.9))
    assert counts.sum() == 4 and counts[-1] == 2 and above == {0.99: 2, 0.9: 3} and span[0] == pytest.approx(0.5)
    whole = html_report.similarity_counts(rank[:3], sims[:3], edges)[0] + html_report.similarity_counts(
        rank[3:], sims[3:], edges)[0]
    assert np.array_equal(whole, counts)
    assert html_report.histogram_quantile(edges, counts, 0.5) == edges[-3]  # the 2nd of 4 (0.95): its bin's top
    summary = {"name": "s", "selection": "m", "method": "meddel", "dedup_rule": "kept", "input_count": 10,
               "candidate_count": 8, "datasets": ["a"],
               "kept_by_eps": [{"eps": 0.1, "similarity_threshold": 0.9, "kept": 4, "ratio": 0.4}]}
    rows = [{"eps": "0.1", "dataset": "(all)", "ratio": "0.4"}, {"eps": "0.1", "dataset": "a", "ratio": "0.5"}]
    view = html_report.sweep_view("s", summary, rows)
    assert view["rows"] == [{"eps": 0.1, "similarity_threshold": 0.9, "kept": 4, "ratio": 0.4,
                             "by_dataset": {"a": 0.5}}]


def test_decode_chunks_split_far_apart_frames():
    rows = [{"id": f"v#{i}", "source": "/d/v.mp4", "frame_index": i} for i in (900, 3, 10, 400)]
    rows.append({"id": "x.jpg#0", "source": "/d/x.jpg", "frame_index": 0})
    jobs = thumbnails.decode_chunks(rows, max_gap=250)
    assert [j["kind"] for j in jobs] == ["image", "video", "video", "video"]
    assert [[f[0] for f in j["frames"]] for j in jobs[1:]] == [[3, 10], [400], [900]]


def test_render_escapes_everything_from_the_data():
    evil = '<script>alert("x")</script>&\'"'
    view = html_report.SelectionView(
        name=evil, method="meddel", counts={"input": 2, "kept": 1, "removed": 1, "ratio": 0.5,
                                            "removed_by_reason": {"duplicate": 1}},
        datasets=[{"dataset": evil, "input": 2, "kept": 1, "ratio": 0.5}],
        groups=[html_report.DuplicateGroup(f"{evil}#0", "kept", 1, ((f"{evil}#1", 0.99, "duplicate"),))],
        outliers=[], invalid=[])
    run = html_render.RunView(output=f"/runs/{evil}", selections=[view])
    text = html_render.render_html(run, {}, {f"{evil}#0": "thumbs/0.jpg"}, {f"{evil}#1": f"cannot decode {evil}"})
    page = Page(text)
    assert page.errors == [] and not page.find("script")
    assert evil not in text and html.escape(evil, quote=True) in text
    assert page.find("section")[0]["attrs"]["data-selection"] == evil  # the attribute round-trips
    assert page.find("figure", class_="member")[0]["attrs"]["data-id"] == f"{evil}#1"
    assert f"no thumbnail: cannot decode {evil}" in page.find("div", class_="missing")[0]["text"]


# ----------------------------------------------------------------------------- a curate run


@pytest.fixture(scope="module")
def curated(ray_session, tiny_sample, tmp_path_factory):
    """curate (embed -> cluster -> dedup -> select -> HTML) on the tiny sample plus an exact
    copy of one video named ``SPECIAL``: its frames duplicate the original's."""
    base = tmp_path_factory.mktemp("html_report")
    videos = base / "videos"
    shutil.copytree(tiny_sample / "videos", videos)
    original = sorted((videos / "center_a").glob("*.mp4"))[0]
    shutil.copy(original, videos / "center_b" / SPECIAL)
    root = str(base / "run")
    config = curate.Config(
        input=str(videos), output=root,
        embed={"model": "vit_tiny_patch16_224", "random_init": True, "pooling": "mean", "stride": 3,
               "segment_seconds": 4, "batch_size": 32},
        cluster={"k": 6, "max_iter": 10, "task_cpus": 0.5},
        dedup={"task_cpus": 0.5},
        select=[{"name": SELECTION, "target_ratio": 0.5,
                 "deldist_rules": {"quality": {}, "outlier_quantile": 0.9, "near_copy": {}}},
                {"name": "random", "method": "random", "match_selection": SELECTION}])
    result = curate.run(config)
    return root, result


def test_curate_writes_the_report(curated):
    root, result = curated
    index = result["html_report"]
    assert index == storage.join(root, "reports", "html", "index.html") and storage.exists(index)
    assert storage.is_published(RunLayout(root).html)
    _, page = load_page(index)
    assert [s["attrs"]["data-selection"] for s in page.find("section")] == [SELECTION, "random"]
    assert assert_images_exist(index, page) > 10


def test_special_characters_are_escaped(curated):
    root, result = curated
    text, page = load_page(result["html_report"])
    for raw in (SPECIAL, SELECTION):
        assert raw not in text
        assert html.escape(raw, quote=True) in text
    shown = [f["attrs"]["data-id"] for f in page.find("figure")]
    special = [i for i in shown if SPECIAL in i]
    assert special, "the copied video's frames should appear (duplicates / invalid frames)"
    # its thumbnails were decoded from the file with that name, not replaced by placeholders
    for figure in (f for f in page.find("figure") if SPECIAL in f["attrs"]["data-id"]):
        assert not any(e["tag"] == "div" and e["ancestors"][-1] is figure for e in page.find("div", class_="missing"))
    files = [p.name for p in (Path(root) / "reports" / "html" / "thumbs").iterdir()]
    assert all(name.replace(".jpg", "").isdigit() for name in files)  # named by counter, never by id


def test_counts_and_datasets_match_summary(curated):
    root, result = curated
    _, page = load_page(result["html_report"])
    for name in (SELECTION, "random"):
        summary, removed, retained = read_selection(root, name)
        cells = {c["attrs"]["data-count"]: c["text"] for c in page.find("td") if c["attrs"].get("data-count")
                 and inside(c, "section", "data-selection") == name and inside(c, "tr", "data-dataset") is None}
        assert int(cells["input"].replace(",", "")) == summary["input_count"] == len(retained) + removed.num_rows
        assert int(cells["kept"].replace(",", "")) == summary["kept_count"] == len(retained)
        assert int(cells["removed"].replace(",", "")) == removed.num_rows
        assert float(cells["ratio"]) == pytest.approx(summary["ratio"], abs=5e-5)
        reasons = {c["attrs"]["data-reason"]: int(c["text"]) for c in page.find("td")
                   if "data-reason" in c["attrs"] and inside(c, "section", "data-selection") == name}
        assert reasons == summary["removed_by_reason"]
        rows = [r for r in page.find("tr")
                if "data-dataset" in r["attrs"] and inside(r, "section", "data-selection") == name]
        assert sorted(r["attrs"]["data-dataset"] for r in rows) == sorted(summary["per_dataset"])
        for row in rows:
            expected = summary["per_dataset"][row["attrs"]["data-dataset"]]
            values = {c["attrs"]["data-count"]: c["text"] for c in page.find("td")
                      if c["ancestors"] and c["ancestors"][-1] is row and "data-count" in c["attrs"]}
            assert int(values["input"]) == expected["input"] and int(values["kept"]) == expected["kept"]
            assert float(values["ratio"]) == pytest.approx(expected["ratio"], abs=5e-5)


def test_duplicate_groups_match_removed_table(curated):
    root, result = curated
    _, page = load_page(result["html_report"])
    summary, removed, retained = read_selection(root, SELECTION)
    rows = {r["id"]: r for r in removed.to_pylist()}
    dup_counts: dict[str, int] = {}
    for r in rows.values():
        if r["reason"] in html_report.GROUP_REASONS:
            dup_counts[r["duplicate_of"]] = dup_counts.get(r["duplicate_of"], 0) + 1
    groups = [g for g in page.find("div", class_="group") if inside(g, "section", "data-selection") == SELECTION]
    assert 0 < len(groups) <= 8
    sizes = [int(g["attrs"]["data-size"]) for g in groups]
    assert sizes == sorted(sizes, reverse=True)
    shown = {g["attrs"]["data-anchor"] for g in groups}
    assert min(sizes) >= max([n for a, n in dup_counts.items() if a not in shown], default=0)  # the largest ones
    for group in groups:
        anchor = group["attrs"]["data-anchor"]
        assert dup_counts[anchor] == int(group["attrs"]["data-size"])
        figures = [f for f in page.find("figure") if f["ancestors"] and f["ancestors"][-1] is group]
        head = [f for f in figures if "anchor" in f["attrs"]["class"].split()]
        assert len(head) == 1 and head[0]["attrs"]["data-id"] == anchor
        status = head[0]["attrs"]["data-status"]
        assert (anchor in retained) if status == "kept" else rows[anchor]["reason"] == status
        members = [f for f in figures if f["attrs"]["class"] == "member"]
        assert 0 < len(members) <= 8
        sims = [float(m["attrs"]["data-sim"]) for m in members]
        assert sims == sorted(sims, reverse=True)
        for member, sim in zip(members, sims):
            row = rows[member["attrs"]["data-id"]]
            assert row["duplicate_of"] == anchor and row["reason"] == member["attrs"]["data-reason"]
            assert sim == pytest.approx(row["max_sim"], abs=1e-6)
            assert f"sim {row['max_sim']:.4f}" in member["text"]
    # the exact copy's frames are near copies (Hamming distance 0) of the original's kept frames
    assert max(r["max_sim"] for r in rows.values() if r["reason"] == "near_copy") == 1.0
    assert all(r["duplicate_of"] in retained for r in rows.values() if r["duplicate_of"])  # nothing lost


def test_outlier_and_invalid_galleries(curated):
    root, result = curated
    _, page = load_page(result["html_report"])
    summary, removed, _ = read_selection(root, SELECTION)
    reasons = dict(zip(removed.column("id").to_pylist(), removed.column("reason").to_pylist()))
    for reason in ("outlier", "invalid"):
        figures = [f for f in page.find("figure", class_=reason) if inside(f, "section", "data-selection") == SELECTION]
        total = summary["removed_by_reason"].get(reason, 0)
        assert total > 0, f"the tiny sample should have {reason} frames at these settings"
        assert len(figures) == min(24, total)
        assert all(reasons[f["attrs"]["data-id"]] == reason for f in figures)
    distances = [float(f["text"].rsplit("distance ", 1)[1]) for f in page.find("figure", class_="outlier")
                 if inside(f, "section", "data-selection") == SELECTION]
    assert distances == sorted(distances, reverse=True)


def test_cluster_histogram(curated):
    root, result = curated
    _, page = load_page(result["html_report"])
    manifest = storage.read_manifest(storage.join(root, "clusters"))
    assert [p["attrs"]["data-k"] for p in page.find("p") if "data-k" in p["attrs"]] == [str(manifest["k"])]
    assert page.find("img", class_="histogram")[0]["attrs"]["src"] == html_report.HISTOGRAM
    labels = storage.read_published(storage.join(root, "clusters", "assignments"), ["cluster"]).column("cluster")
    sizes = html_report.cluster_sizes(labels, manifest["k"])
    assert sizes.sum() == result["embed"]["frames"] and len(sizes) == manifest["k"]


def test_max_sim_histogram_of_the_scores(curated):
    """The page's max_sim part (no sweep in this run): its counts are NumPy's on dedup/scores."""
    root, result = curated
    _, page = load_page(result["html_report"])
    scores = storage.read_published(RunLayout(root).scores, ["rank", "max_sim"])
    later = scores.column("rank").to_numpy() > 0
    max_sim = scores.column("max_sim").to_numpy()[later]
    part = page.find("div", class_="similarity")
    assert len(part) == 1 and int(part[0]["attrs"]["data-items"]) == len(max_sim) > 0
    expected, _ = np.histogram(np.clip(max_sim, -1, 1), bins=html_render.similarity_edges())
    shown = {int(r["attrs"]["data-bin"]): int(c["attrs"]["data-items"]) for r in page.find("tr")
             if "data-bin" in r["attrs"] for c in page.find("td")
             if c["ancestors"][-1] is r and "data-items" in c["attrs"]}
    assert shown == {int(i): int(expected[i]) for i in np.flatnonzero(expected)}
    above = {float(c["ancestors"][-1]["attrs"]["data-threshold"]): int(c["attrs"]["data-above"])
             for c in page.find("td") if "data-above" in c["attrs"]}
    assert above == {t: int((max_sim > t).sum()) for t in html_report.ABOVE}
    assert page.find("img", class_="max-sim-histogram")[0]["attrs"]["src"] == html_report.SIMILARITY
    assert not page.find("div", class_="sweep")  # no deldist sweep ran


@pytest.fixture(scope="module")
def stored_copy(curated, tmp_path_factory):
    """A copy of the curated run with a frame store of the MedDEL selection's kept frames."""
    root, _ = curated
    copy = str(tmp_path_factory.mktemp("html_store") / "run")
    shutil.copytree(root, copy)
    shutil.rmtree(Path(copy) / "reports")
    materialize.run(materialize.Config(output=copy, selection=SELECTION, size=64, frames_per_task=64))
    return copy


def test_thumbnails_from_the_frame_store_and_bounded_galleries(stored_copy):
    index = html_report.write_html_report(stored_copy, [SELECTION], max_per_gallery=3, max_groups=2, max_per_group=2)
    _, page = load_page(index)
    assert assert_images_exist(index, page) > 0
    stats = storage.read_manifest(RunLayout(stored_copy).html)["thumbnails"]
    # kept anchors come from the store; removed frames are not in it and are decoded
    assert stats["from_store"] > 0 and stats["decoded"] > 0 and stats["missing"] == 0
    assert len(page.find("figure", class_="outlier")) <= 3 and len(page.find("figure", class_="invalid")) <= 3
    groups = page.find("div", class_="group")
    members = page.find("figure", class_="member")
    assert len(groups) <= 2 and all(len([f for f in members if f["ancestors"][-1] is g]) <= 2 for g in groups)
    assert [s["attrs"]["data-selection"] for s in page.find("section")] == [SELECTION]


def test_cli_report_html_writes_only_the_page(stored_copy, capsys):
    assert cli.main(["report", "--html", f"output={stored_copy}", "html_gallery=2"]) == 0
    index = storage.join(RunLayout(stored_copy).html, "index.html")
    _, page = load_page(index)
    # default selections (["all"]) -> every published selection; no pretraining happened
    assert [s["attrs"]["data-selection"] for s in page.find("section")] == sorted([SELECTION, "random"])
    assert sorted(p.name for p in (Path(stored_copy) / "reports").iterdir()) == ["html"]
    assert not (Path(stored_copy) / "pretrain").exists()
    assert index in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["embed", "--html", "input=/nowhere", f"output={stored_copy}"])  # not a stage with a report


PROBE = """<!doctype html><html><body><pre id="result">pending</pre>
<iframe id="page" src="index.html" style="width:1400px;height:3000px"></iframe>
<script>
document.getElementById("page").addEventListener("load", () => {
  const doc = document.getElementById("page").contentDocument;
  const images = [...doc.images];
  const out = {images: images.length,
               loaded: images.filter(i => i.complete && i.naturalWidth > 0).length,
               selections: {}};
  for (const s of doc.querySelectorAll("section[data-selection]")) {
    const cells = {};
    for (const c of s.querySelectorAll("tr:not([data-dataset]) > td[data-count]"))
      cells[c.dataset.count] = c.textContent;
    const galleries = {};
    for (const g of s.querySelectorAll("div.gallery[data-gallery]"))
      galleries[g.dataset.gallery] = g.querySelectorAll("figure").length;
    out.selections[s.dataset.selection] = {cells, galleries,
      visible: s.getBoundingClientRect().height > 0};
  }
  document.getElementById("result").textContent = JSON.stringify(out);
});
</script></body></html>"""


def test_chromium_renders_the_galleries(curated, tmp_path):
    """The page in a real browser: every image loads, each selection's section is laid out,
    its counts are the summary's and its galleries hold figures. ``.ci/run`` installs
    Chromium (apt) when missing; elsewhere the test skips without it."""
    import json

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no headless Chromium on this machine (.ci/run installs it)")
    root, result = curated
    page_dir = Path(result["html_report"]).parent
    probe = page_dir / "_probe.html"
    probe.write_text(PROBE)
    try:
        dom = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--allow-file-access-from-files",
                              "--virtual-time-budget=20000", "--dump-dom", probe.as_uri()],
                             check=True, timeout=180, capture_output=True, text=True).stdout
    finally:
        probe.unlink()
    found = json.loads(html.unescape(dom.split('<pre id="result">')[1].split("</pre>")[0]))
    assert found["images"] > 0 and found["loaded"] == found["images"]
    assert set(found["selections"]) == {SELECTION, "random"}
    for name, shown in found["selections"].items():
        summary, removed, retained = read_selection(root, name)
        assert shown["visible"]
        assert int(shown["cells"]["kept"].replace(",", "")) == summary["kept_count"] == len(retained)
        assert int(shown["cells"]["removed"].replace(",", "")) == removed.num_rows
        for reason, figures in shown["galleries"].items():
            assert 0 < figures <= summary["removed_by_reason"][reason]


# ----------------------------------------------------------------------------- object storage


def test_report_on_s3_with_unreadable_frames(s3_bucket, tiny_sample):
    """Run tables written directly (no Ray): thumbnails decoded from local videos and an image,
    a vanished source shows a placeholder; the report lands next to the run on S3."""
    root = f"s3://{s3_bucket}/html-run"
    truth = pq.read_table(tiny_sample / "ground_truth.parquet").to_pylist()
    frames = [{"id": f"{r['source_key']}#{r['frame_index']}", "source": str(tiny_sample / "videos" / r["source_key"]),
               "frame_index": r["frame_index"], "dataset": r["dataset"]} for r in truth if r["frame_index"] % 5 == 0]
    image = sorted((tiny_sample / "kvasir" / "images").iterdir())[0]
    frames.append({"id": f"kvasir/{image.name}#0", "source": str(image), "frame_index": 0, "dataset": "kvasir"})
    frames.append({"id": f"gone/{SPECIAL}#0", "source": f"s3://{s3_bucket}/nowhere/{SPECIAL}", "frame_index": 0,
                   "dataset": "gone"})
    ids = [f["id"] for f in frames]

    def publish(dir_uri: str, table: pa.Table) -> None:
        part = storage.join(dir_uri, "part-0.parquet")
        storage.write_table(table, part)
        storage.publish(dir_uri, [storage.resolve(part)[1]], {"rows": table.num_rows})

    publish(storage.join(root, "embeddings"), pa.Table.from_pylist(frames))
    publish(storage.join(root, "clusters", "assignments"),
            pa.table({"id": ids, "cluster": pa.array([i % 4 for i in range(len(ids))], pa.int32()),
                      "distance": pa.array(np.linspace(0, 1, len(ids)), pa.float32())}))
    storage.publish(storage.join(root, "clusters"), [], {"k": 4, "assignments": "assignments"})
    removed = pa.table({"id": [ids[1], ids[2], ids[-1], ids[-2], ids[3]],
                        "reason": ["duplicate", "duplicate", "duplicate", "invalid", "outlier"],
                        "duplicate_of": [ids[0], ids[0], ids[0], None, None],
                        "max_sim": pa.array([0.97, 0.991, 0.95, math.nan, math.nan], pa.float32())})
    sel = storage.join(root, "selections", "s3sel")
    publish(storage.join(sel, "removed"), removed)
    storage.write_json(storage.join(sel, "summary.json"),
                       {"name": "s3sel", "method": "meddel", "input_count": len(ids), "kept_count": len(ids) - 5,
                        "ratio": (len(ids) - 5) / len(ids),
                        "removed_by_reason": {"duplicate": 3, "invalid": 1, "outlier": 1}, "per_dataset": {}})
    storage.publish(sel, [], {"name": "s3sel"})

    index = html_report.write_html_report(root)
    assert index == f"s3://{s3_bucket}/html-run/reports/html/index.html"
    text, page = load_page(index)
    assert assert_images_exist(index, page) == len(page.find("img")) > 0
    missing = page.find("div", class_="missing")
    assert len(missing) == 1 and missing[0]["attrs"]["title"] == f"gone/{SPECIAL}#0"
    assert "no thumbnail" in missing[0]["text"] and SPECIAL not in text
    group = page.find("div", class_="group")[0]
    assert group["attrs"]["data-anchor"] == ids[0] and group["attrs"]["data-size"] == "3"
    assert [f["attrs"]["data-id"] for f in page.find("figure", class_="member")] == [ids[2], ids[1], ids[-1]]
    assert storage.read_manifest(RunLayout(root).html)["thumbnails"] == {
        "shown": 6, "from_store": 0, "decoded": 5, "missing": 1}


def test_report_end_to_end_with_real_training(curated, tiny_sample, tmp_path_factory):
    """``report`` on the curated tiny run: materialize, MAE pretraining per selection (equal
    compute: epochs = base / R), segmentation finetuning, the NormDEL table and plot."""
    from deldist import report
    from deldist.metrics import normdel

    root, _ = curated
    copy = str(tmp_path_factory.mktemp("report_e2e") / "run")
    shutil.copytree(root, copy)
    settings = report.demo_settings(str(tiny_sample / "kvasir"), quick=True)
    settings["pretrain"].update(epochs=1, warmup_epochs=0)
    settings["finetune"]["segmentation"].update(epochs=2)
    materialize.run(materialize.Config(output=copy, size=64))
    out = report.run(report.Config(output=copy, name="e2e", selections=["all", SELECTION, "random"], frame_size=64,
                                   **settings))
    rows = {r["selection"]: r for r in out["rows"]}
    assert set(rows) == {"all", SELECTION, "random", "random-init"}
    total = rows["all"]["frames"]
    for name in (SELECTION, "random"):
        r = rows[name]
        assert r["frames"] == round(r["retained"] * total)
        assert r["epochs"] == report.schedule_epochs(1, r["retained"], "equal_compute") > 1
        # equal compute: the same number of steps as the full run, up to one epoch's rounding
        assert abs(r["steps"] - rows["all"]["steps"]) <= r["steps"] / r["epochs"] + 1
    for r in out["rows"]:
        assert 0.0 <= r["miou"] <= 1.0
        if r["method"] != "control":
            assert r["normdel"] == pytest.approx(normdel(r["miou"], r["retained"]))
    saved = storage.read_json(storage.join(out["report"], "report.json"))
    assert saved["schedule"] == "equal_compute" and saved["caption"].startswith("pretraining: ")
    assert "| epochs | steps |" in storage.read_bytes(out["table"]).decode()
