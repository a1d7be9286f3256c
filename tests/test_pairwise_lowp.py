"""deldist.pairwise_lowp: the int8 and bfloat16 margins hold on adversarial rows, and the
low-precision kernels' results are the float32 kernel's (max, argmax, exact listed values, a
sound bound, the same kept-aware decisions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deldist import bf16_tiles, greedy, int8_tiles, lowp_tiles, pairwise, pairwise_lowp, tiles

PRECISIONS = ["int8", "bfloat16"]


def near_dup_rows(n: int, dim: int, seed: int, copies: int, spread: float = 0.05) -> np.ndarray:
    """Unit rows around one centre (all pairwise similarities high, as in a tight cluster),
    ``copies`` of them near-copies of an earlier row."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(dim) + 0.6 * rng.standard_normal((n, dim))
    src = rng.integers(0, n - 1, copies)
    dst = np.minimum(src + rng.integers(1, 20, copies), n - 1)
    x[dst] = x[src] + spread * rng.standard_normal((copies, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def adversarial_rows(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit rows whose every element rounds to bfloat16 with nearly the largest relative
    error (mantissas just below a rounding midpoint), all of one sign: the errors add up."""
    rng = np.random.default_rng(seed)
    mag = 2.0 ** rng.integers(-6, -4, (n, dim))  # powers of two ...
    x = (mag * (1 + 2.0 ** -8 - 2.0 ** -20 * rng.random((n, dim)))).astype(np.float32)  # ... just under +half ulp
    return x / np.linalg.norm(x, axis=1, keepdims=True).astype(np.float32)


def bf16_tile(x: np.ndarray) -> np.ndarray:
    """What the kernel scans: x @ x.T in bfloat16 (as float32)."""
    xb = bf16_tiles.prepare(x).xb[: len(x)]
    return (xb @ xb.T).float().numpy()


@pytest.mark.parametrize("make", [adversarial_rows, lambda n, d, s: near_dup_rows(n, d, s, 40)])
@pytest.mark.parametrize("dim", [16, 768])
def test_margin_bounds_the_bfloat16_error(make, dim):
    x = make(200, dim, 3)
    bf = bf16_tiles.prepare(x)
    delta = bf.margins(0, len(x)).astype(np.float64)
    got = bf16_tile(x).astype(np.float64)
    exact32 = (x @ x.T).astype(np.float64)
    above_one = np.where(got >= 1, bf16_tiles.ABOVE_ONE, 0.0)
    err = np.abs(got - exact32)
    assert np.all(err <= delta[:, None] + above_one)
    if make is adversarial_rows:  # the bound is not loose by orders of magnitude where errors add up
        assert err.max() > 0.25 * delta.max()


def test_margin_uses_the_rounding_error_norms():
    x = near_dup_rows(50, 768, 1, 10)
    bf = bf16_tiles.prepare(x)
    x_bf = bf.xb[: len(x)].float().numpy().astype(np.float64)
    np.testing.assert_allclose(bf.err, np.linalg.norm(x_bf - x, axis=1), rtol=2e-4)
    np.testing.assert_allclose(bf.norm, np.linalg.norm(x.astype(np.float64), axis=1), rtol=2e-4)
    assert np.all(bf.norm >= np.linalg.norm(x.astype(np.float64), axis=1))
    assert np.all(bf.err >= np.linalg.norm(x_bf - x, axis=1))  # rounded up
    assert torch.equal(bf.xb[: len(x)], torch.from_numpy(x).to(torch.bfloat16))  # round to nearest even, as torch
    assert 0.003 < bf.margins(0, len(x)).max() < 0.008  # ~2 x 0.0016 + 2^-9: far below the worst case 3 x 2^-8


def centred_tile(x: np.ndarray) -> tuple[bf16_tiles.Bf16Rows, np.ndarray]:
    """What the pairwise kernel scans: the rows minus their mean in bfloat16, plus the float32
    row and column offsets."""
    rows = bf16_tiles.prepare(x, centre=True)
    rp, cp = lowp_tiles.padded_shape(len(x), len(x))
    return rows, bf16_tiles.Bf16TileProducts(rp, cp)(rows, 0, len(x), rows, 0, len(x))[: len(x), : len(x)]


@pytest.mark.parametrize("make", [adversarial_rows, lambda n, d, s: near_dup_rows(n, d, s, 40)])
@pytest.mark.parametrize("dim", [16, 768])
def test_centred_margin_bounds_the_error(make, dim):
    x = make(200, dim, 3)
    rows, got = centred_tile(x)
    delta = rows.margins(0, len(x)).astype(np.float64)
    err = np.abs(got.astype(np.float64) - (x @ x.T).astype(np.float64))
    assert rows.above_one == 0.0  # the tile is a float32 sum, its rounding is inside delta
    assert np.all(err <= delta[:, None])
    assert err.max() > 0.25 * delta.max()  # measured 0.40-0.57: the bound is not loose by orders of magnitude


def test_centring_narrows_the_margin_of_a_tight_cluster():
    """Rows around one centre: their differences from the mean are ~0.55 long, so the rounding
    of the inputs and of the tile shrink with them (measured 0.0021 against 0.0057)."""
    x = near_dup_rows(300, 768, 5, 40)
    centred = bf16_tiles.prepare(x, centre=True).margins(0, len(x)).max()
    plain = bf16_tiles.prepare(x).margins(0, len(x)).max()
    assert centred < 0.5 * plain
    rows = bf16_tiles.prepare(x, centre=True)
    m = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    np.testing.assert_allclose(rows.col_off[: len(x)], x.astype(np.float64) @ m, rtol=1e-6)
    np.testing.assert_allclose(rows.row_off[: len(x)], x.astype(np.float64) @ m - m.astype(np.float64) @ m, atol=1e-6)
    assert not rows.row_off[len(x):].any() and not rows.col_off[len(x):].any()  # padding rows


def int8_adversarial_rows(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit rows whose quantisation errors and low digits are all near their largest and of
    one sign (values just under q + 1/2 with q = 63 mod 128): every term of the int8 margin
    adds up."""
    rng = np.random.default_rng(seed)
    q = 128 * rng.integers(8, 120, (n, dim)) + 63
    q[:, 0] = int8_tiles.Q_MAX  # the row's largest element fixes its scale at 1
    x = (q + 0.4999 * (np.arange(dim) > 0)).astype(np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def int8_tile(x: np.ndarray) -> np.ndarray:
    rows = int8_tiles.prepare(x)
    rp, cp = lowp_tiles.padded_shape(len(x), len(x))
    return int8_tiles.Int8TileProducts(rp, cp)(rows, 0, len(x), rows, 0, len(x))[: len(x), : len(x)]


@pytest.mark.parametrize("make", [int8_adversarial_rows, adversarial_rows, lambda n, d, s: near_dup_rows(n, d, s, 40)])
@pytest.mark.parametrize("dim", [16, 768])
def test_margin_bounds_the_int8_error(make, dim):
    x = make(200, dim, 3)
    delta = int8_tiles.prepare(x).margins(0, len(x)).astype(np.float64)
    got = int8_tile(x).astype(np.float64)
    err = np.abs(got - (x @ x.T).astype(np.float64))
    assert np.all(err <= delta[:, None])
    if make is int8_adversarial_rows:  # the bound is not loose by orders of magnitude where errors add up
        assert err.max() > 0.25 * delta.max()


def test_int8_digits_and_norms():
    x = near_dup_rows(50, 768, 1, 10)
    rows = int8_tiles.prepare(x)
    x64 = x.astype(np.float64)
    scale = np.abs(x64).max(axis=1) / int8_tiles.Q_MAX
    digits = rows.digits[: len(x)].numpy().astype(np.int64)
    b, a = digits[:, :768], digits[:, 768:1536]
    assert np.array_equal(digits[:, 1536:], b)  # [b, a, b]: the pairs [a, b] and [b, a] are views
    assert np.array_equal(rows.pair_rows[: len(x)].numpy(), np.hstack([a, b]))
    assert np.array_equal(rows.pair_cols[: len(x)].numpy(), np.hstack([b, a]))
    q = 128 * a + b
    assert np.abs(a).max() <= 127 and -64 <= b.min() and b.max() <= 63
    assert np.abs(x64 / scale[:, None] - q).max() <= 0.5 + 1e-3  # q rounds x / s
    np.testing.assert_allclose(rows.scale[: len(x)], scale, rtol=1e-12)
    assert not rows.digits[len(x):].any() and not rows.scale[len(x):].any()  # zero padding rows
    err = np.linalg.norm(x64 - scale[:, None] * q, axis=1)
    np.testing.assert_allclose(rows.err, err, rtol=1e-9)
    np.testing.assert_allclose(rows.lo, scale * np.linalg.norm(b, axis=1), rtol=1e-9)
    np.testing.assert_allclose(rows.norm, np.linalg.norm(x64, axis=1), rtol=1e-9)
    assert np.all(rows.err >= err) and np.all(rows.norm >= np.linalg.norm(x64, axis=1))
    # ~1.3e-4 of rounding and low digits plus the float32 recheck's own D 2^-24: ~25x under bfloat16's
    assert 1e-4 < rows.margins(0, len(x)).max() < 4e-4


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("spec", [None, tiles.ListSpec(), tiles.ListSpec(4, 3, 0.3), tiles.ListSpec(6, 0, 0.9)])
@pytest.mark.parametrize("start,stop", [(0, 700), (300, 650)])
def test_results_are_the_float32_kernels(spec, start, stop, precision):
    x = near_dup_rows(700, 64, seed=5, copies=200)
    x[[410, 411, 600]] = x[77]  # exact copies: ties go to the earliest
    stats: dict[str, int] = {}
    got = pairwise_lowp.triu_neighbours_lowp(x, start, stop, spec, precision, block_rows=128, col_block=256,
                                            stats=stats)
    if spec is None:
        ref = pairwise.triu_max_sim(x, start, stop)
    else:
        ref = pairwise.triu_neighbours(x, start, stop, spec)
    np.testing.assert_allclose(got[0], ref[0], atol=1e-6)
    same = got[1] == ref[1]
    x64 = x.astype(np.float64)
    rows = np.arange(start, stop)
    tie = np.abs(np.einsum("ij,ij->i", x64[rows], x64[np.maximum(got[1], 0)])
                 - np.einsum("ij,ij->i", x64[rows], x64[np.maximum(ref[1], 0)])) < 1e-6
    assert np.all(same | tie) and same.mean() > 0.99
    assert got[1][410 - start] == ref[1][410 - start] == 77 if start <= 410 < stop else True
    assert stats["candidates"] > 0
    if spec is None:
        return
    idx, sim, bound = got[2:]
    for r, i in enumerate(rows):
        s64 = x64[:i] @ x64[i]
        listed = idx[r][idx[r] >= 0]
        np.testing.assert_allclose(sim[r][idx[r] >= 0], s64[listed], atol=1e-6)  # exact values
        assert np.all(s64[listed] >= spec.floor - 1e-6)
        unlisted = np.delete(s64, listed)
        assert unlisted.max(initial=-np.inf) <= bound[r] + 1e-6  # the bound is sound
        assert bound[r] >= spec.floor
    # the lists are useful, not just sound: most rows list at least as many items as float32's
    assert (np.sum(idx >= 0, axis=1) >= np.sum(ref[2] >= 0, axis=1) - 2).mean() > 0.9


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("threshold", [0.8, 0.9, 0.95, 0.99])
def test_kept_aware_decisions_match_the_float32_run(threshold, precision):
    x = near_dup_rows(600, 48, seed=7, copies=250, spread=0.1)
    spec = tiles.ListSpec()
    candidate = np.random.default_rng(1).random(len(x)) > 0.1  # some rows removed by earlier rules
    exact_kept, _, _ = pairwise.keep_first_exact(x, candidate, threshold)
    decided = []
    for lists in (pairwise.triu_neighbours(x, spec=spec), pairwise_lowp.triu_neighbours_lowp(x, spec=spec,
                                                                                               precision=precision)):
        _, _, idx, sim, bound = lists
        src = np.repeat(np.arange(len(x)), idx.shape[1])
        live = idx.ravel() >= 0
        edges = greedy.NeighbourEdges.from_pairs(src[live], idx.ravel()[live], sim.ravel()[live], bound, spec.floor)
        kept, dup, dup_sim, unresolved = greedy.resolve_kept(candidate, edges, threshold)
        # up to the first unresolved row the lists decide alone; the selection recomputes the rest
        first = int(np.argmax(unresolved)) if unresolved.any() else len(x)
        decided.append(first)
        assert np.array_equal(kept[:first], exact_kept[:first])
        removed = np.flatnonzero(~kept[:first] & candidate[:first])
        assert np.all(exact_kept[dup[removed]]) and np.all(dup_sim[removed] > threshold)
    # the low-precision bounds leave the exact fallback little more (int8's are ~float32's)
    assert decided[1] >= (0.95 if precision == "int8" else 0.5) * decided[0]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_row_whose_window_overflows_is_recomputed_in_float32(precision):
    rng = np.random.default_rng(0)
    base = rng.standard_normal(32)
    x = base + 1e-3 * rng.standard_normal((300, 32))  # 300 rows within either tile's margin of each other
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    stats: dict[str, int] = {}
    got = pairwise_lowp.triu_neighbours_lowp(x, spec=None, precision=precision, window=8, stats=stats)
    ref = pairwise.triu_max_sim(x)
    assert stats["fallback_rows"] > 100
    np.testing.assert_allclose(got[0], ref[0], atol=1e-6)
    # The rows' similarities differ by about float32's rounding near 1 (the float64 best leads
    # the second best by 6e-8 at the median), so which earlier row is "the" argmax depends on
    # the BLAS kernel's summation order (OpenBLAS's Haswell and SkylakeX kernels disagree on
    # 12 % of these rows). What must hold: every argmax is an earlier row whose float64
    # similarity is the row's float64 max to within float32 rounding (4e-7; float32's own
    # kernel is within 3e-7; a random earlier row passes for 15 % of rows), and the argmax
    # is the float64 one about as often as the float32 kernel's is.
    x64 = x.astype(np.float64)
    s64 = np.tril(x64 @ x64.T, -1) + np.triu(np.full((len(x), len(x)), -np.inf))
    rows = np.arange(1, len(x))
    assert np.all((got[1][rows] >= 0) & (got[1][rows] < rows))
    best = s64[rows].max(axis=1)
    assert np.all(s64[rows, got[1][rows]] >= best - 4e-7)
    exact = s64[rows].argmax(axis=1)
    assert (got[1][rows] == exact).mean() >= (ref[1][rows] == exact).mean() - 0.05


@pytest.mark.parametrize("precision", PRECISIONS)
def test_tile_shapes_must_be_padded_multiples(precision):
    with pytest.raises(ValueError, match="multiple"):
        pairwise_lowp.triu_neighbours_lowp(near_dup_rows(10, 8, 0, 2), precision=precision, block_rows=100)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_nearest_lowp_gives_the_float32_labels(precision):
    """The k-means assignment from low-precision scores: labels and similarities of the
    float32 (faiss) search, ties to the lower centroid index, including rows equal to a
    centroid."""
    from deldist import kmeans

    x = near_dup_rows(3000, 64, seed=11, copies=600)
    centroids = kmeans.normalize_rows(x[:: 37].copy() + 0.01)
    x[[5, 6]] = centroids[[3, 3]]  # rows on a centroid
    centroids[9] = centroids[4]  # duplicate centroids: the tie goes to 4
    x[7] = centroids[4]
    stats: dict[str, int] = {}
    labels, sims = pairwise_lowp.nearest_lowp(x, centroids, precision, stats=stats)
    ref_sims = x.astype(np.float64) @ centroids.astype(np.float64).T
    ref = ref_sims.argmax(axis=1)
    close = np.abs(ref_sims[np.arange(len(x)), labels] - ref_sims.max(axis=1)) < 1e-6
    assert np.all((labels == ref) | close) and (labels == ref).mean() > 0.99
    np.testing.assert_allclose(sims, ref_sims.max(axis=1), atol=1e-6)
    assert labels[7] == 4 and labels[5] == labels[6] == 3
    faiss_labels, _ = kmeans.nearest_centroid(x, centroids, precision="float32")
    assert (faiss_labels == labels).mean() > 0.99
    auto_labels, _ = kmeans.nearest_centroid(x, centroids, precision=precision)
    assert np.array_equal(auto_labels, labels)
    assert stats["candidates"] >= len(x)
    empty = pairwise_lowp.nearest_lowp(x[:0], centroids, precision)
    assert len(empty[0]) == 0


@pytest.mark.parametrize("amx, avx512_bf16, want", [(True, True, "int8"), (False, True, "bfloat16"),
                                                    (False, False, None)])
def test_fastest_supported_follows_the_cpu(monkeypatch, amx, avx512_bf16, want):
    """int8 where AMX multiplies it (measured fastest there), bfloat16 on AVX512-BF16 without
    AMX (measured on an AMD Zen 5), else float32."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert pairwise_lowp.fastest_supported() == want

