"""HTML curation report of a run: what each selection kept and removed, and what it looks like.

:func:`write_html_report` writes ``<output>/reports/html/`` (published like every stage):

- ``index.html``: one self-contained page (inline CSS, no scripts, no external assets) with the
  run's counts, the cluster-size histogram and, per selection, its counts, a per-dataset table
  (input / kept / ratio) and galleries: duplicate groups (the frame that stays beside the
  frames removed as its duplicates, with their ``max_sim``), removed outliers (farthest from
  their centroid first) and invalid frames (with their quality statistics); each bounded.
- ``cluster_sizes.png``: histogram of cluster sizes (matplotlib, Agg backend).
- ``max_sim.png``: histogram of dedup/scores' ``max_sim`` (every item with an earlier-ranked item
  in its cluster, before any rule; read part by part), beside the items above a few similarity
  thresholds: what to look at before choosing eps. ``sweep-<n>.png``: each published ``deldist
  sweep``'s plot, its kept count per eps (overall and per dataset) in a table.
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

import csv
import io
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from deldist import storage
from deldist.html_render import (
    RunView,
    SimilarityView,
    histogram_png,
    render_html,
    similarity_edges,
    similarity_histogram,
    similarity_png,
)
from deldist.layout import RunLayout
from deldist.schema import QUALITY_COLUMNS
from deldist.thumbnails import frame_stores, make_thumbnails, read_rows

# reasons whose rows name the frame they duplicate (duplicate_of) and their similarity to it
GROUP_REASONS: tuple[str, ...] = ("duplicate", "near_copy", "temporal")
HISTOGRAM = "cluster_sizes.png"
SIMILARITY = "max_sim.png"
# the similarity thresholds whose items-above counts the page shows: two tight ones, MedDEL Table 2's 0.9-0.7
ABOVE: tuple[float, ...] = (0.99, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
THUMBS = "thumbs"
INDEX = "index.html"


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


def similarity_counts(rank: np.ndarray, max_sim: np.ndarray, edges: np.ndarray,
                      thresholds: Iterable[float] = ABOVE) -> tuple[np.ndarray, dict[float, int], list[float]]:
    """For the items with an earlier-ranked item (rank > 0): (histogram counts over ``edges``, items
    above each threshold, [min, max] of their max_sim or [] for none). Parts of a table add up."""
    v = np.asarray(max_sim, np.float64)[np.asarray(rank) > 0]
    span = [float(v.min()), float(v.max())] if len(v) else []
    return similarity_histogram(v, edges), {t: int((v > t).sum()) for t in thresholds}, span


def histogram_quantile(edges: np.ndarray, counts: np.ndarray, q: float) -> float:
    """The ``q`` quantile of histogrammed values, to the bin: the upper edge of the bin it falls in."""
    cumulative = np.cumsum(counts)
    return float(edges[1 + int(np.searchsorted(cumulative, q * cumulative[-1]))]) if cumulative[-1] else math.nan


def similarity_view(counts: np.ndarray, above: dict[float, int], span: list[float], edges: np.ndarray,
                    ) -> SimilarityView:
    """The page's max_sim part from :func:`similarity_counts` (summed over the table's parts)."""
    quantiles = {"min": span[0]} if span else {}
    quantiles.update({f"{name} (to the bin)": histogram_quantile(edges, counts, q) for name, q
                      in (("median", 0.5), ("90th percentile", 0.9), ("99th percentile", 0.99)) if span})
    quantiles.update({"max": span[1]} if span else {})
    return SimilarityView(items=int(counts.sum()), edges=edges, counts=counts, quantiles=quantiles, above=above)


def sweep_view(name: str, summary: dict[str, Any], eps_rows: list[dict[str, str]]) -> dict[str, Any]:
    """One ``deldist sweep`` for the page: its summary.json and the rows of its kept_by_eps.csv (as
    read: strings, "" for blank) -> name, selection, rule, counts, datasets and one row per eps
    (kept and ratio overall, kept ratio per dataset)."""
    overall = summary.get("kept_by_eps", [])
    datasets = list(summary.get("datasets", []))
    by_dataset: dict[float, dict[str, float | None]] = {}
    for r in eps_rows:
        by_dataset.setdefault(float(r["eps"]), {})[r["dataset"]] = float(r["ratio"]) if r["ratio"] != "" else None
    rows = [{"eps": float(r["eps"]), "similarity_threshold": float(r["similarity_threshold"]), "kept": r["kept"],
             "ratio": r["ratio"], "by_dataset": {d: by_dataset.get(float(r["eps"]), {}).get(d) for d in datasets}}
            for r in overall]
    return {"name": name, "selection": summary.get("selection", ""), "method": summary.get("method", ""),
            "dedup_rule": summary.get("dedup_rule", ""), "input": int(summary.get("input_count", 0)),
            "candidates": int(summary.get("candidate_count", 0)), "datasets": datasets, "rows": rows}


# ------------------------------------------------------------------ driver


def published_selections(output: str) -> list[str]:
    """Names of the run's published selections, sorted."""
    return _published_under(RunLayout(output).selections)


def _published_under(parent: str) -> list[str]:
    """Names of the published directories right under ``parent``, sorted."""
    fs, path = storage.resolve(parent)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    names = sorted(posixpath.basename(i.path.rstrip("/")) for i in infos if i.type == pafs.FileType.Directory)
    return [n for n in names if storage.is_published(storage.join(parent, n))]


