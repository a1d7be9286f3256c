"""``deldist verify <run root>``: check every invariant a run root promises, and say which fail.

What is checked (each a named check in the report; ``ok`` only when none fails):

- ``published``: every directory with a ``_manifest.json`` has ``_SUCCESS`` and the other way
  round; every file a manifest lists exists; every listed Parquet file has the manifest's
  schema; Parquet parts outside any published directory (a stage stopped between its writes
  and its publish) fail, and parts inside one that its manifest does not list (left by an
  interrupted earlier attempt; readers never see them) are warnings. Directories whose name
  starts with ``_`` (progress records, Ray Train's storage) are private to their stage.
- ``sources``: every file embed listed has its frames in ``embeddings/`` or a row in
  ``errors/`` (and the counts agree), every error row names a listed file.
- ``embeddings``: each id once; as many rows as the manifest says.
- ``clusters``: ``k`` centroids of the embeddings' dimension, finite and unit length; every
  embedded id assigned once, to a cluster in [0, k).
- ``scores``: every assigned id scored once.
- ``selections/<name>``: retained and removed partition the embedded ids (a ``deldist prune``
  selection of a labelled set: the ids of its ``population/``); every removed item
  that names ``duplicate_of`` names a retained id (selections under the ``kept`` rule:
  SemDeDup's ``any_earlier`` may name a removed one); reasons known; the summary's counts match.
- ``curated/<selection>``: versions 1..N published, ``latest.json`` names the newest; each
  version a partition of its ids, which include every id of the version before.
- ``frames/<name>``: the frame store's ids are unique and embedded (retained ones, for a
  selection's store).

Only id columns and Parquet footers are read: no embedding matrix is loaded (the centroids are
k rows). Pure checks take Arrow arrays; :func:`verify_run` does the reading.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from deldist import storage
from deldist.config import StageConfig
from deldist.ids import split_ids
from deldist.layout import ALL_FRAMES, RunLayout, summary_of, table_of
from deldist.rules import REASONS
from deldist.schema import RETAINED_META
from deldist.shards import embedding_matrix

log = logging.getLogger(__name__)

MANIFEST, SUCCESS = storage.MANIFEST, storage.SUCCESS


class Config(StageConfig):
    """``deldist verify`` settings."""

    output: str = Field(description="run root URI to check")
    fail: bool = Field(True, description="raise (exit non-zero) when a check fails")


class VerificationError(RuntimeError):
    """A run root breaks an invariant; the message lists every failure."""


@dataclass
class Report:
    """What was checked, what failed and what only warrants a warning."""

    checked: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def check(self, name: str, problems: list[str]) -> None:
        self.checked.append(name)
        self.failures += [f"{name}: {p}" for p in problems]

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked": self.checked, "failures": self.failures, "warnings": self.warnings}


# ----------------------------------------------------------------------------- pure checks


def _sample(values: pa.Array | list, n: int = 3) -> str:
    values = values.to_pylist() if hasattr(values, "to_pylist") else list(values)
    return ", ".join(repr(v) for v in values[:n]) + (" ..." if len(values) > n else "")


def repeated_ids(ids: pa.Array) -> list[str]:
    """``ids`` that occur more than once."""
    counts = pc.value_counts(ids)
    return counts.field("values").filter(pc.greater(counts.field("counts"), 1)).to_pylist()


def set_problems(have: pa.Array, want: pa.Array, have_name: str, want_name: str) -> list[str]:
    """``have`` holds each id of ``want`` exactly once and nothing else."""
    problems = []
    if twice := repeated_ids(have):
        problems.append(f"{len(twice)} ids more than once in {have_name}: {_sample(twice)}")
    missing = pc.filter(want, pc.invert(pc.is_in(want, value_set=have)))
    extra = pc.filter(have, pc.invert(pc.is_in(have, value_set=want)))
    if len(missing):
        problems.append(f"{len(missing)} ids of {want_name} missing from {have_name}: {_sample(missing)}")
    if len(extra):
        problems.append(f"{len(extra)} ids in {have_name} not in {want_name}: {_sample(extra)}")
    return problems


def partition_problems(all_ids: pa.Array, retained: pa.Array, removed: pa.Table, kept_rule: bool) -> list[str]:
    """retained + removed hold every id of ``all_ids`` once; under the kept rule every
    ``duplicate_of`` is retained; every reason is known."""
    both = pa.concat_arrays([retained, removed.column("id").combine_chunks()])
    problems = set_problems(both, all_ids, "retained + removed", "the input")
    if overlap := pc.sum(pc.is_in(retained, value_set=removed.column("id").combine_chunks())).as_py():
        problems.append(f"{overlap} ids both retained and removed")
    unknown = set(removed.column("reason").unique().to_pylist()) - set(REASONS)
    if unknown:
        problems.append(f"unknown removal reasons {sorted(unknown)}")
    if kept_rule and removed.num_rows:
        named = removed.filter(pc.is_valid(removed.column("duplicate_of")))
        lost = named.filter(pc.invert(pc.is_in(named.column("duplicate_of"), value_set=retained)))
        if lost.num_rows:
            problems.append(f"{lost.num_rows} removed items name a duplicate_of that is not retained: "
                            f"{_sample(lost.column('id'))}")
    return problems


def meta_problems(retained: pa.Table, frames: pa.Table) -> list[str]:
    """The retained rows' source / frame_index / timestamp_s / dataset are the embeddings'."""
    joined = retained.select(["id", *RETAINED_META]).join(frames, "id", right_suffix="_embedded")
    differ = [c for c in RETAINED_META if not joined.column(c).equals(joined.column(f"{c}_embedded"))]
    return [f"retained {', '.join(differ)} differ from embeddings/"] if differ else []


def centroid_problems(centroids: np.ndarray, sizes: np.ndarray, k: int, dim: int) -> list[str]:
    """(k, dim) finite rows, unit length where the cluster has members (``sizes`` > 0)."""
    if centroids.shape != (k, dim):
        return [f"centroids are {centroids.shape}, expected ({k}, {dim})"]
    if not np.isfinite(centroids).all():
        return ["centroids hold NaN or inf"]
    norms = np.linalg.norm(centroids[sizes > 0].astype(np.float64), axis=1)
    if not len(norms):
        return []
    if np.abs(norms - 1).max() > 1e-3:
        return [f"centroid norms range {norms.min():.4f}..{norms.max():.4f}, expected 1"]
    return []


def source_problems(sources: pa.Table, frame_keys: pa.Array, error_sources: pa.Array) -> list[str]:
    """Each listed source has frames or error rows, its ``frames`` / ``errors`` counts match
    the embeddings and errors tables, and every error row names a listed source."""
    problems = []
    rows = sources.to_pylist()
    frames = dict(zip(*[c.to_pylist() for c in pc.value_counts(frame_keys).flatten()])) if len(frame_keys) else {}
    errors = dict(zip(*[c.to_pylist() for c in pc.value_counts(error_sources).flatten()])) if len(error_sources) else {}
    silent = [r["source"] for r in rows if frames.get(r["key"], 0) == 0 and errors.get(r["source"], 0) == 0]
    if silent:
        problems.append(f"{len(silent)} sources have neither frames nor an error row: {_sample(silent)}")
    off = [r["source"] for r in rows if r["kind"] != "skipped" and frames.get(r["key"], 0) != r["frames"]]
    if off:
        problems.append(f"{len(off)} sources' frame counts differ from embeddings/: {_sample(off)}")
    listed_keys = {r["key"] for r in rows if r["kind"] != "skipped"}
    if unlisted := sorted(set(frames) - listed_keys):
        problems.append(f"{len(unlisted)} frame keys in embeddings/ are no listed source: {_sample(unlisted)}")
    if stray := sorted(set(errors) - {r["source"] for r in rows}):
        problems.append(f"{len(stray)} error rows name no listed source: {_sample(stray)}")
    return problems


# ----------------------------------------------------------------------------- reading


def _walk(root: str) -> tuple[set[str], set[str], list[str]]:
    """(dirs with a manifest, dirs with _SUCCESS, Parquet files), paths relative to ``root``,
    skipping ``_``-prefixed directories."""
    manifests, successes, parquet = set(), set(), []
    _, base = storage.resolve(root)
    for path in storage.list_files(root):
        rel = posixpath.relpath(path, base)
        parts = rel.split("/")
        if any(p.startswith("_") for p in parts[:-1]):
            continue
        parent = posixpath.dirname(rel) or "."
        if parts[-1] == MANIFEST:
            manifests.add(parent)
        elif parts[-1] == SUCCESS:
            successes.add(parent)
        elif parts[-1].endswith(".parquet"):
            parquet.append(rel)
    return manifests, successes, parquet


def _check_published(root: str, report: Report) -> set[str]:
    manifests, successes, parquet = _walk(root)
    problems = [f"{d}: {MANIFEST} without {SUCCESS} (half published)" for d in sorted(manifests - successes)]
    problems += [f"{d}: {SUCCESS} without {MANIFEST}" for d in sorted(successes - manifests)]
    fs, base = storage.resolve(root)
    listed: set[str] = set()
    for d in sorted(manifests & successes):
        manifest = storage.read_json(storage.join(root, d, MANIFEST))
        schema = storage.schema_from_hex(manifest["schema"]) if manifest.get("schema") else None
        for f in manifest.get("files", []):
            rel = posixpath.normpath(posixpath.join(d, f))
            listed.add(rel)
            path = posixpath.join(base, rel)
            if not storage.exists(storage.to_uri(root, path)):
                problems.append(f"{d}: lists {f}, which does not exist")
            elif schema is not None and rel.endswith(".parquet"):
                found = pq.read_schema(path, filesystem=fs)
                if not found.remove_metadata().equals(schema.remove_metadata()):
                    problems.append(f"{d}: {f} has schema {found.names}, the manifest says {schema.names}")
    published = manifests & successes
    for rel in sorted(set(parquet) - listed):
        owner = next((d for d in _ancestors(rel) if d in published), None)
        if owner is None:
            problems.append(f"{rel}: a part in no published directory (a stage stopped before publishing)")
        else:
            report.warnings.append(f"{rel}: not listed by {owner}/{MANIFEST} (left by an earlier attempt)")
    report.check("published", problems)
    return published


def _ancestors(rel: str) -> list[str]:
    parts = rel.split("/")[:-1]
    return ["/".join(parts[:i]) or "." for i in range(len(parts), -1, -1)]


def _ids(dir_uri: str, column: str = "id") -> pa.Array:
    return storage.read_published(dir_uri, columns=[column]).column(column).combine_chunks()


def _check_embeddings(layout: RunLayout, report: Report) -> pa.Array | None:
    if not storage.is_published(layout.embeddings):
        report.check("embeddings", [f"{layout.embeddings} is not published"])
        return None
    ids = _ids(layout.embeddings)
    manifest = storage.read_manifest(layout.embeddings)
    problems = [f"{len(t)} ids more than once: {_sample(t)}" for t in [repeated_ids(ids)] if t]
    if manifest.get("rows") is not None and manifest["rows"] != len(ids):
        problems.append(f"manifest says {manifest['rows']} rows, the parts hold {len(ids)}")
    report.check("embeddings", problems)
    if storage.is_published(layout.sources):
        keys, _ = split_ids(ids)
        errors = _ids(layout.errors, "source") if storage.is_published(layout.errors) else pa.array([], pa.string())
        report.check("sources", source_problems(storage.read_published(layout.sources), keys, errors))
    return ids


def _check_clusters(layout: RunLayout, ids: pa.Array, dim: int, report: Report) -> pa.Array | None:
    if not storage.is_published(layout.clusters):
        return None
    manifest = storage.read_manifest(layout.clusters)
    centroids = storage.read_published(layout.centroids)
    matrix = embedding_matrix(centroids.column("centroid"))
    problems = centroid_problems(matrix, centroids.column("size").to_numpy(), manifest["k"], dim)
    assignments = storage.read_published(layout.assignments, columns=["id", "cluster"])
    assigned = assignments.column("id").combine_chunks()
    problems += set_problems(assigned, ids, "assignments", "embeddings")
    cluster = assignments.column("cluster").to_numpy()
    if len(cluster) and (cluster.min() < 0 or cluster.max() >= manifest["k"]):
        problems.append(f"clusters outside [0, {manifest['k']})")
    report.check("clusters", problems)
    return assigned


def _check_selection(layout: RunLayout, name: str, ids: pa.Array, report: Report) -> None:
    d = layout.selection(name)
    summary = storage.read_json(summary_of(d)) if storage.exists(summary_of(d)) else {}
    retained_table = storage.read_published(table_of(d, "retained"))
    retained = retained_table.column("id").combine_chunks()
    removed = storage.read_published(table_of(d, "removed"), columns=["id", "reason", "duplicate_of"])
    labelled = summary.get("population") == "labelled"  # deldist prune: a labelled set, not embedded frames
    if labelled:
        ids = _ids(table_of(d, "population"))
    problems = partition_problems(ids, retained, removed, summary.get("dedup_rule", "kept") == "kept")
    if summary.get("kept_count") is not None and summary["kept_count"] != len(retained):
        problems.append(f"summary kept_count {summary['kept_count']} != {len(retained)} retained rows")
    if set(RETAINED_META) <= set(retained_table.column_names) and not labelled:
        problems += meta_problems(retained_table, storage.read_published(layout.embeddings,
                                                                         columns=["id", *RETAINED_META]))
    report.check(f"selections/{name}", problems)


def _check_curated(layout: RunLayout, selection: str, report: Report) -> None:
    latest = storage.read_json(layout.latest(selection))
    kept_rule = True
    if storage.exists(layout.selection_summary(selection)):
        kept_rule = storage.read_json(layout.selection_summary(selection)).get("dedup_rule", "kept") == "kept"
    problems, previous = [], pa.array([], pa.string())
    for version in range(1, int(latest["version"]) + 1):
        d = layout.version(selection, version)
        if not storage.is_published(d):
            problems.append(f"v{version} is not published")
            continue
        retained = _ids(table_of(d, "retained"))
        removed = storage.read_published(table_of(d, "removed"), columns=["id", "reason", "duplicate_of"])
        ids = pa.concat_arrays([retained, removed.column("id").combine_chunks()])
        problems += [f"v{version}: {p}" for p in partition_problems(pc.unique(ids), retained, removed, kept_rule)]
        if lost := pc.sum(pc.invert(pc.is_in(previous, value_set=ids))).as_py():
            problems.append(f"v{version} lacks {lost} ids of v{version - 1}")
        previous = ids
    if storage.is_published(layout.version(selection, int(latest["version"]) + 1)):
        problems.append(f"v{int(latest['version']) + 1} is published but latest.json names v{latest['version']}")
    report.check(f"curated/{selection}", problems)


def _check_frame_store(layout: RunLayout, name: str, ids: pa.Array, report: Report) -> None:
    stored = _ids(layout.frames(name))
    allowed = ids if name == ALL_FRAMES or not storage.is_published(layout.selection(name)) else \
        _ids(layout.selection_table(name, "retained"))
    problems = [f"{len(t)} ids more than once: {_sample(t)}" for t in [repeated_ids(stored)] if t]
    if extra := pc.sum(pc.invert(pc.is_in(stored, value_set=allowed))).as_py():
        problems.append(f"{extra} stored frames are not among the {len(allowed)} ids it stores from")
    report.check(f"frames/{name}", problems)


def _subdirs(uri: str) -> list[str]:
    if not storage.exists(uri):
        return []
    fs, path = storage.resolve(uri)
    from pyarrow import fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path))
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)


def verify_run(root: str) -> Report:
    """Check the run root at ``root`` (see the module doc); reads ids and footers only. A
    table that cannot be read (a listed file missing, say) fails its check with the reason."""
    report = Report()
    layout = RunLayout(root)
    _check_published(root, report)
    ids = _guarded(report, "embeddings", lambda: _check_embeddings(layout, report))
    if ids is None:
        return report
    dim = int(storage.read_manifest(layout.embeddings).get("dim", 0))
    assigned = _guarded(report, "clusters", lambda: _check_clusters(layout, ids, dim, report))
    if assigned is not None and storage.is_published(layout.scores):
        _guarded(report, "scores", lambda: report.check(
            "scores", set_problems(_ids(layout.scores), assigned, "dedup/scores", "assignments")))
    for name in _subdirs(layout.selections):
        if storage.is_published(layout.selection(name)):
            _guarded(report, f"selections/{name}", lambda: _check_selection(layout, name, ids, report))
    for name in _subdirs(layout.join("curated")):
        if storage.exists(layout.latest(name)):
            _guarded(report, f"curated/{name}", lambda: _check_curated(layout, name, report))
    for name in _subdirs(layout.join("frames")):
        if storage.is_published(layout.frames(name)):
            _guarded(report, f"frames/{name}", lambda: _check_frame_store(layout, name, ids, report))
    return report


def _guarded(report: Report, name: str, check: Callable[[], Any]) -> Any:
    try:
        return check()
    except Exception as e:  # an unreadable table is a failed check, not a crashed verify
        report.check(name, [f"cannot read: {type(e).__name__}: {e}"])
        return None


def run(config: Config) -> dict[str, Any]:
    """Verify ``config.output``; print one line per failure; raise when one fails (``fail``)."""
    report = verify_run(config.output)
    for line in report.failures:
        log.error(f"deldist verify: FAIL {line}")
    log.info(f"deldist verify: {len(report.checked)} checks, {len(report.failures)} failed, "
          f"{len(report.warnings)} warnings -> {config.output}")
    if config.fail and not report.ok:
        raise VerificationError(f"{config.output}: " + "; ".join(report.failures))
    return report.as_dict()
