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
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from deldist import embed, storage
from deldist.arrays import equal_runs
from deldist.cluster import assign_shard, read_centroids
from deldist.config import StageConfig
from deldist.dedup import rank_within_clusters
from deldist.io import list_sources
from deldist.pairwise import keep_first_exact
from deldist.schema import (
    ASSIGNMENTS_SCHEMA,
    QUALITY_COLUMNS,
    REMOVED_SCHEMA,
    RETAINED_SCHEMA,
    VERSION_SOURCES_SCHEMA,
)
from deldist.select import REASONS, Decision, cluster_quantiles, invalid_mask
from deldist.shards import gather_sorted, plan_buckets, plan_shards, shuffle_by_bucket

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


def retained_roots(ids: pa.Array, parent: pa.Array, retained: np.ndarray) -> pa.Array:
    """The retained item each item stands for, following ``parent`` links (duplicate_of).

    ids: (n,) unique strings; parent: (n,) the id each item duplicates (null for none; an id not
    in ``ids`` ends the chain); retained: (n,) bool. Retained items are their own root; an item
    whose chain ends at a non-retained item has a null root. Returns (n,) strings.
    """
    n = len(ids)
    link = pc.index_in(parent, value_set=ids).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    retained = np.asarray(retained, bool)
    root = np.where(retained, np.arange(n), link)
    for _ in range(64):  # pointer jumping: settles chains of any length in log2(length) rounds
        hop = np.where(root >= 0, root, 0)
        settled = (root < 0) | retained[hop]
        jumped = np.where(settled, root, root[hop])
        if np.array_equal(jumped, root):
            break
        root = jumped
    ok = root >= 0
    ok &= retained[np.where(ok, root, 0)]  # chains ending at a non-retained item (or cycling) have no root
    taken = pc.take(ids, pa.array(np.where(ok, root, 0)))
    return pc.if_else(pa.array(ok), taken, pa.nulls(n, pa.string()))


def drift_fraction(distance: np.ndarray, threshold: float) -> float:
    """Fraction of items whose distance to the nearest centroid exceeds ``threshold``."""
    distance = np.asarray(distance, np.float64)
    return float((distance > threshold).mean()) if len(distance) else 0.0


# ----------------------------------------------------------------------------- versions (I/O)


def curated_dir(corpus: str, selection: str) -> str:
    return storage.join(corpus, "curated", selection)


def latest_version(corpus: str, selection: str) -> int:
    """The published version ``latest.json`` points at; 0 when none exists yet."""
    path = storage.join(curated_dir(corpus, selection), "latest.json")
    return int(storage.read_json(path)["version"]) if storage.exists(path) else 0


def version_dir(corpus: str, selection: str, version: int | None = None) -> str:
    """``curated/<selection>/v<version>`` (default: the latest)."""
    version = latest_version(corpus, selection) if version is None else version
    if version < 1:
        raise FileNotFoundError(f"{curated_dir(corpus, selection)} has no version yet; run deldist curate-new")
    return storage.join(curated_dir(corpus, selection), f"v{version}")


def read_version(corpus: str, selection: str, table: str, version: int | None = None,
                 columns: list[str] | None = None) -> pa.Table:
    """One table (``retained``, ``removed`` or ``sources``) of a version (default: latest)."""
    return storage.read_published(storage.join(version_dir(corpus, selection, version), table), columns)


def _set_latest(cur: str, version: int) -> None:
    storage.write_json(storage.join(cur, "latest.json"), {"version": version, "path": f"v{version}"})


def _publish_table(dir_uri: str, shared: Sequence[str], table: pa.Table | None, schema: pa.Schema) -> int:
    """Publish ``dir_uri`` listing the parent's parts (``shared``) plus ``table`` as a new part."""
    files = list(shared)
    if table is not None and table.num_rows:
        path = storage.join(dir_uri, storage.new_part_name())
        storage.write_table(table, path)
        files.append(storage.resolve(path)[1])
    storage.publish(dir_uri, files, {"schema": storage.schema_hex(schema)})
    fs, paths = storage.published_paths(dir_uri)
    return sum(pq.ParquetFile(p, filesystem=fs).metadata.num_rows for p in paths)


