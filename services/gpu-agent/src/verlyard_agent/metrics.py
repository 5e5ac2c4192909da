"""Pure core: verl's metric output (file-logger JSONL, console fallback) and the resume-correctness guard.

verl's `file` logger writes one JSON object per `tracking.log` call, unbuffered:
`{"step": 3, "data": {"train/loss": 5.5, "train/lr": 0.001, ...}}`; validation comes as a separate
record with the same step. The console logger prints `step:3 - train/loss:5.5 - ...`, sharing the line
with tqdm, so it is searched for anywhere in a line, never matched at its start.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

_CONSOLE: Final = re.compile(r"step:(\d+) - (.*)")
_CONSOLE_ITEM: Final = re.compile(r"^\s*([^\s:][^:]*?):\s*(\S+)\s*$")


@dataclass(frozen=True, slots=True)
class StepMetrics:
    """One record: the step and its numeric values (non-numeric and non-finite values are left out)."""

    step: int
    values: dict[str, float]
    dropped: tuple[str, ...] = ()
    """Keys whose values were not finite numbers (a NaN loss is worth a log line)."""


def _numeric(data: Mapping[str, object]) -> tuple[dict[str, float], tuple[str, ...]]:
    values: dict[str, float] = {}
    dropped: list[str] = []
    for key, value in data.items():
        if isinstance(value, bool):
            values[key] = float(value)
        elif isinstance(value, int | float):
            number = float(value)
            if math.isfinite(number):
                values[key] = number
            else:
                dropped.append(key)
        elif value is None:
            dropped.append(key)
    return values, tuple(dropped)


def parse_record(line: str | bytes) -> StepMetrics | None:
    """A file-logger line -> StepMetrics; None for anything else (blank, torn, foreign JSON)."""
    try:
        obj: object = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict):
        return None
    step = obj.get("step")  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    data = obj.get("data")  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    if isinstance(step, bool) or not isinstance(step, int) or not isinstance(data, dict):
        return None
    values, dropped = _numeric(data)  # pyright: ignore[reportUnknownArgumentType]
    return StepMetrics(step=step, values=values, dropped=dropped)


def parse_console_line(line: str) -> StepMetrics | None:
    """`...tqdm...step:3 - train/loss:5.5 - train/lr:0.001` -> StepMetrics (the fallback path)."""
    match = _CONSOLE.search(line)
    if match is None:
        return None
    values: dict[str, float] = {}
    dropped: list[str] = []
    for part in match.group(2).split(" - "):
        item = _CONSOLE_ITEM.match(part)
        if item is None:
            # tqdm may follow the last value on the same line: stop at the first thing that is not `k:v`.
            break
        key, raw = item.group(1).strip(), item.group(2)
        try:
            number = float(raw)
        except ValueError:
            # "4.59375Epoch" (tqdm glued on): keep the leading number, then stop.
            lead = re.match(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", raw)
            if lead is None:
                break
            values[key] = float(lead.group(0))
            break
        if math.isfinite(number):
            values[key] = number
        else:
            dropped.append(key)
    return StepMetrics(step=int(match.group(1)), values=values, dropped=tuple(dropped))


class LineBuffer:
    """Splits a growing byte stream into complete lines; a torn last line waits for its newline."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._pending + chunk
        *lines, self._pending = data.split(b"\n")
        return [line for line in lines if line.strip()]

    def flush(self) -> list[bytes]:
        """The unterminated remainder, once the writer is known to be done."""
        rest, self._pending = self._pending, b""
        return [rest] if rest.strip() else []

    def reset(self) -> None:
        self._pending = b""


# ---- the resume guard -----------------------------------------------------------------------------


@dataclass
class StepLedger:
    """Steps seen in one attempt, judged against where the attempt resumed and where it must end.

    verl can resume into the wrong place and still exit 0 (verl #7401: an epoch skipped). The checks:
    the first step logged after resuming from step N is N+1 (a record *at* N — validation before
    training — is allowed), and the final step reaches the expected total.
    """

    resume_step: int = 0
    expected_total: int | None = None
    first_step: int | None = None
    last_step: int | None = None
    steps: int = 0
    """How many distinct training steps were seen."""
    _seen: set[int] = field(default_factory=set[int])

    def observe(self, step: int) -> bool:
        """Record a step; True when it is new (progress moved)."""
        if step == self.resume_step and self.first_step is None:
            return False  # validation before training, logged at the step it resumed from
        if self.first_step is None:
            self.first_step = step
        if step in self._seen:
            return False
        self._seen.add(step)
        self.steps += 1
        if self.last_step is None or step > self.last_step:
            self.last_step = step
        return True

    def mis_resumed(self) -> str | None:
        """A reason when the first step is not resume_step + 1 (None: fine, or nothing seen yet)."""
        if self.first_step is None or self.first_step == self.resume_step + 1:
            return None
        if self.resume_step:
            return (
                f"mis-resumed: resumed from the checkpoint of step {self.resume_step} but the first step logged "
                f"was {self.first_step} (expected {self.resume_step + 1})"
            )
        return f"mis-resumed: a fresh run's first step logged was {self.first_step} (expected 1)"

    def verdict(self, *, final_checkpoint_step: int | None, expect_final_checkpoint: bool = True) -> str | None:
        """After a clean exit: a reason when the run did not do what it was asked (None: it did).

        `final_checkpoint_step` is what the tracker names at the end: verl saves at its last step (SFT
        always, main_ppo while save_freq > 0), so a run whose last logged step has no checkpoint stopped
        before verl thought it was done.
        """
        if (reason := self.mis_resumed()) is not None:
            return reason
        last = self.last_step if self.last_step is not None else self.resume_step
        if self.expected_total is not None and last < self.expected_total:
            return (
                f"under-trained: the run exited cleanly at step {last} but should reach step "
                f"{self.expected_total} (trainer.total_training_steps)"
            )
        if self.last_step is None:
            if self.expected_total is None or self.resume_step < self.expected_total:
                return (
                    f"under-trained: the run exited cleanly without logging a training step (from {self.resume_step})"
                )
            return None
        if expect_final_checkpoint and (final_checkpoint_step is None or final_checkpoint_step < self.last_step):
            return (
                f"under-trained: the run exited cleanly at step {self.last_step} without verl's final checkpoint "
                f"(latest is {final_checkpoint_step}): verl stopped before its last step"
            )
        return None
