"""Within-cluster semantic dedup scores (SemDeDup / MedDEL), distributed on Ray.

For every cluster, items are ranked by their distance to the centroid (``keep="hard"``:
farthest first, the SemDeDup default; ``"easy"``: nearest first; ``"random"``: a seeded
permutation that does not depend on the input row order). Each item then gets its highest
cosine similarity to any earlier-ranked item of the same cluster (``max_sim``; 0 for the
first-ranked item) and that item's id (``duplicate_of``; null for the first). A selection
later removes an item when ``max_sim > 1 - eps``; storing scores, not booleans, makes every
threshold a cheap filter.

Math (:mod:`deldist.dedup_scores` and the kernels it calls): :func:`~deldist.pairwise.triu_max_sim` computes, for rank-ordered rows ``x`` (n, D), the row-wise max and
argmax of the strictly lower triangle of ``x @ x.T`` blockwise: a block of ``block_rows``
rows is multiplied against the earlier rows in column tiles of ``col_block`` (no mask), and
its diagonal block in sub-blocks of ``diag_rows`` rows with only their own triangle masked,
so memory is O(block_rows x col_block), never O(n^2), and only the lower triangle is
computed: n^2/2 + n diag_rows/2 dot products, about half the full n x n matrix.

Devices: ``device="cpu"`` runs the kernels in NumPy (float32 sgemm); any other torch device
(``"cuda"``) runs the same blocks in torch: one host-to-device copy per bucket (or per split
cluster's row range), full-precision float32 matmuls (TF32 off: its 10-bit mantissa moves
cosines by ~1e-3, enough to flip a ``max_sim > 1 - eps`` decision or a tie), results back as
NumPy. Both paths give the same results up to float32 rounding, with the same tie rule.
Precision (``precision``, deldist's own rule): the tiles may be computed in a low precision
with every written value recomputed in float32 (:mod:`deldist.pairwise_lowp`, a proven error
margin): the same ``max_sim`` and ``duplicate_of``, exact listed similarities and sound
bounds, so every selection decides as on the float32 scores. ``"int8"``: int8 digit products
with exact integer sums (the fast one on CPUs with AMX); ``"bfloat16"``: bfloat16 tiles of
each cluster's rows minus their mean (on CPUs with AVX512-BF16: 0.43x the float32 floor at
1M for the max alone, bench/RESULTS.md). ``"auto"`` (the default) uses int8 on CPUs with
AMX and bfloat16 on CPUs with AVX512-BF16 for clusters of at least
:data:`~deldist.dedup_scores.LOWP_MIN_ROWS` rows, float32 elsewhere; GPUs stay float32.
GPU memory per scoring task: its bucket (up to ``bucket_rows`` x D x 4 bytes) or rows
[0, stop) of its split cluster, plus a few O(block_rows x col_block) tiles.

Ray wiring of :func:`run`:

1. The driver reads ``clusters/assignments`` (id, cluster, distance: metadata only), ranks
   the items and packs clusters into buckets of similar cost (sum of n_c^2); a cluster larger
   than ``split_rows`` gets a bucket of its own and is later split into row ranges.
2. Shuffle: one task per embeddings shard reads (id, embedding), looks up each row's bucket
   and returns one slice per bucket (Ray object store; the embeddings are read once).
3. Score: one task per bucket reads its slices in (cluster, rank) order a group of clusters
   at a time (:class:`~deldist.shuffle.SortedRows`: a few thousand rows, no copy of the whole
   bucket) and scores them; a split cluster is gathered once into the object store and scored by several
   row-range tasks reading it zero-copy. Each task writes a ``dedup/scores`` part.
4. Publish ``dedup/scores/`` (manifest then ``_SUCCESS``).

Bad input: ids present in embeddings but not in assignments (or the reverse), duplicate ids,
and a dimension differing between embeddings and centroids raise errors naming the cause;
an empty assignments table raises :class:`~deldist.shards.EmptyInputError`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field

from deldist import storage
from deldist.config import StageConfig
from deldist.dedup_scores import (
    KeepMode,
    Precision,
    cluster_neighbours,
    rank_within_clusters,
    score_sorted_clusters,
    scores_table,
)
from deldist.faults import fail_once
from deldist.layout import RunLayout
from deldist.schema import SCORES_SCHEMA, stored_itemsize
from deldist.shards import EmbeddingError, EmptyInputError
from deldist.shuffle import (
    Bucket,
    SortedRows,
    bucket_count,
    bucket_of_groups,
    check_shuffle,
    duplicate_ids,
    gather_sorted,
    plan_buckets,
    plan_waves,
    shuffle_by_bucket,
    sorted_lookup,
)
from deldist.tiles import Device, ListSpec

log = logging.getLogger(__name__)


class Config(StageConfig):
    """``deldist dedup`` settings."""

    # the settings that fix the result (the rest only say how to compute it)
    RESULT_KEYS: ClassVar[tuple[str, ...]] = ("keep", "seed", "neighbours_by_similarity", "neighbours_by_rank",
                                              "neighbour_floor")

    output: str = Field(description="run root URI: reads embeddings/ and clusters/, writes dedup/scores/")
    embeddings: str | None = Field(None, description="default <output>/embeddings")
    clusters: str | None = Field(None, description="default <output>/clusters")
    scores: str | None = Field(None, description="default <output>/dedup/scores")
    keep: KeepMode = Field("easy", description="rank order within a cluster: easy = nearest the centroid first "
                                               "(MedDEL), hard = farthest first (SemDeDup)")
    seed: int = Field(0, description="seed of keep=random")
    neighbours_by_similarity: int = Field(16, ge=0, description="per item, the most similar earlier items kept "
                                                                  "for the kept-aware selection")
    neighbours_by_rank: int = Field(16, ge=0, description="per item, the earliest-ranked earlier items kept (those "
                                                            "most often kept themselves)")
    neighbour_floor: float = Field(0.5, ge=-1, le=1, description="neighbours below this similarity are not kept; "
                                                                 "selections need thresholds at or above it")
    block_rows: int = Field(256, ge=1, description="rows per similarity block")
    diag_rows: int = Field(64, ge=1, description="rows per sub-block of a diagonal block")
    col_block: int = Field(16_384, ge=1, description="columns per similarity tile")
    split_rows: int = Field(50_000, ge=2, description="clusters larger than this are split over several tasks")
    bucket_rows: int = Field(200_000, ge=1, description="soft cap on rows in one packed task")
    memory_budget_gb: float | None = Field(None, gt=0, description="vectors one wave of buckets may hold in the "
                                                                     "object store (default: half of it); larger "
                                                                     "inputs are scored in waves, each re-reading "
                                                                     "the embeddings")
    num_buckets: int | None = Field(None, ge=1, description="packed tasks (default: 2 x cluster CPUs / task_cpus)")
    shard_rows: int = Field(65_536, ge=1, description="target rows per read shard")
    task_cpus: float = Field(1.0, gt=0, description="CPUs per scoring task (each runs single-threaded BLAS)")
    io_cpus: float = Field(1.0, gt=0, description="CPUs per shuffle (read) task: Parquet decode and routing are CPU-bound")
    precision: Precision = Field("auto", description="similarity tiles in float32, or in int8 / bfloat16 with every "
                                                    "written value recomputed in float32 (the same results); auto: "
                                                    "int8 for clusters of >= 1536 rows on CPUs with AMX, else float32")
    use_gpu: bool | None = Field(None, description="score on GPUs (torch) (default: when the cluster has GPUs)")
    task_gpus: float = Field(0.5, gt=0, le=1, description="GPU share per scoring task when use_gpu (0.5: two tasks "
                                                           "per GPU, one's gather/write overlaps the other's matmuls)")


# ----------------------------------------------------------------------------- Ray wiring


def _score_bucket(out_dir: str, spec: ListSpec, block_rows: int, col_block: int, diag_rows: int, device: Device,
                  precision: Precision, *slices: tuple[pa.Table, np.ndarray], fault: tuple[str | None, str] = (None, "")) -> dict[str, Any]:
    """Task body: score every (small) cluster of one bucket on ``device`` and write a scores part."""
    fail_once("score_task", *fault)
    began = time.perf_counter()
    rows = SortedRows(slices)  # read group by group as the clusters are scored
    meta = rows.meta
    ids = meta.column("id").combine_chunks()
    gathered = time.perf_counter()
    table = score_sorted_clusters(rows, ids, meta.column("cluster").to_numpy(), meta.column("rank").to_numpy(),
                                  spec, block_rows, col_block, diag_rows, device, precision)
    return write_scores_part(out_dir, table, time.perf_counter() - gathered, gathered - began)


def _gather_cluster(*slices: tuple[pa.Table, np.ndarray]) -> tuple[np.ndarray, pa.Array]:
    """Task body: one split cluster's rows in rank order -> ((n, D) float32, ids (n,))."""
    x, meta = gather_sorted(slices)
    rank = meta.column("rank").to_numpy()
    if not np.array_equal(rank, np.arange(len(rank))):
        raise ValueError("ranks of a split cluster are not 0..n-1: assignments and embeddings disagree")
    return x, meta.column("id").combine_chunks()


