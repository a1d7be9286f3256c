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


def test_init_ray_registers_the_throttle_once(ray_session):
    import ray.data

    from deldist import runtime

    runtime.init_ray()
    runtime.init_ray()
    classes = ray.data.DataContext.get_current().custom_execution_callback_classes
    assert classes.count(runtime.IdleSchedulingThrottle) == 1
