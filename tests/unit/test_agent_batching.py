"""Unit: telemetry batching and progress throttling (time is a parameter)."""

from __future__ import annotations

from verlyard_agent.batching import Batcher, Progress, Throttle


def test_a_batch_is_full_at_max_items_and_due_after_max_age():
    b: Batcher[int] = Batcher(max_items=3, max_age_s=0.1)
    assert b.deadline() is None
    assert b.add(1, 10.0) is False and b.add(2, 10.05) is False
    assert b.deadline() == 10.1 and not b.due(10.09) and b.due(10.1)
    assert b.add(3, 10.06) is True
    assert b.take() == [1, 2, 3] and len(b) == 0 and b.deadline() is None


def test_a_batch_is_full_at_max_bytes():
    b: Batcher[str] = Batcher(max_items=100, max_age_s=1.0, max_bytes=10)
    assert b.add("aaaa", 0.0, size=4) is False
    assert b.add("bbbbbb", 0.0, size=6) is True


def test_progress_goes_out_at_most_once_per_interval_and_the_last_one_always():
    t = Throttle(1.0)
    assert t.offer(Progress(step=1, total_steps=10), 0.0) == Progress(step=1, total_steps=10)
    assert t.offer(Progress(step=2, total_steps=10), 0.2) is None
    assert t.offer(Progress(step=3, total_steps=10), 0.4) is None
    assert t.pending_due_at() == 1.0
    assert t.take_pending(1.0) == Progress(step=3, total_steps=10)
    assert t.take_pending(1.1) is None
    assert t.offer(Progress(step=3, total_steps=10), 5.0) is None, "a step already sent is not sent again"
    assert t.offer(Progress(step=4, total_steps=10), 5.0) == Progress(step=4, total_steps=10)
