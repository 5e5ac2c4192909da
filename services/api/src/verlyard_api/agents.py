"""Pure core: agents as the API shows them. A fold of each `agent-<id>` stream (registered, drain
requested, lost, deregistered: the same rules as the scheduler's), joined with the latest heartbeat
(live GPU utilisation, not in the log) and the agent's active attempts from the read model.

States: `active` (takes work), `draining` (finishes its work, takes none), `lost` (no heartbeat within
its lease; back to `active` when the scheduler sees it again), `stopped` (deregistered).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Final, Literal

import msgspec
from msgspec.structs import replace

from verlyard_api.errors import Conflict, NotFound
from verlyard_shared.envelope import Envelope
from verlyard_shared.events import (
    AgentDeregistered,
    AgentDrainRequested,
    AgentLost,
    AgentRegistered,
    GpuInfo,
)
from verlyard_shared.reports import AgentHeartbeat

AgentState = Literal["active", "draining", "lost", "stopped"]
AGENT_STATES: Final[tuple[str, ...]] = ("active", "draining", "lost", "stopped")
AGENT_PREFIX: Final = "agent-"


class AgentRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One agent's stream, folded."""

    id: str
    hostname: str
    gpus: tuple[GpuInfo, ...] = ()
    cpu_slots: int = 1
    labels: dict[str, str] = {}
    version: str = ""
    state: AgentState = "active"
    reason: str = ""
    registered_at: datetime
    updated_at: datetime
    stream_version: int = 0


def evolve_agent(record: AgentRecord | None, envelope: Envelope) -> AgentRecord | None:
    """Apply one envelope of an `agent-<id>` stream; None until the agent registers."""
    if record is not None and envelope.version <= record.stream_version:
        return record
    event, at = envelope.event, envelope.recorded_at
    new: AgentRecord | None = record
    if isinstance(event, AgentRegistered):
        # A (re-)registration brings the agent back into service with its current inventory.
        new = AgentRecord(
            id=event.agent,
            hostname=event.hostname,
            gpus=event.gpus,
            cpu_slots=event.cpu_slots,
            labels=dict(event.labels),
            version=event.version,
            registered_at=at,
            updated_at=at,
        )
    elif record is None or getattr(event, "agent", None) != record.id:
        return record
    elif isinstance(event, AgentDrainRequested):
        if record.state == "active":
            new = replace(record, state="draining", reason=event.reason, updated_at=at)
    elif isinstance(event, AgentLost):
        if record.state != "stopped":
            new = replace(record, state="lost", reason=event.reason, updated_at=at)
    elif isinstance(event, AgentDeregistered):
        new = replace(record, state="stopped", reason=event.reason, updated_at=at)
    return replace(new, stream_version=envelope.version) if new is not None else None


def fold_agents(envelopes: Iterable[Envelope]) -> dict[str, AgentRecord]:
    """Every agent of `agent-*` envelopes in log order, by id."""
    agents: dict[str, AgentRecord] = {}
    for envelope in envelopes:
        if not envelope.stream_id.startswith(AGENT_PREFIX):
            continue
        agent_id = envelope.stream_id[len(AGENT_PREFIX) :]
        record = evolve_agent(agents.get(agent_id), envelope)
        if record is not None:
            agents[agent_id] = record
    return agents


def decide_drain(record: AgentRecord | None, agent_id: str, reason: str) -> AgentDrainRequested | None:
    """The event a drain request appends; None when the agent drains already (a repeated request)."""
    if record is None:
        raise NotFound(f"no agent {agent_id}", agent=agent_id)
    if record.state == "draining":
        return None
    if record.state != "active":
        raise Conflict(
            f"agent {agent_id} is {record.state}: only an active agent can be drained", code="agent_not_active"
        )
    return AgentDrainRequested(agent=agent_id, reason=reason)


# ---- the public shape ---------------------------------------------------------------------------------


