"""deldist.arrays.equal_runs against a plain Python grouping."""

from __future__ import annotations

import itertools

import numpy as np

from deldist.arrays import equal_runs


def test_equal_runs_matches_groupby():
    rng = np.random.default_rng(0)
    for keys in (np.sort(rng.integers(0, 5, 40)), np.array([3]), np.array([1, 1, 1]), np.arange(6),
                 np.array(["a", "a", "b"])):
        starts, ends = equal_runs(keys)
        runs = [(k, len(list(g))) for k, g in itertools.groupby(keys.tolist())]
        assert [keys[s] for s in starts] == [k for k, _ in runs]
        assert (ends - starts).tolist() == [n for _, n in runs]
        assert starts[0] == 0 and ends[-1] == len(keys) and (starts[1:] == ends[:-1]).all()
    starts, ends = equal_runs(np.zeros(0, np.int64))
    assert starts.dtype == ends.dtype == np.int64 and len(starts) == len(ends) == 0