def sources_ledger(frame_sources: pa.Table, version: int, failed: Iterable[str]) -> pa.Table:
    """A version's ``sources`` rows for what it brought in: every source with embedded frames
    (status embedded, its frame count) and every source in ``failed`` without any (status
    error, 0 frames: seen, so a rerun does not retry it). frame_sources: one ``source`` row per
    embedded frame."""
    counts = frame_sources.group_by("source").aggregate([("source", "count")])
    errors = sorted(set(failed) - set(counts.column("source").to_pylist()))

    def rows(sources: Any, status: str, frames: Any) -> pa.Table:
        n = len(sources)
        return pa.table({"source": pa.array(sources, pa.string()), "version": pa.array(np.full(n, version, np.int32)),
                         "status": pa.array([status] * n, pa.string()), "frames": frames},
                        schema=VERSION_SOURCES_SCHEMA)

    return pa.concat_tables([rows(counts.column("source"), "embedded", counts.column("source_count").cast(pa.int64())),
                             rows(errors, "error", pa.array(np.zeros(len(errors), np.int64)))])


def _sources_of_corpus(corpus: str) -> pa.Table:
    errors_dir = storage.join(corpus, "errors")
    failed = storage.read_published(errors_dir, ["source"]).column("source").to_pylist() \
        if storage.is_published(errors_dir) else []
    return sources_ledger(storage.read_published(storage.join(corpus, "embeddings"), ["source"]), 1, failed)


def _publish_selection_version(run_root: str, selection: str, cur: str, version: int, sources: Sequence[str],
                               sources_table: pa.Table | None, embeddings: list[str],
                               extra: dict[str, Any]) -> dict[str, Any]:
    """Publish ``cur/v<version>`` from selection ``selection`` of ``run_root`` (its retained /
    removed parts shared), then point ``latest.json`` at it."""
    sel_dir = storage.join(run_root, "selections", selection)
    summary = storage.read_json(storage.join(sel_dir, "summary.json"))
    if summary.get("method") not in ("meddel", "semdedup"):
        raise ValueError(f"selection {selection!r} is a {summary.get('method')} selection; curate-new extends a "
                         "MedDEL or SemDeDup selection (its threshold and rules are applied to the uploads)")
    if summary.get("similarity_threshold") is None:
        raise ValueError(f"selection {selection!r} has no similarity threshold (built without eps / target_ratio)")
    clusters_dir = storage.join(run_root, "clusters")
    clusters_manifest = storage.read_manifest(clusters_dir)
    scores_manifest = storage.read_manifest(storage.join(run_root, "dedup", "scores"))
    vdir = storage.join(cur, f"v{version}")
    for table in ("retained", "removed"):
        schema = RETAINED_SCHEMA if table == "retained" else REMOVED_SCHEMA
        _publish_table(storage.join(vdir, table), storage.published_paths(storage.join(sel_dir, table))[1], None,
                       schema)
    _publish_table(storage.join(vdir, "sources"), sources, sources_table, VERSION_SOURCES_SCHEMA)
    params = summary.get("parameters", {})
    manifest = {
        "version": version, "selection": selection, "clusters": clusters_dir, "embeddings": embeddings,
        "assignments": [storage.join(clusters_dir, clusters_manifest.get("assignments", "assignments"))],
        "similarity_threshold": summary["similarity_threshold"],
        "keep": scores_manifest.get("keep", "easy"), "seed": scores_manifest.get("seed", 0),
        "selection_parameters": params, **extra,
    }
    storage.write_json(storage.join(vdir, "summary.json"), {**summary, "version": version, **extra})
    storage.publish(vdir, [], manifest)
    _set_latest(cur, version)
    return manifest


