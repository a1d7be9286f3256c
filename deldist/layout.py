"""The run root's layout: one typed object names every directory of a run.

::

    <root>/
        embeddings/                 embed: frames (Parquet under data/), _manifest.json, _run.json
        _progress/embeddings/       embed: per-unit progress records (what a rerun skips)
        errors/                     embed: what could not be read, and why
        sources/                    embed: every listed file, its frames and error rows
        clusters/                   cluster: manifest; tables centroids/ and assignments/
        dedup/scores/               dedup: per item max_sim, duplicate_of, neighbour lists
        selections/<name>/          select: retained/, removed/, summary.json
        sweeps/<name>/              sweep: kept counts per eps / target ratio, max_sim histogram
        frames/<selection|all>/     materialize: JPEG-in-Parquet frame store
        pretrain/<name>/            pretrain: checkpoints, metrics, encoder.safetensors
        finetune/<name>/            finetune: summary, metrics
        reports/<name>/             report: NormDEL table and plot; reports/html/: the HTML page
        distill/<name>/             distill: synthetic sets (frame stores) and summary.json
        curated/<selection>/        curate-new: v1, v2, ... latest.json, batches/v<N>/
        _scratch/<stage>/<name>/    what a stage spills while it runs (select's exact fallback
                                    vectors), removed when it ends

Stages take a :class:`RunLayout` (``RunLayout.of(config)`` honours a stage's ``embeddings`` /
``clusters`` / ``scores`` overrides) instead of joining path literals.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

from deldist import storage

ALL_FRAMES = "all"
SUMMARY = "summary.json"
RUN_FILE = "_run.json"  # a stage's fingerprint of the settings its parts were written with


def summary_of(dir_uri: str) -> str:
    """``summary.json`` of a selection, curated version, training run or report directory."""
    return storage.join(dir_uri, SUMMARY)


def table_of(dir_uri: str, table: str) -> str:
    """A published table (``retained``, ``removed``, ``sources``) of a selection or curated version."""
    return storage.join(dir_uri, table)


def version_name(version: int) -> str:
    """A curated version's directory name: ``v<version>``."""
    return f"v{version}"


def progress_of(table_dir: str) -> str:
    """Where a resumable stage keeps its progress records for ``table_dir``: ``_progress/<name>``
    beside it, not inside, so every Parquet file under a published table directory is the
    table's (a duckdb or polars glob over ``<dir>/**/*.parquet`` reads only its rows)."""
    parent, name = posixpath.split(table_dir.rstrip("/"))
    return storage.join(parent, "_progress", name)


def run_file_of(stage_dir: str) -> str:
    """The ``_run.json`` fingerprint of an embeddings directory or a frame store: the settings
    its parts were written with (a rerun with other settings must not mix in)."""
    return storage.join(stage_dir, RUN_FILE)


