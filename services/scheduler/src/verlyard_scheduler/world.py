"""Pure core: the scheduler's in-memory world: live pipelines and agents folded from the log, plus the
indexes the service needs (attempt -> pipeline, what active attempts hold on each agent, ready stages,
heartbeat-renewed leases). No I/O: the service feeds it envelopes and reads it back.

Terminal pipelines are retired from memory after a while (`retire`); a later event that can revive one
(`pipeline.retry_requested`) makes `apply` answer `reload`, and the service reads the stream again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Final, Literal

import msgspec

from verlyard_scheduler.fold import AgentState, PipelineState, evolve, evolve_agent
from verlyard_scheduler.placement import AgentView, ReadyStage, views_from_usage
from verlyard_shared.envelope import Envelope
from verlyard_shared.events import PipelineRetryRequested, PipelineSubmitted

PIPELINE_PREFIX: Final = "pipeline-"
_PIPELINE_PREFIX_LEN: Final = len(PIPELINE_PREFIX)
AGENT_PREFIX: Final = "agent-"
RETIRED_ATTEMPTS_KEPT: Final = 100_000
"""Attempts of retired pipelines remembered (attempt -> pipeline, stage) so a zombie's heartbeat still
gets a cancel; the oldest are forgotten first."""

ChangeKind = Literal["pipeline", "agent", "reload"]


class Change(msgspec.Struct, frozen=True):
    """What one applied envelope changed: a pipeline, an agent, or a retired pipeline to read again."""

    kind: ChangeKind
    key: str


class Holding(msgspec.Struct, frozen=True):
    """What one active attempt holds on its agent."""

    agent: str
    gpus: tuple[int, ...]
    cpu_slots: int


def holdings_of(state: PipelineState) -> dict[str, Holding]:
    """Active attempt id -> what it holds, for one pipeline."""
    out: dict[str, Holding] = {}
    for stage in state.stages.values():
        attempt = stage.active_attempt
        if attempt is not None:
            out[attempt.id] = Holding(agent=attempt.agent, gpus=attempt.gpus, cpu_slots=attempt.cpu_slots)
    return out


def _add(busy: dict[str, dict[int, int]], used: dict[str, int], holding: Holding, sign: int) -> None:
    if holding.gpus:
        counts = busy.setdefault(holding.agent, {})
        for gpu in holding.gpus:
            n = counts.get(gpu, 0) + sign
            if n > 0:
                counts[gpu] = n
            else:
                counts.pop(gpu, None)
        if not counts:
            busy.pop(holding.agent, None)
    else:
        n = used.get(holding.agent, 0) + sign * holding.cpu_slots
        if n > 0:
            used[holding.agent] = n
        else:
            used.pop(holding.agent, None)


class World:
    """Everything the leader knows. Mutated only by the service's single loop (never concurrently)."""

    def __init__(self) -> None:
        self.pipelines: dict[str, PipelineState] = {}
        self.agents: dict[str, AgentState] = {}
        self.agent_versions: dict[str, int] = {}
        """Stream version of every `agent-<id>` stream seen (also for agents not registered yet)."""
        self.position = 0
        """Global position folded so far (the tracking row written with every append)."""
        self.leases: dict[str, datetime] = {}
        """Heartbeat-renewed lease expiries of active attempts (never logged: ADR 0005 decision 3)."""
        self.last_seen: dict[str, datetime] = {}
        """Agent -> its last hello or heartbeat (liveness, and placement's `alive_until`)."""
        self.reported_draining: dict[str, bool] = {}
        """Agent -> whether its last heartbeat said it is draining (a drain command is re-sent until so)."""
        self.ready: dict[str, tuple[ReadyStage, ...]] = {}
        """Pipeline -> stages `decide` found ready and placement has not placed yet."""
        self.attempts: dict[str, tuple[str, str]] = {}
        """Attempt id -> (pipeline, stage), for every attempt of a pipeline in memory."""
        self.retired_attempts: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self.terminal: set[str] = set()
        """In-memory pipelines that ended (candidates for `retire`)."""
        self.dead_agents: frozenset[str] = frozenset()
        self.agent_transitions: list[tuple[str, str, str]] = []
        """(agent, status before, status after) since the service last looked; it clears the list."""
        self._holdings: dict[str, dict[str, Holding]] = {}
        self._busy: dict[str, dict[int, int]] = {}
        self._used: dict[str, int] = {}
        self._agent_pipelines: dict[str, dict[str, int]] = {}

    # ---- folding ---------------------------------------------------------------------------------

    def apply(self, envelope: Envelope, *, index: bool = True, advance: bool = True) -> Change | None:
        """Fold one envelope from the log; None when it changes nothing the scheduler keeps.

        `index=False` (the initial load) skips the indexes; call `reindex()` once afterwards.
        `advance=False` (a stream read out of global order) leaves `position` alone.
        """
        if advance and envelope.position > self.position:
            self.position = envelope.position
        stream_id = envelope.stream_id
        if not stream_id.startswith(PIPELINE_PREFIX):
            if stream_id.startswith(AGENT_PREFIX):
                return self._apply_agent(stream_id[len(AGENT_PREFIX) :], envelope)
            return None
        # The pipeline path is inline: it is nearly every event of a start-up load (bench R1).
        pid = stream_id[_PIPELINE_PREFIX_LEN:]
        state = self.pipelines.get(pid)
        if state is None:
            if isinstance(envelope.event, PipelineSubmitted) and envelope.version == 1:
                new = evolve(None, envelope)
            elif isinstance(envelope.event, PipelineRetryRequested):
                return Change("reload", pid)  # a retired pipeline may run again
            else:
                return None  # a late event of a retired pipeline: nothing it could change
        else:
            if envelope.version <= state.version:
                return None
            if envelope.version > state.version + 1:
                return Change("reload", pid)  # a gap: never fold past a missing version
            new = evolve(state, envelope)
        if index:
            self.put_pipeline(pid, new)
        else:
            self.pipelines[pid] = new
        return Change("pipeline", pid)

    def _apply_agent(self, agent: str, envelope: Envelope) -> Change | None:
        if envelope.version <= self.agent_versions.get(agent, 0):
            return None
        self.agent_versions[agent] = envelope.version
        old = self.agents.get(agent)
        new = evolve_agent(old, envelope)
        if new is None:
            return None
        self.put_agent(new)
        before = old.status if old is not None else "new"
        if before != new.status:
            self.agent_transitions.append((agent, before, new.status))
        if agent not in self.last_seen and new.registered_at is not None:
            self.last_seen[agent] = new.registered_at
        return Change("agent", agent)

    def put_agent(self, state: AgentState) -> None:
        self.agents[state.agent] = state
        self.dead_agents = frozenset(a for a, s in self.agents.items() if s.status in ("lost", "gone"))

    def put_pipeline(self, pid: str, state: PipelineState) -> None:
        """Store a pipeline's new state and bring every index up to date with it."""
        self.pipelines[pid] = state
        old = self._holdings.get(pid, {})
        new = holdings_of(state)
        if old != new:
            for aid, holding in old.items():
                if aid not in new:
                    _add(self._busy, self._used, holding, -1)
                    self._count(holding.agent, pid, -1)
                    self.leases.pop(aid, None)
            for aid, holding in new.items():
                if aid not in old:
                    _add(self._busy, self._used, holding, +1)
                    self._count(holding.agent, pid, +1)
            if new:
                self._holdings[pid] = new
            else:
                self._holdings.pop(pid, None)
        for name, stage in state.stages.items():
            for attempt in stage.attempts:
                self.attempts[attempt.id] = (pid, name)
        if state.terminal:
            self.terminal.add(pid)
            self.ready.pop(pid, None)
        else:
            self.terminal.discard(pid)

    def _count(self, agent: str, pid: str, sign: int) -> None:
        counts = self._agent_pipelines.setdefault(agent, {})
        n = counts.get(pid, 0) + sign
        if n > 0:
            counts[pid] = n
        else:
            counts.pop(pid, None)
            if not counts:
                self._agent_pipelines.pop(agent, None)

    def reindex(self) -> None:
        """Rebuild every index from the pipelines in memory (after a load folded with `index=False`)."""
        self._holdings.clear()
        self._busy.clear()
        self._used.clear()
        self._agent_pipelines.clear()
        self.attempts.clear()
        self.terminal.clear()
        for pid, state in list(self.pipelines.items()):
            self.put_pipeline(pid, state)

    def evict(self, pid: str) -> None:
        """Drop a (terminal) pipeline from memory; its attempts stay known for zombie fencing."""
        state = self.pipelines.pop(pid, None)
        self.terminal.discard(pid)
        self.ready.pop(pid, None)
        if state is None:
            return
        for holding in self._holdings.pop(pid, {}).values():
            _add(self._busy, self._used, holding, -1)
            self._count(holding.agent, pid, -1)
        # Local names: a start-up load evicts every ended pipeline it read here (bench R1 times it).
        attempts, leases, retired = self.attempts, self.leases, self.retired_attempts
        for name, stage in state.stages.items():
            for attempt in stage.attempts:
                aid = attempt.id
                attempts.pop(aid, None)
                leases.pop(aid, None)
                retired[aid] = (pid, name)
        while len(retired) > RETIRED_ATTEMPTS_KEPT:
            retired.popitem(last=False)

    def evict_terminal(self, pids: Iterable[str]) -> None:
        for pid in pids:
            state = self.pipelines.get(pid)
            if state is not None and state.terminal:
                self.evict(pid)

    def retire(self, now: datetime, after_s: float) -> list[str]:
        """Evict pipelines that ended more than `after_s` ago; returns their ids."""
        cutoff = now - timedelta(seconds=after_s)
        gone: list[str] = []
        for pid in list(self.terminal):
            state = self.pipelines.get(pid)
            finished = state.finished_at if state is not None else None
            if finished is None or finished <= cutoff:
                self.evict(pid)
                gone.append(pid)
        return gone

    # ---- queries ---------------------------------------------------------------------------------

    def pipelines_on(self, agent: str) -> list[str]:
        """Pipelines with an active attempt on `agent`."""
        return list(self._agent_pipelines.get(agent, {}))

    def holdings(self, pid: str) -> Mapping[str, Holding]:
        return self._holdings.get(pid, {})

    def usage(self) -> tuple[dict[str, set[int]], dict[str, int]]:
        """(agent -> busy GPU indexes, agent -> used CPU slots) over every active attempt in memory."""
        return {a: set(c) for a, c in self._busy.items()}, dict(self._used)

    def views(
        self,
        overrides: Mapping[str, PipelineState],
        *,
        heartbeat_timeout_s: float | None,
    ) -> list[AgentView]:
        """Agents as placement sees them, counting `overrides` (tentative states) instead of the stored ones."""
        busy_counts: dict[str, dict[int, int]] = {a: dict(c) for a, c in self._busy.items()}
        used = dict(self._used)
        for pid, state in overrides.items():
            for holding in self._holdings.get(pid, {}).values():
                _add(busy_counts, used, holding, -1)
            for holding in holdings_of(state).values():
                _add(busy_counts, used, holding, +1)
        busy: dict[str, set[int]] = {a: set(c) for a, c in busy_counts.items()}
        return views_from_usage(
            self.agents.values(),
            busy,
            used,
            last_seen=self.last_seen if heartbeat_timeout_s is not None else None,
            heartbeat_timeout_s=heartbeat_timeout_s,
        )

    def seed(self, now: datetime, grace_s: float) -> None:
        """After a (re)load: heartbeats sent while no scheduler listened were not seen, so every active
        attempt gets a lease of `grace_s` from now and every live agent counts as seen now (ADR 0005)."""
        expiry = now + timedelta(seconds=grace_s)
        for holdings in self._holdings.values():
            for aid in holdings:
                self.leases[aid] = max(self.leases.get(aid, expiry), expiry)
        for agent, state in self.agents.items():
            if state.status in ("active", "draining"):
                self.last_seen[agent] = now

    def active_pipelines(self) -> list[str]:
        return [pid for pid in self.pipelines if pid not in self.terminal]
