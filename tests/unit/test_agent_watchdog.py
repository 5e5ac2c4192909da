"""Unit: the step watchdog's decision (time is a parameter)."""

from __future__ import annotations

from verlyard_agent.watchdog import StepWatch, WatchdogPolicy, median


def test_it_is_not_armed_until_the_first_step():
    watch = StepWatch(WatchdogPolicy(floor_s=120))
    assert not watch.armed and watch.check(10_000.0) is None and watch.seconds_until_due(0.0) is None


def test_the_floor_applies_while_steps_are_fast():
    watch = StepWatch(WatchdogPolicy(floor_s=120, factor=10))
    for step in range(1, 11):
        watch.observe(step, float(step))  # 1 s per step: 10 x median = 10 s < floor
    assert watch.limit_s() == 120
    assert watch.check(10 + 119.0) is None
    hang = watch.check(10 + 120.0)
    assert hang is not None and hang.step == 10 and "after step 10" in hang.reason
    assert "floor 120 s" in hang.reason


def test_slow_steps_raise_the_limit_to_factor_times_the_median():
    watch = StepWatch(WatchdogPolicy(floor_s=120, factor=10))
    t = 0.0
    for step in range(1, 6):
        watch.observe(step, t)
        t += 30.0
    last = t - 30.0
    assert watch.limit_s() == 300
    assert watch.check(last + 299) is None and watch.check(last + 300) is not None
    assert watch.seconds_until_due(last + 100) == 200


def test_repeated_or_older_steps_do_not_count_as_progress():
    watch = StepWatch(WatchdogPolicy(floor_s=10))
    watch.observe(5, 0.0)
    watch.observe(5, 8.0)
    watch.observe(3, 9.0)
    assert watch.last_step == 5 and watch.check(10.0) is not None


def test_a_jump_of_several_steps_is_timed_per_step():
    watch = StepWatch(WatchdogPolicy(floor_s=1, factor=10))
    watch.observe(0, 0.0)
    watch.observe(10, 20.0)  # 10 steps in 20 s: 2 s each
    assert watch.limit_s() == 20


def test_median():
    assert (median([]), median([3.0]), median([1.0, 5.0, 2.0]), median([1.0, 2.0, 3.0, 10.0])) == (0, 3, 2, 2.5)
