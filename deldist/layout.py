"""The run root's layout: one typed object names every directory of a run.

::

    <root>/
        embeddings/                 embed: frames (Parquet), _manifest.json, _run.json
        errors/                     embed: what could not be read, and why
        clusters/                   cluster: centroids.parquet, assignments/ (via the manifest)
        dedup/scores/               dedup: per item max_sim, duplicate_of, neighbour lists
        selections/<name>/          select: retained/, removed/, summary.json
        frames/<selection|all>/     materialize: JPEG-in-Parquet frame store
        pretrain/<name>/            pretrain: checkpoints, metrics, encoder.safetensors
        finetune/<name>/            finetune: summary, metrics
        reports/<name>/             report: NormDEL table and plot; reports/html/: the HTML page
        curated/<selection>/        curate-new: v1, v2, ... latest.json, batches/v<N>/

Stages take a :class:`RunLayout` (``RunLayout.of(config)`` honours a stage's ``embeddings`` /
``clusters`` / ``scores`` overrides) instead of joining path literals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deldist import storage

ALL_FRAMES = "all"


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
        return self.embeddings_dir or self.join("embeddings")

    @property
    def errors(self) -> str:
        return self.join("errors")

    @property
    def clusters(self) -> str:
        return self.clusters_dir or self.join("clusters")

    @property
    def centroids(self) -> str:
        return storage.join(self.clusters, "centroids.parquet")

    @property
    def assignments(self) -> str:
        """``clusters/assignments``, or where the clusters manifest points."""
        manifest = storage.read_manifest(self.clusters)
        return storage.join(self.clusters, manifest.get("assignments", "assignments"))

    @property
    def scores(self) -> str:
        return self.scores_dir or self.join("dedup", "scores")

    def selection(self, name: str) -> str:
        return self.join("selections", name)

    def selection_table(self, name: str, table: str) -> str:
        """``retained`` or ``removed`` of selection ``name``."""
        return storage.join(self.selection(name), table)

    def selection_summary(self, name: str) -> str:
        return storage.join(self.selection(name), "summary.json")

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

    @property
    def html(self) -> str:
        return self.join("reports", "html")

    # -- curate-new
    def curated(self, selection: str) -> str:
        return self.join("curated", selection)

    def version(self, selection: str, version: int) -> str:
        return storage.join(self.curated(selection), f"v{version}")

    def batch(self, selection: str, version: int) -> str:
        """The stage outputs (embeddings, errors, assignments) of the batch that made ``version``."""
        return storage.join(self.curated(selection), "batches", f"v{version}")

    def recluster(self, selection: str, version: int) -> str:
        return storage.join(self.curated(selection), f"recluster-v{version}")

    def latest(self, selection: str) -> str:
        return storage.join(self.curated(selection), "latest.json")
