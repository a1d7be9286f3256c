"""``deldist curate-new``: curate a batch of new uploads against an already curated corpus.

The corpus is a run root written by ``deldist curate`` (embeddings, clusters, dedup scores and
the selection named by ``selection``). Its curated set is versioned under the run root::

    curated/<selection>/
        v1/           the selection as curated (its Parquet parts shared, not copied)
        v2/ ...       one version per batch of new uploads, each published on its own:
                      retained/  removed/  sources/  summary.json  _manifest.json  _SUCCESS
        batches/v2/   the batch's stage outputs: embeddings/, errors/, assignments/, scores/
        latest.json   {"version": N, "path": "vN"}: written last, after vN is published

A version's ``retained`` / ``removed`` / ``sources`` tables list the previous version's parts
plus the batch's own part, so every version holds every id exactly once, no version is ever
rewritten and none is copied (so keep old versions' files while a newer one is in use).

One run:

1. New sources: files under ``input`` whose URI is in no version's ``sources`` table. None: a
   no-op (rerunning on the same uploads changes nothing).
2. Embed them into ``batches/vN/embeddings`` with the corpus's encoder and sampling (checked
   against the corpus's fingerprint), ids prefixed ``vN/`` so they never collide.
3. Assign every new frame to the corpus centroids (cosine distance to the nearest).
4. The corpus selection's rules (its ``selection_parameters``): deldist's quality filter,
   MedDEL's outlier distance, deldist's outlier quantile (over the clusters as they are now,
   corpus + uploads, so new content is drift, not an outlier), temporal collapse, and the
   near-copy pass against the corpus (:func:`represented_items` first, kept) and the uploads.
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

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from deldist import embed, storage
from deldist.arrays import equal_runs
from deldist.cluster import assign_shard, read_centroids
from deldist.config import StageConfig
from deldist.dedup import rank_within_clusters
from deldist.io import list_sources
from deldist.layout import RunLayout
from deldist.pairwise import keep_first_exact
from deldist.rules import Decision, cluster_quantiles, counts_by_reason
from deldist.schema import (
    ASSIGNMENTS_SCHEMA,
    QUALITY_COLUMNS,
    REMOVED_SCHEMA,
    RETAINED_SCHEMA,
    VERSION_SOURCES_SCHEMA,
)
from deldist.select import build_tables
from deldist.shards import (
    bucket_count,
    bucket_of_groups,
    gather_sorted,
    plan_buckets,
    plan_shards,
    shuffle_by_bucket,
)
from deldist.versions import (
    create_first_version,
    curated_dir,
    latest_version,
    publish_selection_version,
    publish_table,
    represented_items,
    retained_roots,
    set_latest,
    sources_ledger,
    version_dir,
)

# embeddings/_run.json keys that fix what a frame's embedding is; a batch must match them
ENCODER_KEYS = ("model", "weights_sha256", "random_init", "pooling", "image_size", "mean", "std",
                "fps", "stride", "keyframes_only", "segment_seconds", "dim")


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

    cur = curated_dir(config.corpus, config.selection)
    vdir = storage.join(cur, f"v{version}")
    manifest = storage.read_manifest(vdir)
    new_version = version + 1
    root = storage.join(cur, f"recluster-v{new_version}")
    emb_dir = storage.join(root, "embeddings")
    parts = [p for d in manifest["embeddings"] for p in storage.published_paths(d)[1]]
    first = manifest["embeddings"][0]
    storage.write_bytes(storage.join(emb_dir, "_run.json"), storage.read_bytes(storage.join(first, "_run.json")))
    storage.publish(emb_dir, parts, {**storage.read_manifest(first), "merged_from": manifest["embeddings"],
                                   "rows": sum(storage.read_manifest(d).get("rows") or 0 for d in manifest["embeddings"])})
    old_clusters = storage.read_manifest(manifest["clusters"])
    cluster.run(cluster.Config.model_validate({
        **{k: old_clusters[k] for k in ("k", "seed", "init", "fit_fraction") if k in old_clusters},
        "use_gpu": config.use_gpu, **config.cluster, "output": root}))
    dedup.run(dedup.Config.model_validate({"keep": manifest["keep"], "seed": manifest["seed"],
                                           "use_gpu": config.use_gpu, **config.dedup, "output": root}))
    params = {k: v for k, v in manifest["selection_parameters"].items()
              if k not in ("output", "embeddings", "clusters", "scores", "ground_truth")}
    select.run(select.Config.model_validate({**params, "output": root, "name": config.selection}))
    sources = storage.published_paths(storage.join(vdir, "sources"))[1]
    result = publish_selection_version(root, config.selection, cur, new_version, sources, None, [emb_dir],
                                        {"parent": version, "reclustered_from": version})
    summary = storage.read_json(storage.join(cur, f"v{new_version}", "summary.json"))
    print(f"deldist curate-new: v{new_version}: re-clustered corpus + uploads (k={result.get('k', old_clusters.get('k'))}), "
          f"kept {summary['kept_count']} of {summary['input_count']}")
    return {"version": new_version, "path": storage.join(cur, f"v{new_version}"),
            "kept": summary["kept_count"], "input": summary["input_count"]}


# ----------------------------------------------------------------------------- Ray wiring


def _batch_embed_config(config: Config, corpus_fp: dict[str, Any], corpus_manifest: dict[str, Any],
                        batch_root: str, batch_manifest: str, prefix: str) -> embed.Config:
    encoder = {k: corpus_fp[k] for k in ENCODER_KEYS if k in embed.Config.model_fields and k in corpus_fp}
    settings = {**encoder, "weights": corpus_manifest.get("weights"), **config.embed,
                "input": config.input, "output": batch_root, "manifest": batch_manifest, "id_prefix": prefix}
    return embed.Config.model_validate(settings)


def _check_same_encoder(corpus_fp: dict[str, Any], batch_fp: dict[str, Any]) -> None:
    diff = {k: (corpus_fp.get(k), batch_fp.get(k)) for k in ENCODER_KEYS if corpus_fp.get(k) != batch_fp.get(k)}
    if diff:
        raise ValueError(f"the uploads were embedded with other settings than the corpus {diff} (corpus, batch); "
                         "curate-new must use the corpus's encoder and sampling")


def _use_gpu(config: Config) -> bool:
    from deldist.runtime import use_gpu

    return use_gpu(config.use_gpu)


def _assign(emb_dir: str, dim: int, centroids: np.ndarray, out_dir: str, config: Config) -> pa.Table:
    import ray

    use_gpu = _use_gpu(config)
    task = ray.remote(num_cpus=config.task_cpus, **({"num_gpus": 1} if use_gpu else {}))(assign_shard)
    shards = plan_shards(emb_dir, config.shard_rows)
    parts = ray.get([task.remote(emb_dir, s, dim, centroids, out_dir, use_gpu, max(1, round(config.task_cpus)))
                     for s in shards])
    storage.publish(out_dir, [p["path"] for p in parts],
                    {"schema": storage.schema_hex(ASSIGNMENTS_SCHEMA), "rows": sum(p["rows"] for p in parts)})
    return storage.read_published(out_dir)


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


def _near_copies_of_corpus(rules: Any, meta: pa.Table, ids: pa.Array, corpus_embeddings: list[str],
                           represented: pa.Table, decision: Decision) -> None:
    """deldist's near-copy rule on the uploads: the corpus's represented frames
    (:func:`represented_items`) first, as kept, then the uploads sharpest first. A copy of a new
    frame links to it; a copy of a corpus frame names that frame's retained stand-in in
    ``decision.info["copy_of_corpus"]``."""

    from deldist.nearcopy import near_copies, ray_pair_finder
    from deldist.rules import near_copy_order

    rule = rules.deldist_rules.near_copy
    hashes_of = pa.concat_tables([storage.read_published(d, ["id", "phash"]) for d in corpus_embeddings])
    corpus = represented.join(hashes_of, "id", join_type="inner")
    r, n = corpus.num_rows, meta.num_rows
    hashes = np.r_[corpus.column("phash").to_numpy(), meta.column("phash").to_numpy()].astype(np.uint64)
    candidate = np.r_[np.ones(r, bool), decision.reason < 0]
    preference = np.r_[np.arange(r), r + near_copy_order(meta.column("blur").to_numpy(), ids)]
    near, copy_of, hamming = near_copies(hashes, candidate, preference, rule.max_hamming,
                                         fixed=np.r_[np.ones(r, bool), np.zeros(n, bool)],
                                         pair_finder=ray_pair_finder(rule.task_cpus))
    near, copy_of, hamming = near[r:], copy_of[r:], hamming[r:]
    of_new = copy_of >= r
    decision.remove(near, "near_copy", "near_copy", "deldist", rule.model_dump(),
                    link=np.where(of_new, copy_of - r, -1), score=(1.0 - hamming / 64.0).astype(np.float32))
    to_corpus = near & ~of_new
    taken = pc.take(corpus.column("stand_in").combine_chunks(), pa.array(np.where(to_corpus, copy_of, 0))) if r \
        else pa.nulls(n, pa.string())
    decision.info["copy_of_corpus"] = pc.if_else(pa.array(to_corpus), taken, pa.nulls(n, pa.string()))


def _dedup_against_corpus(config: Config, manifest: dict[str, Any], seen_assign: pa.Table, represented: pa.Table,
                          batch_emb: str, ids: pa.Array, cluster: np.ndarray, distance: np.ndarray,
                          candidate: np.ndarray, threshold: float, dim: int) -> tuple[pa.Array, np.ndarray]:
    """Per cluster: the corpus's represented items (:func:`represented_items`, as kept), then
    the candidate uploads in the corpus's rank order, through
    :func:`deldist.pairwise.keep_first_exact` (Ray tasks). Returns (duplicate_of (n,) strings: the
    retained item standing for what a removed upload duplicates (a corpus item's stand-in, or
    a kept upload), null when kept or not a candidate; similarity float32 (n,) to the item it
    matched, NaN)."""
    import ray

    n = len(candidate)
    rows = np.flatnonzero(candidate)
    new_cluster = cluster[rows]
    new_rank = rank_within_clusters(ids.take(pa.array(rows)), new_cluster, distance[rows],
                                    manifest.get("keep", "easy"), manifest.get("seed", 0))
    touched = np.unique(new_cluster)
    old = seen_assign.select(["id", "cluster"]).join(represented, "id", join_type="inner")
    old = old.filter(pc.is_in(old.column("cluster"), value_set=pa.array(touched.astype(np.int32))))
    old_cluster = old.column("cluster").to_numpy().astype(np.int64)
    k = int(max(cluster.max(initial=0), old_cluster.max(initial=0))) + 1
    sizes = np.bincount(new_cluster, minlength=k) + np.bincount(old_cluster, minlength=k)
    buckets = plan_buckets(sizes, bucket_count(config.num_buckets, config.task_cpus), split_rows=int(sizes.max()) + 1,
                           bucket_rows=1 << 40)
    bucket_of = bucket_of_groups(buckets, k)
    # corpus rows first in each cluster (negative ranks), then the uploads in rank order
    old_lookup = pa.table({"id": old.column("id"), "bucket": bucket_of[old_cluster],
                           "cluster": old_cluster.astype(np.int32), "rank": -1 - np.arange(len(old_cluster)),
                           "row": np.full(len(old_cluster), -1, np.int64)})
    new_lookup = pa.table({"id": ids.take(pa.array(rows)), "bucket": bucket_of[new_cluster],
                           "cluster": new_cluster.astype(np.int32), "rank": new_rank, "row": rows})
    slices: list[list[Any]] = [[] for _ in buckets]
    stats = []
    for emb_dir, lookup in [*[(d, old_lookup) for d in manifest["embeddings"]], (batch_emb, new_lookup)]:
        per_bucket, route_stats = shuffle_by_bucket(emb_dir, dim, lookup, len(buckets), config.shard_rows,
                                                    config.io_cpus)
        for b, refs in enumerate(per_bucket):
            slices[b] += refs
        stats.append(route_stats)
    use_gpu = _use_gpu(config)
    task = ray.remote(num_cpus=config.task_cpus, **({"num_gpus": config.task_gpus} if use_gpu else {}))(
        _dedup_bucket)
    results = ray.get([task.remote(threshold, config.block_rows, *s) for s in slices])
    found = sum(r["rows"] - r["missing"] for refs in stats for r in ray.get(refs))
    if found != old_lookup.num_rows + new_lookup.num_rows:
        raise RuntimeError(f"found {found} of the {old_lookup.num_rows + new_lookup.num_rows} embeddings needed: "
                           "the embeddings changed under this version")
    stand_in = dict(zip(represented.column("id").to_pylist(), represented.column("stand_in").to_pylist()))
    dup_of = pa.nulls(n, pa.string())
    sim = np.full(n, np.nan, np.float32)
    for done_rows, dup_ids, sims in results:
        dup_ids = pa.array([stand_in.get(d, d) if d is not None else None for d in dup_ids.to_pylist()], pa.string())
        if len(done_rows):
            position = np.full(n, -1, np.int64)
            position[done_rows] = np.arange(len(done_rows))
            dup_of = pc.if_else(pa.array(position >= 0), pc.take(dup_ids, pa.array(np.maximum(position, 0))), dup_of)
            sim[done_rows] = sims
    return dup_of, sim


def _dedup_bucket(threshold: float, block_rows: int, *slices: tuple[pa.Table, np.ndarray],
                  ) -> tuple[np.ndarray, pa.Array, np.ndarray]:
    """Task body: the uploads of one bucket's clusters against the corpus's retained rows ->
    (rows of the uploads, the id each removed one duplicates (null when kept), similarity)."""
    x, meta = gather_sorted(slices)
    ids = meta.column("id").combine_chunks()
    row = meta.column("row").to_numpy()
    new = row >= 0
    dup = np.full(len(row), -1, np.int64)
    sim = np.full(len(row), np.nan, np.float32)
    for s, e in zip(*equal_runs(meta.column("cluster").to_numpy())):
        fixed = int((~new[s:e]).sum())
        _, d, v = keep_first_exact(x[s:e], np.ones(e - s, bool), threshold, fixed, block_rows)
        dup[s:e] = np.where(d >= 0, d + s, -1)
        sim[s:e] = v
    dup_ids = pc.if_else(pa.array(dup >= 0), pc.take(ids, pa.array(np.maximum(dup, 0))),
                         pa.nulls(len(dup), pa.string()))
    return row[new], dup_ids.filter(pa.array(new)), sim[new]


def _stand_ins(ids: pa.Array, linked: pa.Array, kept: np.ndarray) -> pa.Array:
    """duplicate_of of every upload: the retained item it stands for, following links between
    uploads (``linked``: the id each removed upload was matched to, an upload or a corpus
    item; null for none) to a kept upload or a corpus item (retained by construction)."""
    n = len(ids)
    corpus = pc.unique(linked.filter(pc.invert(pc.fill_null(pc.is_in(linked, value_set=ids), True))))
    chain_ids = pa.concat_arrays([ids, corpus])
    chain_parent = pa.concat_arrays([pc.if_else(pa.array(kept), pa.nulls(n, pa.string()), linked),
                                     pa.nulls(len(corpus), pa.string())])
    roots = retained_roots(chain_ids, chain_parent, np.r_[kept, np.ones(len(corpus), bool)]).slice(0, n)
    return pc.if_else(pa.array(kept), pa.nulls(n, pa.string()), roots)


@dataclass
class Batch:
    """One curate-new run: the version it extends and the one it makes."""

    config: Config
    version: int  # the latest published version
    manifest: dict[str, Any]  # that version's manifest
    sources: list[Any]  # new media sources
    skipped: list[str]  # new files that are not media (recorded, never retried)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.config.corpus)

    @property
    def new_version(self) -> int:
        return self.version + 1

    @property
    def root(self) -> str:
        """``curated/<selection>/batches/v<N>``: the batch's embeddings, errors, assignments."""
        return self.layout.batch(self.config.selection, self.new_version)

    @property
    def embeddings(self) -> str:
        return storage.join(self.root, "embeddings")


