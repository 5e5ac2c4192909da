"""Pure core: when telemetry leaves the agent. Log lines and metric points go out in batches (by count,
size or age); progress reports at most once per interval, the last one always (trailing edge).

Time is a parameter (monotonic seconds); the adapter (`telemetry_sink.py`) sets the timers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class Batcher(Generic[T]):
    """Collects items; full at `max_items` or `max_bytes`, due `max_age_s` after its oldest item."""

    def __init__(self, *, max_items: int, max_age_s: float, max_bytes: int = 256 * 1024) -> None:
        self.max_items = max_items
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self._items: list[T] = []
        self._bytes = 0
        self._oldest: float | None = None

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T, now: float, *, size: int = 0) -> bool:
        """Add one item; True when the batch is full and should go out now."""
        if not self._items:
            self._oldest = now
        self._items.append(item)
        self._bytes += size
        return len(self._items) >= self.max_items or self._bytes >= self.max_bytes

    def deadline(self) -> float | None:
        """When the oldest item must go out (None: empty)."""
        return None if self._oldest is None else self._oldest + self.max_age_s

    def due(self, now: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def take(self) -> list[T]:
        items, self._items, self._bytes, self._oldest = self._items, [], 0, None
        return items


@dataclass(frozen=True, kw_only=True)
class Progress:
    step: int
    total_steps: int | None


class Throttle:
    """At most one progress value per `interval_s`; a value held back goes out when the interval ends."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last_sent_at: float | None = None
        self._last_sent_step: int | None = None
        self._pending: Progress | None = None

    def offer(self, value: Progress, now: float) -> Progress | None:
        """The value to send now, or None (it is held, see `pending_due_at`)."""
        if self._last_sent_step is not None and value.step <= self._last_sent_step:
            return None
        if self._last_sent_at is None or now - self._last_sent_at >= self.interval_s:
            self._pending = None
            self._last_sent_at, self._last_sent_step = now, value.step
            return value
        self._pending = value
        return None

    def pending_due_at(self) -> float | None:
        if self._pending is None or self._last_sent_at is None:
            return None
        return self._last_sent_at + self.interval_s

    def take_pending(self, now: float) -> Progress | None:
        value, self._pending = self._pending, None
        if value is not None:
            self._last_sent_at, self._last_sent_step = now, value.step
        return value
