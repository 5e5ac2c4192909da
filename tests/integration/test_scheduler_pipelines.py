"""The scheduler service against real Postgres and NATS with fake agents: pipelines run to the end.

Linear, diamond and wide fan-out pipelines complete; a failure skips dependants while a `when: always`
cleanup still runs; retries wait out their backoff; a poison report is terminated and the rest go on;
a drain request keeps an agent out of placement and reaches the agent as a command; a cancel stops
pending and running stages; a retry request re-runs what failed (reloading a retired pipeline); a
stage past its timeout fails and its agent is told to stop.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from nats.js import JetStreamContext

from verlyard_shared.envelope import Metadata, NewEvent
from verlyard_shared.events import (
    AgentDrainRequested,
    AnyEvent,
    PipelineCancelRequested,
    PipelineRetryRequested,
    PipelineSucceeded,
    StagePlaced,
    StageRetryScheduled,
    StageSucceeded,
)
from verlyard_shared.ids import agent_stream, new_id, pipeline_stream
from verlyard_shared.store.port import ANY
from verlyard_shared.store.postgres import PostgresEventStore
from verlyard_shared.subjects import report_subject

from .fake_agent import FakeAgent
from .scheduler_kit import DIAMOND, LINEAR, fan_out, history, scheduler, submit, until, wait_terminal

FAST: dict[str, Any] = {"lease_s": 3.0, "reconcile_s": 0.5}


def successes(log: list) -> Counter[str]:
    return Counter(e.event.stage for e in log if isinstance(e.event, StageSucceeded))


async def test_linear_diamond_and_fan_out_pipelines_complete(
    pg_url: str, pg_store: PostgresEventStore, nats_url: str
) -> None:
    agents = [await FakeAgent(nats_url, f"a{i}", slots=8).start() for i in range(2)]
    try:
        async with scheduler(pg_url, nats_url, **FAST) as service:
            shapes = {"linear": LINEAR, "diamond": DIAMOND, "fan": fan_out(16)}
            pids = {name: await submit(pg_store, stages, name=name) for name, stages in shapes.items()}
            states = await wait_terminal(pg_store, list(pids.values()), timeout=20)
            for name, pid in pids.items():
                state = states[pid]
                assert state.status == "succeeded", (name, state.reason)
                log = await history(pg_store, pid)
                assert successes(log) == Counter(list(shapes[name])), name  # exactly one success per stage
                # No stage was placed before every stage it needs had succeeded.
                done: set[str] = set()
                for envelope in log:
                    event = envelope.event
                    if isinstance(event, StagePlaced):
                        assert set(shapes[name][event.stage].get("needs", [])) <= done, (name, event.stage)
                    if isinstance(event, StageSucceeded):
                        done.add(event.stage)
            # The fan-out spread over both agents; every placement records why.
            placed = [e.event for e in await history(pg_store, pids["fan"]) if isinstance(e.event, StagePlaced)]
            assert {p.agent for p in placed} == {"a0", "a1"}
            assert all(p.placement.get("policy") == "cpu-most-free" for p in placed)
            assert await pg_store.get_tracking("scheduler") > 0
            assert service.term is not None and service.term.first_command_s is not None
    finally:
        for agent in agents:
            await agent.stop()


async def test_a_failed_stage_fails_the_pipeline_skips_dependants_and_cleanup_still_runs(
    pg_url: str, pg_store: PostgresEventStore, nats_url: str
) -> None:
    agent = await FakeAgent(nats_url, "a0").start()
    agent.fail["train"] = ["user"]
    stages = {
        "prep": {},
        "train": {"needs": ["prep"]},
        "eval": {"needs": ["train"]},
        "export": {"needs": ["eval"]},
        "cleanup": {"needs": ["export"], "when": "always"},
        "alert": {"needs": ["train"], "when": "on_failure"},
    }
    try:
        async with scheduler(pg_url, nats_url, **FAST):
            pid = await submit(pg_store, stages)
            state = (await wait_terminal(pg_store, [pid], timeout=15))[pid]
            statuses = {name: s.status for name, s in state.stages.items()}
            assert state.status == "failed" and state.failed_stages == ("train",)
            assert statuses == {
                "prep": "succeeded",
                "train": "failed",
                "eval": "skipped",
                "export": "skipped",
                "cleanup": "succeeded",
                "alert": "succeeded",
            }
            assert "user" in state.reason
    finally:
        await agent.stop()


async def test_retries_wait_out_their_backoff_then_succeed(
    pg_url: str, pg_store: PostgresEventStore, nats_url: str
) -> None:
    agent = await FakeAgent(nats_url, "a0").start()
    agent.fail["flaky"] = ["infra", "infra"]
    retry = {"max_attempts": 3, "backoff": "fixed", "initial_delay": "400ms", "jitter": "none"}
    try:
        async with scheduler(pg_url, nats_url, **FAST):
            pid = await submit(pg_store, {"flaky": {"retry": retry}, "after": {"needs": ["flaky"]}})
            state = (await wait_terminal(pg_store, [pid], timeout=15))[pid]
            assert state.status == "succeeded"
            flaky = state.stages["flaky"]
            assert [a.status for a in flaky.attempts] == ["failed", "failed", "succeeded"]
            log = await history(pg_store, pid)
            scheduled = [e for e in log if isinstance(e.event, StageRetryScheduled)]
            placed = [e for e in log if isinstance(e.event, StagePlaced) and e.event.stage == "flaky"]
            assert len(scheduled) == 2 and len(placed) == 3
            for retry_event, next_placement in zip(scheduled, placed[1:], strict=True):
                assert isinstance(retry_event.event, StageRetryScheduled)
                # Not placed before the backoff ended (recorded times are the database's).
                waited = (next_placement.recorded_at - retry_event.recorded_at).total_seconds()
                assert waited >= 0.35, waited
    finally:
        await agent.stop()


async def test_a_poison_report_is_terminated_and_the_rest_continue(
    pg_url: str, pg_store: PostgresEventStore, nats_url: str, js: JetStreamContext
) -> None:
    agent = await FakeAgent(nats_url, "a0").start()
    try:
        async with scheduler(pg_url, nats_url, **FAST) as service:
            for body in (b"{not json", b'{"type": "rpt.nonsense", "agent": "a0"}', b"[]"):
                await js.publish(report_subject("a0", "junk"), body, headers={"Nats-Msg-Id": new_id()})
            pids = [await submit(pg_store, LINEAR) for _ in range(3)]
            states = await wait_terminal(pg_store, pids, timeout=15)
            assert all(s.status == "succeeded" for s in states.values())
            assert service.leading.is_set()

            async def drained() -> bool:
                info = await js.consumer_info("VY_REPORTS", "scheduler-reports")
                return info.num_pending == 0 and info.num_ack_pending == 0

            await until(drained, timeout=10, what="every report settled (poison terminated, not redelivered)")
    finally:
        await agent.stop()


async def test_a_draining_agent_gets_no_new_work_and_is_told_to_drain(
    pg_url: str, pg_store: PostgresEventStore, nats_url: str
) -> None:
    busy = await FakeAgent(nats_url, "a0").start()
    spare = await FakeAgent(nats_url, "a1").start()
    try:
        async with scheduler(pg_url, nats_url, **FAST):
            await until(lambda: _registered(pg_store, ["a0", "a1"]), timeout=10, what="both agents registered")
            await pg_store.append(
                agent_stream("a0"),
                ANY,
                [NewEvent(event_id=new_id(), event=AgentDrainRequested(agent="a0", reason="maintenance"))],
                Metadata(actor="test", correlation_id="a0"),
            )

            async def told() -> bool:
                return busy.drained

            await until(told, timeout=10, what="the drain command to reach the agent")
            pids = [await submit(pg_store, DIAMOND) for _ in range(3)]
            await wait_terminal(pg_store, pids, timeout=15)
            for pid in pids:
                agents = {e.event.agent for e in await history(pg_store, pid) if isinstance(e.event, StagePlaced)}
                assert agents == {"a1"}
    finally:
        await busy.stop()
        await spare.stop()


async def _registered(store: PostgresEventStore, agents: list[str]) -> bool:
    for agent in agents:
        if await store.stream_version(agent_stream(agent)) == 0:
            return False
    await asyncio.sleep(0)
    return True


async def _append(store: PostgresEventStore, pid: str, event: AnyEvent) -> None:
    await store.append(
        pipeline_stream(pid),
        ANY,
        [NewEvent(event_id=new_id(), event=event)],
        Metadata(actor="test", correlation_id=pid),
    )


async def test_cancel_stops_pending_stages_at_once_and_running_ones_through_their_agent(
    pg_url: str, pg_store: PostgresEventStore, nats_url: str
) -> None:
    agent = await FakeAgent(nats_url, "a0").start()
    agent.hang.add("train")
    try:
        async with scheduler(pg_url, nats_url, **FAST):
            pid = await submit(
                pg_store, {"train": {}, "eval": {"needs": ["train"]}, "tidy": {"needs": ["train"], "when": "always"}}
            )

            async def running() -> bool:
                return bool(agent.running)

            await until(running, timeout=10, what="train to run")
            await _append(pg_store, pid, PipelineCancelRequested(pipeline_id=pid, reason="changed my mind"))
            state = (await wait_terminal(pg_store, [pid], timeout=10))[pid]
            assert state.status == "cancelled"
            assert {n: s.status for n, s in state.stages.items()} == {
                "train": "cancelled",
                "eval": "cancelled",
                "tidy": "cancelled",
            }
            assert [c.reason for c in agent.cancels][:1] == ["pipeline cancelled: changed my mind"]
    finally:
        await agent.stop()


async def test_retry_reruns_what_failed_even_after_the_pipeline_left_memory(
    pg_url: str, pg_store: PostgresEventStore, nats_url: str
) -> None:
    agent = await FakeAgent(nats_url, "a0").start()
    agent.fail["b"] = ["user"]
    try:
        # retire_after_s=0: an ended pipeline leaves memory at once, so the retry request must reload it.
        async with scheduler(pg_url, nats_url, retire_after_s=0.0, **FAST) as service:
            pid = await submit(pg_store, LINEAR)
            assert (await wait_terminal(pg_store, [pid], timeout=10))[pid].status == "failed"

            async def retired() -> bool:
                term = service.term
                return term is not None and pid not in term.world.pipelines

            await until(retired, timeout=10, what="the ended pipeline to leave memory")
            await _append(pg_store, pid, PipelineRetryRequested(pipeline_id=pid, stages=("b",)))

            async def succeeded() -> bool:
                log = await history(pg_store, pid)
                return any(isinstance(e.event, PipelineSucceeded) for e in log)

            await until(succeeded, timeout=10, what="the retried pipeline to succeed")
            log = await history(pg_store, pid)
            assert successes(log) == Counter({"a": 1, "b": 1, "c": 1})  # `a` kept its success
    finally:
        await agent.stop()


async def test_a_stage_that_runs_past_its_timeout_fails_and_its_agent_is_told_to_stop(
    pg_url: str, pg_store: PostgresEventStore, nats_url: str
) -> None:
    agent = await FakeAgent(nats_url, "a0").start()
    agent.hang.add("stuck")
    try:
        async with scheduler(pg_url, nats_url, **FAST):
            pid = await submit(pg_store, {"stuck": {"timeout": "400ms"}})
            state = (await wait_terminal(pg_store, [pid], timeout=10))[pid]
            assert state.status == "failed"
            current = state.stages["stuck"].current
            assert current is not None and current.failure_class == "timeout"

            async def told() -> bool:
                return any(c.attempt == current.id for c in agent.cancels)

            await until(told, timeout=10, what="the agent to get a cancel")
    finally:
        await agent.stop()