def run(config: Config) -> dict[str, Any]:
    """Curate the new uploads under ``config.input`` into a new corpus version (module doc)."""
    from deldist.runtime import init_ray

    started = time.time()
    init_ray()
    batch = _new_batch(config)
    if not batch.sources and not batch.skipped:
        path = version_dir(config.corpus, config.selection, batch.version)
        print(f"deldist curate-new: no new sources under {config.input}; latest stays v{batch.version}")
        return {"version": batch.version, "changed": False, "new_sources": 0, "path": path}
    embed_result = _embed_uploads(batch)
    rules = _selection_rules(batch.manifest)
    meta = storage.read_published(batch.embeddings, ["id", "source", "frame_index", "dataset", *QUALITY_COLUMNS,
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
                             old_dups=_old_matches(duplicate_of, decision.reason >= 0, ids))
    result = _publish_version(batch, build_tables(ids, decision, duplicate_of), meta, summary)
    if config.recluster and summary["recluster_recommended"]:
        result["reclustered"] = recluster(config, batch.new_version)
        result.update(version=result["reclustered"]["version"], path=result["reclustered"]["path"])
    result["seconds"] = round(time.time() - started, 1)
    return result


def _new_batch(config: Config) -> Batch:
    """The latest version (v1 made from the selection on the first run; a version published
    without its latest.json recovered) and the sources no version has seen."""
    cur = curated_dir(config.corpus, config.selection)
    version = latest_version(config.corpus, config.selection)
    if version == 0:
        create_first_version(config.corpus, config.selection)
        version = 1
    if storage.is_published(storage.join(cur, f"v{version + 1}")):  # published, latest.json not yet written
        version += 1
        set_latest(cur, version)
    vdir = storage.join(cur, f"v{version}")
    seen = set(storage.read_published(storage.join(vdir, "sources"), ["source"]).column("source").to_pylist())
    sources, skipped = list_sources(config.input, config.manifest)
    return Batch(config, version, storage.read_manifest(vdir), [s for s in sources if s.uri not in seen],
                 [u for u in skipped if u not in seen])


def _embed_uploads(batch: Batch) -> dict[str, Any]:
    """Embed the new sources with the corpus's encoder and sampling (checked before any work)."""
    config = batch.config
    listing = storage.join(batch.root, "sources.csv")
    corpus_emb = batch.manifest["embeddings"][0]
    corpus_fp = storage.read_json(storage.join(corpus_emb, "_run.json"))
    emb_cfg = _batch_embed_config(config, corpus_fp, storage.read_manifest(corpus_emb), batch.root, listing,
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
    assigned = _assign(batch.embeddings, int(centroids.shape[1]), centroids, storage.join(batch.root, "assignments"),
                       batch.config) if len(ids) else ASSIGNMENTS_SCHEMA.empty_table()
    assigned = assigned.take(pc.index_in(ids, value_set=assigned.column("id")))
    return assigned.column("cluster").to_numpy().astype(np.int64), assigned.column("distance").to_numpy()


def _apply_rules(batch: Batch, rules: Any, meta: pa.Table, ids: pa.Array, cluster: np.ndarray,
                 distance: np.ndarray, seen: pa.Table, centroids: np.ndarray) -> tuple[Decision, pa.Array]:
    """The corpus selection's rules on the uploads -> (decision, duplicate_of ids): the filters,
    near copies against the corpus, then duplicates of the corpus's represented items or of
    uploads kept before them, in the corpus's rank order."""
    dim, n = int(centroids.shape[1]), meta.num_rows
    vdir = version_dir(batch.config.corpus, batch.config.selection, batch.version)
    decision = _filter_uploads(rules, meta, cluster, distance, seen.column("cluster").to_numpy().astype(np.int64),
                               seen.column("distance").to_numpy(), len(centroids), batch.embeddings, dim)
    represented = represented_items(vdir)
    if rules.deldist_rules.near_copy is not None and n:
        _near_copies_of_corpus(rules, meta, ids, batch.manifest["embeddings"], represented, decision)
    direct = decision.info.get("copy_of_corpus", pa.nulls(n, pa.string()))
    candidate = decision.reason < 0
    if candidate.any():
        threshold = float(batch.manifest["similarity_threshold"])
        dup_of, sim = _dedup_against_corpus(batch.config, batch.manifest, seen, represented, batch.embeddings, ids,
                                            cluster, distance, candidate, threshold, dim)
        decision.remove(pc.is_valid(dup_of).to_numpy(zero_copy_only=False), "duplicate", "duplicate",
                        "MedDEL §3.2 (against the curated corpus)", {"similarity_threshold": threshold,
                                                                     "dedup_rule": "kept"}, score=sim)
        direct = pc.coalesce(dup_of, direct)
    # a frame matched to an upload that a later rule removed follows that upload's own link
    linked = pc.if_else(pa.array(decision.link >= 0), ids.take(pa.array(np.maximum(decision.link, 0))), direct)
    return decision, _stand_ins(ids, linked, decision.reason < 0)


def _publish_version(batch: Batch, tables: dict[str, pa.Table], meta: pa.Table, summary: dict[str, Any],
                     ) -> dict[str, Any]:
    """``v<N>``: its tables (the parent's parts plus this batch's), summary and manifest, then
    ``latest.json``."""
    config, manifest = batch.config, batch.manifest
    cur = curated_dir(config.corpus, config.selection)
    vdir, new_vdir = storage.join(cur, f"v{batch.version}"), storage.join(cur, f"v{batch.new_version}")
    ledger = sources_ledger(meta.select(["source"]), batch.new_version,
                            [s.uri for s in batch.sources] + batch.skipped)
    parents = {t: storage.published_paths(storage.join(vdir, t))[1] for t in ("retained", "removed", "sources")}
    counts = {t: publish_table(storage.join(new_vdir, t), parents[t], tables[t], schema)
              for t, schema in (("retained", RETAINED_SCHEMA), ("removed", REMOVED_SCHEMA))}
    publish_table(storage.join(new_vdir, "sources"), parents["sources"], ledger, VERSION_SOURCES_SCHEMA)
    version_summary = _version_summary(storage.read_json(storage.join(vdir, "summary.json")), summary,
                                       batch.new_version, counts, config)
    storage.write_json(storage.join(new_vdir, "summary.json"), version_summary)
    storage.publish(new_vdir, [], {
        **{k: v for k, v in manifest.items() if k not in ("version", "parent")},
        "version": batch.new_version, "parent": batch.version,
        "embeddings": [*manifest["embeddings"], batch.embeddings],
        "assignments": [*manifest["assignments"], storage.join(batch.root, "assignments")],
    })
    set_latest(cur, batch.new_version)
    print(f"deldist curate-new: v{batch.new_version}: {len(batch.sources)} new sources, {summary['frames']} frames, "
          f"kept {summary['kept']} ({summary['removed_by_reason']}); drift {summary['drift_fraction']:.3f}"
          + ("; re-clustering recommended" if summary["recluster_recommended"] else "") + f" -> {new_vdir}")
    return {"version": batch.new_version, "changed": True, "path": new_vdir, "new_sources": len(batch.sources),
            "new_frames": summary["frames"], "kept": summary["kept"], "drift_fraction": summary["drift_fraction"],
            "recluster_recommended": summary["recluster_recommended"]}


def _old_matches(duplicate_of: pa.Array, removed: np.ndarray, ids: pa.Array) -> int:
    """Removed uploads whose retained stand-in is a corpus item (not from this batch)."""
    named = duplicate_of.filter(pa.array(removed))
    named = named.filter(pc.is_valid(named))
    return int(len(named) - pc.sum(pc.is_in(named, value_set=ids)).as_py()) if len(named) else 0


def _batch_summary(meta: pa.Table, decision: Decision, batch: Batch, embed_result: dict[str, Any], drift: float,
                   drift_threshold: float, old_dups: int) -> dict[str, Any]:
    config, reason = batch.config, decision.reason
    kept = reason < 0
    datasets = meta.column("dataset").to_numpy(zero_copy_only=False).astype(str)
    per_dataset = {name: {"input": int((datasets == name).sum()), "kept": int(kept[datasets == name].sum())}
                   for name in sorted(set(datasets.tolist()))}
    return {
        "input": config.input, "new_sources": len(batch.sources), "skipped_not_media": len(batch.skipped),
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
        "name": config.selection, "method": "meddel", "version": version, "parent": version - 1,
        "input_count": n, "kept_count": counts["retained"], "removed_count": counts["removed"],
        "ratio": counts["retained"] / n if n else 0.0, "removed_by_reason": removed, "per_dataset": per_dataset,
        "similarity_threshold": parent.get("similarity_threshold"), "batch": batch,
        "batches": [*parent.get("batches", []), {"version": version, "input": batch["input"],
                                                  "frames": batch["frames"], "kept": batch["kept"]}],
    }
