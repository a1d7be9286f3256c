"""Training dynamics of the segmentation finetune loop: each training forward pass's per-sample
Dice and EL2N (:mod:`deldist.importance`), recorded on every worker, gathered into rank 0's
checkpointed state at the end of each epoch (so a resumed run keeps what it recorded), and
written by rank 0 as ``finetune/<name>/dynamics/`` when training ends.

``dynamics/`` (a published table): one row per pass of a sample, ``id`` (the labelled image's
frame id, ``<image file name>#0``, what ``deldist embed input=<data>/images`` names it),
``epoch`` (1-based), ``step`` (the optimizer step the pass fed), ``rank``, ``dice``, ``el2n``.
``train_set/``: every id of the training split (the samples a pruning decides on), with its
image file name and data set name.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from deldist import storage

DYNAMICS = "dynamics"
TRAIN_SET = "train_set"
DYNAMICS_SCHEMA = pa.schema([("id", pa.string()), ("epoch", pa.int32()), ("step", pa.int64()), ("rank", pa.int32()),
                             ("dice", pa.float32()), ("el2n", pa.float32())])
TRAIN_SET_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("dataset", pa.string())])


class PassRecorder:
    """One worker's recording: :meth:`add` per training batch, :meth:`end_epoch` on every
    worker at the end of each epoch (a collective: it gathers every worker's rows)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.pending: list[Any] = []

    def add(self, index: Any, epoch: int, step: int, logits: Any, masks: Any) -> None:
        """index: (B,) int64 sample indices; logits (B, K, H, W); masks (B, H, W), as trained on."""
        import torch

        from deldist.importance import argmax_dice, pixel_el2n

        with torch.no_grad():
            dice, el2n = argmax_dice(logits, masks).cpu(), pixel_el2n(logits, masks).cpu()
        n = len(dice)
        meta = torch.tensor([[epoch, step, self.rank]], dtype=torch.float64).expand(n, 3)
        self.pending.append(torch.cat([index.cpu().double().view(n, 1), meta,
                                       dice.double().view(n, 1), el2n.double().view(n, 1)], dim=1))

    def end_epoch(self, state: dict[str, Any]) -> None:
        """Gather this epoch's rows of every worker into ``state["dynamics"]`` ((N, 6) float64:
        index, epoch, step, rank, dice, el2n)."""
        import torch

        from deldist.trainer import all_gather_rows

        mine = torch.cat(self.pending) if self.pending else torch.zeros((0, 6), dtype=torch.float64)
        rows = all_gather_rows(mine)
        self.pending = []
        before = state.get("dynamics")
        state["dynamics"] = rows if before is None else torch.cat([before, rows])


def dynamics_table(rows: np.ndarray, ids: list[str]) -> pa.Table:
    """(N, 6) recorded rows (:meth:`PassRecorder.end_epoch`) -> the ``dynamics`` table; ``ids``
    maps a sample index to its id."""
    index = rows[:, 0].astype(np.int64)
    return pa.table({"id": pa.array(np.asarray(ids, dtype=object)[index], pa.string()),
                     "epoch": rows[:, 1].astype(np.int32), "step": rows[:, 2].astype(np.int64),
                     "rank": rows[:, 3].astype(np.int32), "dice": rows[:, 4].astype(np.float32),
                     "el2n": rows[:, 5].astype(np.float32)}, schema=DYNAMICS_SCHEMA)


def write_dynamics(run_dir: str, rows: Any, ids: list[str], train_index: list[int], dataset: str) -> None:
    """Rank 0 at the end: publish ``dynamics/`` and ``train_set/`` under ``run_dir``.
    rows: the (N, 6) tensor of ``state["dynamics"]`` (None: nothing recorded)."""
    from deldist.ids import split_id

    table = dynamics_table(np.zeros((0, 6)) if rows is None else rows.numpy(), ids)
    train_ids = [ids[i] for i in train_index]
    train = pa.table({"id": train_ids, "source": [split_id(i)[0] for i in train_ids],
                      "dataset": [dataset] * len(train_ids)}, schema=TRAIN_SET_SCHEMA)
    storage.replace_table(storage.join(run_dir, DYNAMICS), table)
    storage.replace_table(storage.join(run_dir, TRAIN_SET), train)
