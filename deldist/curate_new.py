"""``deldist curate-new``: curate a batch of new uploads against an already curated corpus.

The corpus is a run root written by ``deldist curate`` (embeddings, clusters, dedup scores and
the selection named by ``selection``). Its curated set is versioned under the run root::

    curated/<selection>/
        v1/           the selection as curated (its Parquet parts shared, not copied)
        v2/ ...       one version per batch of new uploads, each published on its own:
                      retained/  removed/  sources/  summary.json  _manifest.json  _SUCCESS
        batches/v2/   the batch's stage outputs: embeddings/, errors/, assignments/, scores/
        latest.json   {"version": N, "path": "vN"}: written last, after vN is published

A version's ``retained`` / ``removed`` / ``sources`` tables hold copies of the previous
version's parts plus the batch's own part, so every version holds every id exactly once, is a
table any Parquet reader opens on its own, and no version is ever rewritten.

One run:

1. New sources: files under ``input`` whose URI is in no version's ``sources`` table. None: a
   no-op (rerunning on the same uploads changes nothing). Each new file's sha256 is computed
   (Ray tasks, cached): a file with the bytes of a source already curated (or of an earlier
   upload of this batch) is reported, recorded in the ledger as ``identical`` with its
   ``copy_of``, and not embedded (deldist's rule: re-uploads under a new name are common).
2. Embed them into ``batches/vN/embeddings`` with the corpus's encoder and sampling (checked
   against the corpus's fingerprint), ids prefixed ``vN/`` so they never collide.
3. Assign every new frame to the corpus centroids (cosine distance to the nearest).
4. The corpus selection's rules (its ``selection_parameters``): deldist's quality filter,
   MedDEL's outlier distance, deldist's outlier quantile (over the clusters as they are now,
   corpus + uploads, so new content is drift, not an outlier), temporal collapse, and the
   near-copy pass against the corpus (:func:`represented_items` first, kept) and the uploads;
   a perceptual copy of a corpus frame rejected as invalid or outlier is rejected again for
   that reason (deldist's ``copy_of_rejected``: a re-upload adds nothing).
5. Dedup, per cluster: the corpus's represented items (retained, or removed as a copy of a
   retained item; never one removed as invalid or outlier) come first and count as kept, then
   the candidate uploads in the corpus's rank order through
   :func:`deldist.pairwise.keep_first_exact`: an upload is removed when its similarity to a kept
   item exceeds the corpus selection's threshold. ``duplicate_of`` names the retained item
   standing for what it matched (chains through uploads removed by later rules are followed);
   ``max_sim`` is the similarity to the item matched.
6. Drift: the fraction of new items farther from their nearest centroid than the corpus's
   ``drift_quantile`` distance. At ``recluster_above`` or more the summary recommends re-clustering.
7. Publish ``vN`` (its tables, then summary and manifest), then ``latest.json``.
8. With ``recluster: true`` and re-clustering recommended: k-means, dedup and the selection's
   rules rerun on corpus + all uploads (``curated/<selection>/recluster-v<N+1>/``), published as
   version N + 1; later batches are assigned to its centroids.

One writer at a time per corpus and selection: two concurrent runs would both write ``vN``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from deldist import embed, storage
from deldist.cluster import assign_to_centroids, read_centroids
from deldist.config import StageConfig
from deldist.embed_units import source_hashes
from deldist.incremental import dedup_against_corpus, matched_to_corpus, near_copies_of_corpus, stand_ins
from deldist.io import list_sources
from deldist.layout import RunLayout, run_file_of, summary_of, table_of
from deldist.rules import Decision, cluster_quantiles, counts_by_reason
from deldist.runtime import use_gpu
from deldist.schema import ASSIGNMENTS_SCHEMA, QUALITY_COLUMNS, REMOVED_SCHEMA, RETAINED_SCHEMA, VERSION_SOURCES_SCHEMA
from deldist.selection_tables import build_tables
from deldist.versions import (
    create_first_version,
    known_contents,
    latest_version,
    publish_selection_version,
    publish_table,
    rejected_items,
    represented_items,
    set_latest,
    sources_ledger,
)

log = logging.getLogger(__name__)


class Config(StageConfig):
    """``deldist curate-new`` settings."""

    corpus: str = Field(description="run root of the curated corpus (the output of deldist curate)")
    selection: str = Field(description="the corpus selection to extend, e.g. meddel_20")
    input: str = Field(description="URI prefix of the new uploads")
    manifest: str | None = Field(None, description="optional CSV/Parquet (uri[, dataset]) of the uploads")
    embed: dict[str, Any] = Field(default_factory=dict,
                                  description="embed settings for the batch (throughput knobs; the encoder and "
                                              "sampling come from the corpus)")
    drift_quantile: float = Field(0.99, gt=0, lt=1, description="drift: corpus distance quantile a new item exceeds")
    recluster_above: float = Field(0.1, ge=0, le=1, description="recommend re-clustering at this drift fraction or above")
    recluster: bool = Field(False, description="re-cluster corpus + uploads (a new version) when recommended")
    cluster: dict[str, Any] = Field(default_factory=dict, description="deldist cluster settings for re-clustering")
    dedup: dict[str, Any] = Field(default_factory=dict, description="deldist dedup settings for re-clustering")
    block_rows: int = Field(512, ge=1, description="rows per block of the dedup against the corpus")
    num_buckets: int | None = Field(None, ge=1, description="scoring tasks (default: 2 x cluster CPUs / task_cpus)")
    shard_rows: int = Field(65_536, ge=1)
    task_cpus: float = Field(1.0, gt=0)
    io_cpus: float = Field(0.5, gt=0)
    use_gpu: bool | None = Field(None, description="assign and score on GPUs (default: when the cluster has GPUs)")
    task_gpus: float = Field(0.5, gt=0, le=1, description="GPU share per scoring task when use_gpu (as in dedup)")


# ----------------------------------------------------------------------------- math (pure)


def drift_fraction(distance: np.ndarray, threshold: float) -> float:
    """Fraction of items whose distance to the nearest centroid exceeds ``threshold``."""
    distance = np.asarray(distance, np.float64)
    return float((distance > threshold).mean()) if len(distance) else 0.0


# ----------------------------------------------------------------------------- versions (I/O)


def recluster(config: Config, version: int) -> dict[str, Any]:
    """Re-curate corpus + every batch up to ``version`` from scratch (k-means, dedup and the
    selection's rules on the union of their embeddings) into ``curated/<selection>/recluster-v<N>``
    and publish it as version N = ``version`` + 1, whose centroids later batches then use."""
    from deldist import cluster, dedup, select

    corpus = RunLayout(config.corpus)
    vdir = corpus.version(config.selection, version)
    manifest = storage.read_manifest(vdir)
    new_version = version + 1
    root = RunLayout(corpus.recluster(config.selection, new_version))
    emb_dir = root.embeddings
    parts = storage.copy_into(root.embedding_parts,
                              [p for d in manifest["embeddings"] for p in storage.published_paths(d)[1]])
    first = manifest["embeddings"][0]
    storage.write_bytes(run_file_of(emb_dir), storage.read_bytes(run_file_of(first)))
    storage.publish(emb_dir, parts, {**storage.read_manifest(first), "merged_from": manifest["embeddings"],
                                   "rows": sum(storage.read_manifest(d).get("rows") or 0 for d in manifest["embeddings"])})
    old_clusters = storage.read_manifest(manifest["clusters"])
    cluster.run(cluster.Config.model_validate({
        **{k: old_clusters[k] for k in ("k", "seed", "init", "fit_fraction") if k in old_clusters},
        "use_gpu": config.use_gpu, **config.cluster, "output": root.root}))
    dedup.run(dedup.Config.model_validate({"keep": manifest["keep"], "seed": manifest["seed"],
                                           "use_gpu": config.use_gpu, **config.dedup, "output": root.root}))
    params = {k: v for k, v in manifest["selection_parameters"].items()
              if k not in ("output", "embeddings", "clusters", "scores", "ground_truth")}
    select.run(select.Config.model_validate({**params, "output": root.root, "name": config.selection}))
    sources = storage.published_paths(table_of(vdir, "sources"))[1]
    result = publish_selection_version(root, config.corpus, config.selection, new_version, sources, None, [emb_dir],
                                        {"parent": version, "reclustered_from": version})
    new_vdir = corpus.version(config.selection, new_version)
    summary = storage.read_json(summary_of(new_vdir))
    log.info(f"deldist curate-new: v{new_version}: re-clustered corpus + uploads (k={result.get('k', old_clusters.get('k'))}), "
          f"kept {summary['kept_count']} of {summary['input_count']}")
    return {"version": new_version, "path": new_vdir,
            "kept": summary["kept_count"], "input": summary["input_count"]}


# ----------------------------------------------------------------------------- Ray wiring


def _batch_embed_config(config: Config, corpus_fp: dict[str, Any], corpus_manifest: dict[str, Any],
                        batch_root: str, batch_manifest: str, prefix: str) -> embed.Config:
    encoder = {k: embed.recorded(corpus_fp, k) for k in embed.FINGERPRINT_KEYS
               if k in embed.Config.model_fields and embed.recorded(corpus_fp, k) is not None}
    settings = {**encoder, "weights": corpus_manifest.get("weights"), **config.embed,
                "input": config.input, "output": batch_root, "manifest": batch_manifest, "id_prefix": prefix}
    return embed.Config.model_validate(settings)


def planned_embed_config(config: Config) -> embed.Config:
    """The embed settings curate-new would give its uploads (the corpus's encoder and sampling;
    for ``--dry-run``)."""
    corpus_emb = RunLayout(config.corpus).embeddings
    return _batch_embed_config(config, storage.read_json(run_file_of(corpus_emb)), storage.read_manifest(corpus_emb),
                               config.corpus, config.manifest, "")


def _check_same_encoder(corpus_fp: dict[str, Any], batch_fp: dict[str, Any]) -> None:
    diff = {k: (embed.recorded(corpus_fp, k), embed.recorded(batch_fp, k)) for k in embed.FINGERPRINT_KEYS
            if embed.recorded(corpus_fp, k) != embed.recorded(batch_fp, k)}
    if diff:
        raise ValueError(f"the uploads were embedded with other settings than the corpus {diff} (corpus, batch); "
                         "curate-new must use the corpus's encoder and sampling")


def _selection_rules(manifest: dict[str, Any]) -> Any:
    """The corpus selection's settings (a :class:`deldist.select.Config`) from the version manifest."""
    from deldist import select

    params = {k: v for k, v in manifest["selection_parameters"].items()
              if k not in ("output", "embeddings", "clusters", "scores", "ground_truth")}
    return select.Config.model_validate({**params, "output": "-"})


def _filter_uploads(rules: Any, meta: pa.Table, cluster: np.ndarray, distance: np.ndarray,
                    seen_cluster: np.ndarray, seen_distance: np.ndarray, k: int, batch_emb: str,
                    dim: int) -> Decision:
    """The corpus selection's filters on the uploads (:func:`deldist.select.apply_filters`), the
    outlier quantile taken over the clusters as they are now (corpus + uploads): new content
    far from the old items is drift, not an outlier, unless it is extreme in its cluster too."""
    from deldist.select import apply_filters

    limit = None
    if rules.deldist_rules.outlier_quantile is not None and meta.num_rows:
        limit = cluster_quantiles(np.r_[seen_cluster, cluster], np.r_[seen_distance, distance],
                                  rules.deldist_rules.outlier_quantile, k)[cluster]
    return apply_filters(rules, meta, cluster, distance, batch_emb, dim, quantile_limit=limit)


@dataclass
class Batch:
    """One curate-new run: the version it extends and the one it makes."""

    config: Config
    version: int  # the latest published version
    manifest: dict[str, Any]  # that version's manifest
    sources: list[Any]  # new media sources to embed
    skipped: list[str]  # new files that are not media (recorded, never retried)
    sha256: dict[str, str]  # new media source URI -> digest of its bytes
    identical: dict[str, str]  # new source URI -> the curated source with the same bytes (not embedded)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.config.corpus)

    @property
    def new_version(self) -> int:
        return self.version + 1

    @property
    def outputs(self) -> RunLayout:
        """``curated/<selection>/batches/v<N>``: the batch's embeddings, errors, assignments."""
        return self.layout.batch(self.config.selection, self.new_version)

    @property
    def embeddings(self) -> str:
        return self.outputs.embeddings

    def version_dir(self, version: int) -> str:
        return self.layout.version(self.config.selection, version)


def run(config: Config) -> dict[str, Any]:
    """Curate the new uploads under ``config.input`` into a new corpus version (module doc)."""
    from deldist.runtime import init_ray

    started = time.time()
    init_ray()
    batch = _new_batch(config)
    for uri, original in batch.identical.items():
        log.info(f"deldist curate-new: {uri} has the same bytes as {original}: not embedded")
    if not batch.sources and not batch.skipped:
        path = batch.version_dir(batch.version)
        log.info(f"deldist curate-new: no new sources under {config.input}; latest stays v{batch.version}")
        return {"version": batch.version, "changed": False, "new_sources": 0, "identical_sources": len(batch.identical),
                "path": path}
    embed_result = _embed_uploads(batch)
    rules = _selection_rules(batch.manifest)
    meta = storage.read_published(batch.embeddings, ["id", "source", "frame_index", "timestamp_s", "dataset",
                                                     *QUALITY_COLUMNS,
                                                     *(["phash"] if rules.deldist_rules.near_copy is not None else [])])
    ids = meta.column("id").combine_chunks()
    centroids = read_centroids(batch.manifest["clusters"])
    cluster, distance = _assign_uploads(batch, ids, centroids)
    seen = pa.concat_tables([storage.read_published(a, ["id", "cluster", "distance"])
                             for a in batch.manifest["assignments"]])
    decision, duplicate_of = _apply_rules(batch, rules, meta, ids, cluster, distance, seen, centroids)
    drift_threshold = float(np.quantile(seen.column("distance").to_numpy(), config.drift_quantile))
    drift = drift_fraction(distance, drift_threshold)
    summary = _batch_summary(meta, decision, batch, embed_result, drift, drift_threshold,
                             old_dups=matched_to_corpus(duplicate_of, decision.reason >= 0, ids))
    result = _publish_version(batch, build_tables(ids, decision, duplicate_of, meta), meta, summary)
    if config.recluster and summary["recluster_recommended"]:
        result["reclustered"] = recluster(config, batch.new_version)
        result.update(version=result["reclustered"]["version"], path=result["reclustered"]["path"])
    result["seconds"] = round(time.time() - started, 1)
    return result


def _new_batch(config: Config) -> Batch:
    """The latest version (v1 made from the selection on the first run; a version published
    without its latest.json recovered) and the sources no version has seen."""
    layout = RunLayout(config.corpus)
    version = latest_version(config.corpus, config.selection)
    if version == 0:
        create_first_version(config.corpus, config.selection)
        version = 1
    if storage.is_published(layout.version(config.selection, version + 1)):  # published, latest.json not yet written
        version += 1
        set_latest(config.corpus, config.selection, version)
    vdir = layout.version(config.selection, version)
    ledger = storage.read_published(table_of(vdir, "sources"))
    seen = set(ledger.column("source").to_pylist())
    sources, skipped = list_sources(config.input, config.manifest)
    sources = [s for s in sources if s.uri not in seen]
    hashes_dir = layout.batch(config.selection, version + 1).source_hashes
    sha256 = source_hashes(hashes_dir, [s.uri for s in sources], config.task_cpus) if sources else {}
    known, identical = known_contents(ledger), {}
    for s in sources:  # in key order: the first of several identical uploads is embedded
        digest = sha256[s.uri]
        if digest and digest in known:
            identical[s.uri] = known[digest]
        elif digest:
            known[digest] = s.uri
    return Batch(config, version, storage.read_manifest(vdir), [s for s in sources if s.uri not in identical],
                 [u for u in skipped if u not in seen], sha256, identical)


def _embed_uploads(batch: Batch) -> dict[str, Any]:
    """Embed the new sources with the corpus's encoder and sampling (checked before any work)."""
    config = batch.config
    listing = batch.outputs.batch_listing
    corpus_emb = batch.manifest["embeddings"][0]
    corpus_fp = storage.read_json(run_file_of(corpus_emb))
    emb_cfg = _batch_embed_config(config, corpus_fp, storage.read_manifest(corpus_emb), batch.outputs.root, listing,
                                  f"v{batch.new_version}/")
    _check_same_encoder(corpus_fp, embed.fingerprint(emb_cfg))
    storage.write_csv(listing, [{"uri": s.uri, "dataset": s.dataset} for s in batch.sources]
                      + [{"uri": u, "dataset": ""} for u in batch.skipped])
    result = embed.run(emb_cfg)
    if not result.get("published"):
        raise RuntimeError("embedding the uploads did not finish (max_sources?); rerun curate-new to continue")
    return result


def _assign_uploads(batch: Batch, ids: pa.Array, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each upload's nearest corpus centroid and its cosine distance, in the order of ``ids``."""
    config = batch.config
    assigned = assign_to_centroids(batch.embeddings, centroids, batch.outputs.batch_assignments,
                                   shard_rows=config.shard_rows, task_cpus=config.task_cpus,
                                   use_gpu=use_gpu(config.use_gpu)) if len(ids) else ASSIGNMENTS_SCHEMA.empty_table()
    assigned = assigned.take(pc.index_in(ids, value_set=assigned.column("id")))
    return assigned.column("cluster").to_numpy().astype(np.int64), assigned.column("distance").to_numpy()


def _apply_rules(batch: Batch, rules: Any, meta: pa.Table, ids: pa.Array, cluster: np.ndarray,
                 distance: np.ndarray, seen: pa.Table, centroids: np.ndarray) -> tuple[Decision, pa.Array]:
    """The corpus selection's rules on the uploads -> (decision, duplicate_of ids): the filters,
    near copies against the corpus, then duplicates of the corpus's represented items or of
    uploads kept before them, in the corpus's rank order."""
    dim, n = int(centroids.shape[1]), meta.num_rows
    vdir = batch.version_dir(batch.version)
    decision = _filter_uploads(rules, meta, cluster, distance, seen.column("cluster").to_numpy().astype(np.int64),
                               seen.column("distance").to_numpy(), len(centroids), batch.embeddings, dim)
    represented = represented_items(vdir)
    if rules.deldist_rules.near_copy is not None and n:
        near_copies_of_corpus(rules, meta, ids, batch.manifest["embeddings"], represented, rejected_items(vdir),
                              decision)
    direct = decision.info.get("copy_of_corpus", pa.nulls(n, pa.string()))
    candidate = decision.reason < 0
    if candidate.any():
        threshold = float(batch.manifest["similarity_threshold"])
        dup_of, sim = dedup_against_corpus(batch.config, batch.manifest, seen, represented, batch.embeddings, ids,
                                            cluster, distance, candidate, threshold, dim)
        decision.remove(pc.is_valid(dup_of).to_numpy(zero_copy_only=False), "duplicate", "duplicate",
                        "MedDEL §3.2 (against the curated corpus)", {"similarity_threshold": threshold,
                                                                     "dedup_rule": "kept"}, score=sim)
        direct = pc.coalesce(dup_of, direct)
    # a frame matched to an upload that a later rule removed follows that upload's own link
    linked = pc.if_else(pa.array(decision.link >= 0), ids.take(pa.array(np.maximum(decision.link, 0))), direct)
    return decision, stand_ins(ids, linked, decision.reason < 0)


def _publish_version(batch: Batch, tables: dict[str, pa.Table], meta: pa.Table, summary: dict[str, Any],
                     ) -> dict[str, Any]:
    """``v<N>``: its tables (the parent's parts plus this batch's), summary and manifest, then
    ``latest.json``."""
    config, manifest = batch.config, batch.manifest
    vdir, new_vdir = batch.version_dir(batch.version), batch.version_dir(batch.new_version)
    ledger = sources_ledger(meta.select(["source"]), batch.new_version,
                            [s.uri for s in batch.sources] + batch.skipped, batch.sha256, batch.identical)
    parents = {t: storage.published_paths(table_of(vdir, t))[1] for t in ("retained", "removed", "sources")}
    counts = {t: publish_table(table_of(new_vdir, t), parents[t], tables[t], schema)
              for t, schema in (("retained", RETAINED_SCHEMA), ("removed", REMOVED_SCHEMA))}
    publish_table(table_of(new_vdir, "sources"), parents["sources"], ledger, VERSION_SOURCES_SCHEMA)
    version_summary = _version_summary(storage.read_json(summary_of(vdir)), summary, batch.new_version, counts,
                                       config)
    storage.write_json(summary_of(new_vdir), version_summary)
    storage.publish(new_vdir, [], {
        **{k: v for k, v in manifest.items() if k not in ("version", "parent")},
        "version": batch.new_version, "parent": batch.version,
        "embeddings": [*manifest["embeddings"], batch.embeddings],
        "assignments": [*manifest["assignments"], batch.outputs.batch_assignments],
    })
    set_latest(config.corpus, config.selection, batch.new_version)
    log.info(f"deldist curate-new: v{batch.new_version}: {len(batch.sources)} new sources, {summary['frames']} frames, "
          f"kept {summary['kept']} ({summary['removed_by_reason']}); drift {summary['drift_fraction']:.3f}"
          + ("; re-clustering recommended" if summary["recluster_recommended"] else "") + f" -> {new_vdir}")
    return {"version": batch.new_version, "changed": True, "path": new_vdir, "new_sources": len(batch.sources),
            "identical_sources": len(batch.identical), "new_frames": summary["frames"], "kept": summary["kept"], "drift_fraction": summary["drift_fraction"],
            "recluster_recommended": summary["recluster_recommended"]}


def _batch_summary(meta: pa.Table, decision: Decision, batch: Batch, embed_result: dict[str, Any], drift: float,
                   drift_threshold: float, old_dups: int) -> dict[str, Any]:
    config, reason = batch.config, decision.reason
    kept = reason < 0
    datasets = meta.column("dataset").to_numpy(zero_copy_only=False).astype(str)
    per_dataset = {name: {"input": int((datasets == name).sum()), "kept": int(kept[datasets == name].sum())}
                   for name in sorted(set(datasets.tolist()))}
    return {
        "input": config.input, "new_sources": len(batch.sources), "skipped_not_media": len(batch.skipped),
        "identical_sources": [{"source": u, "copy_of": o} for u, o in sorted(batch.identical.items())],
        "frames": len(reason), "kept": int(kept.sum()),
        "ratio": float(kept.mean()) if len(kept) else 0.0,
        "removed_by_reason": counts_by_reason(reason),
        "duplicates_of_corpus_items": old_dups, "rules": decision.rules,
        "per_dataset": per_dataset, "embed_errors": embed_result.get("errors", 0),
        "drift_fraction": drift, "drift_distance": drift_threshold, "drift_quantile": config.drift_quantile,
        "recluster_recommended": drift >= config.recluster_above,
    }


def _version_summary(parent: dict[str, Any], batch: dict[str, Any], version: int, counts: dict[str, int],
                     config: Config) -> dict[str, Any]:
    removed = dict(parent.get("removed_by_reason", {}))
    for r, c in batch["removed_by_reason"].items():
        removed[r] = removed.get(r, 0) + c
    per_dataset = {k: dict(v) for k, v in parent.get("per_dataset", {}).items()}
    for name, d in batch["per_dataset"].items():
        cur = per_dataset.setdefault(name, {"input": 0, "kept": 0})
        cur["input"] += d["input"]
        cur["kept"] += d["kept"]
        cur["ratio"] = cur["kept"] / cur["input"] if cur["input"] else 0.0
    n = counts["retained"] + counts["removed"]
    return {
        "name": config.selection, "method": parent.get("method", "meddel"), "version": version, "parent": version - 1,
        "input_count": n, "kept_count": counts["retained"], "removed_count": counts["removed"],
        "ratio": counts["retained"] / n if n else 0.0, "removed_by_reason": removed, "per_dataset": per_dataset,
        "similarity_threshold": parent.get("similarity_threshold"), "batch": batch,
        "batches": [*parent.get("batches", []), {"version": version, "input": batch["input"],
                                                  "frames": batch["frames"], "kept": batch["kept"]}],
    }
