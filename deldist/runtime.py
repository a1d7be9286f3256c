"""Ray connection shared by every stage's ``run``: join ``RAY_ADDRESS`` when set, else start
(or reuse) a local cluster. Tests start one cluster per session and every stage reuses it."""

from __future__ import annotations

import os

import ray


def init_ray() -> None:
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, include_dashboard=False if address is None else None,
             logging_level="WARNING")


def cluster_gpus() -> float:
    """GPUs in the whole cluster now (autoscaling clusters may add more later)."""
    return float(ray.cluster_resources().get("GPU", 0.0))
