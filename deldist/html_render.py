"""The HTML report's page and figures, as pure functions of what to show
(:class:`deldist.html_report.SelectionView`, :class:`RunView`): no I/O. Everything from the
data is HTML-escaped, in text and in attributes; the page carries ``data-*`` attributes so
tests and scripts can read the numbers back."""

from __future__ import annotations

import html
import io
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from deldist.html_report import SelectionView


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
class SimilarityView:
    """The max_sim histogram of dedup/scores: every item with an earlier-ranked item in its cluster
    (rank > 0), before any selection rule. ``above``: similarity threshold -> items above it."""

    items: int
    edges: np.ndarray  # (b + 1,) fixed bins over [-1, 1]
    counts: np.ndarray  # (b,)
    quantiles: dict[str, float]
    above: dict[float, int]
    src: str | None = None


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
    similarity: SimilarityView | None = None  # dedup/scores' max_sim, for choosing eps
    sweeps: list[dict[str, Any]] = field(default_factory=list)  # deldist sweep outputs (html_report.sweep_view)


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
    out.append(_similarity_section(run))
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


# ------------------------------------------------------------------ max_sim and eps (deldist sweep)


def similarity_edges(min_eps: float = 1e-4, per_decade: int = 20) -> np.ndarray:
    """Fixed bin edges over cosine similarity [-1, 1], float64 ascending, spaced evenly in log(1 -
    similarity) = log(eps): ``per_decade`` bins per decade of eps from ``min_eps`` to 2, and one
    bin [1 - min_eps, 1]. Near-duplicate similarities crowd just below 1, where linear bins would
    put them all in one bin; these bins read on the same log axis as eps. Every run, dataset and
    sweep with the same settings uses the same bins, so their histograms compare bin by bin."""
    decades = math.log10(2.0 / min_eps)
    eps = np.r_[0.0, np.logspace(math.log10(min_eps), math.log10(2.0), int(math.ceil(decades * per_decade)) + 1)]
    return np.sort(1.0 - eps)


def similarity_histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """int64 (b,) counts of ``values`` in the bins ``edges`` (as ``np.histogram``: [lo, hi), the
    last bin [lo, hi]). Values past the ends (float32 rounding past 1) count in the end bins;
    NaN are left out."""
    v = np.asarray(values, np.float64)
    v = np.clip(v[~np.isnan(v)], edges[0], edges[-1])
    return np.histogram(v, bins=edges)[0].astype(np.int64)


