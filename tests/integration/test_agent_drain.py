"""Integration: the agent as its own process (`verlyard agent`), drained by SIGTERM.

First SIGTERM: no new work (a new RunStage is never accepted, so the scheduler re-places it), the
running attempt finishes, the agent exits 0. A second SIGTERM stops the running attempts, which are
reported `preempted` (retried elsewhere), and the agent exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from nats.js import JetStreamContext

from tests.integration.agent_support import drain, eventually, finished, kinds, reports, run_stage, send
from verlyard_shared import subjects
from verlyard_shared.embedded.nats import EmbeddedNats
from verlyard_shared.reports import AgentHeartbeat, AgentHello, AttemptStartedReport

AGENT_ID = "drain-agent"


AgentFactory = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def agent_factory(tmp_path: Path, nats_server: EmbeddedNats) -> Iterator[AgentFactory]:
    """Starts `verlyard agent --id drain-agent` processes (same VERLYARD_HOME); all killed at the end."""
    env = {
        **os.environ,
        "VERLYARD_NATS_URL": nats_server.url,
        "VERLYARD_NATS_USER": nats_server.user,
        "VERLYARD_NATS_PASSWORD": nats_server.password,
        "VERLYARD_HOME": str(tmp_path / "home"),
        "VERLYARD_HEARTBEAT_S": "0.3",
        "VERLYARD_LOG_FORMAT": "json",
        "VERLYARD_AGENT_CANCEL_GRACE_S": "2",
    }
    started: list[subprocess.Popen[bytes]] = []
    log = (tmp_path / "agent.log").open("ab")

    def start(**extra_env: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "verlyard_shared.cli", "agent", "--id", AGENT_ID, "--label", "zone=test"],
            env={**env, **extra_env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def agent_process(agent_factory: AgentFactory) -> tuple[str, subprocess.Popen[bytes]]:
    return AGENT_ID, agent_factory()


async def _registered(js: JetStreamContext, agent_id: str) -> bool:
    return any(isinstance(r, AgentHello) and r.agent == agent_id for r in await reports(js))


async def _draining_beat(js: JetStreamContext, agent_id: str) -> bool:
    return any(isinstance(r, AgentHeartbeat) and r.agent == agent_id and r.draining for r in await reports(js))


async def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    await eventually(lambda: proc.poll() is not None, timeout=timeout)
    code = proc.returncode
    assert code is not None
    return code


async def test_sigterm_drains_finishes_running_work_and_refuses_new(
    agent_process: tuple[str, subprocess.Popen[bytes]], js: JetStreamContext, tmp_path: Path
):
    agent_id, proc = agent_process
    await eventually(lambda: _registered(js, agent_id), timeout=20)
    hello = next(r for r in await reports(js) if isinstance(r, AgentHello))
    assert hello.labels == {"zone": "test"} and hello.gpus == ()
    running = run_stage(agent_id, "noop", {"sleep_ms": 2500})
    await send(js, running)
    await eventually(lambda: _started(js, running.attempt))
    proc.send_signal(signal.SIGTERM)
    await eventually(lambda: _draining_beat(js, agent_id), timeout=5)
    refused = run_stage(agent_id, "noop")
    await send(js, refused)
    await eventually(lambda: _commands_settled(js, agent_id))
    assert (await finished(js, running.attempt)).outcome == "succeeded"
    assert await _wait_exit(proc, 15) == 0, (tmp_path / "agent.log").read_text()[-3000:]
    assert kinds(await reports(js, refused.attempt)) == [], "a draining agent accepts no new work"


async def _commands_settled(js: JetStreamContext, agent_id: str) -> bool:
    """Every command was taken off the agent's queue (acked or, when refused, terminated)."""
    info = await js.consumer_info(subjects.STREAM_COMMANDS, subjects.agent_command_consumer(agent_id))
    return info.num_pending == 0 and info.num_ack_pending == 0


async def _started(js: JetStreamContext, attempt: str) -> bool:
    return any(isinstance(r, AttemptStartedReport) for r in await reports(js, attempt))


async def test_second_sigterm_stops_running_attempts_as_preempted(
    agent_process: tuple[str, subprocess.Popen[bytes]], js: JetStreamContext, tmp_path: Path
):
    agent_id, proc = agent_process
    await eventually(lambda: _registered(js, agent_id), timeout=20)
    command = run_stage(agent_id, "command", {"run": ["sleep", "60"]})
    await send(js, command)
    await eventually(lambda: _started(js, command.attempt))
    proc.send_signal(signal.SIGTERM)
    await eventually(lambda: _draining_beat(js, agent_id), timeout=5)
    proc.send_signal(signal.SIGTERM)
    end = await finished(js, command.attempt, timeout=15)
    assert (end.outcome, end.failure_class) == ("failed", "preempted")
    assert await _wait_exit(proc, 15) == 0, (tmp_path / "agent.log").read_text()[-3000:]


async def test_a_drain_that_times_out_stops_the_attempts(agent_factory: AgentFactory, js: JetStreamContext):
    proc = agent_factory(VERLYARD_AGENT_DRAIN_TIMEOUT_S="1")
    await eventually(lambda: _registered(js, AGENT_ID), timeout=20)
    command = run_stage(AGENT_ID, "command", {"run": ["sleep", "60"]})
    await send(js, command)
    await eventually(lambda: _started(js, command.attempt))
    proc.send_signal(signal.SIGTERM)
    end = await finished(js, command.attempt, timeout=15)
    assert (end.outcome, end.failure_class) == ("failed", "preempted") and "did not finish within 1 s" in end.reason
    assert await _wait_exit(proc, 15) == 0


async def test_drain_command_keeps_the_agent_up_but_idle(
    agent_process: tuple[str, subprocess.Popen[bytes]], js: JetStreamContext
):
    agent_id, proc = agent_process
    await eventually(lambda: _registered(js, agent_id), timeout=20)
    await send(js, drain(agent_id))
    await eventually(lambda: _draining_beat(js, agent_id), timeout=5)
    refused = run_stage(agent_id, "noop")
    await send(js, refused)
    await eventually(lambda: _commands_settled(js, agent_id))
    assert proc.poll() is None, "a drained agent keeps running"
    proc.send_signal(signal.SIGTERM)
    assert await _wait_exit(proc, 15) == 0
    assert kinds(await reports(js, refused.attempt)) == []


ORPHAN = """
import subprocess, sys, time
kid = subprocess.Popen(["sleep", "600"])
open(sys.argv[1], "w").write(str(kid.pid))
time.sleep(600)
"""


async def test_an_agent_killed_mid_attempt_reports_it_lost_on_restart_and_stops_its_leftovers(
    agent_factory: AgentFactory, js: JetStreamContext, tmp_path: Path
):
    first = agent_factory()
    await eventually(lambda: _registered(js, AGENT_ID), timeout=20)
    pid_file = tmp_path / "grandchild.pid"
    command = run_stage(AGENT_ID, "command", {"run": [sys.executable, "-c", ORPHAN, str(pid_file)]})
    await send(js, command)
    await eventually(lambda: pid_file.exists() and pid_file.read_text().strip().isdigit())
    grandchild = int(pid_file.read_text())
    first.kill()  # kill -9: no drain, no report
    first.wait()
    assert psutil.pid_exists(grandchild), "a grandchild outlives the agent (only the child gets PDEATHSIG)"
    agent_factory()
    end = await finished(js, command.attempt, timeout=20)
    assert (end.outcome, end.failure_class) == ("failed", "lost")
    assert str(grandchild) in end.reason
    await eventually(lambda: not _alive(grandchild), timeout=10)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
