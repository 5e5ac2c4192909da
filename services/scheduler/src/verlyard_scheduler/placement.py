"""Pure core: place ready stages on agents (GPUs, memory floors, CPU slots, labels, draining).

Order is FIFO by submission, with pipeline priority first and stage priority second (higher first).
A GPU stage takes whole GPUs whose total memory meets its floor, on one agent, best fit (the agent
left with the fewest matching free GPUs) so large requests keep room; a GPU-less stage takes CPU
slots on the agent with the most free slots. A GPU stage that cannot be placed reserves the agent
that could best serve it, so smaller stages behind it cannot starve it by taking those GPUs.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

import msgspec

from verlyard_scheduler.fold import AgentState, PipelineState
from verlyard_shared.spec import Resources

MB_PER_GB = 1000
"""A request of `gpu_memory_gb: 24` is met by a GPU with >= 24,000 MiB: cards are sold in decimal GB
(a "24 GB" card reports 24,564 MiB, a "40 GB" A100 40,960 MiB), so the floor errs towards placing."""


class ReadyStage(msgspec.Struct, frozen=True, kw_only=True):
    """A stage whose dependencies allow it to run now: the input of placement."""

    pipeline_id: str
    stage: str
    kind: str
    attempt_number: int
    resources: Resources
    pipeline_priority: int = 0
    priority: int = 0
    queued_at: int = 0
    """The pipeline's submission position (FIFO key)."""
    index: int = 0
    """The stage's position in its pipeline (ties within a pipeline keep spec order)."""


class GpuView(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    memory_mb: int
    name: str = ""
    busy: bool = False


class AgentView(msgspec.Struct, frozen=True, kw_only=True):
    """What placement needs to know of an agent right now."""

    agent: str
    hostname: str = ""
    gpus: tuple[GpuView, ...] = ()
    cpu_slots: int = 0
    cpu_slots_used: int = 0
    labels: dict[str, str] = {}
    draining: bool = False
    alive_until: datetime | None = None
    """No heartbeat is expected after this; None when liveness is not tracked."""


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    pipeline_id: str
    stage: str
    attempt_number: int
    agent: str
    gpus: tuple[int, ...] = ()
    cpu_slots: int = 0
    why: dict[str, Any] = {}
    """The inputs of the choice, recorded on `stage.placed` (why this agent)."""


class Unplaceable(msgspec.Struct, frozen=True, kw_only=True):
    pipeline_id: str
    stage: str
    reason: str


def queue_key(ready: ReadyStage) -> tuple[int, int, int, str, int]:
    return (-ready.pipeline_priority, -ready.priority, ready.queued_at, ready.pipeline_id, ready.index)


def _gb(memory_gb: float) -> str:
    return f"{memory_gb:g} GB"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _labels(labels: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))


class _Agent:
    """A working copy of one agent's free capacity during a placement pass."""

    def __init__(self, view: AgentView) -> None:
        self.view = view
        self.free_gpus = [g for g in view.gpus if not g.busy]
        self.free_slots = max(0, view.cpu_slots - view.cpu_slots_used)

    def capable(self, floor_mb: float) -> list[GpuView]:
        return [g for g in self.view.gpus if g.memory_mb >= floor_mb]

    def free_capable(self, floor_mb: float) -> list[GpuView]:
        return [g for g in self.free_gpus if g.memory_mb >= floor_mb]


def place(ready: Iterable[ReadyStage], agents: Iterable[AgentView], now: datetime) -> list[Placement | Unplaceable]:
    """One placement pass: every ready stage is either placed or gets a precise reason why not.

    Never over-commits: GPUs and slots handed out earlier in the pass are no longer free.
    """
    pool = [_Agent(a) for a in sorted(agents, key=lambda a: a.agent)]
    alive = [a for a in pool if a.view.alive_until is None or now < a.view.alive_until]
    reserved: dict[str, str] = {}  # agent -> the blocked GPU stage it is kept for
    out: list[Placement | Unplaceable] = []
    # A long queue of stages that cannot be placed is mostly the same request again and again: while
    # the pass has neither placed nor reserved anything since, the same request gets the same reason
    # (`_place_one` depends on the item only through its resources), so it is not worked out again.
    changes = 0
    refused: dict[tuple[int, float, int, tuple[tuple[str, str], ...]], tuple[int, str]] = {}
    for item in sorted(ready, key=queue_key):
        res = item.resources
        key = (res.gpus, res.gpu_memory_gb, res.cpu_slots, tuple(sorted(res.labels.items())))
        known = refused.get(key)
        if known is not None and known[0] == changes:
            out.append(Unplaceable(pipeline_id=item.pipeline_id, stage=item.stage, reason=known[1]))
            continue
        held = len(reserved)
        result = _place_one(item, alive, reserved)
        if isinstance(result, Placement) or len(reserved) != held:
            changes += 1
        else:
            refused[key] = (changes, result.reason)
        out.append(result)
    return out


