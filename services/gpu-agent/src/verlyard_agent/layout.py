"""Pure core: where an agent keeps its files under its data dir; every path component is checked.

<data>/agent.lock                                   one agent per data dir
<data>/journal/{reports,telemetry}.jsonl (+ .cursor) the local outbox (journal.py)
<data>/attempts/<attempt>.json                      what this agent knows of each attempt
<data>/pipelines/<pipeline>/                        ctx.pipeline_dir
<data>/pipelines/<pipeline>/<stage>/                ctx.stage_dir (checkpoints: shared by retries)
<data>/pipelines/<pipeline>/<stage>/attempts/<attempt>/   ctx.work_dir (attempt.log lives here)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from verlyard_shared.subjects import token


@dataclass(frozen=True, kw_only=True)
class AttemptPaths:
    pipeline_dir: Path
    stage_dir: Path
    work_dir: Path
    log_file: Path


def safe_name(value: str, what: str) -> str:
    """`value` as one path component: letters, digits, '_' and '-' only (never '..', '/', or empty)."""
    try:
        return token(value)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not a safe name (letters, digits, '_' and '-' only)") from None


def attempt_paths(data_dir: Path, *, pipeline_id: str, stage: str, attempt: str) -> AttemptPaths:
    pipeline_dir = data_dir / "pipelines" / safe_name(pipeline_id, "pipeline id")
    stage_dir = pipeline_dir / safe_name(stage, "stage")
    work_dir = stage_dir / "attempts" / safe_name(attempt, "attempt id")
    return AttemptPaths(
        pipeline_dir=pipeline_dir, stage_dir=stage_dir, work_dir=work_dir, log_file=work_dir / "attempt.log"
    )


def records_dir(data_dir: Path) -> Path:
    return data_dir / "attempts"


def record_file(data_dir: Path, attempt: str) -> Path:
    return records_dir(data_dir) / f"{safe_name(attempt, 'attempt id')}.json"


def journal_dir(data_dir: Path) -> Path:
    return data_dir / "journal"


def lock_file(data_dir: Path) -> Path:
    return data_dir / "agent.lock"


def default_data_dir(home: Path, agent_id: str) -> Path:
    """`$VERLYARD_HOME/agent/<agent-id>/`: one folder per agent, so two agents on a host never share."""
    return home / "agent" / safe_name(agent_id, "agent id")
