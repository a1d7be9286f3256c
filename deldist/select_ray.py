"""Ray wiring of the selection rules that need more than the metadata tables: deldist's
temporal collapse (embeddings shuffled by video), the near-copy join (hashes in the object
store, the join's passes over tasks) and the exact fallback of the kept duplicate rule (the
vectors of the clusters the neighbour lists cannot decide, gathered once). The math is in
:mod:`deldist.rules`, :mod:`deldist.greedy`, :mod:`deldist.nearcopy` and :mod:`deldist.pairwise`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deldist import storage
from deldist.arrays import equal_runs
from deldist.greedy import NeighbourEdges, any_earlier_duplicates, threshold_for_ratio
from deldist.rules import temporal_collapse
from deldist.schema import stored_itemsize
from deldist.shuffle import (
    bucket_count,
    bucket_of_groups,
    gather_sorted,
    plan_buckets,
    plan_waves,
    shuffle_by_bucket,
    unit_rows,
)

if TYPE_CHECKING:
    from deldist.select import Config


def check_found(stats: list[dict[str, Any]], expected: int, what: str) -> None:
    found = sum(s["rows"] - s["missing"] for s in stats)
    if found != expected:
        raise RuntimeError(f"found {found} of the {expected} embeddings {what} needs: the embeddings changed "
                           "since the earlier stages; re-run them")


def temporal_rule(config: Config, emb_dir: str, dim: int | None, meta: pa.Table, candidate: np.ndarray,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray wiring of the temporal rule over the candidates: shuffle their embeddings by
    source, collapse per video. Returns (collapsed bool (n,), representative row int64 (n,),
    similarity (n,)) aligned with ``meta``'s rows."""
    import ray

    n = meta.num_rows
    rows = np.flatnonzero(candidate)
    source_code = pc.dictionary_encode(meta.column("source")).combine_chunks().indices.to_numpy()
    n_sources = int(source_code.max()) + 1 if n else 0
    n_buckets = max(1, min(n_sources, bucket_count(None, config.task_cpus)))
    lookup = pa.table({"id": meta.column("id").take(pa.array(rows)),
                       "bucket": (source_code[rows] % n_buckets).astype(np.int32),
                       "source_code": source_code[rows].astype(np.int64),
                       "frame_index": meta.column("frame_index").to_numpy()[rows].astype(np.int64),
                       "row": rows.astype(np.int64)})
    slices_of, stats = shuffle_by_bucket(emb_dir, dim, lookup, n_buckets, config.shard_rows, config.io_cpus)
    task = ray.remote(num_cpus=config.task_cpus)(_temporal_bucket)
    pending = [task.remote(config.deldist_rules.temporal_threshold, *slices) for slices in slices_of]
    check_found(ray.get(stats), len(rows), "the temporal rule")
    collapsed = np.zeros(n, bool)
    representative = np.full(n, -1, np.int64)
    similarity = np.zeros(n, np.float32)
    for done_rows, rep_rows, sims in ray.get(pending):
        collapsed[done_rows] = rep_rows >= 0
        representative[done_rows] = rep_rows
        similarity[done_rows] = sims
    return collapsed, representative, similarity


def _temporal_bucket(threshold: float, *slices: tuple[pa.Table, np.ndarray]) -> tuple[np.ndarray, ...]:
    """Task body: temporal collapse of every video in one bucket -> (rows, representative
    rows (-1 kept), similarity), rows being indices into the driver's table."""
    x, meta = gather_sorted(slices, keys=("source_code", "frame_index"))
    rows = meta.column("row").to_numpy()
    code = meta.column("source_code").to_numpy()
    rep_rows = np.full(len(rows), -1, np.int64)
    sims = np.zeros(len(rows), np.float32)
    if len(rows):
        for s, e in zip(*equal_runs(code)):
            rep, sim = temporal_collapse(x[s:e], threshold)
            rep_rows[s:e] = np.where(rep >= 0, rows[s + np.maximum(rep, 0)], -1)
            sims[s:e] = sim
    return rows, rep_rows, sims


