"""HTML curation report of a run: what each selection kept and removed, and what it looks like.

:func:`write_html_report` writes ``<output>/reports/html/`` (published like every stage):

- ``index.html``: one self-contained page (inline CSS, no scripts, no external assets) with the
  run's counts, the cluster-size histogram and, per selection, its counts, a per-dataset table
  (input / kept / ratio) and galleries: duplicate groups (the frame that stays beside the
  frames removed as its duplicates, with their ``max_sim``), removed outliers (farthest from
  their centroid first) and invalid frames (with their quality statistics); each bounded.
- ``cluster_sizes.png``: histogram of cluster sizes (matplotlib, Agg backend).
- ``thumbs/<n>.jpg``: small JPEG thumbnails named by a counter, not by frame id (ids hold any
  character a file name may hold). Taken from a published frame store (``deldist
  materialize``) when one holds the frame, else decoded from the source video or image; a
  frame that cannot be read shows a placeholder text instead.
- ``_manifest.json`` + ``_SUCCESS``, with where the thumbnails came from.

Everything that comes from the data (ids, file names, dataset and selection names, the run
URI) is HTML-escaped, in text and in attributes. Only a bounded number of frames is decoded,
so the report costs the same on a run of a thousand frames or of millions.

The page carries ``data-*`` attributes (selection, counts, group anchors, similarities) so
tests and scripts can read the numbers back without scraping the layout.
"""

from __future__ import annotations

import concurrent.futures
import html
import io
import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from deldist import storage
from deldist.schema import QUALITY_COLUMNS

# reasons whose rows name the frame they duplicate (duplicate_of) and their similarity to it
GROUP_REASONS: tuple[str, ...] = ("duplicate", "near_copy", "temporal")
HISTOGRAM = "cluster_sizes.png"
THUMBS = "thumbs"
# wanted frames of one video further apart than this are decoded in separate seeks, so a
# gallery spread over an hour of video costs a few GOPs per frame, not the whole stream
_SEEK_GAP_FRAMES = 250


def html_dir(output: str) -> str:
    """Where the HTML report of run ``output`` lives."""
    return storage.join(output, "reports", "html")


# ------------------------------------------------------------------ what to show (pure)


@dataclass(frozen=True)
class DuplicateGroup:
    """A frame (``anchor``: the ``duplicate_of`` of the members) and frames removed as its
    duplicates. ``anchor_status`` is ``"kept"`` or the reason the anchor was removed itself
    (dedup scores rank before the other filters, so an anchor may be, say, invalid)."""

    anchor: str
    anchor_status: str
    size: int  # members removed as its duplicates, all of them (not only those shown)
    members: tuple[tuple[str, float, str], ...]  # (id, max_sim, reason), most similar first


@dataclass
class SelectionView:
    """What the page shows of one selection (ids only; thumbnails and captions come later)."""

    name: str
    method: str
    counts: dict[str, Any]
    datasets: list[dict[str, Any]]
    groups: list[DuplicateGroup]
    outliers: list[str]
    invalid: list[str]
    parameters: dict[str, Any] = field(default_factory=dict)

    def frame_ids(self) -> list[str]:
        """Every id the page shows for this selection, in page order, each once."""
        ids: list[str] = []
        for g in self.groups:
            ids += [g.anchor, *(m[0] for m in g.members)]
        return list(dict.fromkeys(ids + self.outliers + self.invalid))


def selection_counts(summary: dict[str, Any]) -> dict[str, Any]:
    """input / kept / removed counts, kept ratio and removals by reason of a ``summary.json``."""
    n, kept = int(summary["input_count"]), int(summary["kept_count"])
    return {"input": n, "kept": kept, "removed": int(summary.get("removed_count", n - kept)),
            "ratio": float(summary["ratio"]), "removed_by_reason": dict(summary.get("removed_by_reason", {}))}