def create_first_version(corpus: str, selection: str) -> dict[str, Any]:
    """``v1``: the corpus selection as curated, its retained / removed parts shared."""
    return _publish_selection_version(corpus, selection, curated_dir(corpus, selection), 1, [],
                                      _sources_of_corpus(corpus), [storage.join(corpus, "embeddings")],
                                      {"parent": None})


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
    result = _publish_selection_version(root, config.selection, cur, new_version, sources, None, [emb_dir],
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
    from deldist.runtime import cluster_gpus

    return cluster_gpus() > 0 if config.use_gpu is None else config.use_gpu


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


def represented_items(vdir: str) -> pa.Table:
    """The corpus items an upload may be a copy of -> (id, stand_in): every retained item (its
    own stand-in) and every item removed as a copy of another (duplicate, near_copy, temporal)
    with the retained item standing for it. Items removed as invalid or outliers are not in it:
    an upload is never removed because of a frame that was rejected for its own sake."""
    retained = storage.read_published(storage.join(vdir, "retained"), ["id"]).column("id").combine_chunks()
    removed = storage.read_published(storage.join(vdir, "removed"), ["id", "duplicate_of"])
    linked = removed.filter(pc.is_valid(removed.column("duplicate_of")))
    ids = pa.concat_arrays([retained, linked.column("id").combine_chunks()])
    parent = pa.concat_arrays([pa.nulls(len(retained), pa.string()), linked.column("duplicate_of").combine_chunks()])
    stand_in = retained_roots(ids, parent, np.r_[np.ones(len(retained), bool), np.zeros(linked.num_rows, bool)])
    table = pa.table({"id": ids, "stand_in": stand_in})
    return table.filter(pc.is_valid(table.column("stand_in")))


def _selection_rules(manifest: dict[str, Any]) -> Any:
    """The corpus selection's settings (a :class:`deldist.select.Config`) from the version manifest."""
    from deldist import select

    params = {k: v for k, v in manifest["selection_parameters"].items()
              if k not in ("output", "embeddings", "clusters", "scores", "ground_truth")}
    return select.Config.model_validate({**params, "output": "-"})


def _filter_uploads(rules: Any, meta: pa.Table, ids: pa.Array, cluster: np.ndarray, distance: np.ndarray,
                    seen_cluster: np.ndarray, seen_distance: np.ndarray, k: int, batch_emb: str,
                    dim: int) -> Decision:
    """The corpus selection's quality, outlier and temporal rules on the uploads."""
    n = meta.num_rows
    decision = Decision.empty(n)
    extra = rules.deldist_rules
    if extra.quality is not None and n:
        quality = {c: meta.column(c).to_numpy(zero_copy_only=False) for c in QUALITY_COLUMNS}
        groups = pc.dictionary_encode(meta.column("source").combine_chunks()).indices.to_numpy()
        masks = invalid_mask(quality, extra.quality, groups, meta.column("frame_index").to_numpy())
        decision.remove(np.logical_or.reduce([np.zeros(n, bool), *masks.values()]), "invalid", "quality", "deldist",
                        extra.quality.model_dump(), flagged_by_check={r: int(m.sum()) for r, m in masks.items()})
    if rules.outlier_distance is not None:
        decision.remove(distance > rules.outlier_distance, "outlier", "outlier_distance", "MedDEL §3.2",
                        {"outlier_distance": rules.outlier_distance})
    if extra.outlier_quantile is not None and n:
        # the per-cluster quantile of the clusters as they are now (corpus + uploads): new content
        # far from the old items is drift, not an outlier, unless it is extreme in its cluster too
        limits = cluster_quantiles(np.r_[seen_cluster, cluster], np.r_[seen_distance, distance],
                                   extra.outlier_quantile, k)
        decision.remove(distance > limits[cluster], "outlier", "outlier_quantile", "deldist",
                        {"outlier_quantile": extra.outlier_quantile})
    if extra.temporal_threshold is not None and n:
        from deldist.select import _temporal

        collapsed, rep_row, sim = _temporal(rules, batch_emb, dim, meta, decision.reason < 0)
        decision.remove(collapsed, "temporal", "temporal", "deldist", {"temporal_threshold": extra.temporal_threshold},
                        link=rep_row, score=sim)
    return decision


def _near_copies_of_corpus(rules: Any, meta: pa.Table, ids: pa.Array, corpus_embeddings: list[str],
                           represented: pa.Table, decision: Decision) -> None:
    """deldist's near-copy rule on the uploads: the corpus's represented frames
    (:func:`represented_items`) first, as kept, then the uploads sharpest first. A copy of a new
    frame links to it; a copy of a corpus frame names that frame's retained stand-in in
    ``decision.info["copy_of_corpus"]``."""
    import ray

    from deldist.nearcopy import distributed_pairs, near_copies
    from deldist.select import near_copy_order

    rule = rules.deldist_rules.near_copy
    hashes_of = pa.concat_tables([storage.read_published(d, ["id", "phash"]) for d in corpus_embeddings])
    corpus = represented.join(hashes_of, "id", join_type="inner")
    r, n = corpus.num_rows, meta.num_rows
    hashes = np.r_[corpus.column("phash").to_numpy(), meta.column("phash").to_numpy()].astype(np.uint64)
    candidate = np.r_[np.ones(r, bool), decision.reason < 0]
    preference = np.r_[np.arange(r), r + near_copy_order(meta.column("blur").to_numpy(), ids)]
    tasks = max(1, int(ray.cluster_resources().get("CPU", 1.0) // rule.task_cpus))
    near, copy_of, hamming = near_copies(hashes, candidate, preference, rule.max_hamming,
                                         fixed=np.r_[np.ones(r, bool), np.zeros(n, bool)],
                                         pair_finder=lambda u, h: distributed_pairs(u, h, tasks, rule.task_cpus))
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
    n_buckets = config.num_buckets or max(1, 2 * int(ray.cluster_resources().get("CPU", 1.0) // config.task_cpus))
    buckets = plan_buckets(sizes, n_buckets, split_rows=int(sizes.max()) + 1, bucket_rows=1 << 40)
    bucket_of = np.full(k, -1, np.int32)
    for b, bucket in enumerate(buckets):
        bucket_of[bucket.clusters] = b
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


def run(config: Config) -> dict[str, Any]:
    """Curate the new uploads under ``config.input`` into a new corpus version (module doc)."""
    from deldist.runtime import init_ray

    started = time.time()
    init_ray()
    cur = curated_dir(config.corpus, config.selection)
    version = latest_version(config.corpus, config.selection)
    if version == 0:
        create_first_version(config.corpus, config.selection)
        version = 1
    if storage.is_published(storage.join(cur, f"v{version + 1}")):  # published, latest.json not yet written
        version += 1
        _set_latest(cur, version)
    vdir = storage.join(cur, f"v{version}")
    manifest = storage.read_manifest(vdir)

    # 1. what is new
    seen = set(storage.read_published(storage.join(vdir, "sources"), ["source"]).column("source").to_pylist())
    sources, skipped = list_sources(config.input, config.manifest)
    new_sources = [s for s in sources if s.uri not in seen]
    new_skipped = [u for u in skipped if u not in seen]
    if not new_sources and not new_skipped:
        print(f"deldist curate-new: no new sources under {config.input}; latest stays v{version}")
        return {"version": version, "changed": False, "new_sources": 0, "path": vdir}
    new_version = version + 1
    batch_root = storage.join(cur, "batches", f"v{new_version}")
    new_vdir = storage.join(cur, f"v{new_version}")

    # 2. embed the new sources with the corpus's encoder (checked before any work)
    batch_manifest = storage.join(batch_root, "sources.csv")
    corpus_emb = manifest["embeddings"][0]
    corpus_fp = storage.read_json(storage.join(corpus_emb, "_run.json"))
    emb_cfg = _batch_embed_config(config, corpus_fp, storage.read_manifest(corpus_emb), batch_root,
                                  batch_manifest, f"v{new_version}/")
    _check_same_encoder(corpus_fp, embed.fingerprint(emb_cfg))
    storage.write_csv(batch_manifest, [{"uri": s.uri, "dataset": s.dataset} for s in new_sources]
                      + [{"uri": u, "dataset": ""} for u in new_skipped])
    embed_result = embed.run(emb_cfg)
    if not embed_result.get("published"):
        raise RuntimeError("embedding the uploads did not finish (max_sources?); rerun curate-new to continue")
    batch_emb = storage.join(batch_root, "embeddings")
    rules = _selection_rules(manifest)
    meta = storage.read_published(batch_emb, ["id", "source", "frame_index", "dataset", *QUALITY_COLUMNS,
                                              *(["phash"] if rules.deldist_rules.near_copy is not None else [])])
    n = meta.num_rows
    ids = meta.column("id").combine_chunks()

    # 3. assign to the corpus centroids
    centroids = read_centroids(manifest["clusters"])
    dim = int(centroids.shape[1])
    assigned = _assign(batch_emb, dim, centroids, storage.join(batch_root, "assignments"), config) if n else \
        ASSIGNMENTS_SCHEMA.empty_table()
    assigned = assigned.take(pc.index_in(ids, value_set=assigned.column("id")))
    cluster = assigned.column("cluster").to_numpy().astype(np.int64)
    distance = assigned.column("distance").to_numpy()

    # 4. the corpus selection's rules: quality, outliers, temporal, near copies
    seen_assign = pa.concat_tables([storage.read_published(a, ["id", "cluster", "distance"])
                                    for a in manifest["assignments"]])
    seen_cluster = seen_assign.column("cluster").to_numpy().astype(np.int64)
    seen_distance = seen_assign.column("distance").to_numpy()
    decision = _filter_uploads(rules, meta, ids, cluster, distance, seen_cluster, seen_distance, len(centroids),
                               batch_emb, dim)
    represented = represented_items(vdir)
    if rules.deldist_rules.near_copy is not None and n:
        _near_copies_of_corpus(rules, meta, ids, manifest["embeddings"], represented, decision)
    drift_threshold = float(np.quantile(seen_distance, config.drift_quantile))
    drift = drift_fraction(distance, drift_threshold)

    # 5. dedup: a new item is a duplicate only of a kept item of its cluster (the corpus's
    # retained items, then the new items kept before it in rank order)
    threshold = float(manifest["similarity_threshold"])
    candidate = decision.reason < 0
    if candidate.any():
        dup_of, sim = _dedup_against_corpus(config, manifest, seen_assign, represented, batch_emb, ids, cluster,
                                            distance, candidate, threshold, dim)
        duplicate = pc.is_valid(dup_of).to_numpy(zero_copy_only=False)
        decision.remove(duplicate, "duplicate", "duplicate", "MedDEL §3.2 (against the curated corpus)",
                        {"similarity_threshold": threshold, "dedup_rule": "kept"}, score=sim)
        direct = pc.coalesce(dup_of, decision.info.get("copy_of_corpus", pa.nulls(n, pa.string())))
    else:
        direct = decision.info.get("copy_of_corpus", pa.nulls(n, pa.string()))
    reason = decision.reason
    kept = reason < 0
    # duplicate_of: the retained item a removed item stands for; a frame matched to a new frame
    # that a later rule removed follows that frame's own link
    linked_ids = pc.if_else(pa.array(decision.link >= 0), ids.take(pa.array(np.maximum(decision.link, 0))),
                            direct)
    duplicate_of = _stand_ins(ids, linked_ids, kept)
    removed_rows = np.flatnonzero(~kept)
    new_retained = pa.table({"id": ids.filter(pa.array(kept))}, schema=RETAINED_SCHEMA)
    new_removed = pa.table({
        "id": ids.take(pa.array(removed_rows)),
        "reason": pa.array(np.asarray(REASONS, dtype=object)[reason[removed_rows]], pa.string()),
        "duplicate_of": duplicate_of.take(pa.array(removed_rows)),
        "max_sim": pa.array(decision.score[removed_rows], pa.float32(), from_pandas=True),
    }, schema=REMOVED_SCHEMA)
    ledger = sources_ledger(meta.select(["source"]), new_version, [s.uri for s in new_sources] + new_skipped)

    # 7. publish the version, then point latest at it
    parent_paths = {t: storage.published_paths(storage.join(vdir, t))[1] for t in ("retained", "removed", "sources")}
    counts = {
        "retained": _publish_table(storage.join(new_vdir, "retained"), parent_paths["retained"], new_retained,
                                   RETAINED_SCHEMA),
        "removed": _publish_table(storage.join(new_vdir, "removed"), parent_paths["removed"], new_removed,
                                  REMOVED_SCHEMA),
    }
    _publish_table(storage.join(new_vdir, "sources"), parent_paths["sources"],
                   ledger, VERSION_SOURCES_SCHEMA)
    parent_summary = storage.read_json(storage.join(vdir, "summary.json"))
    batch = _batch_summary(meta, reason, kept, new_sources, new_skipped, embed_result, drift, drift_threshold,
                           config, decision.rules, old_dups=_old_matches(duplicate_of, reason >= 0, ids))
    summary = _version_summary(parent_summary, batch, new_version, counts, config)
    storage.write_json(storage.join(new_vdir, "summary.json"), summary)
    storage.publish(new_vdir, [], {
        **{k: v for k, v in manifest.items() if k not in ("version", "parent")},
        "version": new_version, "parent": version,
        "embeddings": [*manifest["embeddings"], batch_emb],
        "assignments": [*manifest["assignments"], storage.join(batch_root, "assignments")],
    })
    _set_latest(cur, new_version)
    print(f"deldist curate-new: v{new_version}: {len(new_sources)} new sources, {n} frames, kept {int(kept.sum())} "
          f"({batch['removed_by_reason']}); drift {drift:.3f}"
          + ("; re-clustering recommended" if batch["recluster_recommended"] else "") + f" -> {new_vdir}")
    result = {"version": new_version, "changed": True, "path": new_vdir, "new_sources": len(new_sources),
              "new_frames": n, "kept": int(kept.sum()), "drift_fraction": drift,
              "recluster_recommended": batch["recluster_recommended"]}
    if config.recluster and batch["recluster_recommended"]:
        result["reclustered"] = recluster(config, new_version)
        result.update(version=result["reclustered"]["version"], path=result["reclustered"]["path"])
    result["seconds"] = round(time.time() - started, 1)
    return result


def _old_matches(duplicate_of: pa.Array, removed: np.ndarray, ids: pa.Array) -> int:
    """Removed uploads whose retained stand-in is a corpus item (not from this batch)."""
    named = duplicate_of.filter(pa.array(removed))
    named = named.filter(pc.is_valid(named))
    return int(len(named) - pc.sum(pc.is_in(named, value_set=ids)).as_py()) if len(named) else 0


def _batch_summary(meta: pa.Table, reason: np.ndarray, kept: np.ndarray, new_sources: list, new_skipped: list[str],
                   embed_result: dict[str, Any], drift: float, drift_threshold: float, config: Config,
                   rules: list[dict[str, Any]], old_dups: int) -> dict[str, Any]:
    datasets = meta.column("dataset").to_numpy(zero_copy_only=False).astype(str)
    per_dataset = {name: {"input": int((datasets == name).sum()), "kept": int(kept[datasets == name].sum())}
                   for name in sorted(set(datasets.tolist()))}
    return {
        "input": config.input, "new_sources": len(new_sources), "skipped_not_media": len(new_skipped),
        "frames": len(reason), "kept": int(kept.sum()),
        "ratio": float(kept.mean()) if len(kept) else 0.0,
        "removed_by_reason": {REASONS[r]: int((reason == r).sum()) for r in np.unique(reason[reason >= 0])},
        "duplicates_of_corpus_items": old_dups, "rules": rules,
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
