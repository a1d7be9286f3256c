"""Small NumPy helpers shared by the pure math modules (no Ray, no I/O)."""

from __future__ import annotations

import numpy as np


def equal_runs(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the runs of equal values in ``sorted_keys`` (n,): run i is
    ``sorted_keys[starts[i]:ends[i]]``. Empty input -> two empty int64 arrays."""
    keys = np.asarray(sorted_keys)
    if not len(keys):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.r_[0, np.flatnonzero(keys[1:] != keys[:-1]) + 1].astype(np.int64)
    return starts, np.r_[starts[1:], len(keys)].astype(np.int64)
