"""The scheduler service's leases and fencing against real Postgres and NATS (reliability T7, T8 reduced).

An agent that stops heartbeating (paused like SIGSTOP) loses its attempt once the lease expires; the
retry runs on the same agent when it comes back, or on another one; everything the paused attempt
reports afterwards is rejected and audited, and the zombie is told to stop.
"""

from __future__ import annotations

import time
from collections import Counter

from verlyard_shared.events import AttemptLost, AttemptStarted, ReportRejected, StagePlaced, StageSucceeded
from verlyard_shared.store.postgres import PostgresEventStore

from .fake_agent import FakeAgent
from .scheduler_kit import history, scheduler, submit, until, wait_terminal

LEASE_S = 1.0
RETRY = {"max_attempts": 3, "backoff": "fixed", "initial_delay": "100ms", "jitter": "none"}


async def _started(store: PostgresEventStore, pid: str, stage: str) -> str | None:
    for envelope in await history(store, pid):
        if isinstance(envelope.event, AttemptStarted) and envelope.event.stage == stage:
            return envelope.event.attempt
    return None


async def _lost(store: PostgresEventStore, pid: str) -> AttemptLost | None:
    for envelope in await history(store, pid):
        if isinstance(envelope.event, AttemptLost):
            return envelope.event
    return None


async def test_a_silent_agent_loses_its_attempt_and_the_retry_runs_on_it_when_it_returns(
    pg_url: str, pg_store: PostgresEventStore, nats_url: str
) -> None:
    agent = await FakeAgent(nats_url, "a0", heartbeat_s=0.2).start()
    try:
        async with scheduler(pg_url, nats_url, lease_s=LEASE_S, reconcile_s=0.5):
            pid = await submit(pg_store, {"long": {"retry": RETRY, "with": {"sleep_ms": 1500}}})
            await until(lambda: _started(pg_store, pid, "long"), timeout=10, what="the attempt to start")
            agent.pause()
            paused = time.monotonic()
            await until(lambda: _lost(pg_store, pid), timeout=10, what="the attempt to be declared lost")
            # T7: declared lost within the heartbeat timeout + 1 s (the last heartbeat was <= 0.2 s before).
            assert time.monotonic() - paused <= LEASE_S + 1.0
            agent.resume()
            state = (await wait_terminal(pg_store, [pid], timeout=15))[pid]
            assert state.status == "succeeded"
            log = await history(pg_store, pid)
            assert Counter(type(e.event).__name__ for e in log)["StageSucceeded"] == 1
            placed = [e.event for e in log if isinstance(e.event, StagePlaced)]
            assert [p.agent for p in placed] == ["a0", "a0"]
    finally:
        await agent.stop()


async def test_a_stale_attempt_is_fenced_its_reports_rejected_and_audited_and_the_zombie_stopped(
    pg_url: str, pg_store: PostgresEventStore, nats_url: str
) -> None:
    zombie = await FakeAgent(nats_url, "a0", heartbeat_s=0.2).start()
    try:
        async with scheduler(pg_url, nats_url, lease_s=LEASE_S, reconcile_s=0.5):
            pid = await submit(pg_store, {"train": {"retry": RETRY, "with": {"sleep_ms": 800}}})
            first = await _wait_started(pg_store, pid)
            zombie.pause()
            spare = await FakeAgent(nats_url, "a1", heartbeat_s=0.2).start()
            try:
                await until(lambda: _lost(pg_store, pid), timeout=10, what="the paused attempt to be lost")
                state = (await wait_terminal(pg_store, [pid], timeout=15))[pid]
                assert state.status == "succeeded"
                zombie.resume()  # SIGCONT: it carries on and reports on its stale attempt

                async def audited() -> bool:
                    log = await history(pg_store, pid)
                    return any(isinstance(e.event, ReportRejected) for e in log)

                await until(audited, timeout=10, what="the stale report to be rejected")

                async def told_to_stop() -> bool:
                    return any(c.attempt == first for c in zombie.cancels) or zombie.finished.get(first) is not None

                await until(told_to_stop, timeout=10, what="the zombie to be stopped or to finish")
                log = await history(pg_store, pid)
                rejected = [e.event for e in log if isinstance(e.event, ReportRejected)]
                assert rejected and all(r.attempt == first and r.agent == "a0" for r in rejected)
                succeeded = [e.event for e in log if isinstance(e.event, StageSucceeded)]
                assert len(succeeded) == 1 and succeeded[0].attempt != first
                placed = [e.event for e in log if isinstance(e.event, StagePlaced)]
                assert [p.agent for p in placed] == ["a0", "a1"]
                # The fold is untouched by the rejected reports.
                final = (await wait_terminal(pg_store, [pid], timeout=1))[pid]
                assert final.stages["train"].current is not None
                assert final.stages["train"].current.id == succeeded[0].attempt
            finally:
                await spare.stop()
    finally:
        await zombie.stop()


async def _wait_started(store: PostgresEventStore, pid: str) -> str:
    found: list[str] = []

    async def started() -> bool:
        attempt = await _started(store, pid, "train")
        if attempt is not None:
            found.append(attempt)
        return attempt is not None

    await until(started, timeout=10, what="the attempt to start")
    return found[0]