def _score_rows(out_dir: str, x: np.ndarray, ids: pa.Array, cluster: int, start: int, stop: int, spec: ListSpec,
                block_rows: int, col_block: int, diag_rows: int, device: Device = "cpu", precision: Precision = "float32",
                fault: tuple[str | None, str] = (None, "")) -> dict[str, Any]:
    """Task body: rows [start, stop) of one split cluster -> a scores part (on ``device``: only
    rows [0, stop) are copied there)."""
    fail_once("score_task", *fault)
    began = time.perf_counter()
    sims, arg, nbr, nbr_sim, bound = cluster_neighbours(x, start, stop, spec, (block_rows, col_block, diag_rows),
                                                        device, precision)
    table = scores_table(ids.slice(start, stop - start), np.full(stop - start, cluster),
                         np.arange(start, stop), sims, arg, nbr, nbr_sim, bound, dup_ids=ids)
    return write_scores_part(out_dir, table, time.perf_counter() - began, 0.0)


def write_scores_part(out_dir: str, table: pa.Table, score_seconds: float, gather_seconds: float) -> dict[str, Any]:
    began = time.perf_counter()
    path = storage.join(out_dir, storage.new_part_name())
    storage.write_table(table, path)
    return {"path": storage.resolve(path)[1], "rows": table.num_rows, "score_seconds": score_seconds,
            "gather_seconds": gather_seconds, "write_seconds": time.perf_counter() - began}


