"""The scheduler as a real process (`python -m verlyard_shared.cli scheduler`): kill -9 mid-run and restart,
and two schedulers side by side (reliability T1 reduced; issue 3: one leader, takeover within 5 s); and
a new term rebuilding the same world whether it reads only the live streams or folds the whole log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from verlyard_shared.embedded.nats import EmbeddedNats
from verlyard_shared.events import StageSucceeded
from verlyard_shared.store.postgres import PostgresEventStore

from .fake_agent import FakeAgent
from .scheduler_kit import (
    DIAMOND,
    history,
    log_lines,
    scheduler,
    spawn_scheduler,
    state_of,
    submit,
    until,
    wait_terminal,
)

SLOW_DIAMOND = {name: {**body, "with": {"sleep_ms": 200}} for name, body in DIAMOND.items()}


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def _leading(path: Path) -> int:
    return sum(1 for line in log_lines(path) if line.get("event") == "scheduler_leading")


async def _exactly_once(store: PostgresEventStore, pids: list[str]) -> None:
    for pid in pids:
        log = await history(store, pid)
        counts = Counter(e.event.stage for e in log if isinstance(e.event, StageSucceeded))
        assert counts == Counter(list(DIAMOND)), (pid, counts)


async def test_kill_9_mid_run_then_restart_every_pipeline_completes_exactly_once(
    pg_url: str,
    pg_store: PostgresEventStore,
    nats_url: str,
    nats_server: EmbeddedNats,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    agents = [await FakeAgent(nats_url, f"a{i}", slots=6, heartbeat_s=0.3).start() for i in range(2)]
    log_path = tmp_path / "scheduler.log"
    try:
        processes.append(spawn_scheduler(pg_url, nats_server, log_path))
        await until(lambda: _async(_leading(log_path) == 1), timeout=15, what="the scheduler to lead")
        pids = [await submit(pg_store, SLOW_DIAMOND) for _ in range(16)]
        for kill in range(2):
            # Let some stages finish, then kill -9 in the middle of the run.
            await asyncio.sleep(0.4 if kill == 0 else 0.2)
            os.kill(processes[-1].pid, signal.SIGKILL)
            processes[-1].wait(timeout=10)
            ended = [pid for pid in pids if (await state_of(pg_store, pid)).terminal]
            assert len(ended) < len(pids), "the kill came after the run: nothing was tested"
            await asyncio.sleep(0.3)  # work and reports pile up while no scheduler runs
            processes.append(spawn_scheduler(pg_url, nats_server, log_path))
            await until(lambda n=kill: _async(_leading(log_path) == n + 2), timeout=15, what="the restart to lead")
        states = await wait_terminal(pg_store, pids, timeout=30)
        unfinished = [(s.status, s.reason) for s in states.values() if s.status != "succeeded"]
        assert not unfinished, unfinished
        await _exactly_once(pg_store, pids)
        loaded = [line for line in log_lines(log_path) if line.get("event") == "scheduler_loaded"]
        assert len(loaded) == 3 and loaded[-1]["events"] > 0
        # T1: a restarted scheduler sends its first command within 2 s of taking the lead.
        firsts = [line["seconds"] for line in log_lines(log_path) if line.get("event") == "scheduler_first_command"]
        assert len(firsts) == 3 and max(firsts[1:]) < 2.0, firsts
    finally:
        for agent in agents:
            await agent.stop()


async def test_two_schedulers_one_leads_and_the_standby_takes_over_within_5s_of_a_kill(
    pg_url: str,
    pg_store: PostgresEventStore,
    nats_url: str,
    nats_server: EmbeddedNats,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    agent = await FakeAgent(nats_url, "a0", slots=8, heartbeat_s=0.3).start()
    logs = [tmp_path / "s0.log", tmp_path / "s1.log"]
    try:
        processes.extend(spawn_scheduler(pg_url, nats_server, path) for path in logs)

        async def both_up() -> bool:
            standby = sum(1 for p in logs for line in log_lines(p) if line.get("event") == "scheduler_standby")
            return sum(_leading(p) for p in logs) == 1 and standby == 1

        await until(both_up, timeout=20, what="one leader and one standby")
        leader = 0 if _leading(logs[0]) else 1
        first = [await submit(pg_store, SLOW_DIAMOND) for _ in range(3)]
        await wait_terminal(pg_store, first, timeout=15)
        assert _leading(logs[1 - leader]) == 0  # the standby stayed standby all along

        second = [await submit(pg_store, SLOW_DIAMOND) for _ in range(3)]
        await asyncio.sleep(0.2)
        os.kill(processes[leader].pid, signal.SIGKILL)
        killed = time.monotonic()
        await until(lambda: _async(_leading(logs[1 - leader]) == 1), timeout=10, what="the standby to take over")
        assert time.monotonic() - killed < 5.0
        states = await wait_terminal(pg_store, second, timeout=20)
        assert all(s.status == "succeeded" for s in states.values())
        await _exactly_once(pg_store, first + second)
        # SIGTERM stops it cleanly.
        survivor = processes[1 - leader]
        survivor.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(survivor.wait, 10) == 0
        assert any(line.get("event") == "scheduler_stopped" for line in log_lines(logs[1 - leader]))
    finally:
        await agent.stop()


async def _async(value: bool) -> bool:
    return value


async def test_a_new_term_rebuilds_the_same_world_from_the_live_streams_or_the_whole_log(
    pg_url: str, pg_store: PostgresEventStore, nats_url: str
) -> None:
    agent = await FakeAgent(nats_url, "a0", heartbeat_s=0.3).start()
    agent.hang.add("stuck")
    try:
        async with scheduler(pg_url, nats_url, lease_s=30.0):
            done = [await submit(pg_store, DIAMOND) for _ in range(3)]
            running = await submit(
                pg_store, {"first": {}, "stuck": {"needs": ["first"]}, "after": {"needs": ["stuck"]}}
            )
            await wait_terminal(pg_store, done, timeout=15)

            async def stuck_runs() -> bool:
                return (await state_of(pg_store, running)).stages["stuck"].status == "running"

            await until(stuck_runs, timeout=10, what="the stuck stage to run")
        expected = await state_of(pg_store, running)
        worlds = []
        for live_load in (True, False):
            async with scheduler(pg_url, nats_url, live_load=live_load, lease_s=30.0) as service:
                term = service.term
                assert term is not None
                await asyncio.wait_for(term.loaded.wait(), timeout=10)
                worlds.append(term.world)
        for world in worlds:
            assert list(world.pipelines) == [running]  # ended pipelines are not kept
            state = world.pipelines[running]
            assert state.version == expected.version
            assert {n: s.status for n, s in state.stages.items()} == {n: s.status for n, s in expected.stages.items()}
            assert set(world.agents) == {"a0"} and world.position == await pg_store.head_position()
            stuck = state.stages["stuck"].current
            assert stuck is not None and stuck.id in world.leases  # seeded with the restart grace
    finally:
        await agent.stop()


async def test_a_leader_whose_lock_connection_dies_steps_down_at_once_and_leads_again(
    pg_url: str, pg_store: PostgresEventStore, pg_pool: asyncpg.Pool, nats_url: str
) -> None:
    agent = await FakeAgent(nats_url, "a0", heartbeat_s=0.3).start()
    try:
        async with scheduler(pg_url, nats_url, lease_s=30.0) as service:
            first = service.term
            assert first is not None
            await asyncio.wait_for(first.loaded.wait(), timeout=10)
            killed = await pg_pool.fetchval(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            )
            assert killed
            await until(lambda: _async(first.leadership.lost.is_set()), timeout=5, what="the loss to be noticed")

            async def new_term() -> bool:
                return service.terms == 2 and service.leading.is_set()

            await until(new_term, timeout=10, what="a new term")
            pids = [await submit(pg_store, SLOW_DIAMOND) for _ in range(3)]
            states = await wait_terminal(pg_store, pids, timeout=20)
            assert all(s.status == "succeeded" for s in states.values())
            await _exactly_once(pg_store, pids)
    finally:
        await agent.stop()