@dataclass(frozen=True)
class RunLayout:
    """Every directory of the run root ``root`` (a local path or an object-store URI)."""

    root: str
    embeddings_dir: str | None = None
    clusters_dir: str | None = None
    scores_dir: str | None = None

    @classmethod
    def of(cls, config: Any) -> "RunLayout":
        """The layout of a stage config with an ``output`` root and optional ``embeddings`` /
        ``clusters`` / ``scores`` overrides."""
        return cls(config.output, getattr(config, "embeddings", None), getattr(config, "clusters", None),
                   getattr(config, "scores", None))

    def join(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    # -- curation
    @property
    def embeddings(self) -> str:
        """embed's published frames table (or the ``embeddings`` override)."""
        return self.embeddings_dir or self.join("embeddings")

    @property
    def embedding_parts(self) -> str:
        """Where embed writes its Parquet parts (published by the embeddings manifest)."""
        return storage.join(self.embeddings, "data")

    @property
    def embed_progress(self) -> str:
        """embed's per-unit progress records (what a rerun skips), under :func:`progress_of` the embeddings."""
        return storage.join(progress_of(self.embeddings), "units")

    @property
    def source_hashes(self) -> str:
        """The sha256 of every source embed or curate-new has read (a cache: each file is hashed once)."""
        return storage.join(progress_of(self.embeddings), "hashes")

    @property
    def errors(self) -> str:
        """embed's table of what could not be read, and why."""
        return self.join("errors")

    @property
    def sources(self) -> str:
        """embed's table of every listed file: its frames and error rows."""
        return self.join("sources")

    @property
    def clusters(self) -> str:
        """cluster's centroids and manifest (or the ``clusters`` override)."""
        return self.clusters_dir or self.join("clusters")

    @property
    def centroids(self) -> str:
        """The k x D centroids: a published table directory of one Parquet file."""
        return storage.join(self.clusters, "centroids")

    @property
    def assignments(self) -> str:
        """``clusters/assignments``, or where the clusters manifest points."""
        manifest = storage.read_manifest(self.clusters)
        return storage.join(self.clusters, manifest.get("assignments", "assignments"))

    @property
    def new_assignments(self) -> str:
        """Where the cluster stage writes the assignments it publishes."""
        return storage.join(self.clusters, "assignments")

    @property
    def scores(self) -> str:
        return self.scores_dir or self.join("dedup", "scores")

    @property
    def selections(self) -> str:
        return self.join("selections")

    def selection(self, name: str) -> str:
        return storage.join(self.selections, name)

    def selection_table(self, name: str, table: str) -> str:
        """``retained`` or ``removed`` of selection ``name``."""
        return table_of(self.selection(name), table)

    def selection_summary(self, name: str) -> str:
        return summary_of(self.selection(name))

    def scratch(self, stage: str, name: str) -> str:
        """Where stage ``stage`` run ``name`` spills data it removes when it ends."""
        return self.join("_scratch", stage, name)

    @property
    def sweeps(self) -> str:
        return self.join("sweeps")

    def sweep(self, name: str) -> str:
        """``deldist sweep``'s CSVs, plot and summary for the selection settings ``name``."""
        return storage.join(self.sweeps, name)

    # -- training and reports
    def frames(self, selection: str | None = None) -> str:
        return self.join("frames", selection or ALL_FRAMES)

    def pretrain(self, name: str) -> str:
        return self.join("pretrain", name)

    @property
    def pretrain_ray(self) -> str:
        return self.join("pretrain", "_ray")

    def finetune(self, name: str) -> str:
        return self.join("finetune", name)

    @property
    def finetune_ray(self) -> str:
        return self.join("finetune", "_ray")

    def report(self, name: str) -> str:
        return self.join("reports", name)

    def distill(self, name: str) -> str:
        """``deldist distill``'s synthetic sets (``synthetic/seed<k>/``) and ``summary.json``."""
        return self.join("distill", name)

    @property
    def html(self) -> str:
        return self.join("reports", "html")

    # -- curate-new
    def curated(self, selection: str) -> str:
        return self.join("curated", selection)

    def version(self, selection: str, version: int) -> str:
        return storage.join(self.curated(selection), version_name(version))

    def batch(self, selection: str, version: int) -> "RunLayout":
        """The run root of the batch that made ``version``: its embeddings/, errors/, and
        assignments/ (:attr:`batch_assignments`)."""
        return RunLayout(storage.join(self.curated(selection), "batches", version_name(version)))

    @property
    def batch_assignments(self) -> str:
        """A curate-new batch's assignments to the corpus centroids (in a batch's layout)."""
        return self.join("assignments")

    @property
    def batch_listing(self) -> str:
        """The list of new sources a curate-new batch embeds (in a batch's layout)."""
        return self.join("sources.csv")

    def recluster(self, selection: str, version: int) -> str:
        return storage.join(self.curated(selection), f"recluster-{version_name(version)}")

    def latest(self, selection: str) -> str:
        return storage.join(self.curated(selection), "latest.json")
