"""Incremental curation: new uploads against an already curated corpus (``deldist curate-new``).

The corpus's represented items (:func:`deldist.versions.represented_items`: retained, or
removed as a copy of a retained item) are fixed and count as kept; the uploads are judged
against them and against the uploads kept before them, with the corpus selection's rules.
The math is the batch stages' (:func:`deldist.pairwise.keep_first_exact`,
:func:`deldist.nearcopy.near_copies`); this module is the wiring that puts corpus and upload
rows side by side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deldist import runtime, storage
from deldist.arrays import equal_runs
from deldist.dedup_scores import rank_within_clusters
from deldist.pairwise import keep_first_exact
from deldist.rules import Decision
from deldist.shuffle import bucket_count, bucket_of_groups, gather_sorted, plan_buckets, shuffle_by_bucket
from deldist.versions import retained_roots

if TYPE_CHECKING:
    from deldist.curate_new import Config


def near_copies_of_corpus(rules: Any, meta: pa.Table, ids: pa.Array, corpus_embeddings: list[str],
                          represented: pa.Table, rejected: pa.Table, decision: Decision) -> None:
    """deldist's near-copy rule on the uploads: the corpus's represented frames
    (:func:`deldist.versions.represented_items`) first, as kept, then the corpus frames rejected
    for their own sake (:func:`deldist.versions.rejected_items`), then the uploads sharpest
    first. A copy of a new frame links to it; a copy of a represented corpus frame names that
    frame's retained stand-in in ``decision.info["copy_of_corpus"]``.

    deldist's own rule, ``copy_of_rejected``: an upload within ``max_hamming`` of a rejected
    corpus frame (and of no represented one) is removed for that frame's reason, with no
    ``duplicate_of``. A re-upload adds nothing, also where a relative rule (the outlier
    quantile, taken over corpus + uploads) would now draw its line a hair the other side.
    """
    from deldist.nearcopy import near_copies, ray_pair_finder
    from deldist.rules import near_copy_order

    rule = rules.deldist_rules.near_copy
    hashes_of = pa.concat_tables([storage.read_published(d, ["id", "phash"]) for d in corpus_embeddings])
    corpus = represented.join(hashes_of, "id", join_type="inner")
    refused = rejected.join(hashes_of, "id", join_type="inner")
    r, f, n = corpus.num_rows, corpus.num_rows + refused.num_rows, meta.num_rows
    hashes = np.r_[corpus.column("phash").to_numpy(), refused.column("phash").to_numpy(),
                   meta.column("phash").to_numpy()].astype(np.uint64)
    candidate = np.r_[np.ones(f, bool), decision.reason < 0]
    preference = np.r_[np.arange(f), f + near_copy_order(meta.column("blur").to_numpy(), ids)]
    near, copy_of, hamming = near_copies(hashes, candidate, preference, rule.max_hamming,
                                         fixed=np.r_[np.ones(f, bool), np.zeros(n, bool)],
                                         pair_finder=ray_pair_finder(rule.task_cpus))
    near, copy_of, hamming = near[f:], copy_of[f:], hamming[f:]
    score = (1.0 - hamming / 64.0).astype(np.float32)
    to_rejected = near & (copy_of >= r) & (copy_of < f)
    reason_of = refused.column("reason").to_numpy(zero_copy_only=False)[np.clip(copy_of - r, 0, f - r - 1)] \
        if f > r else np.full(n, "", object)
    for reason in sorted(set(refused.column("reason").to_pylist())):
        decision.remove(to_rejected & (reason_of == reason), reason, "copy_of_rejected", "deldist",
                        {"max_hamming": rule.max_hamming}, score=score)
    near &= ~to_rejected
    of_new = copy_of >= f
    decision.remove(near, "near_copy", "near_copy", "deldist", rule.model_dump(),
                    link=np.where(of_new, copy_of - f, -1), score=score)
    to_corpus = near & ~of_new
    taken = pc.take(corpus.column("stand_in").combine_chunks(), pa.array(np.where(to_corpus, copy_of, 0))) if r \
        else pa.nulls(n, pa.string())
    decision.info["copy_of_corpus"] = pc.if_else(pa.array(to_corpus), taken, pa.nulls(n, pa.string()))


def dedup_against_corpus(config: Config, manifest: dict[str, Any], seen_assign: pa.Table, represented: pa.Table,
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
    use_gpu = runtime.use_gpu(config.use_gpu)
    task = ray.remote(num_cpus=config.task_cpus, **({"num_gpus": config.task_gpus} if use_gpu else {}))(
        dedup_bucket)
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


def dedup_bucket(threshold: float, block_rows: int, *slices: tuple[pa.Table, np.ndarray],
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


def stand_ins(ids: pa.Array, linked: pa.Array, kept: np.ndarray) -> pa.Array:
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


def matched_to_corpus(duplicate_of: pa.Array, removed: np.ndarray, ids: pa.Array) -> int:
    """Removed uploads whose retained stand-in is a corpus item (not from this batch)."""
    named = duplicate_of.filter(pa.array(removed))
    named = named.filter(pc.is_valid(named))
    return int(len(named) - pc.sum(pc.is_in(named, value_set=ids)).as_py()) if len(named) else 0