def similarity_png(edges: np.ndarray, histograms: dict[str, np.ndarray],
                   curves: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                   reference: dict[float, float] | None = None) -> bytes:
    """PNG: the max_sim histogram over 1 - max_sim on a log axis (the first of ``histograms`` filled,
    the others as lines; ``edges`` from :func:`similarity_edges`) and, with ``curves`` (label ->
    (eps, kept fraction)), the kept fraction against eps on the same axis beside it;
    ``reference``: eps -> kept fraction points to mark (MedDEL's Table 2, on their data)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    eps_edges = 1.0 - np.asarray(edges, np.float64)[::-1]
    eps_edges[0] = eps_edges[1] / 2  # the bin [0, min_eps] drawn at the log axis' left end
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(12 if curves else 7, 3.6), squeeze=False)
    if curves:
        ax = axes[0, 0]
        for label, (eps, ratio) in curves.items():
            ax.plot(eps, ratio, marker=".", label=label)
        if reference:
            ax.scatter(list(reference), list(reference.values()), marker="x", color="black", zorder=3,
                       label="MedDEL Table 2 (their 88k frames)")
        ax.set_xscale("log")
        ax.set_xlabel("eps (duplicate above similarity 1 - eps)")
        ax.set_ylabel("kept fraction")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    ax = axes[0, -1]
    for i, (label, counts) in enumerate(histograms.items()):
        ax.stairs(np.asarray(counts)[::-1], eps_edges, fill=i == 0, label=label, alpha=0.6 if i == 0 else 1.0)
    ax.set_xscale("log")
    occupied = np.flatnonzero(np.sum([np.asarray(c)[::-1] for c in histograms.values()], axis=0))
    if len(occupied):
        ax.set_xlim(eps_edges[occupied[0]], eps_edges[occupied[-1] + 1])
    ax.set_xlabel("1 - max_sim (max_sim: similarity to the nearest earlier-ranked item)")
    ax.set_ylabel("items per bin")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _similarity_section(run: RunView) -> str:
    """The max_sim histogram of dedup/scores and every sweep's kept-vs-eps table."""
    out = ["<h2>choosing eps: max_sim and kept counts</h2>"]
    sim = run.similarity
    if sim is None:
        out.append('<p class="muted">no published dedup/scores</p>')
    else:
        q = ", ".join(f"{k} {v:.4f}" for k, v in sim.quantiles.items())
        out.append(f'<div class="similarity" data-items="{sim.items}"><p>{_num(sim.items)} items of dedup/scores '
                   "have an earlier-ranked item in their cluster; their <code>max_sim</code> (before any selection "
                   f"rule): {_e(q)}</p>")
        if sim.src:
            out.append(f'<img class="max-sim-histogram" src="{_e(sim.src)}" alt="histogram of max_sim">')
        out.append('<table class="max-sim-above"><tr><th>similarity threshold (1 - eps)</th><th>eps</th>'
                   "<th>items above</th></tr>" + "".join(
                       f'<tr data-threshold="{t:g}"><td>{t:g}</td><td>{1 - t:.4g}</td><td data-above="{n}">'
                       f"{_num(n)}</td></tr>" for t, n in sim.above.items()) + "</table>")
        out.append('<details><summary>histogram bins</summary><table class="max-sim-bins"><tr><th>max_sim from</th>'
                   "<th>to</th><th>items</th></tr>" + "".join(
                       f'<tr data-bin="{i}"><td>{sim.edges[i]:.6g}</td><td>{sim.edges[i + 1]:.6g}</td>'
                       f'<td data-items="{int(sim.counts[i])}">{_num(int(sim.counts[i]))}</td></tr>'
                       for i in np.flatnonzero(sim.counts)) + "</table></details></div>")
    for sweep in run.sweeps:
        out.append(_sweep_table(sweep))
    if not run.sweeps:
        out.append('<p class="muted">no sweeps: <code>deldist sweep</code> gives the kept count per eps and per '
                   "target ratio, per dataset</p>")
    return "\n".join(out)


def _sweep_table(sweep: dict[str, Any]) -> str:
    """One sweep: kept count and fraction per eps, overall and per dataset (kept_by_eps.csv rows)."""
    datasets = sweep["datasets"]
    out = [f'<div class="sweep" data-sweep="{_e(sweep["name"])}"><h3>sweep {_e(sweep["name"])} <span class="muted">'
           f'(selection {_e(sweep["selection"])}, {_e(sweep["method"])}, dedup_rule {_e(sweep["dedup_rule"])}; '
           f'{_num(sweep["candidates"])} of {_num(sweep["input"])} items pass the rules before the duplicates)'
           "</span></h3>"]
    if sweep.get("src"):
        out.append(f'<img class="sweep-plot" src="{_e(sweep["src"])}" alt="kept fraction against eps">')
    out.append('<table class="kept-by-eps"><tr><th>eps</th><th>similarity threshold</th><th>kept</th><th>ratio</th>'
               + "".join(f"<th>ratio: {_e(d)}</th>" for d in datasets) + "</tr>")
    for row in sweep["rows"]:
        cells = [f'<td data-kept="{row["kept"]}">{_num(row["kept"])}</td><td>{_num(row["ratio"])}</td>'
                 if row["kept"] is not None else '<td colspan="2" class="muted">below the neighbour floor</td>']
        cells += [f'<td data-dataset="{_e(d)}">{_num(row["by_dataset"][d])}</td>' if row["by_dataset"].get(d)
                  is not None else "<td></td>" for d in datasets]
        out.append(f'<tr data-eps="{row["eps"]}"><td>{row["eps"]:g}</td><td>{row["similarity_threshold"]:.4f}</td>'
                   + "".join(cells) + "</tr>")
    out.append("</table></div>")
    return "\n".join(out)
