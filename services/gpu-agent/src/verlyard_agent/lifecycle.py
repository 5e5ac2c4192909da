"""Pure core: what the agent does with each command, given what it already knows of the attempt.

Idempotency by attempt id: the local record (attempts.py keeps one per attempt under the data dir)
decides, so a redelivered or re-derived RunStage never starts a second process, and a cancel that
overtakes its RunStage leaves a tombstone that the late RunStage finds.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from verlyard_shared.commands import CancelAttempt, RunStage
from verlyard_shared.reports import AttemptFinishedReport

RecordState = Literal["accepted", "running", "finished"]


class AttemptRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What this agent knows of one attempt; survives agent restarts (one JSON file per attempt)."""

    attempt: str
    pipeline_id: str
    stage: str
    kind: str
    state: RecordState
    updated_at: datetime
    work_dir: str = ""
    finished: AttemptFinishedReport | None = None
    """The report sent when the attempt ended: re-sent as is (same report id) when asked again."""


RunAction = Literal["accept", "refuse", "already_running", "already_finished", "wrong_agent"]
CancelAction = Literal["stop", "already_finished", "tombstone", "wrong_agent"]


def on_run_stage(command: RunStage, *, me: str, known: AttemptRecord | None, draining: bool) -> RunAction:
    """accept: new work; refuse: draining, leave it unaccepted (the scheduler re-places it elsewhere);
    already_*: a redelivery, ack it (re-sending the stored end when it has one)."""
    if command.agent != me:
        return "wrong_agent"
    if known is not None:
        return "already_finished" if known.state == "finished" else "already_running"
    return "refuse" if draining else "accept"


def on_cancel(command: CancelAttempt, *, me: str, known: AttemptRecord | None) -> CancelAction:
    """stop: kill its process group; tombstone: never started here, record it cancelled so a late
    RunStage of it is answered with that end instead of running."""
    if command.agent != me:
        return "wrong_agent"
    if known is None:
        return "tombstone"
    return "already_finished" if known.state == "finished" else "stop"