class ExactFallback:
    """Ray wiring of the exact ``kept`` rule for the clusters the neighbour lists cannot
    decide (:class:`deldist.kept_rule.KeptRule`).

    Their vectors are shuffled once per new set of clusters and written to ``cache_dir`` (one
    ``.npy`` per bucket of clusters, rows in (cluster, rank) order, the stored dtype), so every
    threshold a ratio search tries reuses them without another shuffle. The shuffle runs in
    waves within the memory budget (:func:`deldist.runtime.wave_budget`), as dedup's scoring
    does: at 10M items the undecided clusters hold ~6 GB of float16 vectors, which in one go
    (slices beside gathered copies) outgrew the object store and then the disk. An exact task
    maps one bucket file (local disk) or reads it whole (object store): its memory is one
    bucket, which is sized to a share of the budget. :meth:`close` removes the files.
    sizes: (k,) items per cluster."""

    def __init__(self, config: Config, emb_dir: str, dim: int | None, sizes: np.ndarray, cache_dir: str):
        self.config, self.emb_dir, self.dim, self.cache_dir = config, emb_dir, dim, cache_dir
        self.sizes = np.asarray(sizes, np.int64)
        manifest = storage.read_manifest(emb_dir)
        self.itemsize = stored_itemsize(manifest)
        self.width = int(dim or manifest.get("dim") or 1)
        self.where: dict[int, tuple[str, int]] = {}  # cluster -> (its bucket's file, row offset)
        self.gathers = self.waves = 0
        storage.delete_dir(cache_dir)  # an interrupted earlier run's files

    def gather(self, clusters: Sequence[int], rows_of: Callable[[np.ndarray], pa.Table]) -> None:
        """Shuffle the vectors of ``clusters`` not gathered yet into bucket files; ``rows_of``:
        clusters -> their items' (id, cluster, rank)."""
        import ray

        from deldist.runtime import task_slots, wave_budget

        missing = sorted(set(int(c) for c in clusters) - set(self.where))
        if not missing:
            return
        budget = wave_budget(self.config.memory_budget_gb)
        sizes = np.zeros(len(self.sizes), np.int64)
        sizes[missing] = self.sizes[missing]
        # a bucket is at most a quarter of the budget per concurrent task (its float32 cluster
        # copies and, from an object store, the file read whole come on top)
        slots = max(task_slots(self.config.task_cpus), task_slots(self.config.io_cpus))
        bucket_rows = max(int(sizes.max()), int(budget / (4 * slots * self.width * 4)))
        buckets = plan_buckets(sizes, bucket_count(None, self.config.task_cpus), int(sizes.max()) + 1, bucket_rows)
        bucket_of = bucket_of_groups(buckets, len(sizes))
        rows = rows_of(np.asarray(missing, np.int64))
        cluster = rows.column("cluster").to_numpy()
        lookup = pa.table({"id": rows.column("id"), "bucket": bucket_of[cluster],
                           "cluster": cluster.astype(np.int32), "rank": rows.column("rank")})
        del rows
        write = ray.remote(num_cpus=self.config.io_cpus)(_write_gathered)
        stats: list[dict[str, Any]] = []
        for wave in plan_waves(buckets, self.width, budget, self.itemsize):
            local = np.full(len(buckets), -1, np.int32)  # bucket -> its index in this wave; -1: another wave
            local[wave] = np.arange(len(wave), dtype=np.int32)
            bucket = local[lookup.column("bucket").to_numpy()]
            routed = lookup.set_column(1, "bucket", pa.array(bucket)).filter(pa.array(bucket >= 0))
            slices_of, wave_stats = shuffle_by_bucket(self.emb_dir, self.dim, routed, len(wave),
                                                      self.config.shard_rows, self.config.io_cpus)
            paths = [storage.join(self.cache_dir, f"gather{self.gathers:03d}-bucket{b:05d}.npy") for b in wave]
            written = [write.remote(path, *slices) for path, slices in zip(paths, slices_of)]
            del slices_of  # the write tasks hold the slices; each is freed when its task ends
            stats += ray.get(wave_stats)
            ray.get(written)
            for b, path in zip(wave, paths):
                offset = 0
                for c in sorted(buckets[b].clusters):
                    self.where[c] = (path, offset)
                    offset += int(self.sizes[c])
            self.waves += 1
        check_found(stats, lookup.num_rows, "the exact dedup fallback")
        self.gathers += 1

    def run(self, spans: Sequence[tuple[int, int, np.ndarray, np.ndarray]], threshold: float,
            ) -> list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
        """:func:`deldist.pairwise.keep_first_exact` on each (cluster, first rank, ranks kept before
        it, candidacy of the ranks from it on) span: the cluster from its first item the lists
        could not decide on, the items kept before it fixed -> [(cluster, first rank, kept,
        duplicate_of rank or -1, similarity) of ranks first..the cluster's end]. Every span's
        cluster must be gathered."""
        import ray

        by_file: dict[str, list[tuple[int, int, int, np.ndarray, np.ndarray]]] = {}
        for c, first, fixed, candidate in spans:
            path, offset = self.where[int(c)]
            size = int(self.sizes[c])
            assert size - first == len(candidate)
            by_file.setdefault(path, []).append((int(c), offset, size, fixed, candidate))
        task = ray.remote(num_cpus=self.config.task_cpus)(_keep_first_in_file)
        return [r for done in ray.get([task.remote(path, file_spans, threshold, self.config.block_rows)
                                       for path, file_spans in by_file.items()]) for r in done]

    def close(self) -> None:
        storage.delete_dir(self.cache_dir)
        self.where.clear()


