"""The idle throttle on Ray Data's scheduling loop: it sleeps only after a step that returned
at once (nothing running to wait on), and ``init_ray`` registers it on the DataContext."""

from __future__ import annotations

# deldist.runtime imports Ray, which reads its auth settings from the environment once:
# imported here at collection time, before the session's cluster sets them, ray.init fails


def test_idle_throttle_sleeps_only_after_instant_steps(ray_session, monkeypatch):
    from deldist import runtime

    clock = [100.0]
    slept: list[float] = []
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(runtime.time, "sleep", slept.append)
    throttle = runtime.IdleSchedulingThrottle()
    clock[0] += 0.1  # a step that blocked in ray.wait (tasks running)
    throttle.on_execution_step(None)
    assert slept == []
    clock[0] += 0.0005  # a step with nothing to wait on: the loop would spin
    throttle.on_execution_step(None)
    assert slept == [runtime.IDLE_SLEEP_S]


def test_the_throttle_registers_once_and_only_where_asked(ray_session):
    import ray.data

    from deldist import runtime

    classes = ray.data.DataContext.get_current().custom_execution_callback_classes
    before = classes.count(runtime.IdleSchedulingThrottle)
    runtime.init_ray()  # every stage: no throttle
    assert classes.count(runtime.IdleSchedulingThrottle) == before
    runtime.throttle_idle_scheduling()  # pretrain's
    runtime.throttle_idle_scheduling()
    assert classes.count(runtime.IdleSchedulingThrottle) == 1


def test_task_slots_and_gpu_setting(ray_session):
    from deldist import runtime

    assert runtime.task_slots(0.5) == 4 and runtime.task_slots(1.0) == 2 and runtime.task_slots(8.0) == 1
    assert runtime.use_gpu(None) is False and runtime.use_gpu(True) is True  # the session cluster has no GPU


ZEN4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"


def test_blas_core_type_for_zen4_and_zen5(monkeypatch):
    """OpenBLAS is told to use its Zen kernels on AMD family 25 with AVX-512 (Zen 4), its
    SkylakeX kernels on family 26 (Zen 5, full-width AVX-512), nothing elsewhere; the pick
    replaces a machine-wide value, and DELDIST_OPENBLAS_CORETYPE overrides the pick."""
    from deldist import runtime

    assert runtime.blas_core_type(ZEN4) == "ZEN"
    assert runtime.blas_core_type(ZEN4.replace(" avx512f avx512_bf16", "")) is None  # Zen 3: OpenBLAS's own pick
    assert runtime.blas_core_type(ZEN4.replace("25", "26")) == "SKYLAKEX"  # Zen 5: full-width AVX-512
    assert runtime.blas_core_type(ZEN4.replace("AuthenticAMD", "GenuineIntel")) is None
    assert runtime.blas_core_type("") is None
    monkeypatch.setenv("DELDIST_OPENBLAS_CORETYPE", "HASWELL")
    monkeypatch.setenv("OPENBLAS_CORETYPE", "ZEN")
    assert runtime.tune_worker_blas() == "HASWELL"
    assert runtime.os.environ["OPENBLAS_CORETYPE"] == "HASWELL"
    monkeypatch.delenv("DELDIST_OPENBLAS_CORETYPE")
    with open("/proc/cpuinfo") as f:
        pick = runtime.blas_core_type(f.read(16_384))
    monkeypatch.setenv("OPENBLAS_CORETYPE", "PRESCOTT")
    assert runtime.tune_worker_blas() == pick
    assert runtime.os.environ["OPENBLAS_CORETYPE"] == (pick or "PRESCOTT")