def _clear(dir_uri: str) -> None:
    """Delete a previous report's files (stale thumbnails) and its ``_SUCCESS`` first, so a
    half-rewritten report is never taken for a published one."""
    fs, path = storage.resolve(dir_uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir_contents(path, missing_dir_ok=True)


def _read_selections(layout: RunLayout, names: list[str]) -> list[tuple[dict[str, Any], pa.Table]]:
    """(summary, removed rows) of each selection; a clear error for an unknown or unfinished one."""
    loaded = []
    for name in names:
        storage.read_manifest(layout.selection(name))
        loaded.append((storage.read_json(layout.selection_summary(name)),
                       storage.read_published(layout.selection_table(name, "removed"),
                                              ["id", "reason", "duplicate_of", "max_sim"])))
    return loaded


def _cluster_figures(layout: RunLayout, run: RunView, outlier_ids: list[str]) -> tuple[dict[str, bytes],
                                                                                        dict[str, float]]:
    """Cluster sizes into ``run`` and the histogram file; the centroid distance of ``outlier_ids``."""
    if not storage.is_published(layout.clusters):
        return {}, {}
    files: dict[str, bytes] = {}
    sizes = cluster_sizes(storage.read_published(layout.assignments, ["cluster"]).column("cluster"),
                          storage.read_manifest(layout.clusters).get("k"))
    if len(sizes):
        run.clusters = {"k": len(sizes), "min": int(sizes.min()), "median": float(np.median(sizes)),
                        "max": int(sizes.max()), "empty": int((sizes == 0).sum())}
        files[HISTOGRAM] = histogram_png(sizes)
        run.histogram_src = HISTOGRAM
    rows = read_rows(layout.assignments, outlier_ids, ["id", "distance"])
    distance = dict(zip(rows.column("id").to_pylist(), rows.column("distance").to_pylist())) \
        if "distance" in rows.column_names else {}
    return files, distance


def _similarity_figures(layout: RunLayout, run: RunView) -> dict[str, bytes]:
    """dedup/scores' max_sim histogram (read part by part) and every published sweep into ``run``;
    the figure files."""
    files: dict[str, bytes] = {}
    if storage.is_published(layout.scores):
        edges = similarity_edges()
        counts, above, span = np.zeros(len(edges) - 1, np.int64), dict.fromkeys(ABOVE, 0), []
        fs, paths = storage.published_paths(layout.scores)
        for path in paths:
            part = pq.read_table(path, columns=["rank", "max_sim"], filesystem=fs)
            c, a, s = similarity_counts(part.column("rank").to_numpy(), part.column("max_sim").to_numpy(), edges)
            counts += c
            above = {t: above[t] + a[t] for t in ABOVE}
            span = [min(span[0], s[0]), max(span[1], s[1])] if span and s else span or s
        run.similarity = similarity_view(counts, above, span, edges)
        if counts.sum():
            files[SIMILARITY] = similarity_png(edges, {"dedup/scores, rank > 0": counts})
            run.similarity.src = SIMILARITY
    for i, name in enumerate(_published_under(layout.sweeps)):
        d = layout.sweep(name)
        outputs = storage.read_manifest(d).get("outputs", {})
        summary = storage.read_json(storage.join(d, outputs.get("summary", "summary.json")))
        text = storage.read_bytes(storage.join(d, outputs.get("eps", "kept_by_eps.csv"))).decode("utf-8")
        view = sweep_view(name, summary, list(csv.DictReader(io.StringIO(text))))
        if outputs.get("plot") and storage.exists(storage.join(d, outputs["plot"])):
            view["src"] = f"sweep-{i}.png"
            files[view["src"]] = storage.read_bytes(storage.join(d, outputs["plot"]))
        run.sweeps.append(view)
    return files


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
    layout = RunLayout(output)
    names = published_selections(output) if selections is None else list(selections)
    out_dir = layout.html
    run = RunView(output=output)
    embedded = storage.is_published(layout.embeddings)
    if embedded:
        meta = storage.read_manifest(layout.embeddings)
        run.embedded, run.sources, run.errors = meta.get("rows"), meta.get("sources"), meta.get("errors")
        run.model, run.random_init = meta.get("model"), bool(meta.get("random_init", False))
    loaded = _read_selections(layout, names)
    _clear(out_dir)
    files, distance = _cluster_figures(layout, run, sorted({i for _, removed in loaded
                                                            for i in removed_ids(removed, "outlier")}))
    files.update(_similarity_figures(layout, run))
    run.selections = [selection_view(summary, removed, max_per_gallery=max_per_gallery, max_groups=max_groups,
                                     max_per_group=max_per_group, outlier_distance=distance or None)
                      for summary, removed in loaded]
    ids = list(dict.fromkeys(i for view in run.selections for i in view.frame_ids()))
    locations = read_rows(layout.embeddings, ids, ["id", "source", "frame_index", *QUALITY_COLUMNS]) \
        if embedded else pa.table({"id": pa.array([], pa.string())})
    frames = {r["id"]: r for r in locations.to_pylist()}
    for frame_id, d in distance.items():
        frames.setdefault(frame_id, {})["distance"] = d
    written, missing, stats = make_thumbnails(ids, locations, storage.join(out_dir, THUMBS), thumb_size,
                                              frame_stores(output, names), decode_workers)
    thumbs = {i: f"{THUMBS}/{name}" for i, name in written.items()}
    for name, data in files.items():
        storage.write_bytes(storage.join(out_dir, name), data)
    index = storage.join(out_dir, INDEX)
    storage.write_bytes(index, render_html(run, frames, thumbs, missing).encode("utf-8"))
    _, root = storage.resolve(out_dir)
    listed = [posixpath.join(root, n) for n in [INDEX, *files, *(f"{THUMBS}/{w}" for w in written.values())]]
    storage.publish(out_dir, listed, {"selections": names, "thumbnails": stats, "index": INDEX})
    return index
