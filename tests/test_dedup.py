"""deldist.dedup: blockwise triu-max against a float64 all-pairs reference, the Ray stage."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from deldist import dedup, dedup_scores, pairwise, pairwise_torch, shards, shuffle, storage, tiles
from deldist.pairwise_lowp import prepare_rows
from deldist.schema import ASSIGNMENTS_SCHEMA, QUALITY_COLUMNS, SCORES_SCHEMA, embedding_array, embeddings_schema
from deldist.shards import EmbeddingError, EmptyInputError


def clustered_with_sizes(sizes: list[int], dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit rows (n, dim) float32 in clusters of the given sizes, with near-duplicates.
    Returns (x, cluster labels (n,), cosine distance to the normalised cluster mean (n,))."""
    rng = np.random.default_rng(seed)
    blocks, labels = [], []
    for c, n in enumerate(sizes):
        centre = rng.standard_normal(dim)
        base = centre + 0.7 * rng.standard_normal((n, dim))
        dupes = rng.random(n) < 0.3  # some rows nearly copy an earlier one
        src = np.maximum(np.arange(n) - rng.integers(1, 4, n), 0)
        base[dupes] = base[src[dupes]] + 0.05 * rng.standard_normal((int(dupes.sum()), dim))
        blocks.append(base)
        labels.append(np.full(n, c))
    x = np.concatenate(blocks)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    labels = np.concatenate(labels)
    distance = np.empty(len(x), np.float32)
    for c in range(len(sizes)):
        members = labels == c
        mean = x[members].astype(np.float64).sum(axis=0)
        distance[members] = 1.0 - x[members] @ (mean / np.linalg.norm(mean))
    return x, labels, distance