def _write_gathered(path: str, *slices: tuple[pa.Table, np.ndarray]) -> int:
    """A fallback bucket's shuffled slices -> its file, rows in (cluster, rank) order, as stored
    (float16 stays float16: the exact tasks widen and normalise each cluster as gather_sorted
    would). Returns the rows written."""
    x = gather_sorted(slices, widen=False)[0]
    storage.write_array(path, x)
    return len(x)


def _keep_first_in_file(path: str, spans: list[tuple[int, int, int, np.ndarray, np.ndarray]], threshold: float,
                        block_rows: int) -> list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
    """The exact rule on clusters of one bucket file. Per (cluster, row offset, rows, fixed, candidate)
    span: the ranks in ``fixed`` are kept and come first, then the cluster's last len(candidate)
    rows decide. Returns (cluster, first rank decided, kept, duplicate_of rank, similarity)."""
    from deldist.pairwise import keep_first_exact

    x = storage.read_array(path)
    out = []
    for c, o, z, fixed, cand in spans:
        first = z - len(cand)
        rows = np.concatenate([fixed, np.arange(first, z)])
        kept, dup, sim = keep_first_exact(unit_rows(np.asarray(x[o:o + z])[rows]), np.r_[np.ones(len(fixed), bool), cand],
                                          threshold, n_fixed=len(fixed), block_rows=block_rows)
        out.append((c, first, kept[len(fixed):], np.where(dup >= 0, rows[np.maximum(dup, 0)], -1)[len(fixed):],
                    sim[len(fixed):]))
    return out


@dataclass
class Scores:
    """dedup's scores as the selection reads them: ``table`` row-aligned with the selection's
    ids (``cluster``; SemDeDup's rule: also rank, max_sim, duplicate_of); ``list_row[i]`` the
    stored row of ids row i; ``lists`` (neighbours, neighbour_sims, in stored row order) when
    read here, else ``source_dir`` and its ``parts`` (fs path, rows) in stored row order, which
    the kept rule's shards read themselves (:mod:`deldist.kept_rule`; the lists are 8 bytes per
    listed pair, 2.5 GB at 10M items); ``manifest``: the scores' manifest."""

    table: pa.Table
    lists: pa.Table | None
    list_row: np.ndarray | None
    manifest: dict[str, Any]
    source_dir: str = ""
    parts: list[tuple[str, int]] = field(default_factory=list)


def stored_rows(ids: pa.Array, stored_ids: pa.ChunkedArray, what: str) -> np.ndarray:
    """(n,) int64: the row of ``stored_ids`` holding each of ``ids``; every id must be there
    exactly once."""
    if len(stored_ids) != len(ids):
        raise ValueError(f"{what} has {len(stored_ids)} rows but {len(ids)} ids are embedded; re-run it")
    position = pc.index_in(ids, value_set=stored_ids)
    if position.null_count:
        examples = ids.filter(pc.is_null(position)).slice(0, 5).to_pylist()
        raise ValueError(f"{position.null_count} embedded ids are missing from {what}, e.g. {examples}")
    return position.to_numpy(zero_copy_only=False).astype(np.int64)