class GpuOut(msgspec.Struct, kw_only=True):
    index: int
    name: str
    uuid: str
    memory_total_mb: int
    utilization_pct: float | None = None
    """From the latest heartbeat; null before the first one this API process has seen."""
    memory_used_mb: int | None = None
    temperature_c: float | None = None


class AgentAttemptOut(msgspec.Struct, kw_only=True):
    pipeline_id: str
    stage: str
    attempt: str
    number: int
    status: str
    gpus: list[int]


class AgentOut(msgspec.Struct, kw_only=True):
    id: str
    hostname: str
    state: str
    """active | draining | lost | stopped"""
    reason: str
    gpus: list[GpuOut]
    labels: dict[str, str]
    cpu_slots: int
    version: str
    registered_at: datetime
    updated_at: datetime
    last_heartbeat_at: datetime | None
    """`sent_at` of the latest heartbeat this API process has seen (heartbeats are not events)."""
    reported_draining: bool | None
    """What the agent itself said in that heartbeat."""
    attempts: list[AgentAttemptOut]
    """Its placed, accepted and running attempts (from the read model)."""


class AgentPage(msgspec.Struct, kw_only=True):
    items: list[AgentOut]
    next: None = None
    """Always null: every agent fits one page."""


class ActiveAttempt(msgspec.Struct, frozen=True, kw_only=True):
    agent: str
    pipeline_id: str
    stage: str
    attempt: str
    number: int
    status: str
    gpus: tuple[int, ...] = ()


def agent_out(record: AgentRecord, heartbeat: AgentHeartbeat | None, attempts: Sequence[ActiveAttempt]) -> AgentOut:
    live = {g.index: g for g in heartbeat.gpus} if heartbeat is not None else {}
    gpus: list[GpuOut] = []
    for gpu in record.gpus:
        status = live.get(gpu.index)
        gpus.append(
            GpuOut(
                index=gpu.index,
                name=gpu.name,
                uuid=gpu.uuid,
                memory_total_mb=gpu.memory_total_mb,
                utilization_pct=status.utilization_pct if status is not None else None,
                memory_used_mb=status.memory_used_mb if status is not None else None,
                temperature_c=status.temperature_c if status is not None else None,
            )
        )
    return AgentOut(
        id=record.id,
        hostname=record.hostname,
        state=record.state,
        reason=record.reason,
        gpus=gpus,
        labels=record.labels,
        cpu_slots=record.cpu_slots,
        version=record.version,
        registered_at=record.registered_at,
        updated_at=record.updated_at,
        last_heartbeat_at=heartbeat.sent_at if heartbeat is not None else None,
        reported_draining=heartbeat.draining if heartbeat is not None else None,
        attempts=[
            AgentAttemptOut(
                pipeline_id=a.pipeline_id,
                stage=a.stage,
                attempt=a.attempt,
                number=a.number,
                status=a.status,
                gpus=list(a.gpus),
            )
            for a in attempts
        ],
    )


def agents_out(
    records: Mapping[str, AgentRecord],
    heartbeats: Mapping[str, AgentHeartbeat],
    attempts: Iterable[ActiveAttempt],
) -> list[AgentOut]:
    """Every agent, by id, with its heartbeat and attempts."""
    by_agent: dict[str, list[ActiveAttempt]] = {}
    for attempt in attempts:
        by_agent.setdefault(attempt.agent, []).append(attempt)
    return [
        agent_out(records[agent_id], heartbeats.get(agent_id), by_agent.get(agent_id, []))
        for agent_id in sorted(records)
    ]


def newer(current: AgentHeartbeat | None, candidate: AgentHeartbeat) -> bool:
    """Keep the latest heartbeat by the agent's own clock (a replayed journal sends old ones again)."""
    return current is None or candidate.sent_at >= current.sent_at


def count_by_state(records: Iterable[AgentRecord]) -> dict[str, int]:
    counts: dict[str, int] = dict.fromkeys(AGENT_STATES, 0)
    for record in records:
        counts[record.state] += 1
    return counts