def reference_scores(x: np.ndarray, labels: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 all-pairs: for row i, max <x_i, x_j> over j of the same cluster with a lower
    rank (0 and -1 for the first) -> (max_sim (n,), argmax row (n,))."""
    x64 = x.astype(np.float64)
    best = np.zeros(len(x))
    arg = np.full(len(x), -1)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rows = rows[np.argsort(rank[rows])]
        sims = x64[rows] @ x64[rows].T
        for r in range(1, len(rows)):
            j = int(np.argmax(sims[r, :r]))
            best[rows[r]], arg[rows[r]] = sims[r, j], rows[j]
    return best, arg


def assert_matches_reference(x, labels, rank, max_sim, dup_row):
    ref_sim, ref_arg = reference_scores(x, labels, rank)
    assert np.abs(max_sim - ref_sim).max() < 1e-5
    assert np.array_equal(dup_row < 0, ref_arg < 0)
    has = ref_arg >= 0
    chosen = np.einsum("ij,ij->i", x[has].astype(np.float64), x[dup_row[has]].astype(np.float64))
    assert np.abs(chosen - ref_sim[has]).max() < 1e-5  # any argmax within float32 rounding
    assert (dup_row[has] == ref_arg[has]).mean() > 0.99
    assert np.array_equal(labels[dup_row[has]], labels[has])
    assert np.all(rank[dup_row[has]] < rank[has])


SIZES = [1, 70, 3, 1, 25, 1, 130]  # single-item clusters and clusters larger than a block


@pytest.mark.parametrize("keep", ["hard", "easy", "random"])
def test_scores_equal_all_pairs_reference(keep):
    x, labels, distance = clustered_with_sizes(SIZES, 24, seed=1)
    ids = pa.array([f"f{i:04d}" for i in range(len(x))])
    rank = dedup_scores.rank_within_clusters(ids, labels, distance, keep, seed=3)
    order = np.lexsort((rank, labels))
    table = dedup_scores.score_sorted_clusters(x[order], ids.take(pa.array(order)), labels[order], rank[order],
                                        block_rows=16, col_block=40, diag_rows=6)
    assert table.schema.equals(SCORES_SCHEMA)
    back = np.argsort(order)
    max_sim = table.column("max_sim").to_numpy()[back]
    dup_ids = table.column("duplicate_of").to_pylist()
    dup_row = np.array([-1 if dup_ids[b] is None else int(dup_ids[b][1:]) for b in back])
    assert_matches_reference(x, labels, rank, max_sim, dup_row)
    first = rank == 0
    assert np.all(max_sim[first] == 0) and np.all(dup_row[first] == -1)
    assert first.sum() == len(SIZES)


def test_exact_ties_go_to_the_earliest_item():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, (5, 8)).astype(np.float32)[rng.integers(0, 5, 200)]  # exact integer dot products
    full = x.astype(np.float64) @ x.T.astype(np.float64)
    first = [-1] + [int(np.argmax(full[i, :i])) for i in range(1, 200)]
    for block_rows, col_block, diag_rows in [(16, 40, 6), (7, 5, 3), (256, 16_384, 32)]:
        _, arg = pairwise.triu_max_sim(x, block_rows=block_rows, col_block=col_block, diag_rows=diag_rows)
        assert arg.tolist() == first


def test_rank_modes():
    ids = pa.array(["d", "a", "c", "b", "e"])
    labels = np.array([0, 0, 0, 1, 1])
    distance = np.array([0.1, 0.3, 0.2, 0.5, 0.5], np.float32)
    assert dedup_scores.rank_within_clusters(ids, labels, distance, "hard").tolist() == [2, 0, 1, 0, 1]
    assert dedup_scores.rank_within_clusters(ids, labels, distance, "easy").tolist() == [0, 2, 1, 0, 1]
    r1 = dedup_scores.rank_within_clusters(ids, labels, distance, "random", seed=7)
    assert sorted(r1[:3].tolist()) == [0, 1, 2] and sorted(r1[3:].tolist()) == [0, 1]
    shuffled = [4, 2, 0, 3, 1]  # random ranks follow the ids, not the row order
    r2 = dedup_scores.rank_within_clusters(ids.take(pa.array(shuffled)), labels[shuffled], distance[shuffled], "random", 7)
    assert r2.tolist() == r1[shuffled].tolist()


def test_row_ranges_cover_the_triangle_evenly():
    ranges = shuffle.split_rows_by_area(1000, 4)
    assert ranges[0][0] == 0 and ranges[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    work = [b * b - a * a for a, b in ranges]
    assert max(work) < 1.1 * min(work)
    x, labels, _ = clustered_with_sizes([300], 16, seed=2)
    whole, arg = pairwise.triu_max_sim(x, block_rows=32)
    pieces = [pairwise.triu_max_sim(x, a, b, block_rows=32, col_block=50, diag_rows=7)
              for a, b in shuffle.split_rows_by_area(300, 3)]
    assert np.allclose(np.concatenate([p[0] for p in pieces]), whole, atol=1e-6)  # gemm shapes differ
    assert np.array_equal(np.concatenate([p[1] for p in pieces]), arg)


def test_plan_waves_fit_the_budget():
    buckets = [shuffle.Bucket([c], rows, 0.0) for c, rows in enumerate([100, 50, 50, 400, 10])]
    per_row = 8 * 4  # float32 slices, D = 8
    assert shuffle.plan_waves(buckets, 8, 200 * per_row) == [[0, 1, 2], [3], [4]]  # 400 alone: over budget
    assert shuffle.plan_waves(buckets, 8, 1e12) == [[0, 1, 2, 3, 4]]
    assert shuffle.plan_waves(buckets, 8, 1.0) == [[0], [1], [2], [3], [4]]
    # float16 slices take half: twice the rows per wave
    assert shuffle.plan_waves(buckets, 8, 100 * per_row) == [[0], [1, 2], [3], [4]]
    assert shuffle.plan_waves(buckets, 8, 100 * per_row, itemsize=2) == [[0, 1, 2], [3], [4]]
    # a split cluster's gathered float32 copy sits in the object store beside its slices
    split = [shuffle.Bucket([0], 100, 0.0, [(0, 50), (50, 100)]), shuffle.Bucket([1], 100, 0.0)]
    assert shuffle.plan_waves(split, 8, 250 * per_row) == [[0], [1]]


def test_plan_buckets_packs_small_and_splits_huge():
    sizes = np.array([5, 0, 400, 7, 9, 3, 2])
    buckets = shuffle.plan_buckets(sizes, n_buckets=2, split_rows=100, bucket_rows=1000)
    split = [b for b in buckets if b.row_ranges]
    assert len(split) == 1 and split[0].clusters == [2] and len(split[0].row_ranges) >= 2
    packed = sorted(c for b in buckets if not b.row_ranges for c in b.clusters)
    assert packed == [0, 3, 4, 5, 6] and len(buckets) == 3


def test_empty_and_single_inputs():
    sims, arg = pairwise.triu_max_sim(np.zeros((0, 8), np.float32))
    assert len(sims) == 0 and len(arg) == 0
    sims, arg = pairwise.triu_max_sim(np.ones((1, 8), np.float32) / np.sqrt(8))
    assert sims.tolist() == [0.0] and arg.tolist() == [-1]
    assert len(dedup_scores.rank_within_clusters(pa.array([], pa.string()), np.array([]), np.array([]))) == 0


# ----------------------------------------------------------------------------- torch path (GPU kernels, run on the CPU)


def near_dup_rows(n: int, dim: int, seed: int, copies: int = 0) -> np.ndarray:
    """(n, dim) float32 unit rows in a few tight groups (near-duplicates), the last ``copies``
    rows bitwise copies of earlier ones."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, dim))[rng.integers(0, 4, n)] + 0.2 * rng.standard_normal((n, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    if copies:
        x[n - copies:] = x[rng.integers(0, n - copies, copies)]
    return x


def exact_unit_rows(n: int, seed: int) -> np.ndarray:
    """(n, 8) unit rows of four +-0.5 entries drawn from 6 patterns: every dot product is a
    multiple of 1/4, exact in float32 whatever the summation order, so ties are exact ties."""
    rng = np.random.default_rng(seed)
    patterns = np.zeros((6, 8), np.float32)
    for p in patterns:
        p[rng.choice(8, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return patterns[rng.integers(0, 6, n)]


def check_against_float64(sims64: np.ndarray, rows: np.ndarray, cols: list[np.ndarray], max_sim: np.ndarray,
                          arg: np.ndarray, exact: bool = False) -> None:
    """Kernel output vs the float64 all-pairs ``sims64``: row r may match the columns ``cols[k]``.
    max_sim within 1e-5; argmax the reference's first argmax unless another candidate is
    within float32 rounding of the max (then it must be one of those); with ``exact`` data
    (no rounding at all) always the first argmax."""
    for k, (r, c) in enumerate(zip(rows, cols)):
        if len(c) == 0:
            continue
        ref = sims64[r, c]
        best, first = ref.max(), int(c[np.argmax(ref)])  # np.argmax: the first on ties
        assert abs(max_sim[k] - best) < 1e-5, (r, max_sim[k], best)
        tied = c[ref >= best - (0.0 if exact else 1e-6)]
        if exact or len(tied) == 1:
            assert arg[k] == first, (r, arg[k], first, tied)
        else:
            assert arg[k] in tied, (r, arg[k], tied)


@pytest.mark.parametrize("block_rows,col_block,diag_rows", [(32, 50, 7), (7, 5, 3), (256, 16_384, 64), (64, 1, 64)])
@pytest.mark.parametrize("start,stop", [(0, None), (0, 1), (1, 2), (150, 171), (37, 300), (299, 300), (120, 120)])
def test_torch_triu_matches_float64_reference(block_rows, col_block, diag_rows, start, stop):
    x = near_dup_rows(300, 24, seed=block_rows + start, copies=40)  # larger than every block
    sims64 = x.astype(np.float64) @ x.astype(np.float64).T
    max_sim, arg = pairwise_torch.triu_max_sim_torch(x, start, stop, block_rows, col_block, diag_rows, device="cpu")
    stop = len(x) if stop is None else stop
    assert max_sim.dtype == np.float32 and arg.dtype == np.int64 and len(max_sim) == len(arg) == stop - start
    rows = np.arange(start, stop)
    check_against_float64(sims64, rows, [np.arange(r) for r in rows], max_sim, arg)
    if start == 0 and stop > 0:
        assert max_sim[0] == 0.0 and arg[0] == -1
    assert np.all((arg >= 0) == (rows > 0)) and np.all(arg < rows)
    np_sim, np_arg = pairwise.triu_max_sim(x, start, stop, block_rows, col_block, diag_rows)  # the NumPy path
    assert np.abs(np_sim - max_sim).max(initial=0) < 1e-6


@pytest.mark.parametrize("block_rows,col_block,diag_rows", [(16, 40, 6), (7, 5, 3), (256, 16_384, 32)])
def test_torch_exact_ties_go_to_the_earliest_item(block_rows, col_block, diag_rows):
    x = exact_unit_rows(200, seed=4)  # 6 distinct rows: every row after the first few has exact twins
    sims64 = x.astype(np.float64) @ x.astype(np.float64).T
    for start, stop in [(0, 200), (90, 200), (3, 4)]:
        max_sim, arg = pairwise_torch.triu_max_sim_torch(x, start, stop, block_rows, col_block, diag_rows, device="cpu")
        rows = np.arange(start, stop)
        check_against_float64(sims64, rows, [np.arange(r) for r in rows], max_sim, arg, exact=True)
    rng = np.random.default_rng(0)  # the integer rows of the NumPy tie test
    x = rng.integers(0, 3, (5, 8)).astype(np.float32)[rng.integers(0, 5, 200)]
    full = x.astype(np.float64) @ x.T.astype(np.float64)
    first = [-1] + [int(np.argmax(full[i, :i])) for i in range(1, 200)]
    _, arg = pairwise_torch.triu_max_sim_torch(x, block_rows=block_rows, col_block=col_block, diag_rows=diag_rows,
                                       device="cpu")
    assert arg.tolist() == first


def test_torch_single_row_and_empty():
    one = np.ones((1, 8), np.float32) / np.sqrt(8)
    for x in (one, pairwise.to_device(one, "cpu")):
        max_sim, arg = pairwise_torch.triu_max_sim_torch(x, device="cpu")
        assert max_sim.tolist() == [0.0] and arg.tolist() == [-1]
    max_sim, arg = pairwise_torch.triu_max_sim_torch(np.zeros((0, 8), np.float32), device="cpu")
    assert max_sim.shape == arg.shape == (0,) and max_sim.dtype == np.float32 and arg.dtype == np.int64
    x = near_dup_rows(10, 8, seed=1)
    max_sim, arg = pairwise_torch.triu_max_sim_torch(x, 6, 7, device="cpu")  # one row of a range, start > 0
    assert arg[0] == int(np.argmax(x[6].astype(np.float64) @ x[:6].T.astype(np.float64)))
    with pytest.raises(ValueError, match="outside"):
        pairwise_torch.triu_max_sim_torch(x, 4, 11, device="cpu")


@pytest.mark.parametrize("block_rows,col_block", [(32, 50), (7, 5), (256, 16_384)])
def test_torch_max_sim_to_matches_float64_reference(block_rows, col_block):
    keys = near_dup_rows(230, 24, seed=block_rows, copies=30)  # more keys than a column tile
    q = np.concatenate([near_dup_rows(70, 24, seed=block_rows + 1), keys[[5, 229, 0]]])  # exact copies of keys
    sims64 = np.concatenate([q, keys]).astype(np.float64) @ np.concatenate([q, keys]).astype(np.float64).T
    key_cols = np.arange(len(q), len(q) + len(keys))
    max_sim, arg = pairwise_torch.max_sim_to_torch(q, keys, block_rows, col_block, device="cpu")
    assert max_sim.dtype == np.float32 and arg.dtype == np.int64 and len(arg) == len(q)
    check_against_float64(sims64, np.arange(len(q)), [key_cols] * len(q), max_sim, arg + len(q))
    np_sim, np_arg = pairwise.max_sim_to(q, keys, block_rows, col_block)  # the NumPy path
    assert np.abs(np_sim - max_sim).max() < 1e-6

    keys = exact_unit_rows(120, seed=2)  # exact ties: the first key wins
    q = exact_unit_rows(40, seed=3)
    max_sim, arg = pairwise_torch.max_sim_to_torch(q, keys, block_rows, col_block, device="cpu")
    full = q.astype(np.float64) @ keys.T.astype(np.float64)
    assert arg.tolist() == np.argmax(full, axis=1).tolist() and np.array_equal(max_sim, full.max(axis=1))

    max_sim, arg = pairwise_torch.max_sim_to_torch(q, keys[:0], block_rows, col_block, device="cpu")  # no keys
    assert np.all(max_sim == -np.inf) and np.all(arg == -1)
    max_sim, arg = pairwise_torch.max_sim_to_torch(q[:0], keys, block_rows, col_block, device="cpu")
    assert len(max_sim) == len(arg) == 0


@pytest.fixture
def cuda_on_cpu(monkeypatch):
    """device="cuda" runs the torch kernels, with every tensor placed on the CPU: exercises the
    device plumbing (one copy per bucket, slices per cluster) without a GPU."""
    place = pairwise_torch.as_device_tensor
    monkeypatch.setattr(pairwise_torch, "as_device_tensor", lambda x, device: place(x, "cpu"))


def test_score_sorted_clusters_on_the_torch_path(cuda_on_cpu):
    x, labels, distance = clustered_with_sizes(SIZES, 24, seed=1)
    ids = pa.array([f"f{i:04d}" for i in range(len(x))])
    rank = dedup_scores.rank_within_clusters(ids, labels, distance, "hard")
    order = np.lexsort((rank, labels))
    args = (x[order], ids.take(pa.array(order)), labels[order], rank[order], tiles.ListSpec(4, 3, 0.2))
    on_torch = dedup_scores.score_sorted_clusters(*args, block_rows=16, col_block=40, diag_rows=6, device="cuda")
    on_numpy = dedup_scores.score_sorted_clusters(*args, block_rows=16, col_block=40, diag_rows=6, device="cpu")
    assert on_torch.schema.equals(SCORES_SCHEMA)
    assert np.abs(on_torch.column("max_sim").to_numpy() - on_numpy.column("max_sim").to_numpy()).max() < 1e-6
    assert on_torch.column("duplicate_of").equals(on_numpy.column("duplicate_of"))
    assert on_torch.column("neighbours").equals(on_numpy.column("neighbours"))  # no exact ties in this data
    assert np.abs(on_torch.column("unlisted_max_sim").to_numpy() - on_numpy.column("unlisted_max_sim").to_numpy()
                  ).max() < 1e-6
    sims, arg = pairwise.triu_max_sim(x, 100, 130, 16, 40, 6, device="cuda")  # a split cluster's row range
    np_sims, np_arg = pairwise.triu_max_sim(x, 100, 130, 16, 40, 6, device="cpu")
    assert np.abs(sims - np_sims).max() < 1e-6 and np.array_equal(arg, np_arg)


def reference_lists(x: np.ndarray, spec: tiles.ListSpec) -> list[tuple[set, float]]:
    """float64: per row, the union of its ``by_similarity`` most similar and ``by_rank`` earliest
    earlier rows with similarity >= floor, and the largest similarity of an earlier row not in it."""
    sims = x.astype(np.float64) @ x.astype(np.float64).T
    out = []
    for i in range(len(x)):
        above = np.flatnonzero(sims[i, :i] >= spec.floor)
        top = sorted(above, key=lambda j: (-sims[i, j], j))[: spec.by_similarity]
        listed = set(top) | set(above[: spec.by_rank].tolist())
        unlisted = [sims[i, j] for j in range(i) if j not in listed]
        out.append((listed, max(unlisted, default=-np.inf)))
    return out


def lists_match(listed: list[int], row64: np.ndarray, spec: tiles.ListSpec, tol: float = 1e-5) -> bool:
    """A row's listed neighbours against float64 (``row64``: its similarities to the earlier
    rows): the reference union, or, where rows tie at the by-similarity cut within ``tol``
    (exact copies, float32 rounding, or for low-precision tiles twice their margin: list
    membership follows the tile's order), another of the tied rows: then every by-rank row is
    listed, the listed rows' largest similarities are the reference's top ones within ``tol``,
    and any other listed row is at the cut."""
    above = np.flatnonzero(row64 >= spec.floor)
    top = sorted(above, key=lambda j: (-row64[j], j))[: spec.by_similarity]
    by_rank = set(above[: spec.by_rank].tolist())
    if set(listed) == set(top) | by_rank:
        return True
    cut = row64[top[-1]] if top else np.inf
    got_top = sorted(row64[listed], reverse=True)[: len(top)]
    return (by_rank <= set(listed) and np.allclose(got_top, sorted(row64[top], reverse=True), atol=tol)
            and all(row64[j] >= cut - tol for j in set(listed) - by_rank))


@pytest.mark.parametrize("spec", [tiles.ListSpec(4, 3, 0.3), tiles.ListSpec(0, 5, -1.0), tiles.ListSpec(6, 0, 0.6)])
@pytest.mark.parametrize("device", ["cpu", "torch"])
def test_neighbour_lists_match_float64_reference(spec, device):
    x = near_dup_rows(150, 12, seed=4, copies=30)
    x[[40, 41, 90]] = x[7]  # exact copies: ties
    ref = reference_lists(x, spec)
    for start, stop in [(0, 150), (37, 121)]:  # a whole cluster and a split cluster's row range
        if device == "cpu":
            _, _, idx, sim, bound = pairwise.triu_neighbours(x, start, stop, spec, 16, 40, 6)
        else:
            _, _, idx, sim, bound = pairwise_torch.triu_max_sim_torch(x, start, stop, 16, 40, 6, "cpu", spec)
        sims64 = x.astype(np.float64) @ x.astype(np.float64).T
        for r, i in enumerate(range(start, stop)):
            listed = idx[r][idx[r] >= 0]
            assert np.all(np.diff(sim[r][idx[r] >= 0]) <= 1e-6)  # most similar first
            np.testing.assert_allclose(sim[r][idx[r] >= 0], sims64[i, listed], atol=1e-5)
            want, unlisted_max = ref[i]
            assert lists_match(listed.tolist(), sims64[i, :i], spec), (i, listed, want)
            assert unlisted_max <= bound[r] + 1e-5  # the bound the selection relies on


@pytest.mark.parametrize("precision", ["float32", "auto"])
def test_bucket_of_clusters_lists_match_float64_reference(monkeypatch, precision):
    """score_sorted_clusters on a bucket of many clusters (one accumulator for all the float32
    ones; under ``auto`` with a low LOWP_MIN_ROWS the large clusters run the low-precision
    tiles in the same bucket): every row's max, argmax and lists as the float64 reference
    of its own cluster, never a row of another cluster."""
    monkeypatch.setattr(dedup_scores, "LOWP_MIN_ROWS", dict.fromkeys(dedup_scores.LOWP_MIN_ROWS, 60))
    low_calls = []
    lowp = dedup_scores.triu_neighbours_lowp
    monkeypatch.setattr(dedup_scores, "triu_neighbours_lowp", lambda x, *a, **k: low_calls.append(len(x)) or lowp(x, *a, **k))
    spec = tiles.ListSpec(4, 3, 0.3)
    x, labels, distance = clustered_with_sizes([1, 70, 3, 130, 1, 25, 64, 2], 24, seed=6)
    ids = pa.array([f"f{i:04d}" for i in range(len(x))])
    rank = dedup_scores.rank_within_clusters(ids, labels, distance, "hard")
    order = np.lexsort((rank, labels))
    table = dedup_scores.score_sorted_clusters(x[order], ids.take(pa.array(order)), labels[order], rank[order],
                                               spec, block_rows=16, col_block=40, diag_rows=6, precision=precision)
    low = precision == "auto" and dedup_scores.fastest_supported() is not None
    assert sorted(low_calls) == ([64, 70, 130] if low else [])
    xs, ls = x[order], labels[order]
    max_sim = table.column("max_sim").to_numpy()
    dup_of = table.column("duplicate_of").to_pylist()
    neighbours = table.column("neighbours").to_pylist()
    bound = table.column("unlisted_max_sim").to_numpy()
    for c in np.unique(ls):
        rows = np.flatnonzero(ls == c)  # rank order
        sims64 = xs[rows].astype(np.float64) @ xs[rows].astype(np.float64).T
        # a cluster scored from low-precision tiles lists near-ties in the tile's order: within
        # 2 delta (each tile value is within delta of the float32 one) plus float32 rounding
        tol = 1e-5
        if low and len(rows) >= 60:
            rows_lp = prepare_rows(xs[rows], dedup_scores.fastest_supported(), centre=True)
            tol += 2 * float(rows_lp.margins(0, len(rows)).max())
        for r, (want, unlisted_max) in enumerate(reference_lists(xs[rows], spec)):
            i = rows[r]
            assert (dup_of[i] is None) == (r == 0)
            if r:
                assert abs(max_sim[i] - sims64[r, :r].max()) < 1e-5
                d = list(order[rows]).index(int(dup_of[i][1:]))  # its rank in this cluster
                assert d < r and abs(sims64[r, d] - sims64[r, :r].max()) < 1e-6  # the argmax (or a tie)
            listed = neighbours[i]
            np.testing.assert_allclose(table.column("neighbour_sims")[int(i)].as_py(), sims64[r, listed], atol=1e-5)
            assert lists_match(listed, sims64[r, :r], spec, tol), (r, listed, want)
            assert unlisted_max <= bound[i] + 1e-5


def reference_keep_first(x: np.ndarray, candidate: np.ndarray, threshold: float, fixed: int = 0):
    """float64 loop: rows in order; a candidate is removed iff its similarity to an earlier kept
    row exceeds the threshold -> (kept, duplicate_of (most similar kept, earliest on ties), sim)."""
    x64 = x.astype(np.float64)
    kept = np.zeros(len(x), bool)
    dup = np.full(len(x), -1)
    sim = np.full(len(x), np.nan)
    for i in range(len(x)):
        earlier = np.flatnonzero(kept[:i])
        s = x64[earlier] @ x64[i] if len(earlier) else np.zeros(0)
        if i < fixed:
            kept[i] = True
        elif candidate[i] and len(s) and s.max() > threshold:
            dup[i], sim[i] = earlier[int(np.argmax(s))], s.max()
        elif candidate[i]:
            kept[i] = True
    return kept, dup, sim


@pytest.mark.parametrize("low", ["int8", "bfloat16", None])
def test_auto_precision_per_cluster_size(monkeypatch, low):
    """``auto``: the CPU's low-precision tile from its size threshold on (bfloat16 pays from
    fewer rows for the max alone than with the neighbour lists), float32 below and on CPUs
    with neither tile."""
    monkeypatch.setattr(dedup_scores, "fastest_supported", lambda: low)
    rows = np.array([100, 1023, 1024, 1535, 1536, 2559, 2560, 50_000])
    for lists in (True, False):
        got = dedup_scores._resolve_precision("auto", rows, lists)
        want = np.where(rows >= dedup_scores.LOWP_MIN_ROWS[low, lists], low, "float32") if low else \
            np.full(len(rows), "float32")
        assert list(got) == list(want)
    if low == "bfloat16":
        assert list(dedup_scores._resolve_precision("auto", rows, True)).count("bfloat16") == 2
        assert list(dedup_scores._resolve_precision("auto", rows, False)).count("bfloat16") == 6
    assert list(dedup_scores._resolve_precision("float32", rows, True)) == ["float32"] * len(rows)


@pytest.mark.parametrize("block_rows", [1, 7, 512])
@pytest.mark.parametrize("fixed", [0, 9])
@pytest.mark.parametrize("threshold", [0.9, 0.995])
def test_keep_first_exact_matches_float64_reference(block_rows, fixed, threshold):
    x = near_dup_rows(160, 10, seed=fixed + block_rows, copies=40)
    x[[50, 51, 120]] = x[3]  # exact copies
    candidate = np.random.default_rng(1).random(160) < 0.8
    candidate[3] = False  # the original of the exact copies is removed by an earlier rule
    kept, dup, sim = pairwise.keep_first_exact(x, candidate, threshold, fixed, block_rows)
    ref_kept, ref_dup, ref_sim = reference_keep_first(x, candidate, threshold, fixed)
    assert np.array_equal(kept, ref_kept) and np.array_equal(dup, ref_dup)
    np.testing.assert_allclose(sim[dup >= 0], ref_sim[dup >= 0], atol=1e-5)
    assert kept[dup[dup >= 0]].all()  # nothing lost: every removed row names a kept one
    if threshold > 0.99 and not fixed:  # the copies of an original removed by an earlier rule keep one
        assert kept[50] and dup[51] == dup[120] == 50


# ----------------------------------------------------------------------------- Ray stage


def write_run(root: str, x: np.ndarray, labels: np.ndarray, distance: np.ndarray, parts: int = 3,
              clusters_dim: int | None = None, drop_assignments: int = 0, dtype: str = "float32") -> list[str]:
    """Publish embeddings/ (stored as ``dtype``) and clusters/ (assignments + a centroids
    manifest) under ``root``."""
    n, dim = x.shape
    ids = [f"vid{i % 3}.mp4#{i}" for i in range(n)]
    schema = embeddings_schema(dim, dtype)
    emb_dir, files = storage.join(root, "embeddings"), []
    for rows in np.array_split(np.arange(n), parts):
        table = pa.table({
            "id": [ids[i] for i in rows], "source": [f"vid{i % 3}.mp4" for i in rows],
            "frame_index": pa.array(rows, pa.int64()), "timestamp_s": pa.array(rows * 0.5),
            "dataset": ["d"] * len(rows),
            "embedding": embedding_array(x[rows], dtype),
            **{q: pa.array(np.full(len(rows), 0.5), pa.float32()) for q in QUALITY_COLUMNS},
            "phash": pa.array(np.zeros(len(rows), np.uint64)),
        }, schema=schema)
        path = storage.join(emb_dir, storage.new_part_name())
        storage.write_table(table, path)
        files.append(storage.resolve(path)[1])
    storage.publish(emb_dir, files, {"dim": dim, "schema": storage.schema_hex(schema)})
    clusters_dir = storage.join(root, "clusters")
    assign_dir = storage.join(clusters_dir, "assignments")
    keep = slice(0, n - drop_assignments)
    table = pa.table({"id": ids[keep], "cluster": labels[keep].astype(np.int32),
                      "distance": distance[keep].astype(np.float32)}, schema=ASSIGNMENTS_SCHEMA)
    path = storage.join(assign_dir, storage.new_part_name())
    storage.write_table(table, path)
    storage.publish(assign_dir, [storage.resolve(path)[1]], {"schema": storage.schema_hex(ASSIGNMENTS_SCHEMA)})
    storage.publish(clusters_dir, [], {"dim": clusters_dim or dim, "assignments": "assignments"})
    return ids


@pytest.mark.parametrize("keep", ["hard", "random"])
def test_run_matches_reference_with_a_split_cluster(ray_session, tmp_path, keep):
    x, labels, distance = clustered_with_sizes([260, 1, 40, 12, 1, 90], 16, seed=5)
    root = str(tmp_path / "run")
    ids = write_run(root, x, labels, distance)
    summary = dedup.run(dedup.Config(output=root, keep=keep, seed=2, block_rows=32, col_block=64, diag_rows=8,
                                     split_rows=100,
                                     num_buckets=2, shard_rows=150, task_cpus=0.5))
    assert summary["split_clusters"] == 1 and summary["rows"] == len(x)
    assert summary["use_gpu"] is False  # use_gpu=None: GPUs only when the cluster has some (none here)
    assert storage.read_manifest(storage.join(root, "dedup", "scores"))["use_gpu"] is False
    scores = storage.read_published(storage.join(root, "dedup", "scores"))
    assert scores.schema.equals(SCORES_SCHEMA)
    got = scores.column("id").to_pylist()
    assert sorted(got) == sorted(ids)
    row_of = {i: r for r, i in enumerate(ids)}
    rows = np.array([row_of[i] for i in got])
    rank = np.empty(len(x), np.int64)
    rank[rows] = scores.column("rank").to_numpy()
    expected_rank = dedup_scores.rank_within_clusters(pa.array(ids), labels, distance, keep, seed=2)
    assert np.array_equal(rank, expected_rank)
    assert np.array_equal(scores.column("cluster").to_numpy(), labels[rows])
    max_sim = np.empty(len(x), np.float32)
    max_sim[rows] = scores.column("max_sim").to_numpy()
    dup_row = np.full(len(x), -1)
    dup_row[rows] = [-1 if d is None else row_of[d] for d in scores.column("duplicate_of").to_pylist()]
    assert_matches_reference(x, labels, rank, max_sim, dup_row)
    # the neighbour lists (default spec) of the split cluster's rows and of the packed ones
    spec = tiles.ListSpec()
    for c in (0, 5):
        members = np.flatnonzero(labels == c)
        members = members[np.argsort(rank[members])]
        ref = reference_lists(x[members], spec)
        for r, row in enumerate(members):
            k = got.index(ids[row])
            listed = scores.column("neighbours")[k].as_py()
            assert set(listed) == ref[r][0]
            assert ref[r][1] <= scores.column("unlisted_max_sim")[k].as_py() + 1e-5


def test_run_reads_float16_embeddings(ray_session, tmp_path):
    """embed's ``embedding_dtype: float16``: the stage widens and renormalises the stored rows,
    so its scores are the float64 reference's on the float16 vectors."""
    x, labels, distance = clustered_with_sizes([150, 1, 60, 9], 32, seed=8)
    root = str(tmp_path / "run")
    ids = write_run(root, x, labels, distance, dtype="float16")
    part = storage.published_paths(storage.join(root, "embeddings"))[1][0]
    assert pq.read_schema(part).field("embedding").type == pa.binary(2 * 32)
    dedup.run(dedup.Config(output=root, block_rows=32, col_block=64, task_cpus=0.5))
    scores = storage.read_published(storage.join(root, "dedup", "scores"))
    row_of = {i: r for r, i in enumerate(ids)}
    rows = np.array([row_of[i] for i in scores.column("id").to_pylist()])
    x16 = x.astype(np.float16).astype(np.float64)
    x16 = (x16 / np.linalg.norm(x16, axis=1, keepdims=True)).astype(np.float32)
    rank = np.empty(len(x), np.int64)
    rank[rows] = scores.column("rank").to_numpy()
    max_sim = np.empty(len(x), np.float32)
    max_sim[rows] = scores.column("max_sim").to_numpy()
    dup_row = np.full(len(x), -1)
    dup_row[rows] = [-1 if d is None else row_of[d] for d in scores.column("duplicate_of").to_pylist()]
    assert_matches_reference(x16, labels, rank, max_sim, dup_row)
    assert np.abs(max_sim - reference_scores(x, labels, rank)[0]).max() < 2e-3  # float16 moves cosines little


def read_scores_by_row(root: str, ids: list[str]) -> dict[str, np.ndarray]:
    """dedup/scores/ in the row order of ``ids``: max_sim, duplicate_of row, lists, bound."""
    scores = storage.read_published(storage.join(root, "dedup", "scores"))
    row_of = {i: r for r, i in enumerate(ids)}
    order = np.argsort([row_of[i] for i in scores.column("id").to_pylist()])
    dup = [-1 if d is None else row_of[d] for d in scores.column("duplicate_of").to_pylist()]
    return {"max_sim": scores.column("max_sim").to_numpy()[order], "dup": np.array(dup)[order],
            "rank": scores.column("rank").to_numpy()[order],
            "neighbours": [scores.column("neighbours")[int(k)].as_py() for k in order],
            "neighbour_sims": [scores.column("neighbour_sims")[int(k)].as_py() for k in order],
            "bound": scores.column("unlisted_max_sim").to_numpy()[order]}


@pytest.mark.parametrize("low", ["int8", "bfloat16"])
def test_run_in_low_precision_or_in_waves_gives_the_float32_scores(ray_session, tmp_path, low):
    """precision="int8" / "bfloat16" (deldist.pairwise_lowp), packed and split clusters: the
    same max_sim and duplicate_of as the float32 run; listed similarities exact, bounds sound.
    And the float32 run in waves (memory_budget_gb) gives the same table."""
    x, labels, distance = clustered_with_sizes([1300, 1, 400, 12], 24, seed=9)
    x[[900, 1100]] = x[50]  # exact copies: ties
    runs = {}
    for name, precision, budget in (("float32", "float32", None), ("low", low, None), ("waves", "float32", 1e-6)):
        root = str(tmp_path / name)
        ids = write_run(root, x, labels, distance)
        summary = dedup.run(dedup.Config(output=root, keep="hard", precision=precision, split_rows=1000,
                                         num_buckets=2, task_cpus=0.5, memory_budget_gb=budget))
        assert summary["precision"] == precision and summary["split_clusters"] == 1
        runs[name] = read_scores_by_row(root, ids)
    f32, b16 = runs["float32"], runs["low"]
    # out of core: a budget below one bucket scores every bucket in a wave of its own (the
    # embeddings read once per wave), with the same scores
    for key in ("max_sim", "dup", "rank", "bound"):
        assert np.array_equal(runs["waves"][key], f32[key])
    assert runs["waves"]["neighbours"] == f32["neighbours"]
    assert np.array_equal(f32["rank"], b16["rank"])
    np.testing.assert_allclose(b16["max_sim"], f32["max_sim"], atol=1e-6)
    assert np.array_equal(b16["dup"], f32["dup"])
    x64 = x.astype(np.float64)
    for c in (0, 2):
        members = np.flatnonzero(labels == c)
        members = members[np.argsort(b16["rank"][members])]
        sims = x64[members] @ x64[members].T
        for r, row in enumerate(members):
            listed = b16["neighbours"][row]
            np.testing.assert_allclose(b16["neighbour_sims"][row], sims[r, listed], atol=1e-6)
            unlisted = np.delete(sims[r, :r], listed)
            assert unlisted.max(initial=-np.inf) <= b16["bound"][row] + 1e-6


def test_run_rejects_bad_input(ray_session, tmp_path):
    x, labels, distance = clustered_with_sizes([20, 10], 8, seed=6)
    mismatch = str(tmp_path / "dim")
    write_run(mismatch, x, labels, distance, clusters_dim=16)
    with pytest.raises(EmbeddingError, match="dimension mismatch"):
        dedup.run(dedup.Config(output=mismatch))

    missing = str(tmp_path / "missing")
    write_run(missing, x, labels, distance, drop_assignments=2)
    with pytest.raises(ValueError, match="disagree"):
        dedup.run(dedup.Config(output=missing, task_cpus=0.5))
    assert not storage.is_published(storage.join(missing, "dedup", "scores"))

    nan = str(tmp_path / "nan")
    bad = x.copy()
    bad[3] = np.nan
    write_run(nan, bad, labels, distance)
    with pytest.raises(EmbeddingError, match="NaN"):
        dedup.run(dedup.Config(output=nan, task_cpus=0.5))

    repeated = str(tmp_path / "repeated")
    write_run(repeated, x, labels, distance)
    path = storage.join(repeated, "clusters", "assignments")
    assignments = storage.read_published(path)
    part = storage.join(path, storage.new_part_name())
    storage.write_table(pa.concat_tables([assignments, assignments.slice(0, 2)]), part)
    storage.publish(path, [storage.resolve(part)[1]], storage.read_manifest(path))
    with pytest.raises(ValueError, match="2 duplicate ids"):
        dedup.run(dedup.Config(output=repeated, task_cpus=0.5))

    empty = str(tmp_path / "empty")
    write_run(empty, x[:0], labels[:0], distance[:0], parts=1)
    with pytest.raises(EmptyInputError):
        dedup.run(dedup.Config(output=empty))


@pytest.mark.parametrize("coarse_hash", [False, True])
def test_positions_in_finds_every_id_and_only_those(monkeypatch, coarse_hash):
    """The shuffle's id lookup (binary search on a sorted 53-bit id hash, strings confirmed):
    every id found at its row, absent ids -1; with a hash that collides constantly (string
    length) the exact fallback gives the same answer."""
    if coarse_hash:
        monkeypatch.setattr(shuffle, "id_hash", lambda ids: np.asarray(pc.utf8_length(ids), np.float64))
    ids = [f"site_{i % 7}/v{i // 13}.mp4#{i}" for i in range(500)]
    lookup = shuffle.sorted_lookup(pa.table({"id": ids, "bucket": np.arange(500, dtype=np.int32)}))
    assert list(lookup.column_names) == ["id", "bucket", "id_key"]
    assert np.all(np.diff(lookup.column("id_key").to_numpy()) >= 0)
    query = pa.array(ids[::-3] + ["absent.mp4#1", "site_0/v0.mp4#999999"])
    pos = shuffle.positions_in(query, lookup)
    assert pos[-1] == -1 and pos[-2] == -1
    assert lookup.column("id").take(pa.array(pos[:-2])).to_pylist() == ids[::-3]
    assert shuffle.positions_in(pa.array([], pa.string()), lookup).tolist() == []
    # repeated ids are counted, hash collisions between distinct ids are not
    assert shuffle.duplicate_ids(lookup) == 0
    repeated = ids + ids[10:13] + ids[10:11]
    table = pa.table({"id": repeated, "bucket": np.arange(len(repeated), dtype=np.int32)})
    assert shuffle.duplicate_ids(shuffle.sorted_lookup(table)) == 4


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_sorted_rows_reads_any_range_in_key_order(dtype):
    """SortedRows (a scoring task's slices read a group at a time): every range is the rows of
    the slices sorted by (cluster, rank), float16 widened and normalised; an empty slice
    and a range read after a larger one (buffer reuse) change nothing."""
    rng = np.random.default_rng(3)
    cluster, rank = rng.integers(0, 5, 90), rng.permutation(90)
    x = rng.standard_normal((90, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cuts = [0, 30, 30, 75, 90]  # the second slice is empty
    slices = [(pa.table({"id": pa.array([f"f{i}" for i in range(a, b)], pa.string()), "cluster": cluster[a:b],
                         "rank": rank[a:b]}),
               x[a:b].astype(dtype)) for a, b in zip(cuts[:-1], cuts[1:])]
    order = np.lexsort((rank, cluster))
    want = x[order].astype(dtype).astype(np.float32)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    rows = shuffle.SortedRows(slices)
    assert rows.meta.column("id").to_pylist() == [f"f{i}" for i in order] and len(rows) == 90
    for p0, p1 in [(0, 90), (10, 17), (89, 90), (40, 40), (0, 90), (5, 60)]:
        np.testing.assert_allclose(rows[p0:p1], want[p0:p1], atol=1e-6)
    whole, meta = shuffle.gather_sorted(slices)
    np.testing.assert_allclose(whole, want, atol=1e-6)
    assert meta.equals(rows.meta)


def test_route_shard_slices_from_the_reused_buffer_match_fresh_ones(tmp_path):
    """A Ray read task's slices are views of one buffer its process reuses (returns are copied
    into the object store first); they hold the same rows and ids as fresh arrays, and a
    second, smaller shard read into the same buffer is right too."""
    from test_cluster import write_embeddings

    rng = np.random.default_rng(5)
    x = rng.standard_normal((120, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    emb = str(tmp_path / "embeddings")
    ids = write_embeddings(emb, x, parts=4, order=rng.permutation(120))
    lookup = shuffle.sorted_lookup(pa.table({"id": ids, "bucket": pa.array(rng.integers(-1, 3, 120), pa.int32()),
                                             "cluster": pa.array(np.arange(120) % 7, pa.int32())}))
    for shard in shards.plan_shards(emb, shard_rows=70):  # 60 + 60 rows: the buffer is reused, not grown
        fresh = shuffle.route_shard(emb, shard, 16, lookup, 3)
        reused = shuffle.route_shard(emb, shard, 16, lookup, 3, reuse_buffer=True)
        assert fresh[-1] == reused[-1]
        for (meta_a, rows_a), (meta_b, rows_b) in zip(fresh[:-1], reused[:-1]):
            assert meta_a.equals(meta_b)
            np.testing.assert_array_equal(rows_a, rows_b)
            row_of = {f"v{i % 5}.mp4#{i}": i for i in range(120)}
            np.testing.assert_allclose(rows_b, x[[row_of[i] for i in meta_b.column("id").to_pylist()]], atol=1e-6)


def test_cluster_groups_pack_consecutive_clusters():
    groups = dedup_scores.cluster_groups(np.array([5, 3, 0, 9, 2, 2, 1]), 8)
    assert groups == [(0, 3), (3, 4), (4, 7)]  # 9 rows: a group of its own
    assert dedup_scores.cluster_groups(np.array([], np.int64), 8) == []
