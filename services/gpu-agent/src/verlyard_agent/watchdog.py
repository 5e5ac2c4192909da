"""Pure core: the step-progress watchdog's decision (a hung NCCL collective keeps GPUs busy and silent).

It arms on the first step a stage kind reports (`ctx.progress`): kinds without steps (noop, command,
preprocess) are never judged. After that, no new step within `max(floor_s, factor × median of the
recent step times)` is a hang. Time is a parameter (monotonic seconds); the adapter in `runner.py`
polls `check`, dumps stacks and stops the process group.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class WatchdogPolicy:
    floor_s: float = 120.0
    """Never call a hang sooner than this (checkpoint saves and evaluation pause the steps)."""
    factor: float = 10.0
    window: int = 20
    """How many recent step times the median is taken over."""


@dataclass(frozen=True, kw_only=True)
class Hang:
    step: int
    idle_s: float
    limit_s: float
    reason: str


def median(values: Iterable[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


class StepWatch:
    """Tracks the last step and when it advanced; says when the silence has become a hang."""

    def __init__(self, policy: WatchdogPolicy | None = None) -> None:
        self.policy = policy or WatchdogPolicy()
        self._last_step: int | None = None
        self._last_at: float | None = None
        self._durations: deque[float] = deque(maxlen=max(1, self.policy.window))

    @property
    def armed(self) -> bool:
        return self._last_at is not None

    @property
    def last_step(self) -> int | None:
        return self._last_step

    def observe(self, step: int, now: float) -> None:
        """A step was reported. Only an advance counts (a resumed run may repeat a step number)."""
        if self._last_step is not None and step <= self._last_step:
            return
        if self._last_step is not None and self._last_at is not None:
            advanced = step - self._last_step
            self._durations.append(max(0.0, now - self._last_at) / advanced)
        self._last_step, self._last_at = step, now

    def limit_s(self) -> float:
        typical = median(self._durations)
        return max(self.policy.floor_s, self.policy.factor * typical)

    def check(self, now: float) -> Hang | None:
        if self._last_at is None or self._last_step is None:
            return None
        idle = now - self._last_at
        limit = self.limit_s()
        if idle < limit:
            return None
        typical = median(self._durations)
        why = (
            f"no training step for {_seconds(idle)} after step {self._last_step} (limit {_seconds(limit)}: "
            f"max(floor {_seconds(self.policy.floor_s)}, {self.policy.factor:g} × median step "
            f"{_seconds(typical)}))"
        )
        return Hang(step=self._last_step, idle_s=idle, limit_s=limit, reason=why)

    def seconds_until_due(self, now: float) -> float | None:
        """How long the adapter may sleep before a check could fire (None: not armed)."""
        if self._last_at is None:
            return None
        return max(0.0, self._last_at + self.limit_s() - now)
