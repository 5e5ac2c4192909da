"""Integration (reliability facts 5 and 8): NATS dies mid-attempt; the attempt keeps running, the agent
journals its reports and log lines, and replays them in order once NATS is back."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from tests.integration.agent_support import (
    agent_config,
    eventually,
    finished,
    kinds,
    log_lines,
    reports,
    run_stage,
    running_agent,
    send,
)
from verlyard_shared.embedded.nats import EmbeddedNats
from verlyard_shared.nats_topology import connect_nats, ensure_topology
from verlyard_shared.reports import AgentHello

SCRIPT = """
import sys, time
for i in range(30):
    print("tick", i, flush=True)
    time.sleep(0.1)
"""


async def test_nats_killed_mid_attempt_then_reports_are_replayed_in_order(
    tmp_path: Path, nats_server_factory: Callable[[], EmbeddedNats]
):
    server = nats_server_factory()
    nc = await connect_nats(server.url, name="pytest-scheduler", user=server.user, password=server.password)
    try:
        await ensure_topology(nc.jetstream())
        async with running_agent(agent_config(tmp_path, server)) as agent:
            journal = agent.reports
            assert journal is not None
            command = run_stage(agent.agent_id, "command", {"run": [sys.executable, "-c", SCRIPT]})
            await send(nc.jetstream(), command)
            await eventually(lambda: any(o >= 3 for o, _, _ in agent_lines(agent, command.attempt)), timeout=10)

            server.kill()  # a crash, as JetStream sees it
            # The attempt runs to its end without NATS; its end is journaled, not lost.
            await eventually(lambda: agent.running == {}, timeout=15)
            assert journal.backlog >= 1, "the finished report waits in the journal"
            work = agent.data_dir / "pipelines" / command.pipeline_id / "s1" / "attempts" / command.attempt
            assert "tick 29" in (work / "attempt.log").read_text()

            server.start()
            js = nc.jetstream()
            await eventually(lambda: journal.backlog == 0, timeout=20)
            end = await finished(js, command.attempt, timeout=20)
            assert end.outcome == "succeeded"
            assert kinds(await reports(js, command.attempt)) == [
                "AttemptAcceptedReport",
                "AttemptStartedReport",
                "AttemptFinishedReport",
            ]

            async def registered_again() -> bool:  # the scheduler may have declared it lost meanwhile
                return len([r for r in await reports(js) if isinstance(r, AgentHello)]) >= 2

            await eventually(registered_again, timeout=10)

            async def every_line() -> bool:
                return [t for _, s, t in await log_lines(js, command.attempt) if s == "stdout"] == [
                    f"tick {i}" for i in range(30)
                ]

            await eventually(every_line, timeout=20)
            offsets = [o for o, _, _ in await log_lines(js, command.attempt)]
            assert offsets == sorted(set(offsets)), "no line twice"
    finally:
        await nc.close()


def agent_lines(agent: object, attempt: str) -> list[tuple[int, str, str]]:
    """Lines the running attempt has emitted so far (read from the agent, not NATS)."""
    runs = getattr(agent, "running", {})
    run = runs.get(attempt)
    if run is None:
        return []
    return [(i, "stdout", t) for i, t in enumerate(run._tail)]  # pyright: ignore[reportPrivateUsage]
