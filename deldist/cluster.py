"""Spherical k-means over the published ``embeddings/`` table, distributed on Ray.

Flow of :func:`run`:

1. **Plan** the embeddings Parquet into shards (groups of row groups, ~``shard_rows`` rows,
   at least 4 per fit task).
2. **Load the fit sample once**: one task per shard reads its rows, validates them (finite,
   non-zero, dimension D), keeps a seeded ``fit_fraction`` of them and leaves the float32
   matrix (and its ids) in the object store. Nothing is re-read from Parquet during the fit.
3. **Initialise** with greedy k-means++ on a small sample, inside one task (or ``random``).
4. **Lloyd iterations**: per iteration one task per shard group assigns its rows to the
   broadcast centroids and returns per-centroid sums (k x D), counts (k,), the objective and
   its worst-fitting points; the driver reduces them, re-seeds empty clusters with the
   farthest points and renormalises. Only centroids travel to the tasks; only k x D sums
   travel back. The first pass searches every row with a faiss ``IndexFlatIP`` (GPU index
   when the task has a GPU); later passes use per-row distance bounds
   (:class:`~deldist.kmeans.GroupBounds`, left in the object store between passes: Hamerly's
   upper/lower bound, the 8 nearest centroids of the last search and a bound on all others)
   to touch only the rows whose cluster may have changed, and update the group's one
   per-centroid sum by the rows that moved. The
   result is exactly Lloyd's; once the clusters settle a pass costs O(n), not O(n k D).
   Stops when the relative objective change drops below ``tol`` or after ``max_iter``.
5. **Assign** every row once with the final centroids and write ``assignments`` parts:
   from the object store when the fit saw every row (``fit_fraction`` = 1), else streamed
   from Parquet shard by shard.

Output (DESIGN.md ``clusters/``)::

    R/clusters/centroids/            one Parquet part: cluster int32, centroid
                                     fixed_size_list<float32>[D] (unit norm), size int64
    R/clusters/assignments/part-*    id, cluster int32, distance float32 (1 - cosine)
    R/clusters/_manifest.json        k, dim, objective, iterations ... ; _SUCCESS last

The objective is the total cosine distance ``sum_i (1 - <x_i, c(x_i)>)``; lower is better.

Bad input: NaN / inf / zero-norm embeddings and an embedding width that differs from the
manifest's ``dim`` raise :class:`EmbeddingError` naming the offending ids; an empty table
raises :class:`EmptyInputError`; ``k`` larger than the number of fit rows raises
``ValueError`` (lower ``k`` or raise ``fit_fraction``). Embeddings are re-normalised to unit
norm before use (the contract says they already are; this absorbs float drift).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from deldist import storage
from deldist.config import StageConfig
from deldist.ids import id_hash
from deldist.kmeans import (
    GroupBounds,
    PartialStats,
    assign_with_bounds,
    centroid_shift,
    has_converged,
    nearest_centroid,
    partial_stats,
    reduce_stats,
    update_centroids,
    use_threads,
)
from deldist.layout import RunLayout
from deldist.schema import ASSIGNMENTS_SCHEMA, centroids_schema
from deldist.seeding import default_init_sample_size, kmeans_plus_plus, random_init
from deldist.shards import (
    EmptyInputError,
    Shard,
    embedding_matrix,
    normalize_checked,
    plan_shards,
    read_shard,
    table_matrix,
)

# ----------------------------------------------------------------------------- config

log = logging.getLogger(__name__)


class Config(StageConfig):
    """``deldist cluster`` settings."""

    # the settings that fix the result (the rest only say how to compute it)
    RESULT_KEYS: ClassVar[tuple[str, ...]] = ("k", "max_iter", "tol", "fit_fraction", "init", "init_sample_size",
                                              "seed")

    output: str = Field(description="run root URI; reads output/embeddings, writes output/clusters")
    embeddings: str | None = Field(None, description="embeddings dir (default: <output>/embeddings)")
    clusters: str | None = Field(None, description="output dir (default: <output>/clusters)")
    k: int = Field(1000, ge=1, description="number of clusters")
    max_iter: int = Field(20, ge=0, description="maximum Lloyd updates")
    tol: float = Field(1e-4, ge=0, description="stop when |obj_prev - obj| / obj_prev < tol (0: never early)")
    fit_fraction: float = Field(1.0, gt=0, le=1, description="fraction of rows the fit sees")
    init: Literal["k-means++", "random"] = "k-means++"
    init_sample_size: int | None = Field(
        None, ge=1, description="rows k-means++ runs on (default max(4k, 4096), capped at fit rows)")
    seed: int = 0
    shard_rows: int = Field(65_536, ge=1, description="target rows per read shard")
    num_tasks: int | None = Field(None, ge=1, description="tasks per iteration (default: cluster CPUs / task_cpus)")
    task_cpus: float = Field(1.0, gt=0, description="CPUs per fit / assign task (threads = max(1, round))")
    io_cpus: float = Field(0.5, gt=0, description="CPUs per load task")
    use_gpu: bool | None = Field(None, description="faiss GPU index in tasks (default: when the cluster has GPUs)")
    bounds: bool = Field(True, description="skip rows whose cluster provably cannot change (Hamerly bounds)")
    precision: Literal["auto", "float32", "int8", "bfloat16"] = Field(
        "auto", description="scores of the streamed assignment (fit_fraction < 1): float32 (faiss), or int8 / "
                            "bfloat16 tiles with each row's near-best centroids rechecked in float32 (the same "
                            "labels); auto: int8 on CPUs with AMX (1.5x faiss there, bench/RESULTS.md), else float32")


# ----------------------------------------------------------------------------- math (pure)


# ----------------------------------------------------------------------------- shards (I/O)


def balanced_groups(sizes: Sequence[int], n_groups: int) -> list[list[int]]:
    """Indices of ``sizes`` split into ``n_groups`` groups of similar total (LPT greedy)."""
    n_groups = max(1, min(n_groups, len(sizes)))
    totals = [0] * n_groups
    groups: list[list[int]] = [[] for _ in range(n_groups)]
    for i in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
        g = min(range(n_groups), key=totals.__getitem__)
        groups[g].append(i)
        totals[g] += sizes[i]
    return [sorted(g) for g in groups if g]


def centroids_table(centroids: np.ndarray, sizes: np.ndarray) -> pa.Table:
    k, dim = centroids.shape
    flat = pa.array(np.ascontiguousarray(centroids, dtype=np.float32).reshape(-1), pa.float32())
    return pa.table({
        "cluster": pa.array(np.arange(k, dtype=np.int32)),
        "centroid": pa.FixedSizeListArray.from_arrays(flat, dim),
        "size": pa.array(np.asarray(sizes, dtype=np.int64)),
    }, schema=centroids_schema(dim))


def read_centroids(clusters_uri: str) -> np.ndarray:
    """Centroids (k, D) float32 of a published ``clusters/`` directory, ordered by cluster."""
    centroids = RunLayout(clusters_uri, clusters_dir=clusters_uri).centroids
    table = storage.read_published(centroids, columns=["cluster", "centroid"]).sort_by("cluster")
    return embedding_matrix(table.column("centroid"))


# ----------------------------------------------------------------------------- Ray wiring


def _threads(cpus: float) -> int:
    return max(1, int(round(cpus)))


def _load_fit_shard(emb_dir: str, shard: Shard, dim: int, fraction: float, seed: int
                    ) -> tuple[np.ndarray, int, pa.Array]:
    """Task body: read, validate, normalise and subsample one shard -> ((m, D) float32, m,
    the m ids). The subsample is the ids whose seeded hash is below ``fraction``: the same
    rows whatever order embed wrote them in."""
    table = read_shard(emb_dir, shard, ["id", "embedding"])
    table = table.take(pc.sort_indices(table, [("id", "ascending")]))  # sums in one order, whatever embed's
    ids = table.column("id").combine_chunks()
    x = normalize_checked(table_matrix(table, dim), ids)
    if fraction < 1.0:
        keep = id_hash(ids, seed) < fraction
        x = np.ascontiguousarray(x[keep])
        ids = ids.filter(pa.array(keep))
    return x, len(x), ids


def _sample_rows(x: np.ndarray, ids: pa.Array, below: float, seed: int
                 ) -> tuple[tuple[np.ndarray, np.ndarray], int]:
    """Task body: the rows of one shard whose id hash (seed + 1) is below ``below`` with those
    hashes, and their count."""
    h = id_hash(ids, seed + 1)
    keep = h < below
    return (np.asarray(x)[keep], h[keep]), int(keep.sum())


def _init_task(k: int, init: str, seed: int, m: int, threads: int, *samples: tuple[np.ndarray, np.ndarray],
               ) -> np.ndarray:
    """Task body: seed k centroids (k, D) from the m candidate rows of smallest id hash, in
    hash order (so the seeding depends on the ids' content, not on the shards or row order),
    over ``threads`` threads (the same centroids for any count)."""
    rows = np.concatenate([x for x, _ in samples])
    order = np.argsort(np.concatenate([h for _, h in samples]), kind="stable")[:m]
    sample = np.ascontiguousarray(rows[order])
    rng = np.random.default_rng(seed)
    return kmeans_plus_plus(sample, k, rng, threads=threads) if init == "k-means++" else random_init(sample, k, rng)


def _stats_task(centroids: np.ndarray, shift: np.ndarray | None, n_far: int, use_gpu: bool, threads: int,
                bounds: GroupBounds | None, *matrices: np.ndarray) -> tuple[PartialStats, GroupBounds]:
    """Task body of one Lloyd pass over a shard group -> (stats, bounds for the next pass)."""
    use_threads(threads)
    return partial_stats(matrices, centroids, n_far, use_gpu, bounds, shift)


def _assignments_part(out_dir: str, ids: pa.Array | pa.ChunkedArray, labels: np.ndarray, sims: np.ndarray,
                      k: int) -> dict[str, Any]:
    """Write one ``assignments`` part -> {path, rows, counts (k,), objective}."""
    distance = np.clip(1.0 - sims, 0.0, 2.0).astype(np.float32)
    out = pa.table({"id": ids, "cluster": pa.array(labels.astype(np.int32)),
                    "distance": pa.array(distance)}, schema=ASSIGNMENTS_SCHEMA)
    path = storage.join(out_dir, storage.new_part_name())
    storage.write_table(out, path)
    return {"path": storage.resolve(path)[1], "rows": len(labels), "counts": np.bincount(labels, minlength=k),
            "objective": float(distance.astype(np.float64).sum())}


def assign_shard(emb_dir: str, shard: Shard, dim: int, centroids: np.ndarray, out_dir: str,
                  use_gpu: bool, threads: int, precision: str = "float32") -> dict[str, Any]:
    """Task body: read one shard from Parquet, assign it, write its ``assignments`` part."""
    use_threads(threads)
    table = read_shard(emb_dir, shard, ["id", "embedding"])
    ids = table.column("id")
    x = normalize_checked(table_matrix(table, dim), ids)
    labels, sims = nearest_centroid(x, centroids, use_gpu, precision)
    return _assignments_part(out_dir, ids, labels, sims, len(centroids))


def _assign_loaded(out_dir: str, centroids: np.ndarray, shift: np.ndarray | None, bounds: GroupBounds | None,
                   use_gpu: bool, threads: int, n_matrices: int, *refs: Any) -> dict[str, Any]:
    """Task body of the final assignment when the fit saw every row: the group's matrices
    and ids are still in the object store and its bounds spare most of the search.
    refs: n_matrices matrices, then their n_matrices id arrays."""
    use_threads(threads)
    matrices, ids = refs[:n_matrices], refs[n_matrices:]
    labels, sims = [], []
    for i, x in enumerate(matrices):
        b, _ = assign_with_bounds(x, centroids, bounds.rows[i] if bounds else None, shift, use_gpu)
        labels.append(b.labels)
        sims.append(_rowwise_dot(np.asarray(x), centroids, b.labels))
    return _assignments_part(out_dir, pa.chunked_array(list(ids), pa.string()), np.concatenate(labels),
                             np.concatenate(sims), len(centroids))


def _rowwise_dot(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """<x_i, centroids[labels_i]> for every row (n,) float32, in chunks."""
    out = np.empty(len(x), np.float32)
    for s in range(0, len(x), chunk):
        out[s:s + chunk] = np.einsum("ij,ij->i", x[s:s + chunk], centroids[labels[s:s + chunk]])
    return out


@dataclass
class Plan:
    """What a cluster run works on: the embeddings' shards and how the work is spread."""

    layout: RunLayout
    dim: int | None
    shards: list[Shard]
    n_total: int
    n_tasks: int
    use_gpu: bool
    threads: int

    @property
    def gpu_opts(self) -> dict[str, Any]:
        return {"num_gpus": 1} if self.use_gpu else {}


@dataclass
class Fit:
    """The fit's result and the object-store references the final assignment reuses."""

    centroids: np.ndarray
    shift: np.ndarray | None
    matrices: list[Any]
    id_refs: list[Any]
    bounds_refs: list[Any]
    groups: list[list[int]]
    n_fit: int
    history: list[float] = field(default_factory=list)
    searched: list[float] = field(default_factory=list)
    pass_seconds: list[float] = field(default_factory=list)
    reseeded: int = 0
    converged: bool = False
    seconds: dict[str, float] = field(default_factory=dict)


def run(config: Config) -> dict[str, Any]:
    """Fit spherical k-means on ``embeddings/`` and publish ``clusters/`` (see module doc)."""
    from deldist.runtime import init_ray

    init_ray()
    plan = _plan(config, RunLayout.of(config))
    fit = _fit(config, plan)
    started = time.perf_counter()
    results = _assign_all(config, plan, fit)
    fit.seconds["assign"] = time.perf_counter() - started
    return _publish(config, plan, fit, results)


def _plan(config: Config, layout: RunLayout) -> Plan:
    from deldist.runtime import task_slots, use_gpu

    n_tasks = config.num_tasks or task_slots(config.task_cpus)
    shards = plan_shards(layout.embeddings, config.shard_rows, min_shards=4 * n_tasks)
    n_total = sum(s.num_rows for s in shards)
    if n_total == 0:
        raise EmptyInputError(f"{layout.embeddings} has no rows: nothing to cluster")
    if config.k > n_total:
        raise ValueError(f"k={config.k} exceeds the number of embeddings ({n_total}); lower k")
    return Plan(layout, storage.read_manifest(layout.embeddings).get("dim"), shards, n_total, n_tasks,
                use_gpu(config.use_gpu), _threads(config.task_cpus))


def _fit(config: Config, plan: Plan) -> Fit:
    """Load the fit sample once into the object store, initialise on a small sample in a task
    (the driver never holds the data), then Lloyd passes: only centroids (and their shifts) go
    out, only k x D sums come back; each group's bounds stay in the object store between passes."""
    import ray

    from deldist.runtime import largest_node_cpus

    started = time.perf_counter()
    load = ray.remote(num_cpus=config.io_cpus, num_returns=3)(_load_fit_shard)
    loads = [load.remote(plan.layout.embeddings, s, plan.dim, config.fit_fraction, config.seed) for s in plan.shards]
    matrices, id_refs = [ref for ref, _, _ in loads], [ref for _, _, ref in loads]
    row_counts = [int(c) for c in ray.get([count for _, count, _ in loads])]
    del loads  # the matrices must be freed once the fit is done
    n_fit = int(sum(row_counts))
    if config.k > n_fit:
        raise ValueError(f"k={config.k} exceeds the {n_fit} rows of the fit sample "
                         f"(fit_fraction={config.fit_fraction} of {plan.n_total}); lower k or raise fit_fraction")
    loaded = time.perf_counter()
    m = min(max(config.k, config.init_sample_size or default_init_sample_size(config.k, n_fit)), n_fit)
    sample_task = ray.remote(num_cpus=0.01, num_returns=2)(_sample_rows)
    below = 1.0 if 2 * m >= n_fit else 2 * m / n_fit  # ~2m candidates: at least m of them all but surely
    samples, counts = zip(*[sample_task.remote(mat, ids, below, config.seed) for mat, ids in zip(matrices, id_refs)])
    if sum(ray.get(list(counts))) < m:
        samples, _ = zip(*[sample_task.remote(mat, ids, 1.0, config.seed) for mat, ids in zip(matrices, id_refs)])
    # the seeding is k sequential passes over its sample and nothing else runs meanwhile: it
    # takes a whole node's CPUs (k = 10,000: ~370 s on one core of this VM, half on two)
    init_cpus = max(config.task_cpus, largest_node_cpus())
    centroids = ray.get(ray.remote(num_cpus=init_cpus)(_init_task).remote(
        config.k, config.init, config.seed, m, max(1, int(init_cpus)), *samples))
    groups = balanced_groups(row_counts, plan.n_tasks)
    fit = Fit(centroids, None, matrices, id_refs, [None] * len(groups), groups, n_fit)
    initialised = time.perf_counter()
    stats_task = ray.remote(num_cpus=config.task_cpus, num_returns=2, **plan.gpu_opts)(_stats_task)
    for _ in range(config.max_iter):
        pass_started = time.perf_counter()
        c_ref, s_ref = ray.put(fit.centroids), ray.put(fit.shift)
        calls = [stats_task.remote(c_ref, s_ref, min(config.k, 256), plan.use_gpu, plan.threads,
                                   fit.bounds_refs[g] if config.bounds else None, *[matrices[i] for i in group])
                 for g, group in enumerate(groups)]
        fit.bounds_refs = [b for _, b in calls]
        stats = reduce_stats(ray.get([p for p, _ in calls]))
        new_centroids, n_empty = update_centroids(stats, fit.centroids)
        fit.shift, fit.centroids = centroid_shift(fit.centroids, new_centroids), new_centroids
        fit.reseeded += n_empty
        fit.history.append(stats.objective)
        fit.searched.append(stats.searched / n_fit)
        fit.pass_seconds.append(time.perf_counter() - pass_started)
        log.info(f"deldist cluster: pass {len(fit.history)}/{config.max_iter}: objective {stats.objective:.6g}, "
                 f"{fit.searched[-1]:.0%} of the rows searched, {fit.pass_seconds[-1]:.1f} s")
        if has_converged(fit.history, config.tol):
            fit.converged = True
            break
    fit.seconds = {"load": loaded - started, "init": initialised - loaded, "fit": time.perf_counter() - initialised}
    return fit


def _assign_all(config: Config, plan: Plan, fit: Fit) -> list[dict[str, Any]]:
    """One full assignment pass with the final centroids: from the object store when the fit
    saw every row (bounds apply), else every row streamed from Parquet once."""
    import ray

    from deldist.runtime import get_with_progress

    assign_dir = plan.layout.new_assignments
    c_ref, s_ref = ray.put(fit.centroids), ray.put(fit.shift)
    if config.fit_fraction >= 1.0:
        assign = ray.remote(num_cpus=config.task_cpus, **plan.gpu_opts)(_assign_loaded)
        refs = [assign.remote(assign_dir, c_ref, s_ref, fit.bounds_refs[g] if config.bounds else None,
                              plan.use_gpu, plan.threads, len(group), *[fit.matrices[i] for i in group],
                              *[fit.id_refs[i] for i in group]) for g, group in enumerate(fit.groups)]
    else:
        assign = ray.remote(num_cpus=config.task_cpus, **plan.gpu_opts)(assign_shard)
        refs = [assign.remote(plan.layout.embeddings, s, plan.dim, c_ref, assign_dir, plan.use_gpu, plan.threads,
                              config.precision) for s in plan.shards]
    results = get_with_progress(refs, "deldist cluster: assignment tasks", log)
    fit.bounds_refs, fit.matrices, fit.id_refs = [], [], []
    return results


def assign_to_centroids(embeddings: str, centroids: np.ndarray, out_dir: str, *, shard_rows: int, task_cpus: float,
                        use_gpu: bool, precision: str = "float32") -> pa.Table:
    """Assign every row of a published embeddings directory to its nearest of ``centroids``
    ((k, D) float32, unit rows) with Ray tasks; publish the assignments in ``out_dir`` and
    return them (id, cluster, distance)."""
    import ray

    task = ray.remote(num_cpus=task_cpus, **({"num_gpus": 1} if use_gpu else {}))(assign_shard)
    c_ref = ray.put(centroids)
    parts = ray.get([task.remote(embeddings, s, int(centroids.shape[1]), c_ref, out_dir, use_gpu,
                                 max(1, round(task_cpus)), precision) for s in plan_shards(embeddings, shard_rows)])
    storage.publish(out_dir, [p["path"] for p in parts],
                    {"schema": storage.schema_hex(ASSIGNMENTS_SCHEMA), "rows": sum(p["rows"] for p in parts)})
    return storage.read_published(out_dir)


def fingerprint(config: Config) -> dict[str, Any]:
    """What fixes this stage's result: its settings and the embeddings it reads."""
    return storage.stage_fingerprint({k: getattr(config, k) for k in Config.RESULT_KEYS},
                                     [RunLayout.of(config).embeddings])


def _publish(config: Config, plan: Plan, fit: Fit, results: list[dict[str, Any]]) -> dict[str, Any]:
    out_dir = plan.layout.clusters
    sizes = np.sum([r["counts"] for r in results], axis=0).astype(np.int64)
    full_objective = float(sum(r["objective"] for r in results))
    storage.publish(plan.layout.new_assignments, [r["path"] for r in results],
                    {"schema": storage.schema_hex(ASSIGNMENTS_SCHEMA), "rows": plan.n_total})
    storage.replace_table(plan.layout.centroids, centroids_table(fit.centroids, sizes))
    summary = {
        "k": config.k, "dim": int(fit.centroids.shape[1]), "rows": plan.n_total, "fit_rows": fit.n_fit,
        "iterations": len(fit.history), "converged": fit.converged, "objective": full_objective,
        "searched_fraction": [round(f, 4) for f in fit.searched],
        "pass_seconds": [round(t, 3) for t in fit.pass_seconds],
        "mean_distance": full_objective / plan.n_total, "fit_objective_history": fit.history,
        "reseeded_clusters": fit.reseeded, "empty_clusters": int((sizes == 0).sum()),
        "largest_cluster": int(sizes.max()), "init": config.init, "seed": config.seed,
        "fit_fraction": config.fit_fraction, "use_gpu": plan.use_gpu, "fit_tasks": len(fit.groups),
        "seconds": fit.seconds,
    }
    storage.publish(out_dir, [], {**summary, **fingerprint(config), "assignments": "assignments",
                                  "centroids": "centroids", "embeddings": plan.layout.embeddings})
    summary["clusters"] = out_dir
    return summary