def neighbour_edges(scores: Scores, order: np.ndarray, starts: np.ndarray, floor: float) -> NeighbourEdges:
    """The scores' ``neighbours`` / ``neighbour_sims`` lists (ranks within the cluster; position
    p holds ids row ``order[p]``) as :class:`NeighbourEdges` in position space: each stored chunk's lists
    copied once, straight to their positions (compiled; no combined copy, no per-pair index)."""
    assert scores.lists is not None and scores.list_row is not None
    n = len(order)
    cluster = scores.table.column("cluster").to_numpy().astype(np.int64)
    first = starts[cluster[order]]  # (n,) position of each position's cluster start
    bound = scores.table.column("unlisted_max_sim").to_numpy()[order]
    nbr, sims = scores.lists.column("neighbours"), scores.lists.column("neighbour_sims")
    row_of_pos = np.asarray(scores.list_row, np.int64)[order]
    scores.lists = scores.list_row = None  # consumed here, chunk by chunk (memory: 8 bytes per listed pair)
    if [len(c) for c in nbr.chunks] != [len(c) for c in sims.chunks]:
        nbr, sims = pa.chunked_array([nbr.combine_chunks()]), pa.chunked_array([sims.combine_chunks()])
    rank_chunks, sim_chunks = list(nbr.chunks), list(sims.chunks)
    del nbr, sims
    lengths = np.concatenate([pc.list_value_length(c).to_numpy(zero_copy_only=False) for c in rank_chunks]
                             or [np.zeros(0, np.int64)]).astype(np.int64)
    offsets = np.r_[0, np.cumsum(lengths[row_of_pos])].astype(np.int64)
    dst = np.empty(int(offsets[-1]), np.int32 if n < 2 ** 31 else np.int64)
    sim = np.empty(int(offsets[-1]), np.float32)
    chunk_starts = np.r_[0, np.cumsum([len(c) for c in rank_chunks])].astype(np.int64)
    chunk_of_pos = np.searchsorted(chunk_starts, row_of_pos, "right") - 1
    by_chunk = np.argsort(chunk_of_pos, kind="stable")
    bounds = np.searchsorted(chunk_of_pos[by_chunk], np.arange(len(rank_chunks) + 1))
    for c in range(len(rank_chunks)):
        ranks, values = rank_chunks[c], sim_chunks[c]
        rank_chunks[c] = sim_chunks[c] = None  # each chunk freed once copied: the peak is the copy plus one chunk
        pos = by_chunk[bounds[c]:bounds[c + 1]]
        if len(pos):
            _lists_to_positions(pos, row_of_pos[pos] - chunk_starts[c], ranks.offsets.to_numpy(),
                                ranks.values.to_numpy(), values.offsets.to_numpy(), values.values.to_numpy(), first,
                                offsets, dst, sim)
        del ranks, values
    pa.default_memory_pool().release_unused()
    return NeighbourEdges(offsets, dst, sim, bound, floor)


@numba.njit(cache=True, nogil=True)
def _lists_to_positions(pos, rows, nbr_offsets, ranks, sim_offsets, sims, first, offsets, dst,
                        sim):  # pragma: no cover - compiled
    """Copy chunk row rows[i]'s list to position pos[i]'s slot, ranks turned into positions."""
    for i in range(len(pos)):
        p, r = pos[i], rows[i]
        e = offsets[p]
        a = sim_offsets[r]
        for j in range(nbr_offsets[r], nbr_offsets[r + 1]):
            dst[e] = first[p] + ranks[j]
            sim[e] = sims[a + j - nbr_offsets[r]]
            e += 1


def dedup_any_earlier(config: Config, scores: Scores, candidate: np.ndarray, ids: pa.Array,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """SemDeDup's duplicate rule over the candidates (rows); outputs as :func:`dedup_kept`."""
    n = len(candidate)
    first = scores.table.column("rank").to_numpy() == 0
    max_sim = scores.table.column("max_sim").to_numpy(zero_copy_only=False)
    info: dict[str, Any] = {}
    if config.target_ratio is not None:
        threshold, reachable = threshold_for_ratio(max_sim, first, candidate, int(round(config.target_ratio * n)))
        info.update(target_ratio=config.target_ratio, target_reachable=reachable)
    else:
        threshold = 1.0 - float(config.eps)
    info.update(similarity_threshold=threshold if math.isfinite(threshold) else None,
                eps=1.0 - threshold if math.isfinite(threshold) else None)
    duplicate = any_earlier_duplicates(candidate, first, max_sim, threshold)
    matched = pc.fill_null(pc.index_in(scores.table.column("duplicate_of"), value_set=ids), -1).to_numpy()
    link = np.where(duplicate, matched, -1).astype(np.int64)
    return duplicate, link, np.where(duplicate, max_sim, np.nan).astype(np.float32), info
