"""Ray connection shared by every stage's ``run``: join ``RAY_ADDRESS`` when set, else start
(or reuse) a local cluster. Tests start one cluster per session and every stage reuses it.

Also the cluster's resources as stages ask for them (GPUs, task slots), and the idle
scheduling throttle that only ``deldist pretrain`` registers (the one stage whose Ray Data
stream sits backpressured for hours)."""

from __future__ import annotations

import os
import time
from typing import Any

import ray

try:  # Ray Data's executor callback hook (registered through the public DataContext field)
    from ray.data._internal.execution.execution_callback import ExecutionCallback
except ImportError:  # pragma: no cover - another Ray version: run without the throttle
    ExecutionCallback = None  # type: ignore[assignment,misc]

IDLE_STEP_S = 0.002
IDLE_SLEEP_S = 0.05


if ExecutionCallback is not None:

    class IdleSchedulingThrottle(ExecutionCallback):
        """Sleeps 50 ms after a scheduling step of Ray Data's executor that returned at once.

        The executor's loop blocks (in ``ray.wait``) only while tasks run. When every operator
        is backpressured, e.g. a training stream that is ahead of its trainers, no task runs
        and the loop spins: 87 % of a core in the SplitCoordinator, measured here, taken from
        the trainers. Throttled it uses 7 %; new tasks start at most 50 ms later than they
        could, while the trainers draw on blocks already made."""

        def __init__(self) -> None:
            self.last = time.perf_counter()

        def on_execution_step(self, executor: object) -> None:
            if time.perf_counter() - self.last < IDLE_STEP_S:
                time.sleep(IDLE_SLEEP_S)
            self.last = time.perf_counter()


def throttle_idle_scheduling() -> None:
    """Register ``IdleSchedulingThrottle`` on this process's DataContext (datasets created
    afterwards carry it to wherever they execute)."""
    if ExecutionCallback is None:
        return
    from ray.data import DataContext

    classes = DataContext.get_current().custom_execution_callback_classes
    if IdleSchedulingThrottle not in classes:
        classes.append(IdleSchedulingThrottle)


def blas_core_type(cpuinfo: str) -> str | None:
    """The OpenBLAS kernel set to run on the CPU ``/proc/cpuinfo`` describes, where deldist has
    measured a better one than a generic choice; None elsewhere (OpenBLAS's own pick).

    deldist's own rule, from measurements of the dedup kernel's tiles (64-256 rows x 768) and of
    1024 x 1024, one core (bench/RESULTS.md):
    - AMD Zen 4 (family 25 with AVX-512) splits 512-bit operations in two: OpenBLAS picks its
      SkylakeX kernels, whose small-matrix path ran the tiles at 73-76 GFLOPS, against 94-96
      with its Zen kernels (2026-12-01, fourth session) -> ``ZEN``.
    - AMD Zen 5 and later (family >= 26 with AVX-512) have full-width AVX-512: the SkylakeX
      kernels ran the tiles at 130-190 GFLOPS and 1024 x 1024 at 207-210, against 102-110 with
      the Haswell or Zen kernels (AVX2) (2026-12-02) -> ``SKYLAKEX``."""
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines()[:40] if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = fields.get("flags", "").split()
    if fields.get("vendor_id") != "AuthenticAMD" or "avx512f" not in flags:
        return None
    family = int(fields.get("cpu family", "0") or 0)
    if family == 25:
        return "ZEN"
    if family >= 26:
        return "SKYLAKEX"
    return None


def tune_worker_blas() -> str | None:
    """Set ``OPENBLAS_CORETYPE`` in this process's environment, which a local Ray cluster's
    workers inherit (OpenBLAS reads it when NumPy loads, so it cannot be changed later in a
    process). Returns the value set, or None when left alone.

    ``DELDIST_OPENBLAS_CORETYPE``, when set, is the value used. Otherwise deldist's pick for the
    CPU (:func:`blas_core_type`) replaces any other value, with a warning: a machine-wide
    ``OPENBLAS_CORETYPE=Haswell`` (a common workaround from before OpenBLAS knew Zen 5) runs
    float32 products on a Zen 5 at half its rate. On a remote cluster set it in the job's
    ``runtime_env`` ``env_vars`` (README)."""
    import logging

    core = os.environ.get("DELDIST_OPENBLAS_CORETYPE")
    if not core:
        try:
            with open("/proc/cpuinfo") as f:
                core = blas_core_type(f.read(16_384))
        except OSError:
            return None
    if core is None:
        return None
    previous = os.environ.get("OPENBLAS_CORETYPE")
    if previous and previous.upper() != core.upper():
        logging.getLogger("deldist").warning(
            "OPENBLAS_CORETYPE=%s replaced by %s for deldist's local workers (faster on this CPU; set "
            "DELDIST_OPENBLAS_CORETYPE to choose)", previous, core)
    os.environ["OPENBLAS_CORETYPE"] = core
    return core


def init_ray() -> None:
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    if address is None:
        tune_worker_blas()
    ray.init(address=address, include_dashboard=False if address is None else None,
             logging_level="WARNING")


def cluster_gpus() -> float:
    """GPUs in the whole cluster now (autoscaling clusters may add more later)."""
    return float(ray.cluster_resources().get("GPU", 0.0))


def use_gpu(setting: bool | None) -> bool:
    """A stage's ``use_gpu`` setting, or (None) whether the cluster has GPUs now."""
    return cluster_gpus() > 0 if setting is None else bool(setting)


def largest_node_cpus() -> float:
    """The CPUs of the alive node that has most (what one task can take whole)."""
    return max((float(node["Resources"].get("CPU", 0.0)) for node in ray.nodes() if node.get("Alive")), default=1.0)


def wave_budget(memory_budget_gb: float | None) -> float:
    """Bytes of vectors one wave of a shuffle may hold in the object store: ``memory_budget_gb``,
    or half the object store (the other half for the task results and the next wave's reads)."""
    if memory_budget_gb is not None:
        return memory_budget_gb * 2 ** 30
    return 0.5 * ray.cluster_resources().get("object_store_memory", 2 * 2 ** 30)


def task_slots(task_cpus: float) -> int:
    """How many tasks of ``task_cpus`` CPUs the cluster holds now (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1.0) // task_cpus))


def get_with_progress(refs: list, what: str, logger: Any, every_s: float = 10.0) -> list:
    """``ray.get(refs)`` in order, logging ``what: i/n done`` as tasks finish (at most every
    ``every_s`` seconds, and once at the end), so a long stage shows it is moving."""
    remaining, done, last = list(refs), 0, time.perf_counter()
    while remaining:
        ready, remaining = ray.wait(remaining, num_returns=len(remaining), timeout=every_s)
        done += len(ready)
        if (time.perf_counter() - last >= every_s and remaining) or not remaining:
            logger.info(f"{what}: {done}/{len(refs)} done")
            last = time.perf_counter()
    return ray.get(refs)