def dataset_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per dataset (sorted by name): input, kept and kept ratio, from ``summary["per_dataset"]``."""
    return [{"dataset": name, "input": int(d["input"]), "kept": int(d["kept"]), "ratio": float(d["ratio"])}
            for name, d in sorted(summary.get("per_dataset", {}).items())]


def cluster_sizes(cluster: np.ndarray | pa.Array | pa.ChunkedArray, k: int | None = None) -> np.ndarray:
    """Members per cluster (int64 (k,)) from the ``cluster`` column of ``clusters/assignments``;
    ``k`` keeps empty clusters at the end of the range in the count."""
    if isinstance(cluster, (pa.Array, pa.ChunkedArray)):
        cluster = cluster.to_numpy() if isinstance(cluster, pa.Array) else cluster.combine_chunks().to_numpy()
    labels = np.asarray(cluster, np.int64)
    return np.bincount(labels, minlength=k or 0).astype(np.int64)


def size_histogram(sizes: np.ndarray, max_bins: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """(bin edges int64 (b + 1,), clusters per bin int64 (b,)) of cluster sizes: integer-wide
    bins [edge_i, edge_i+1), at most ``max_bins`` of them, covering min..max size."""
    sizes = np.asarray(sizes, np.int64)
    if not len(sizes):
        return np.zeros(1, np.int64), np.zeros(0, np.int64)
    lo, hi = int(sizes.min()), int(sizes.max())
    width = max(1, -(-(hi - lo + 1) // max_bins))  # ceil division
    n_bins = -(-(hi - lo + 1) // width)
    edges = lo + width * np.arange(n_bins + 1, dtype=np.int64)
    counts = np.bincount((sizes - lo) // width, minlength=n_bins).astype(np.int64)
    return edges, counts


def duplicate_groups(removed: pa.Table, max_groups: int, max_per_group: int) -> list[DuplicateGroup]:
    """The ``max_groups`` largest duplicate groups of a selection's ``removed`` table (id,
    reason, duplicate_of, max_sim), largest first (ties by anchor id), each with at most
    ``max_per_group`` members, most similar first."""
    if max_groups <= 0 or removed.num_rows == 0:
        return []
    rows = removed.filter(pc.and_(pc.is_in(removed.column("reason"), value_set=pa.array(GROUP_REASONS)),
                                  pc.is_valid(removed.column("duplicate_of"))))
    if rows.num_rows == 0:
        return []
    sizes = rows.group_by("duplicate_of").aggregate([("id", "count")])
    sizes = sizes.sort_by([("id_count", "descending"), ("duplicate_of", "ascending")]).slice(0, max_groups)
    anchors = sizes.column("duplicate_of").to_pylist()
    members: dict[str, list[tuple[str, float, str]]] = {a: [] for a in anchors}
    chosen = rows.filter(pc.is_in(rows.column("duplicate_of"), value_set=pa.array(anchors, pa.string())))
    for r in chosen.select(["id", "duplicate_of", "max_sim", "reason"]).to_pylist():
        sim = float("nan") if r["max_sim"] is None else float(r["max_sim"])
        members[r["duplicate_of"]].append((r["id"], sim, r["reason"]))
    # an anchor not in removed is retained (retained and removed partition the ids)
    anchor_rows = removed.filter(pc.is_in(removed.column("id"), value_set=pa.array(anchors, pa.string())))
    status = dict(zip(anchor_rows.column("id").to_pylist(), anchor_rows.column("reason").to_pylist()))
    groups = []
    for anchor, size in zip(anchors, sizes.column("id_count").to_pylist()):
        shown = sorted(members[anchor], key=lambda m: (-m[1], m[0]))[:max_per_group]
        groups.append(DuplicateGroup(anchor, status.get(anchor, "kept"), int(size), tuple(shown)))
    return groups


def spread_evenly(ids: Iterable[str], limit: int) -> list[str]:
    """At most ``limit`` of ``ids`` (sorted), evenly spaced: a long run of black frames in one
    video does not fill a gallery that should show the variety of what was removed."""
    ordered = sorted(ids)
    if len(ordered) <= limit:
        return ordered
    if limit <= 0:
        return []
    picks = np.unique(np.linspace(0, len(ordered) - 1, limit).round().astype(np.int64))
    return [ordered[i] for i in picks]


def removed_ids(removed: pa.Table, reason: str) -> list[str]:
    """Ids removed for ``reason``."""
    return removed.filter(pc.equal(removed.column("reason"), reason)).column("id").to_pylist()


def farthest_first(ids: Iterable[str], distance: dict[str, float], limit: int) -> list[str]:
    """At most ``limit`` ids, largest ``distance`` (to the centroid) first; ids without a
    distance come last, by id."""
    return sorted(ids, key=lambda i: (-distance.get(i, -np.inf), i))[:max(limit, 0)]


def selection_view(summary: dict[str, Any], removed: pa.Table, *, max_per_gallery: int, max_groups: int,
                   max_per_group: int, outlier_distance: dict[str, float] | None = None) -> SelectionView:
    """Everything one selection's section shows, from its ``summary.json`` and ``removed``
    table (and the outliers' cosine distances to their centroid, when known)."""
    outliers = removed_ids(removed, "outlier")
    outliers = farthest_first(outliers, outlier_distance, max_per_gallery) if outlier_distance \
        else spread_evenly(outliers, max_per_gallery)
    params = summary.get("parameters", {})
    shown: dict[str, Any] = {k: params.get(k) for k in ("method", "eps", "target_ratio", "match_selection", "seed")
                             if params.get(k) is not None}
    for rule in summary.get("rules", []):  # every rule that ran, whose rule it is, what it removed
        settings = ", ".join(f"{k}={v}" for k, v in rule.get("parameters", {}).items() if v is not None)
        shown[f"rule: {rule['rule']}"] = f"{rule['by']}; removed {rule['removed']}" + (f"; {settings}" if settings else "")
    if summary.get("similarity_threshold") is not None:
        shown["similarity_threshold"] = summary["similarity_threshold"]
    return SelectionView(
        name=str(summary.get("name", "")), method=str(summary.get("method", "")),
        counts=selection_counts(summary), datasets=dataset_rows(summary),
        groups=duplicate_groups(removed, max_groups, max_per_group), outliers=outliers,
        invalid=spread_evenly(removed_ids(removed, "invalid"), max_per_gallery), parameters=shown)


# ------------------------------------------------------------------ rendering (pure)


def _e(value: Any) -> str:
    """HTML-escape anything for text and (quoted) attribute values."""
    return html.escape(str(value), quote=True)


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0} th,td{border:1px solid #ccc;padding:.2em .6em;text-align:right}
th:first-child,td:first-child{text-align:left} .muted{color:#777}
.gallery{display:flex;flex-wrap:wrap;gap:8px;margin:.5em 0}
figure{margin:0;width:132px;font-size:11px;word-break:break-all}
figure img,.missing{width:128px;height:128px;display:block;border:2px solid #ccc}
.missing{background:#eee;color:#a00;font-size:11px;overflow:hidden;box-sizing:border-box;padding:4px}
.group{border:1px solid #ddd;padding:6px;margin:.5em 0;display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
figure.anchor img,figure.anchor .missing{border-color:#2a2} figure.member img{border-color:#c33}
figure.anchor.removed img{border-color:#c80} .warn{background:#fff3cd;padding:.4em;border:1px solid #e0c060}
"""


@dataclass
class RunView:
    """The run-level part of the page."""

    output: str
    embedded: int | None = None
    sources: int | None = None
    errors: int | None = None
    model: str | None = None
    random_init: bool = False
    clusters: dict[str, Any] | None = None  # k, min, median, max size
    histogram_src: str | None = None
    selections: list[SelectionView] = field(default_factory=list)


def _figure(frame_id: str, caption: str, thumbs: dict[str, str], missing: dict[str, str], css: str,
            extra: str = "") -> str:
    """One thumbnail (or its placeholder) with the id and a caption."""
    label = _e(frame_id)
    if frame_id in thumbs:
        picture = f'<img src="{_e(thumbs[frame_id])}" alt="{label}" title="{label}" loading="lazy">'
    else:
        why = missing.get(frame_id, "not rendered")
        picture = f'<div class="missing" title="{label}">no thumbnail: {_e(why)}</div>'
    return (f'<figure class="{css}" data-id="{label}"{extra}>{picture}'
            f'<figcaption>{label}<br>{caption}</figcaption></figure>')


def _quality_caption(info: dict[str, Any]) -> str:
    parts = [f"{name} {info[name]:.3g}" for name in ("brightness", "contrast", "blur", "dark", "saturated")
             if info.get(name) is not None]
    return _e(" · ".join(parts))


def _selection_section(i: int, view: SelectionView, frames: dict[str, dict[str, Any]], thumbs: dict[str, str],
                       missing: dict[str, str]) -> str:
    c = view.counts
    out = [f'<section class="selection" id="sel-{i}" data-selection="{_e(view.name)}">',
           f"<h2>selection {_e(view.name)} <span class=\"muted\">({_e(view.method)})</span></h2>"]
    if view.parameters:
        out.append('<p class="muted">' + _e(", ".join(f"{k} = {v}" for k, v in view.parameters.items())) + "</p>")
    out.append('<table class="counts"><tr>' + "".join(f"<th>{h}</th>" for h in ("input", "kept", "removed", "ratio"))
               + "".join(f"<th>removed: {_e(r)}</th>" for r in c["removed_by_reason"]) + "</tr><tr>"
               + "".join(f'<td data-count="{k}">{_num(c[k])}</td>' for k in ("input", "kept", "removed", "ratio"))
               + "".join(f'<td data-reason="{_e(r)}">{_num(n)}</td>' for r, n in c["removed_by_reason"].items())
               + "</tr></table>")
    if view.datasets:
        out.append("<h3>per dataset</h3><table class=\"datasets\"><tr><th>dataset</th><th>input</th><th>kept</th>"
                   "<th>ratio</th></tr>")
        for d in view.datasets:
            out.append(f'<tr data-dataset="{_e(d["dataset"])}"><td>{_e(d["dataset"])}</td>'
                       + "".join(f'<td data-count="{k}">{_num(d[k])}</td>' for k in ("input", "kept", "ratio"))
                       + "</tr>")
        out.append("</table>")

    out.append(f"<h3>duplicate groups <span class=\"muted\">(largest {len(view.groups)}; green = the frame that "
               "stays, red = removed as its duplicates, with their cosine similarity to it)</span></h3>")
    if not view.groups:
        out.append('<p class="muted">no frames removed as duplicates</p>')
    for g in view.groups:
        more = g.size - len(g.members)
        anchor_css = "anchor" if g.anchor_status == "kept" else "anchor removed"
        status = "kept" if g.anchor_status == "kept" else f"removed itself: {g.anchor_status}"
        out.append(f'<div class="group" data-anchor="{_e(g.anchor)}" data-size="{g.size}">')
        out.append(_figure(g.anchor, f"<b>{_e(status)}</b> · {g.size} duplicates", thumbs, missing, anchor_css,
                           f' data-status="{_e(g.anchor_status)}"'))
        for member, sim, reason in g.members:
            label = f"sim {sim:.4f}" + ("" if reason == "duplicate" else f" ({reason})")
            out.append(_figure(member, _e(label), thumbs, missing, "member",
                               f' data-sim="{sim:.6f}" data-reason="{_e(reason)}"'))
        if more > 0:
            out.append(f'<p class="muted">+ {more} more</p>')
        out.append("</div>")

    galleries = (("outlier", view.outliers, "removed outliers (farthest from their centroid first)"),
                 ("invalid", view.invalid, "invalid frames (quality filter)"))
    for reason, ids, title in galleries:
        total = c["removed_by_reason"].get(reason, 0)
        out.append(f"<h3>{title} <span class=\"muted\">({len(ids)} of {total})</span></h3>")
        if not ids:
            out.append(f'<p class="muted">no frames removed as {reason}</p>')
            continue
        out.append(f'<div class="gallery" data-gallery="{reason}">')
        for frame_id in ids:
            info = frames.get(frame_id, {})
            if reason == "outlier" and info.get("distance") is not None:
                caption = _e(f"distance {info['distance']:.4f}")
            else:
                caption = _quality_caption(info)
            out.append(_figure(frame_id, caption, thumbs, missing, reason))
        out.append("</div>")
    out.append("</section>")
    return "\n".join(out)


def render_html(run: RunView, frames: dict[str, dict[str, Any]], thumbs: dict[str, str],
                missing: dict[str, str]) -> str:
    """The whole page. ``frames``: id -> facts for captions (quality columns, ``distance``);
    ``thumbs``: id -> relative image src; ``missing``: id -> why it has no thumbnail."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>deldist curation report: {_e(run.output)}</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>deldist curation report</h1>", f'<p>run <code>{_e(run.output)}</code></p>']
    if run.random_init:
        out.append('<p class="warn">The embeddings come from a random-initialised encoder (tests only): '
                   "no basis for real curation.</p>")
    facts = [("embedded frames", run.embedded), ("sources", run.sources), ("unreadable inputs (errors/)", run.errors),
             ("encoder", run.model)]
    out.append('<table class="run">' + "".join(f'<tr><th>{k}</th><td>{_e(_num(v))}</td></tr>'
                                               for k, v in facts if v is not None) + "</table>")
    if run.selections:
        reasons = list(dict.fromkeys(r for s in run.selections for r in s.counts["removed_by_reason"]))
        out.append("<h2>selections</h2><table class=\"selections\"><tr><th>selection</th><th>method</th><th>input</th>"
                   "<th>kept</th><th>ratio</th>" + "".join(f"<th>removed: {_e(r)}</th>" for r in reasons) + "</tr>")
        for i, s in enumerate(run.selections):
            c = s.counts
            out.append(f'<tr data-selection="{_e(s.name)}"><td><a href="#sel-{i}">{_e(s.name)}</a></td>'
                       f"<td>{_e(s.method)}</td><td>{_num(c['input'])}</td><td>{_num(c['kept'])}</td>"
                       f"<td>{_num(c['ratio'])}</td>"
                       + "".join(f"<td>{_num(c['removed_by_reason'].get(r, 0))}</td>" for r in reasons) + "</tr>")
        out.append("</table>")
    else:
        out.append('<p class="muted">no published selections</p>')
    out.append("<h2>cluster sizes</h2>")
    if run.clusters:
        stats = run.clusters
        out.append(f'<p data-k="{stats["k"]}">k = {stats["k"]}; members per cluster: min {stats["min"]}, median '
                   f'{stats["median"]:g}, max {stats["max"]}; empty clusters {stats["empty"]}</p>')
        if run.histogram_src:
            out.append(f'<img class="histogram" src="{_e(run.histogram_src)}" alt="histogram of cluster sizes">')
    else:
        out.append('<p class="muted">no published clusters/</p>')
    for i, view in enumerate(run.selections):
        out.append(_selection_section(i, view, frames, thumbs, missing))
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def histogram_png(sizes: np.ndarray) -> bytes:
    """Bar chart of cluster sizes (x: members per cluster, y: clusters) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    edges, counts = size_histogram(sizes)
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4a7ab5", edgecolor="white")
    ax.yaxis.get_major_locator().set_params(integer=True)  # counts of clusters: no 0.5 ticks
    ax.set_xlabel("members per cluster")
    ax.set_ylabel("clusters")
    ax.set_title(f"{len(sizes)} clusters")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


# ------------------------------------------------------------------ thumbnails


def decode_chunks(rows: list[dict[str, Any]], max_gap: int = _SEEK_GAP_FRAMES) -> list[dict[str, Any]]:
    """Group frames (dicts with id, source, frame_index) into decode jobs: per video, runs of
    wanted indices at most ``max_gap`` frames apart (one seek each); one job per image."""
    from deldist.io import media_kind

    by_video: dict[str, list[tuple[int, str]]] = {}
    jobs: list[dict[str, Any]] = []
    for r in rows:
        if media_kind(r["source"]) == "video":
            by_video.setdefault(r["source"], []).append((int(r["frame_index"]), r["id"]))
        else:
            jobs.append({"kind": "image", "source": r["source"], "frames": [(0, r["id"])]})
    for source in sorted(by_video):
        frames = sorted(by_video[source])
        chunk = [frames[0]]
        for f in frames[1:]:
            if f[0] - chunk[-1][0] > max_gap:
                jobs.append({"kind": "video", "source": source, "frames": chunk})
                chunk = []
            chunk.append(f)
        jobs.append({"kind": "video", "source": source, "frames": chunk})
    return jobs


def _decode_job(job: dict[str, Any], size: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Decode one job -> (id -> rgb (size, size, 3), id -> why it failed). Never raises: a
    frame that cannot be read becomes a placeholder, not a failed report."""
    from deldist.frames import Sampling, decode_image, decode_video
    from deldist.io import open_source

    images: dict[str, np.ndarray] = {}
    try:
        if job["kind"] == "image":
            frame_id = job["frames"][0][1]
            images[frame_id] = decode_image(storage.read_bytes(job["source"]), size)
        else:
            wanted = {index: frame_id for index, frame_id in job["frames"]}
            source = open_source(job["source"])  # a path, or an open object-store file
            try:
                for index, _, rgb in decode_video(source, size, Sampling(), start_frame=min(wanted), threads=1,
                                                  only=frozenset(wanted)):
                    images[wanted[index]] = rgb
            finally:
                if not isinstance(source, str):
                    source.close()
    except Exception as e:  # noqa: BLE001 - any unreadable source is a placeholder
        reason = f"{type(e).__name__}: {e}"
    else:
        reason = "frame not in the decoded stream"
    return images, {frame_id: reason[:200] for _, frame_id in job["frames"] if frame_id not in images}


def _read_rows(dir_uri: str, ids: list[str], columns: list[str]) -> pa.Table:
    """Rows of a published table whose id is in ``ids`` (only the listed columns present)."""
    fs, paths = storage.published_paths(dir_uri)
    if not paths or not ids:
        return pa.table({"id": pa.array([], pa.string())})
    dataset = pq.ParquetDataset(paths, filesystem=fs, filters=[("id", "in", ids)])
    present = [c for c in columns if c in dataset.schema.names]
    return dataset.read(columns=present)


def _thumbnail_jpeg(image: np.ndarray | bytes, size: int) -> bytes:
    """RGB array or encoded image -> square JPEG ``size`` px (center crop)."""
    from PIL import Image, ImageOps

    from deldist.materialize import encode_jpeg

    if isinstance(image, bytes):
        picture = ImageOps.fit(Image.open(io.BytesIO(image)).convert("RGB"), (size, size))
        image = np.asarray(picture)
    elif image.shape[0] != size or image.shape[1] != size:
        image = np.asarray(ImageOps.fit(Image.fromarray(image), (size, size)))
    return encode_jpeg(image, quality=85)


def frame_stores(output: str, selections: list[str]) -> list[str]:
    """Published frame stores of the run: the full one (``frames/all``) and each selection's."""
    from deldist.materialize import store_uri

    candidates = [store_uri(output, None), *(store_uri(output, s) for s in selections)]
    return [s for s in dict.fromkeys(candidates) if storage.is_published(s)]


def make_thumbnails(ids: list[str], locations: pa.Table, thumbs_dir: str, size: int,
                    stores: list[str], workers: int = 2) -> tuple[dict[str, str], dict[str, str], dict[str, int]]:
    """Write ``thumbs_dir/<n>.jpg`` for ``ids`` (n = position in ``ids``).

    Frames come from the first published store in ``stores`` that holds them, the rest are
    decoded from their source (``locations``: id, source, frame_index). Returns (id -> file
    name, id -> why there is no thumbnail, counts by origin).
    """
    encoded: dict[str, bytes] = {}
    for store in stores:
        pending = [i for i in ids if i not in encoded]
        if not pending:
            break
        table = _read_rows(store, pending, ["id", "jpeg"])
        if table.num_rows:
            encoded.update(zip(table.column("id").to_pylist(), table.column("jpeg").to_pylist()))
    located = {r["id"]: r for r in locations.to_pylist()}
    missing = {i: "not in embeddings/" for i in ids if i not in encoded and i not in located}
    to_decode = [located[i] for i in ids if i not in encoded and i in located]
    decoded: dict[str, np.ndarray] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # PyAV and Pillow release the GIL while decoding: threads overlap the sources
        for images, failed in pool.map(lambda job: _decode_job(job, size), decode_chunks(to_decode)):
            decoded.update(images)
            missing.update(failed)

        def write(item: tuple[int, str]) -> tuple[str, str | None, str | None]:
            n, frame_id = item
            name = f"{n}.jpg"
            try:
                source = encoded[frame_id] if frame_id in encoded else decoded[frame_id]
                storage.write_bytes(storage.join(thumbs_dir, name), _thumbnail_jpeg(source, size))
            except Exception as e:  # noqa: BLE001 - a corrupt stored JPEG is a placeholder too
                return frame_id, None, f"{type(e).__name__}: {e}"[:200]
            return frame_id, name, None

        written: dict[str, str] = {}
        wanted = [(n, i) for n, i in enumerate(ids) if i in encoded or i in decoded]
        for frame_id, name, error in pool.map(write, wanted):
            if name:
                written[frame_id] = name
            else:
                missing[frame_id] = error or "not written"
    stats = {"shown": len(ids), "from_store": sum(1 for i in written if i in encoded),
             "decoded": sum(1 for i in written if i not in encoded), "missing": len(missing)}
    return written, missing, stats


# ------------------------------------------------------------------ driver


def published_selections(output: str) -> list[str]:
    """Names of the run's published selections, sorted."""
    root = storage.join(output, "selections")
    fs, path = storage.resolve(root)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    names = sorted(posixpath.basename(i.path.rstrip("/")) for i in infos if i.type == pafs.FileType.Directory)
    return [n for n in names if storage.is_published(storage.join(root, n))]


def _clear(dir_uri: str) -> None:
    """Delete a previous report's files (stale thumbnails) and its ``_SUCCESS`` first, so a
    half-rewritten report is never taken for a published one."""
    fs, path = storage.resolve(dir_uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir_contents(path, missing_dir_ok=True)


def write_html_report(output: str, selections: list[str] | None = None, *, max_per_gallery: int = 24,
                      max_groups: int = 8, max_per_group: int = 8, thumb_size: int = 128,
                      decode_workers: int = 2) -> str:
    """Write the HTML report of run ``output`` (see the module doc); returns the URI of its
    ``index.html``.

    ``selections``: names under ``<output>/selections/`` (default: every published one);
    ``max_per_gallery``: frames per outlier / invalid gallery; ``max_groups`` duplicate groups
    of at most ``max_per_group`` duplicates each. Works on local paths and object storage; no
    Ray needed.
    """
    names = published_selections(output) if selections is None else list(selections)
    out_dir = html_dir(output)
    run = RunView(output=output)
    emb_dir = storage.join(output, "embeddings")
    if storage.is_published(emb_dir):
        meta = storage.read_manifest(emb_dir)
        run.embedded, run.sources, run.errors = meta.get("rows"), meta.get("sources"), meta.get("errors")
        run.model, run.random_init = meta.get("model"), bool(meta.get("random_init", False))

    loaded: list[tuple[dict[str, Any], pa.Table]] = []
    for name in names:
        sel_dir = storage.join(output, "selections", name)
        storage.read_manifest(sel_dir)  # a clear error for an unknown or unfinished selection
        summary = storage.read_json(storage.join(sel_dir, "summary.json"))
        loaded.append((summary, storage.read_published(storage.join(sel_dir, "removed"),
                                                       ["id", "reason", "duplicate_of", "max_sim"])))

    _clear(out_dir)
    clusters_dir = storage.join(output, "clusters")
    distance: dict[str, float] = {}
    files: dict[str, bytes] = {}
    if storage.is_published(clusters_dir):
        manifest = storage.read_manifest(clusters_dir)
        assign_dir = storage.join(clusters_dir, manifest.get("assignments", "assignments"))
        sizes = cluster_sizes(storage.read_published(assign_dir, ["cluster"]).column("cluster"), manifest.get("k"))
        if len(sizes):
            run.clusters = {"k": len(sizes), "min": int(sizes.min()), "median": float(np.median(sizes)),
                            "max": int(sizes.max()), "empty": int((sizes == 0).sum())}
            files[HISTOGRAM] = histogram_png(sizes)
            run.histogram_src = HISTOGRAM
        outlier_ids = sorted({i for _, removed in loaded for i in removed_ids(removed, "outlier")})
        if outlier_ids:
            rows = _read_rows(assign_dir, outlier_ids, ["id", "distance"])
            distance = dict(zip(rows.column("id").to_pylist(), rows.column("distance").to_pylist()))

    run.selections = [selection_view(summary, removed, max_per_gallery=max_per_gallery, max_groups=max_groups,
                                     max_per_group=max_per_group, outlier_distance=distance or None)
                      for summary, removed in loaded]
    ids = list(dict.fromkeys(i for view in run.selections for i in view.frame_ids()))
    locations = _read_rows(emb_dir, ids, ["id", "source", "frame_index", *QUALITY_COLUMNS]) \
        if storage.is_published(emb_dir) else pa.table({"id": pa.array([], pa.string())})
    frames = {r["id"]: r for r in locations.to_pylist()}
    for frame_id, d in distance.items():
        frames.setdefault(frame_id, {})["distance"] = d
    thumbs_dir = storage.join(out_dir, THUMBS)
    written, missing, stats = make_thumbnails(ids, locations, thumbs_dir, thumb_size,
                                              frame_stores(output, names), decode_workers)
    thumbs = {i: f"{THUMBS}/{name}" for i, name in written.items()}

    for name, data in files.items():
        storage.write_bytes(storage.join(out_dir, name), data)
    index = storage.join(out_dir, "index.html")
    storage.write_bytes(index, render_html(run, frames, thumbs, missing).encode("utf-8"))
    _, root = storage.resolve(out_dir)
    listed = [posixpath.join(root, n) for n in ["index.html", *files, *(f"{THUMBS}/{w}" for w in written.values())]]
    storage.publish(out_dir, listed, {"selections": names, "thumbnails": stats, "index": "index.html"})
    return index
