"""Fault injection for the fault tests: a stage's ``inject_fault`` setting names a point where
the process running it exits hard, once per run root, as a killed worker, actor or driver
would. Off (``None``) in every real run; training has its own hook
(``inject_failure_at_step``, :func:`deldist.trainer.maybe_inject_failure`).

Points: ``decode_task`` (an embed decode task's worker), ``encoder_actor`` (an embed encoder
actor, on its first batch), ``score_task`` (a dedup scoring task's worker), ``before_publish``
(the driver of embed, dedup or select, after its parts are written and before its manifest).
"""

from __future__ import annotations

import os
from typing import Literal, get_args

from deldist import storage

FaultPoint = Literal["decode_task", "encoder_actor", "score_task", "before_publish"]
POINTS = get_args(FaultPoint)
EXIT_CODE = 86


def fail_once(point: str, wanted: str | None, root: str) -> None:
    """Exit the process hard if ``wanted`` names ``point`` and it has not failed there yet
    in the run root ``root`` (a marker under ``<root>/_faults/`` records that it has)."""
    if wanted != point:
        return
    marker = storage.join(root, "_faults", point)
    if storage.exists(marker):
        return
    storage.write_bytes(marker, b"")
    os._exit(EXIT_CODE)
