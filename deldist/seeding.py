"""k-means seeding (pure math: no Ray, no I/O): greedy k-means++ with cosine distance, its
multi-threaded steps, uniform random seeding, and the seeding sample's size."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator,
                     local_trials: int | None = None, threads: int = 1) -> np.ndarray:
    """Greedy k-means++ seeding on unit rows ``x`` (m, D) with cosine distance -> (k, D).

    For unit vectors ``||a - b||^2 = 2 (1 - cos)``, so sampling proportional to the cosine
    distance to the nearest chosen centre is the D^2 weighting of k-means++. Greedy variant
    (as in scikit-learn): each step draws ``local_trials`` (default 2 + ln k) candidates and
    keeps the one that lowers the total distance most; the candidates are scored with one
    (trials, D) x (D, m) product. k steps in all, each a pass over ``x``: keep m modest (see
    :func:`default_init_sample_size`); ``deldist cluster`` seeds in one Ray task that takes a
    node's CPUs (nothing else runs then).
    Rows at zero distance from a chosen centre (duplicates) are never drawn while any row at
    positive distance remains; when none remains, the rest are drawn uniformly.
    ``threads``: the candidates' product is split by rows of ``x`` over that many threads
    (each step reads all of ``x``: memory-bound, ~35 ms per step for 40,000 x 768 on one core
    of this VM, half that on two); the same centroids for any count.
    """
    m = len(x)
    if k > m:
        raise ValueError(f"k-means++ needs at least k={k} rows, got {m}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    trials = local_trials or 2 + int(np.log(k))
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(m)
    closest = np.maximum(1.0 - x @ x[chosen[0]], 0.0).astype(np.float64)
    closest[chosen[0]] = 0.0
    taken = np.zeros(m, dtype=bool)
    taken[chosen[0]] = True
    with ThreadPoolExecutor(threads) if threads > 1 else nullcontext() as pool:
        _seed_steps(x, k, rng, trials, chosen, closest, taken, pool, threads)
    return x[chosen].copy()


def _candidate_distances(x: np.ndarray, picks: np.ndarray, pool: ThreadPoolExecutor | None, threads: int,
                         ) -> np.ndarray:
    """(len(picks), m) cosine distances of the picked rows to every row, clipped at 0; over
    ``pool``'s ``threads`` threads by row blocks of ``x`` (NumPy's BLAS releases the GIL)."""
    picked = x[picks]
    if pool is None:
        return np.maximum(1.0 - picked @ x.T, 0.0)
    out = np.empty((len(picks), len(x)), np.float32)
    step = -(-len(x) // threads)

    def block(a: int) -> None:
        out[:, a:a + step] = np.maximum(1.0 - picked @ x[a:a + step].T, 0.0)

    list(pool.map(block, range(0, len(x), step)))
    return out


def _seed_steps(x: np.ndarray, k: int, rng: np.random.Generator, trials: int, chosen: np.ndarray,
                closest: np.ndarray, taken: np.ndarray, pool: ThreadPoolExecutor | None, threads: int) -> None:
    """Steps 1..k-1 of :func:`kmeans_plus_plus` (in place on chosen / closest / taken)."""
    m = len(x)
    for i in range(1, k):
        cumulative = np.cumsum(closest)
        total = cumulative[-1]
        if total <= 0:
            pick = int(rng.choice(np.flatnonzero(~taken)))
            distance = np.maximum(1.0 - x @ x[pick], 0.0)
        else:
            picks = np.searchsorted(cumulative, rng.random(trials) * total, side="right")
            picks = np.unique(np.minimum(picks, m - 1))
            picks = picks[closest[picks] > 0]
            if len(picks) == 0:  # float edge: only zero-weight rows were hit
                picks = np.flatnonzero(closest > 0)[:1]
            candidate = _candidate_distances(x, picks, pool, threads)  # (trials, m)
            potential = np.minimum(closest[None, :], candidate).sum(axis=1)
            best = int(np.argmin(potential))
            pick = int(picks[best])
            distance = candidate[best]
        chosen[i] = pick
        taken[pick] = True
        np.minimum(closest, distance, out=closest)
        closest[pick] = 0.0


def random_init(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct rows of ``x`` (m, D) chosen uniformly (faiss' default seeding) -> (k, D)."""
    if k > len(x):
        raise ValueError(f"random init needs at least k={k} rows, got {len(x)}")
    return x[rng.choice(len(x), size=k, replace=False)].astype(np.float32, copy=True)


def default_init_sample_size(k: int, n_fit: int) -> int:
    """Rows k-means++ seeds from: 4 per cluster, at least 4096 (k passes over them)."""
    return min(n_fit, max(4 * k, 4096))


def init_sample(x: np.ndarray, k: int, size: int | None, rng: np.random.Generator) -> np.ndarray:
    """The rows seeding draws from: ``size`` (default :func:`default_init_sample_size`) of ``x``."""
    size = size or default_init_sample_size(k, len(x))
    size = max(min(size, len(x)), min(k, len(x)))
    if size >= len(x):
        return x
    return x[np.sort(rng.choice(len(x), size=size, replace=False))]
