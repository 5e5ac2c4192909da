"""Pure core: checkpoint retention. Which `global_step_*` folders a cleanup stage may delete.

verl #4873: `max_ckpt_to_keep=1` deleted the only good checkpoint before the new one was complete.
So: a checkpoint is complete when `latest_checkpointed_iteration.txt` names it or a newer step (verl
writes that file atomically after the folder); the newest complete checkpoint is never deleted,
whatever `keep_last` says; folders newer than the file (a save in progress or torn by a crash) are
left alone; `pinned` steps are kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

LATEST_FILE = "latest_checkpointed_iteration.txt"
_STEP_DIR = re.compile(r"^global_step_(\d+)$")


@dataclass(frozen=True, kw_only=True)
class RetentionPlan:
    keep: tuple[int, ...]
    delete: tuple[int, ...]
    incomplete: tuple[int, ...]
    """Folders newer than the latest complete step: never touched."""
    newest_complete: int | None
    why_kept: dict[int, str]


def step_of(name: str) -> int | None:
    """`global_step_12` -> 12; anything else -> None."""
    match = _STEP_DIR.fullmatch(name)
    return int(match[1]) if match else None


def parse_latest(text: str) -> int | None:
    """The step in `latest_checkpointed_iteration.txt` (None if it does not hold one integer)."""
    value = text.strip()
    return int(value) if value.isdigit() else None


def plan_retention(
    steps: Iterable[int], latest: int | None, *, keep_last: int, pinned: Iterable[int] = ()
) -> RetentionPlan:
    """Keep the newest `keep_last` complete checkpoints, every pinned one and always the newest complete.

    Without a readable latest file no checkpoint is known complete, so nothing is deleted.
    """
    if keep_last < 0:
        raise ValueError("keep_last must be >= 0")
    found = sorted(set(steps))
    pins = set(pinned)
    if latest is None:
        why = {s: "no latest_checkpointed_iteration.txt: completeness unknown" for s in found}
        return RetentionPlan(keep=tuple(found), delete=(), incomplete=(), newest_complete=None, why_kept=why)
    complete = [s for s in found if s <= latest]
    incomplete = tuple(s for s in found if s > latest)
    newest = complete[-1] if complete else None
    recent: set[int] = set(complete[-keep_last:]) if keep_last > 0 else set()
    why_kept: dict[int, str] = {}
    delete: list[int] = []
    for step in complete:
        if step == newest:
            why_kept[step] = "newest complete checkpoint"
        elif step in pins:
            why_kept[step] = "pinned"
        elif step in recent:
            why_kept[step] = f"one of the last {keep_last}"
        else:
            delete.append(step)
    for step in incomplete:
        why_kept[step] = f"newer than the latest complete step {latest} (in progress or torn)"
    keep = tuple(s for s in found if s not in delete)
    return RetentionPlan(
        keep=keep, delete=tuple(delete), incomplete=incomplete, newest_complete=newest, why_kept=why_kept
    )