@dataclass
class Plan:
    """What a dedup run scores: every assigned item's cluster and rank, packed into buckets."""

    layout: RunLayout
    dim: int | None
    itemsize: int  # bytes per stored embedding value (2: float16, 4: float32)
    lookup: pa.Table  # id, bucket, cluster, rank, id_key (rows sorted by it: shuffle.sorted_lookup)
    sizes: np.ndarray  # (k,) items per cluster
    buckets: list[Bucket]

    @property
    def n(self) -> int:
        return self.lookup.num_rows


def fingerprint(config: Config) -> dict[str, Any]:
    """What fixes this stage's result: its settings, the embeddings and the clusters it reads."""
    layout = RunLayout.of(config)
    return storage.stage_fingerprint({k: getattr(config, k) for k in Config.RESULT_KEYS},
                                     [layout.embeddings, layout.clusters])


def run(config: Config) -> dict[str, Any]:
    """Score every embedded item against the earlier-ranked items of its cluster and publish
    ``dedup/scores/`` (see the module doc)."""
    from deldist.runtime import init_ray, use_gpu

    init_ray()
    started = time.perf_counter()
    storage.check_inputs_current(RunLayout.of(config).clusters, "deldist cluster")
    plan = plan_scores(config, RunLayout.of(config))
    planned = time.perf_counter()
    gpu = use_gpu(config.use_gpu)
    parts, tasks, shards = _score(config, plan, gpu)
    spec = _list_spec(config)
    fail_once("before_publish", config.inject_fault, plan.layout.root)
    storage.publish(plan.layout.scores, [p["path"] for p in parts],
                    {**fingerprint(config), "schema": storage.schema_hex(SCORES_SCHEMA), "rows": plan.n, "keep": config.keep,
                     "seed": config.seed, "clusters": plan.layout.clusters, "use_gpu": gpu,
                     "precision": config.precision, "neighbours_by_similarity": spec.by_similarity, "neighbours_by_rank": spec.by_rank,
                     "neighbour_floor": spec.floor})
    sizes = plan.sizes
    return {
        "scores": plan.layout.scores, "rows": plan.n, "clusters": int((sizes > 0).sum()), "keep": config.keep,
        "largest_cluster": int(sizes.max()), "pairs": int((sizes.astype(np.int64) * (sizes - 1) // 2).sum()),
        "buckets": len(plan.buckets), "split_clusters": sum(1 for b in plan.buckets if b.row_ranges),
        "tasks": tasks, "shards": shards, "use_gpu": gpu, "precision": config.precision,
        "seconds": {"plan": planned - started, "shuffle_and_score": time.perf_counter() - planned,
                    **{f"{what}_tasks_total": sum(p[f"{what}_seconds"] for p in parts)
                       for what in ("gather", "score", "write")}},
    }


def _list_spec(config: Config) -> ListSpec:
    return ListSpec(config.neighbours_by_similarity, config.neighbours_by_rank, config.neighbour_floor)


def plan_scores(config: Config, layout: RunLayout) -> Plan:
    """Read the assignments (metadata only), check them against the embeddings, rank every
    cluster and pack the clusters into buckets of similar cost."""
    embeddings = storage.read_manifest(layout.embeddings)
    dim = embeddings.get("dim")
    itemsize = stored_itemsize(embeddings)
    clusters_dim = storage.read_manifest(layout.clusters).get("dim")
    if dim is not None and clusters_dim is not None and int(dim) != int(clusters_dim):
        raise EmbeddingError(f"dimension mismatch: {layout.embeddings} has D={dim} but the centroids in "
                             f"{layout.clusters} have D={clusters_dim}; re-run cluster")
    assignments = storage.read_published(layout.assignments, columns=["id", "cluster", "distance"])
    if assignments.num_rows == 0:
        raise EmptyInputError(f"{layout.assignments} has no rows: nothing to deduplicate")
    cluster = assignments.column("cluster").to_numpy().astype(np.int64)
    if cluster.min() < 0:
        raise ValueError(f"{layout.assignments} has negative cluster ids")
    rank = rank_within_clusters(assignments.column("id"), cluster, assignments.column("distance").to_numpy(),
                                config.keep, config.seed)
    sizes = np.bincount(cluster)
    buckets = plan_buckets(sizes, bucket_count(config.num_buckets, config.task_cpus), config.split_rows,
                           config.bucket_rows)
    lookup = pa.table({"id": assignments.column("id"), "bucket": bucket_of_groups(buckets, len(sizes))[cluster],
                       "cluster": cluster.astype(np.int32), "rank": rank})
    lookup = sorted_lookup(lookup)  # sorted once for every wave
    repeated = duplicate_ids(lookup)
    if repeated:
        raise ValueError(f"{layout.assignments} holds {repeated} duplicate ids; ids must be unique")
    return Plan(layout, dim, itemsize, lookup, sizes, buckets)


def _score(config: Config, plan: Plan, gpu: bool) -> tuple[list[dict[str, Any]], int, int]:
    """The shuffle and the scoring tasks, one wave of buckets at a time (:func:`plan_waves`):
    per wave, each embeddings shard is read and split by the wave's buckets, then packed
    buckets are scored directly and split clusters gathered once, then scored by row-range
    tasks. Returns (the parts written, tasks, shard reads)."""
    import ray

    from deldist.runtime import get_with_progress, wave_budget

    out_dir, spec, device = plan.layout.scores, _list_spec(config), "cuda" if gpu else "cpu"
    tiles = (config.block_rows, config.col_block, config.diag_rows)
    fault = (config.inject_fault, plan.layout.root)
    gpu_opts = {"num_gpus": config.task_gpus} if gpu else {}
    score_bucket = ray.remote(num_cpus=config.task_cpus, **gpu_opts)(_score_bucket)
    gather = ray.remote(num_cpus=config.io_cpus, num_returns=2)(_gather_cluster)
    score_rows = ray.remote(num_cpus=config.task_cpus, **gpu_opts)(_score_rows)
    waves = plan_waves(plan.buckets, int(plan.dim or 1), wave_budget(config.memory_budget_gb), plan.itemsize)
    bucket_of = plan.lookup.column("bucket").to_numpy()
    parts: list[dict[str, Any]] = []
    tasks = reads = 0
    for w, wave in enumerate(waves):
        local = np.full(len(plan.buckets), -1, np.int32)  # plan bucket -> its index in this wave; -1: another wave
        local[wave] = np.arange(len(wave), dtype=np.int32)
        lookup = plan.lookup.set_column(1, "bucket", pa.array(local[bucket_of]))
        slices_of, route_stats = shuffle_by_bucket(plan.layout.embeddings, plan.dim, lookup, len(wave),
                                                   config.shard_rows, config.io_cpus)
        pending = []
        for b, slices in zip(wave, slices_of):
            bucket = plan.buckets[b]
            if bucket.row_ranges:
                x_ref, ids_ref = gather.remote(*slices)
                pending += [score_rows.remote(out_dir, x_ref, ids_ref, bucket.clusters[0], a, e, spec, *tiles, device,
                                              config.precision, fault=fault) for a, e in bucket.row_ranges]
            else:
                pending.append(score_bucket.remote(out_dir, spec, *tiles, device, config.precision, *slices,
                                                   fault=fault))
        del slices_of  # the tasks hold the slices now; each is freed when its task ends
        try:
            check_shuffle(ray.get(route_stats), plan.n, "assignments")
        except ValueError:
            for ref in pending:
                ray.cancel(ref)
            raise
        label = f"wave {w + 1}/{len(waves)}: " if len(waves) > 1 else ""
        parts += get_with_progress(pending, f"deldist dedup: {label}scoring tasks", log)
        tasks, reads = tasks + len(pending), reads + len(route_stats)
    scored = sum(p["rows"] for p in parts)
    if scored != plan.n:
        raise RuntimeError(f"scored {scored} rows but {plan.n} were assigned")
    return parts, tasks, reads
