"""The ``kept`` duplicate rule at any similarity threshold, its clusters held by Ray actors.

The rule's state is per cluster: each item's neighbour lists (8 bytes per listed pair, ~2.5 GB
at 10M items), its rank and candidacy. :class:`KeptShard` actors each hold the dedup scores
parts of a share of the clusters (parts that share a split cluster go to the same shard), so
the driver reads only the ``id`` and ``cluster`` columns and gets back counts, the clusters the
lists cannot decide, and at the end one threshold's decisions: its memory is a few arrays of
n numbers, not the lists (select's driver peaked at 8.4 GiB at 10M items with the lists in it,
4.5 GiB without: ``bench/RESULTS.md``). Below ``LOCAL_BELOW`` items (``kept_shards`` unset) the
one shard is an object in the driver. This is deldist's wiring of the rule, not a paper's.

A threshold is evaluated in two rounds: every shard resolves its clusters from the lists
(:func:`deldist.greedy.resolve_kept`, compiled, the shards in parallel) and names the clusters
it cannot decide, each from its first undecided item on; the driver's
:class:`deldist.select_ray.ExactFallback` computes those exactly from the gathered vectors and
the shards patch them in. The math is in :mod:`deldist.greedy` and :mod:`deldist.pairwise`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from deldist.greedy import FloatGrid, resolve_kept, search_threshold
from deldist.select_ray import ExactFallback, Scores, neighbour_edges
from deldist.shards import read_files

if TYPE_CHECKING:
    from deldist.select import Config

# a span the exact fallback redoes: (cluster, first rank undecided, ranks kept before it, candidacy
# of the ranks from it on); and its answer: (cluster, first rank, kept, duplicate_of rank, similarity)
Span = tuple[int, int, np.ndarray, np.ndarray]
Redone = tuple[int, int, np.ndarray, np.ndarray, np.ndarray]
# below this many items the default is one shard in the driver: an actor's start (a process importing
# numba, pyarrow and the compiled passes, ~2 s) costs more there than the lists' memory
LOCAL_BELOW = 1_000_000


class KeptShard:
    """Ray actor body: the kept rule on the clusters of some dedup scores parts.

    Rows are the parts' rows in the order given; ``ids_row[i]``: row i's row among the
    selection's ids, ``candidate[i]``: whether it passed the earlier rules. Positions sort the
    rows by (cluster, rank), as :class:`deldist.greedy.NeighbourEdges` needs. The latest two
    thresholds' decisions are kept (a ratio search's answer is the last or the one before)."""

    def __init__(self, scores_dir: str, paths: list[str], ids_row: np.ndarray, candidate: np.ndarray, floor: float):
        self.scores_dir, self.paths = scores_dir, paths
        stored = self._read(["cluster", "rank", "unlisted_max_sim", "neighbours", "neighbour_sims"])
        if stored.num_rows != len(ids_row):
            raise RuntimeError(f"{scores_dir}: {stored.num_rows} rows in {len(paths)} parts, the driver counted "
                               f"{len(ids_row)}; the scores changed while select ran")
        cluster = stored.column("cluster").to_numpy().astype(np.int64)
        rank = stored.column("rank").to_numpy().astype(np.int64)
        order = np.lexsort((rank, cluster))  # position -> row
        self.clusters, local = np.unique(cluster, return_inverse=True)
        sizes = np.bincount(local, minlength=len(self.clusters))
        self.starts = starts = np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64)
        self.stops = starts + sizes
        if not np.array_equal(rank[order], np.arange(len(rank)) - starts[local[order]]):
            raise ValueError("dedup/scores ranks are not 0..n-1 within each cluster; re-run dedup")
        del cluster, rank
        self.local_pos = local[order]  # (m,) each position's cluster, 0..len(clusters)-1
        self.row_pos = order  # (m,) each position's row in the parts
        table = pa.table({"cluster": local, "unlisted_max_sim": stored.column("unlisted_max_sim")})
        lists = stored.select(["neighbours", "neighbour_sims"])
        del stored, local
        self.edges = neighbour_edges(Scores(table, lists, np.arange(len(order)), {}), order, starts, floor)
        self.ids_row_pos = np.asarray(ids_row, np.int64)[order]
        self.cand_pos = np.asarray(candidate, bool)[order]
        self.decided: dict[float, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _read(self, columns: list[str]) -> pa.Table:
        return pa.concat_tables(read_files(self.scores_dir, self.paths, columns))

    def max_listed_sim(self) -> float:
        return float(self.edges.sim.max()) if len(self.edges.sim) else -math.inf

    def count_from_lists(self, t: float) -> int:
        """The kept count at ``t`` from the lists alone (undecided items counted as they decide them)."""
        return int(resolve_kept(self.cand_pos, self.edges, t)[0].sum())

    def hard_clusters(self, t: float) -> np.ndarray:
        """The clusters (global ids) the lists cannot decide at ``t``."""
        return self.clusters[np.unique(self.local_pos[resolve_kept(self.cand_pos, self.edges, t)[3]])]

    def resolve(self, t: float) -> tuple[int, list[Span]]:
        """Decide every item from the lists at ``t`` -> (kept count, the spans the exact rule must
        redo: each undecided cluster from its first undecided item on, the kept before it fixed)."""
        kept, dup, sim, unresolved = resolve_kept(self.cand_pos, self.edges, t)
        while len(self.decided) >= 2:
            self.decided.pop(next(iter(self.decided)))
        self.decided[t] = (kept, dup, sim)
        hard, first = np.unique(self.local_pos[unresolved], return_index=True)
        spans = []
        for c, f in zip(hard.tolist(), np.flatnonzero(unresolved)[first].tolist()):
            start, stop = int(self.starts[c]), int(self.stops[c])
            spans.append((int(self.clusters[c]), f - start, np.flatnonzero(kept[start:f]), self.cand_pos[f:stop]))
        return int(kept.sum()), spans

    def patch(self, t: float, redone: list[Redone]) -> int:
        """Take the exact rule's decisions for the spans :meth:`resolve` named -> the kept count at ``t``."""
        kept, dup, sim = self.decided[t]
        local = np.searchsorted(self.clusters, [r[0] for r in redone])
        for c, (_, first, k, d, s) in zip(local.tolist(), redone):
            start = int(self.starts[c])
            span = slice(start + first, int(self.stops[c]))
            kept[span], dup[span], sim[span] = k, np.where(d >= 0, d + start, -1), s
        return int(kept.sum())

    def rows_of(self, clusters: np.ndarray) -> pa.Table:
        """(id, cluster, rank) of every item of ``clusters`` (global ids, all held here), rank order."""
        local = np.searchsorted(self.clusters, clusters)
        pos = np.concatenate([np.arange(self.starts[c], self.stops[c]) for c in local.tolist()] or [np.zeros(0, int)])
        # the ids are read again here (a gather or two per selection), not held: ~35 bytes per item
        ids = self._read(["id"]).column("id").take(pa.array(self.row_pos[pos]))
        return pa.table({"id": ids, "cluster": self.clusters[self.local_pos[pos]],
                         "rank": pos - self.starts[self.local_pos[pos]]})

    def decisions(self, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """At ``t`` (resolved and patched): (ids rows, duplicate bool, the ids row it duplicates
        or -1, similarity) of this shard's items."""
        kept, dup, sim = self.decided[t]
        link = np.where(dup >= 0, self.ids_row_pos[np.maximum(dup, 0)], -1)
        return self.ids_row_pos, self.cand_pos & ~kept, link, sim.astype(np.float32)


def plan_kept_shards(part_clusters: list[np.ndarray], n_shards: int) -> list[list[int]]:
    """Group scores parts into at most ``n_shards`` shards of about equal rows, every part that
    holds a piece of a cluster in the same shard (dedup splits large clusters over parts).
    part_clusters: each part's cluster column -> shards as lists of part indices, ascending."""
    n_parts = len(part_clusters)
    parent = list(range(n_parts))

    def root(p: int) -> int:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    owner: dict[int, int] = {}
    for p, clusters in enumerate(part_clusters):
        for c in np.unique(clusters).tolist():
            if c in owner:
                parent[root(p)] = root(owner[c])
            else:
                owner[c] = p
    groups: dict[int, list[int]] = {}
    for p in range(n_parts):
        groups.setdefault(root(p), []).append(p)
    rows = {g: sum(len(part_clusters[p]) for p in parts) for g, parts in groups.items()}
    shards: list[list[int]] = [[] for _ in range(max(1, min(n_shards, len(groups))))]
    load = [0] * len(shards)
    for g in sorted(groups, key=lambda g: -rows[g]):  # largest first onto the lightest shard
        s = load.index(min(load))
        shards[s] += groups[g]
        load[s] += rows[g]
    return [sorted(s) for s in shards if s]


class KeptRule:
    """The ``kept`` duplicate rule over fixed candidates at any similarity threshold, without
    rerunning the pairwise stage, on :class:`KeptShard` actors (see the module doc).
    ``deldist select`` evaluates one threshold (or searches a ``target_ratio``), ``deldist
    sweep`` a grid of them on the same object. scores: :func:`deldist.select.read_scores`'s
    (``cluster`` aligned with the ids, ``parts``, ``list_row``); candidate: (n,) bool."""

    def __init__(self, config: Config, scores: Scores, candidate: np.ndarray, emb_dir: str, dim: int | None,
                 floor: float, cache_dir: str):
        import ray

        from deldist.runtime import task_slots

        self.n, self.floor = len(candidate), floor
        self.candidates = int(np.count_nonzero(candidate))
        cluster = scores.table.column("cluster").to_numpy().astype(np.int64)
        sizes = np.bincount(cluster, minlength=int(cluster.max()) + 1 if len(cluster) else 0)
        self.fallback = ExactFallback(config, emb_dir, dim, sizes, cache_dir)
        ids_row = np.empty(self.n, np.int64)  # stored row -> ids row
        ids_row[np.asarray(scores.list_row, np.int64)] = np.arange(self.n)
        starts = np.r_[0, np.cumsum([rows for _, rows in scores.parts])].astype(np.int64)
        wanted = config.kept_shards if config.kept_shards is not None else \
            task_slots(config.task_cpus) if self.n >= LOCAL_BELOW else 0
        plan = plan_kept_shards([cluster[ids_row[a:b]] for a, b in zip(starts[:-1], starts[1:])], max(1, wanted))
        # no CPUs reserved: a shard computes only while the driver waits for it, never beside the
        # fallback's shuffle tasks (which need the CPUs); SPREAD puts the shards' memory on every node
        self.remote = wanted > 0
        actor = ray.remote(num_cpus=0, scheduling_strategy="SPREAD")(KeptShard).remote if self.remote else KeptShard
        self.shards: list[Any] = []
        self.shard_of = np.full(len(sizes), -1, np.int32)  # cluster -> the shard holding it
        for s, parts in enumerate(plan):
            rows = np.concatenate([ids_row[starts[p]:starts[p + 1]] for p in parts])
            self.shard_of[cluster[rows]] = s
            self.shards.append(actor(scores.source_dir, [scores.parts[p][0] for p in parts], rows,
                                     np.asarray(candidate, bool)[rows], floor))
        del ids_row
        self.n_shards = len(self.shards)
        self.counts: dict[float, tuple[int, int]] = {}  # threshold -> (kept count, clusters decided exactly)
        self.held: list[float] = []  # the thresholds whose decisions the shards hold (the latest two)
        self.tried = 0

    def _call(self, calls: list[tuple[int, str, tuple]]) -> list[Any]:
        """(shard, method, args) calls, run on the actors together or in this process in turn."""
        import ray

        if not self.remote:
            return [getattr(self.shards[s], method)(*args) for s, method, args in calls]
        return ray.get([getattr(self.shards[s], method).remote(*args) for s, method, args in calls])

    def _all(self, method: str, *args: Any) -> list[Any]:
        return self._call([(s, method, args) for s in range(len(self.shards))])

    def evaluate(self, t: float, held: bool = False) -> tuple[int, int]:
        """At similarity threshold ``t`` (>= the floor): (kept count, clusters decided exactly);
        ``held``: also make the shards hold its decisions (:meth:`decisions`)."""
        if t not in self.counts or (held and t not in self.held):
            resolved = self._all("resolve", t)
            spans = [span for _, shard_spans in resolved for span in shard_spans]
            count = sum(c for c, _ in resolved)
            if spans:
                self.fallback.gather([s[0] for s in spans], self._rows_of)
                by_shard: dict[int, list[Redone]] = {}
                for redone in self.fallback.run(spans, t):
                    by_shard.setdefault(int(self.shard_of[redone[0]]), []).append(redone)
                patched = dict(zip(by_shard, self._call([(s, "patch", (t, r)) for s, r in by_shard.items()])))
                count = sum(patched.get(s, c) for s, (c, _) in enumerate(resolved))
            self.tried += t not in self.counts
            self.counts[t] = (count, len(spans))
            self.held = [*[h for h in self.held if h != t], t][-2:]
        return self.counts[t]

    def _rows_of(self, clusters: np.ndarray) -> pa.Table:
        clusters = np.asarray(clusters, np.int64)
        shard = self.shard_of[clusters]
        return pa.concat_tables(self._call([(s, "rows_of", (clusters[shard == s],))
                                            for s in np.unique(shard).tolist()]))

    def decisions(self, t: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """At ``t``: (duplicate bool (n,), the ids row each duplicate's duplicate_of is int64 (n,),
        similarity float32 (n,)), in the ids' row order."""
        self.evaluate(t, held=True)
        duplicate = np.zeros(self.n, bool)
        link = np.full(self.n, -1, np.int64)
        score = np.full(self.n, np.nan, np.float32)
        for s in range(len(self.shards)):  # one shard's arrays at a time
            rows, dup, to, sim = self._call([(s, "decisions", (t,))])[0]
            duplicate[rows], link[rows], score[rows] = dup, to, sim
        return duplicate, link, score

    def kept_rows(self, t: float, candidate: np.ndarray) -> np.ndarray:
        """bool (n,) in row order: the candidates kept at threshold ``t``."""
        return np.asarray(candidate, bool) & ~self.decisions(t)[0]

    def hard_clusters(self, t: float) -> np.ndarray:
        """The clusters the lists cannot decide at ``t`` (the exact fallback's work there)."""
        return np.concatenate(self._all("hard_clusters", t))

    def close(self) -> None:
        """End the shards and remove the exact fallback's gathered vectors."""
        import ray

        for shard in self.shards if self.remote else []:
            ray.kill(shard)
        self.shards = []
        self.fallback.close()

    def thresholds(self) -> FloatGrid:
        """The thresholds a ratio search tries among (ascending): every float32 from the floor to
        the largest listed similarity (the kept count only changes at listed similarities),
        and +inf (keep every candidate)."""
        return FloatGrid(self.floor, max(max(self._all("max_listed_sim")), self.floor))

    def count_from_lists(self, t: float) -> int:
        """The kept count at ``t`` from the neighbour lists alone (items the lists cannot decide
        counted as they decide them): no vectors, a compiled pass per shard."""
        return sum(self._all("count_from_lists", t))

    def search(self, target_ratio: float, ratio_tolerance: float) -> tuple[float, dict[str, Any]]:
        """The threshold keeping about ``target_ratio`` of the n items -> (threshold, info: target_ratio,
        target_reachable, thresholds_tried, and target_unreachable_because when not reachable).

        First a bisection on :meth:`count_from_lists` (no vectors), then exact counts
        (:meth:`evaluate`) from that threshold outwards: the exact fallback gathers vectors only
        for thresholds near the answer (a bisection on exact counts from the floor up gathered
        the embeddings ~9 times at 1M items)."""
        keep_count = int(round(target_ratio * self.n))
        tolerance = int(math.floor(ratio_tolerance * self.n))
        grid = self.thresholds()
        guess, _, _ = search_threshold(self.count_from_lists, grid, keep_count, tolerance)
        # one gather for the thresholds the exact counts will likely try, not one per threshold
        # (each gather re-reads every embeddings shard): steps of 1,024 ulps around the guess
        at = grid.index(guess)
        near = [grid[min(max(at + k * 1024, 0), len(grid) - 2)] for k in (-8, -4, -2, -1, 0, 1, 2, 4, 8)]
        self.fallback.gather(np.unique(np.concatenate([self.hard_clusters(t) for t in near])), self._rows_of)
        # steps of 1,024 float32 ulps (~6e-5 at 0.7) and up; stop at the first count within tolerance
        threshold, count, reachable = search_threshold(lambda t: self.evaluate(t)[0], grid, keep_count,
                                                       tolerance, start=at, first_step=1024,
                                                       stop_within=tolerance)
        info: dict[str, Any] = dict(target_ratio=target_ratio, target_reachable=reachable,
                                    thresholds_tried=self.tried)
        if not reachable:
            why = (f"at the neighbour floor {self.floor} (the lowest threshold the scores allow) {count} items stay; "
                   "re-run dedup with a lower neighbour_floor" if count > keep_count else
                   f"only {self.candidates} items pass the earlier rules")
            info["target_unreachable_because"] = why
        return threshold, info


def dedup_kept(config: Config, scores: Scores, candidate: np.ndarray, emb_dir: str, dim: int | None, floor: float,
               cache_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """The ``kept`` duplicate rule over the candidates (rows) -> (duplicate bool (n,), the row
    it duplicates int64 (n,), similarity float32 (n,), info); the exact fallback's vectors live
    in ``cache_dir`` while it runs."""
    rule = KeptRule(config, scores, candidate, emb_dir, dim, floor, cache_dir)
    info: dict[str, Any] = {}
    try:
        if config.target_ratio is not None:
            threshold, found = rule.search(config.target_ratio, config.ratio_tolerance)
            info.update(found)
        else:
            threshold = 1.0 - float(config.eps)
        _, hard_clusters = rule.evaluate(threshold)
        duplicate, link, score = rule.decisions(threshold)
    finally:
        rule.close()
    info.update(similarity_threshold=threshold if math.isfinite(threshold) else None,
                eps=1.0 - threshold if math.isfinite(threshold) else None,
                exact_fallback_clusters=hard_clusters, exact_fallback_gathers=rule.fallback.gathers,
                exact_fallback_waves=rule.fallback.waves, kept_rule_shards=rule.n_shards)
    return duplicate, link, score, info