def _place_one(item: ReadyStage, alive: list[_Agent], reserved: dict[str, str]) -> Placement | Unplaceable:
    res = item.resources

    def unplaceable(reason: str) -> Unplaceable:
        return Unplaceable(pipeline_id=item.pipeline_id, stage=item.stage, reason=reason)

    if not alive:
        return unplaceable("no agent is connected")
    matching = [a for a in alive if all(a.view.labels.get(k) == v for k, v in res.labels.items())]
    if not matching:
        return unplaceable(f"no connected agent has the labels {_labels(res.labels)}")
    usable = [a for a in matching if not a.view.draining]
    if not usable:
        names = ", ".join(a.view.agent for a in matching)
        return unplaceable(f"every matching agent is draining ({names})")
    if res.gpus > 0:
        return _place_gpus(item, usable, reserved, unplaceable)
    return _place_slots(item, usable, unplaceable)


def _place_gpus(
    item: ReadyStage,
    usable: list[_Agent],
    reserved: dict[str, str],
    unplaceable: Callable[[str], Unplaceable],
) -> Placement | Unplaceable:
    res = item.resources
    floor = res.gpu_memory_gb * MB_PER_GB
    want = f"{_plural(res.gpus, 'GPU')}" + (f" with >= {_gb(res.gpu_memory_gb)}" if res.gpu_memory_gb > 0 else "")
    able = [a for a in usable if len(a.capable(floor)) >= res.gpus]
    if not able:
        # No agent could ever run it as things stand: it stays pending (an agent may join), with the reason.
        most = max(usable, key=lambda a: (len(a.capable(floor)), a.view.agent))
        count = len(most.capable(floor))
        if count == 0:
            return unplaceable(f"waiting for {want}; no connected agent has such a GPU")
        return unplaceable(f"waiting for {want}; no agent has that many (most: {count} on agent {most.view.agent})")
    fits = [a for a in able if len(a.free_capable(floor)) >= res.gpus and a.view.agent not in reserved]
    if not fits:
        largest = max(usable, key=lambda a: (len(a.free_capable(floor)), a.view.agent))
        free = len(largest.free_capable(floor))
        blocked_by = [reserved[a.view.agent] for a in able if a.view.agent in reserved]
        # Keep the agent with the most matching GPUs for this stage (anti-starvation), if not kept already.
        target = max(able, key=lambda a: (len(a.capable(floor)), a.view.agent))
        reserved.setdefault(target.view.agent, f"{item.pipeline_id}/{item.stage}")
        if blocked_by and any(len(a.free_capable(floor)) >= res.gpus for a in able):
            return unplaceable(f"waiting for {want}; the free ones are held for {blocked_by[0]}, queued earlier")
        where = f"{free} on agent {largest.view.agent}" if free else "none"
        return unplaceable(f"waiting for {want}; largest free: {where}")
    chosen = min(fits, key=lambda a: (len(a.free_capable(floor)) - res.gpus, a.view.agent))
    # Smallest sufficient GPUs first, so bigger ones stay free for bigger requests.
    gpus = sorted(chosen.free_capable(floor), key=lambda g: (g.memory_mb, g.index))[: res.gpus]
    taken = {g.index for g in gpus}
    free_before = len(chosen.free_gpus)
    chosen.free_gpus = [g for g in chosen.free_gpus if g.index not in taken]
    return Placement(
        pipeline_id=item.pipeline_id,
        stage=item.stage,
        attempt_number=item.attempt_number,
        agent=chosen.view.agent,
        gpus=tuple(sorted(taken)),
        cpu_slots=0,
        why={
            "policy": "gpu-best-fit",
            "request": {"gpus": res.gpus, "gpu_memory_gb": res.gpu_memory_gb, "labels": dict(res.labels)},
            "candidates": [a.view.agent for a in fits],
            "free_gpus_before": free_before,
            "gpu_memory_mb": [g.memory_mb for g in gpus],
        },
    )


