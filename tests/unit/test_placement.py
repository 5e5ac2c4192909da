"""Unit: placement of ready stages on agents (pure; fixed clock)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from verlyard_scheduler.fold import AgentState
from verlyard_scheduler.placement import (
    AgentView,
    GpuView,
    Placement,
    ReadyStage,
    Unplaceable,
    _Agent,  # pyright: ignore[reportPrivateUsage]
    _place_one,  # pyright: ignore[reportPrivateUsage]
    agent_views,
    place,
    queue_key,
)
from verlyard_shared.events import GpuInfo
from verlyard_shared.spec import Resources

from .pipeline_world import T0, World, spec

GB = 1024  # MiB per GiB, as nvidia-smi reports


def ready(stage: str, *, pipeline: str = "p1", queued_at: int = 1, index: int = 0, **res: Any) -> ReadyStage:
    prio = res.pop("priority", 0)
    pprio = res.pop("pipeline_priority", 0)
    return ReadyStage(
        pipeline_id=pipeline,
        stage=stage,
        kind="noop",
        attempt_number=1,
        resources=Resources(**res),
        priority=prio,
        pipeline_priority=pprio,
        queued_at=queued_at,
        index=index,
    )


def gpus(*memory_gb: float, busy: tuple[int, ...] = ()) -> tuple[GpuView, ...]:
    return tuple(GpuView(index=i, memory_mb=int(m * GB), busy=i in busy) for i, m in enumerate(memory_gb))


def agent(name: str, **kwargs: Any) -> AgentView:
    return AgentView(agent=name, **kwargs)


def by_stage(results: list[Placement | Unplaceable]) -> dict[str, Placement | Unplaceable]:
    return {r.stage: r for r in results}


def test_gpu_stage_goes_to_the_best_fitting_agent_on_the_smallest_sufficient_gpus() -> None:
    agents = [agent("big", gpus=gpus(80, 80, 80, 80)), agent("mixed", gpus=gpus(24, 80, 40))]
    (result,) = place([ready("t", gpus=1, gpu_memory_gb=40)], agents, T0)
    assert isinstance(result, Placement)
    assert (result.agent, result.gpus) == ("mixed", (2,))  # the 40 GB card; the 80s stay free
    assert result.why["policy"] == "gpu-best-fit" and result.why["candidates"] == ["big", "mixed"]


def test_a_card_sold_as_24_gb_meets_a_24_gb_floor() -> None:
    (result,) = place(
        [ready("t", gpus=1, gpu_memory_gb=24)], [agent("a", gpus=(GpuView(index=0, memory_mb=24_564),))], T0
    )
    assert isinstance(result, Placement)


def test_never_over_commits_gpus_within_one_pass() -> None:
    stages = [ready(f"s{i}", index=i, gpus=1) for i in range(3)]
    results = place(stages, [agent("a", gpus=gpus(24, 24))], T0)
    placed = [r for r in results if isinstance(r, Placement)]
    assert sorted(g for p in placed for g in p.gpus) == [0, 1]
    (waiting,) = [r for r in results if isinstance(r, Unplaceable)]
    assert waiting.stage == "s2" and waiting.reason == "waiting for 1 GPU; largest free: none"


def test_busy_gpus_are_not_handed_out() -> None:
    (result,) = place([ready("t", gpus=2, gpu_memory_gb=40)], [agent("x", gpus=gpus(80, 80, busy=(0,)))], T0)
    assert isinstance(result, Unplaceable)
    assert result.reason == "waiting for 2 GPUs with >= 40 GB; largest free: 1 on agent x"


def test_request_no_agent_can_ever_satisfy_stays_pending_with_a_reason() -> None:
    agents = [agent("x", gpus=gpus(80)), agent("y", gpus=gpus(24, 24))]
    (result,) = place([ready("t", gpus=2, gpu_memory_gb=40)], agents, T0)
    assert isinstance(result, Unplaceable)
    assert result.reason == "waiting for 2 GPUs with >= 40 GB; no agent has that many (most: 1 on agent x)"
    (none,) = place([ready("t", gpus=1, gpu_memory_gb=100)], agents, T0)
    assert isinstance(none, Unplaceable)
    assert none.reason == "waiting for 1 GPU with >= 100 GB; no connected agent has such a GPU"


def test_cpu_stages_use_slots_spread_over_agents_and_never_over_commit() -> None:
    agents = [agent("a", cpu_slots=2), agent("b", cpu_slots=4, cpu_slots_used=1), agent("g", gpus=gpus(80))]
    results = place([ready(f"s{i}", index=i) for i in range(6)], agents, T0)
    placed = [r for r in results if isinstance(r, Placement)]
    assert [p.agent for p in placed] == ["b", "a", "b", "a", "b"]
    assert all(p.gpus == () and p.cpu_slots == 1 for p in placed)
    (waiting,) = [r for r in results if isinstance(r, Unplaceable)]
    assert waiting.reason == "waiting for 1 CPU slot; largest free: none"


def test_cpu_request_larger_than_any_agent() -> None:
    (result,) = place([ready("s", cpu_slots=8)], [agent("a", cpu_slots=2), agent("b", cpu_slots=4)], T0)
    assert isinstance(result, Unplaceable)
    assert result.reason == "waiting for 8 CPU slots; no agent has that many (most: 4 on agent b)"
    (busy,) = place([ready("s", cpu_slots=2)], [agent("a", cpu_slots=2, cpu_slots_used=1)], T0)
    assert isinstance(busy, Unplaceable) and busy.reason == "waiting for 2 CPU slots; largest free: 1 on agent a"


def test_labels_must_match() -> None:
    agents = [agent("a", cpu_slots=4, labels={"zone": "eu"}), agent("b", cpu_slots=4, labels={"zone": "us"})]
    (result,) = place([ready("s", labels={"zone": "us"})], agents, T0)
    assert isinstance(result, Placement) and result.agent == "b"
    (nope,) = place([ready("s", labels={"zone": "ap", "gpu": "h100"})], agents, T0)
    assert isinstance(nope, Unplaceable) and nope.reason == "no connected agent has the labels gpu=h100, zone=ap"


def test_draining_agents_get_nothing() -> None:
    agents = [agent("a", cpu_slots=4, draining=True), agent("b", cpu_slots=1)]
    results = place([ready("s1"), ready("s2", index=1)], agents, T0)
    assert [r.agent for r in results if isinstance(r, Placement)] == ["b"]
    (only,) = place([ready("s")], [agent("a", cpu_slots=4, draining=True)], T0)
    assert isinstance(only, Unplaceable) and only.reason == "every matching agent is draining (a)"


def test_agents_past_their_heartbeat_deadline_and_no_agents() -> None:
    stale = agent("a", cpu_slots=4, alive_until=T0)
    (result,) = place([ready("s")], [stale], T0)
    assert isinstance(result, Unplaceable) and result.reason == "no agent is connected"
    (alive,) = place([ready("s")], [stale], T0 - timedelta(seconds=1))
    assert isinstance(alive, Placement)
    (empty,) = place([ready("s")], [], T0)
    assert isinstance(empty, Unplaceable)


def test_fifo_by_submission_with_pipeline_then_stage_priority() -> None:
    one_slot = [agent("a", cpu_slots=1)]
    older, newer = ready("old", pipeline="p1", queued_at=1), ready("new", pipeline="p2", queued_at=2)
    assert [r.stage for r in place([newer, older], one_slot, T0) if isinstance(r, Placement)] == ["old"]
    urgent = ready("urgent", pipeline="p3", queued_at=3, pipeline_priority=5)
    assert [r.stage for r in place([older, urgent], one_slot, T0) if isinstance(r, Placement)] == ["urgent"]
    low, high = ready("low", index=0), ready("high", index=1, priority=2)
    assert [r.stage for r in place([low, high], one_slot, T0) if isinstance(r, Placement)] == ["high"]


def test_a_blocked_big_gpu_stage_is_not_starved_by_smaller_ones_behind_it() -> None:
    agents = [agent("x", gpus=gpus(80, 80, 80, 80, busy=(0, 1, 2)))]
    big = ready("big", pipeline="p1", queued_at=1, gpus=4)
    small = ready("small", pipeline="p2", queued_at=2, gpus=1)
    results = by_stage(place([small, big], agents, T0))
    assert isinstance(results["big"], Unplaceable)
    assert results["big"].reason == "waiting for 4 GPUs; largest free: 1 on agent x"
    assert isinstance(results["small"], Unplaceable)
    assert results["small"].reason == "waiting for 1 GPU; the free ones are held for p1/big, queued earlier"
    # A small stage may still use an agent the big one could never use.
    both = [*agents, agent("y", gpus=gpus(24))]
    assert isinstance(by_stage(place([small, big], both, T0))["small"], Placement)


def test_agent_views_subtract_what_active_attempts_hold() -> None:
    w = World(spec({"t": {"kind": "train", "with": {"model": "m"}, "resources": {"gpus": 1}}, "c": {}}))
    w.ready()
    w.place("t", agent="g1", gpus=(1,))
    w.place("c", agent="g1")
    registered = [
        AgentState(agent="g1", hostname="h1", cpu_slots=2, gpus=(GpuInfo(index=0, name="A100", memory_total_mb=81_920),
                   GpuInfo(index=1, name="A100", memory_total_mb=81_920)), registered_at=T0),
        AgentState(agent="g2", hostname="h2", status="draining"),
        AgentState(agent="g3", hostname="h3", status="lost"),
    ]  # fmt: skip
    views = agent_views(registered, [w.s], last_seen={"g1": T0}, heartbeat_timeout_s=15)
    assert [v.agent for v in views] == ["g1", "g2"]
    g1 = views[0]
    assert [g.busy for g in g1.gpus] == [False, True]
    assert g1.cpu_slots_used == 1 and g1.alive_until == T0 + timedelta(seconds=15)
    assert views[1].draining
    (result,) = place([ready("next", gpus=1, gpu_memory_gb=80)], views, T0)
    assert isinstance(result, Placement) and result.gpus == (0,)


# ---- the pass's memo of refusals changes nothing ---------------------------------------------------------

_REQUESTS = st.sampled_from(
    [
        {"gpus": 1},
        {"gpus": 2, "gpu_memory_gb": 40},
        {"gpus": 8},
        {"gpus": 1, "gpu_memory_gb": 200},
        {"cpu_slots": 1},
        {"cpu_slots": 3},
        {"cpu_slots": 99},
        {"cpu_slots": 1, "labels": {"pool": "a"}},
        {"gpus": 1, "labels": {"pool": "b"}},
    ]
)
_AGENTS = st.lists(
    st.builds(
        lambda i, cards, busy, slots, used, label, draining: agent(
            f"a{i}",
            gpus=gpus(*cards, busy=tuple(b for b in busy if b < len(cards))),
            cpu_slots=slots,
            cpu_slots_used=min(used, slots),
            labels={"pool": label} if label else {},
            draining=draining,
        ),
        st.integers(0, 9),
        st.lists(st.sampled_from([24, 40, 80]), max_size=4),
        st.sets(st.integers(0, 3)),
        st.integers(0, 4),
        st.integers(0, 4),
        st.sampled_from(["", "a", "b"]),
        st.booleans(),
    ),
    max_size=3,
    unique_by=lambda a: a.agent,
)


def _reference(ready_stages: list[ReadyStage], agents: list[AgentView]) -> list[Placement | Unplaceable]:
    """The pass without its memo: every stage worked out on its own."""
    pool = [_Agent(a) for a in sorted(agents, key=lambda a: a.agent)]
    alive = [a for a in pool if a.view.alive_until is None or a.view.alive_until > T0]
    reserved: dict[str, str] = {}
    return [_place_one(item, alive, reserved) for item in sorted(ready_stages, key=queue_key)]


@settings(max_examples=500, deadline=None)
@given(requests=st.lists(_REQUESTS, max_size=30), agents=_AGENTS)
def test_the_memo_of_refusals_gives_what_working_each_stage_out_gives(
    requests: list[dict[str, Any]], agents: list[AgentView]
) -> None:
    stages = [ready(f"s{i}", pipeline=f"p{i}", queued_at=i, **dict(r)) for i, r in enumerate(requests)]
    assert place(stages, agents, T0) == _reference(stages, agents)


def test_a_refusal_is_worked_out_again_once_the_pass_has_placed_something() -> None:
    # 3 slots free of 4: the 4-slot stage is refused ("largest free: 3"), a 1-slot stage takes one,
    # so the next 4-slot stage's reason must say 2, not repeat the first refusal.
    agents = [agent("a", cpu_slots=4, cpu_slots_used=1)]
    stages = [
        ready("big1", queued_at=1, cpu_slots=4),
        ready("small", queued_at=2),
        ready("big2", queued_at=3, cpu_slots=4),
    ]
    results = by_stage(place(stages, agents, T0))
    assert isinstance(results["small"], Placement)
    big1, big2 = results["big1"], results["big2"]
    assert isinstance(big1, Unplaceable) and isinstance(big2, Unplaceable)
    assert "largest free: 3 on agent a" in big1.reason and "largest free: 2 on agent a" in big2.reason
    assert place(stages, agents, T0) == _reference(stages, agents)