def _place_slots(
    item: ReadyStage, usable: list[_Agent], unplaceable: Callable[[str], Unplaceable]
) -> Placement | Unplaceable:
    need = item.resources.cpu_slots
    want = _plural(need, "CPU slot")
    if not any(a.view.cpu_slots >= need for a in usable):
        most = max(usable, key=lambda a: (a.view.cpu_slots, a.view.agent))
        return unplaceable(
            f"waiting for {want}; no agent has that many (most: {most.view.cpu_slots} on agent {most.view.agent})"
        )
    fits = [a for a in usable if a.free_slots >= need]
    if not fits:
        largest = max(usable, key=lambda a: (a.free_slots, a.view.agent))
        where = f"{largest.free_slots} on agent {largest.view.agent}" if largest.free_slots else "none"
        return unplaceable(f"waiting for {want}; largest free: {where}")
    # Spread CPU work: the agent with the most free slots (ties by name).
    chosen = min(fits, key=lambda a: (-a.free_slots, a.view.agent))
    free_before = chosen.free_slots
    chosen.free_slots -= need
    return Placement(
        pipeline_id=item.pipeline_id,
        stage=item.stage,
        attempt_number=item.attempt_number,
        agent=chosen.view.agent,
        gpus=(),
        cpu_slots=need,
        why={
            "policy": "cpu-most-free",
            "request": {"cpu_slots": need, "labels": dict(item.resources.labels)},
            "candidates": [a.view.agent for a in fits],
            "free_slots_before": free_before,
        },
    )


def agent_views(
    agents: Iterable[AgentState],
    pipelines: Iterable[PipelineState],
    *,
    last_seen: Mapping[str, datetime] | None = None,
    heartbeat_timeout_s: float | None = None,
) -> list[AgentView]:
    """Agents as placement sees them: registered inventory minus what active attempts hold.

    Lost and deregistered agents are left out; `last_seen` (agent -> last heartbeat) with
    `heartbeat_timeout_s` sets how long each is considered alive.
    """
    busy_gpus: dict[str, set[int]] = {}
    used_slots: dict[str, int] = {}
    for state in pipelines:
        for stage in state.stages.values():
            attempt = stage.active_attempt
            if attempt is None:
                continue
            if attempt.gpus:
                busy_gpus.setdefault(attempt.agent, set()).update(attempt.gpus)
            else:
                used_slots[attempt.agent] = used_slots.get(attempt.agent, 0) + attempt.cpu_slots
    return views_from_usage(agents, busy_gpus, used_slots, last_seen=last_seen, heartbeat_timeout_s=heartbeat_timeout_s)


def views_from_usage(
    agents: Iterable[AgentState],
    busy_gpus: Mapping[str, Collection[int]],
    used_slots: Mapping[str, int],
    *,
    last_seen: Mapping[str, datetime] | None = None,
    heartbeat_timeout_s: float | None = None,
) -> list[AgentView]:
    """`agent_views` for a caller that keeps the usage itself (the service, incrementally):
    `busy_gpus` (agent -> GPU indexes held by active attempts), `used_slots` (agent -> CPU slots held)."""
    views: list[AgentView] = []
    for agent in agents:
        if agent.status in ("lost", "gone"):
            continue
        alive_until: datetime | None = None
        if last_seen is not None and heartbeat_timeout_s is not None:
            seen = last_seen.get(agent.agent) or agent.registered_at
            if seen is not None:
                alive_until = seen + timedelta(seconds=heartbeat_timeout_s)
        busy = busy_gpus.get(agent.agent, ())
        views.append(
            AgentView(
                agent=agent.agent,
                hostname=agent.hostname,
                gpus=tuple(
                    GpuView(index=g.index, memory_mb=g.memory_total_mb, name=g.name, busy=g.index in busy)
                    for g in agent.gpus
                ),
                cpu_slots=agent.cpu_slots,
                cpu_slots_used=used_slots.get(agent.agent, 0),
                labels=agent.labels,
                draining=agent.status == "draining",
                alive_until=alive_until,
            )
        )
    return views
