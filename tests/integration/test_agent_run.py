"""Integration: the agent against a real nats-server, the test playing the scheduler.

Given an agent consuming its command subject, when the scheduler sends RunStage / CancelAttempt,
then the reports, log lines and metrics arrive on their streams, once, in order; a redelivered
command never starts a second process; a cancel leaves no process of the group behind.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import psutil
from nats.js import JetStreamContext

from tests.integration.agent_support import (
    agent_config,
    cancel,
    eventually,
    finished,
    kinds,
    log_lines,
    reports,
    run_stage,
    running_agent,
    send,
)
from verlyard_shared import subjects
from verlyard_shared.embedded.nats import EmbeddedNats
from verlyard_shared.reports import AgentHeartbeat, AgentHello, AttemptStartedReport

PY = sys.executable


async def test_noop_succeeds_with_reports_in_order(tmp_path: Path, nats_server: EmbeddedNats, js: JetStreamContext):
    async with running_agent(agent_config(tmp_path, nats_server)) as agent:
        command = run_stage(agent.agent_id, "noop", {"sleep_ms": 50})
        await send(js, command)
        end = await finished(js, command.attempt)
        assert end.outcome == "succeeded"
        assert kinds(await reports(js, command.attempt)) == [
            "AttemptAcceptedReport",
            "AttemptStartedReport",
            "AttemptFinishedReport",
        ]
        everything = await reports(js)
        assert any(isinstance(r, AgentHello) and r.cpu_slots == 2 and r.gpus == () for r in everything)
        beats = [r for r in everything if isinstance(r, AgentHeartbeat)]
        await eventually(lambda: True)
        assert beats, "heartbeats are sent"
        work_dir = agent.data_dir / "pipelines" / command.pipeline_id / "s1" / "attempts" / command.attempt
        assert (work_dir / "attempt.log").is_file()


async def test_command_streams_log_lines_and_its_exit_code(
    tmp_path: Path, nats_server: EmbeddedNats, js: JetStreamContext
):
    script = "import sys\nfor i in range(250): print('line', i)\nprint('oops', file=sys.stderr)\nsys.exit(3)"
    async with running_agent(agent_config(tmp_path, nats_server)) as agent:
        command = run_stage(agent.agent_id, "command", {"run": [PY, "-c", script]})
        await send(js, command)
        end = await finished(js, command.attempt)
        assert (end.outcome, end.exit_code, end.failure_class) == ("failed", 3, "user")
        assert "exit code 3" in end.reason

        async def all_lines() -> bool:
            return sum(1 for _, stream, _ in await log_lines(js, command.attempt) if stream == "stdout") == 250

        await eventually(all_lines)
        lines = await log_lines(js, command.attempt)
        offsets = [o for o, _, _ in lines]
        assert offsets == list(range(len(lines))), "every line once, numbered from 0"
        stdout = [t for _, s, t in lines if s == "stdout"]
        assert stdout == [f"line {i}" for i in range(250)]
        assert ("stderr", "oops") in [(s, t) for _, s, t in lines]
        log_file = (
            agent.data_dir / "pipelines" / command.pipeline_id / "s1" / "attempts" / command.attempt / "attempt.log"
        )
        text = log_file.read_text()
        assert "line 249\noops\n" in text and "[verlyard] process" in text


async def test_child_sees_its_gpus_and_no_agent_secrets(
    tmp_path: Path, nats_server: EmbeddedNats, js: JetStreamContext
):
    script = "import json, os; print(json.dumps(dict(os.environ)))"
    config = agent_config(tmp_path, nats_server)
    config = type(config)(**{**config.__dict__, "host_env": {**config.host_env, "VERLYARD_NATS_PASSWORD": "secret"}})
    async with running_agent(config) as agent:
        command = run_stage(agent.agent_id, "command", {"run": [PY, "-c", script], "env": {"MY_VAR": "1"}})
        await send(js, command)
        assert (await finished(js, command.attempt)).outcome == "succeeded"
        await eventually(lambda: _has_stdout(js, command.attempt))
        env = json.loads(next(t for _, s, t in await log_lines(js, command.attempt) if s == "stdout"))
        assert env["CUDA_VISIBLE_DEVICES"] == ""
        assert env["MY_VAR"] == "1" and env["VERLYARD_ATTEMPT"] == command.attempt
        assert "VERLYARD_NATS_PASSWORD" not in env


async def _has_stdout(js: JetStreamContext, attempt: str) -> bool:
    return any(s == "stdout" for _, s, _ in await log_lines(js, attempt))


async def test_redelivered_run_stage_never_starts_a_second_process(
    tmp_path: Path, nats_server: EmbeddedNats, js: JetStreamContext
):
    marker = tmp_path / "starts.txt"
    script = f"import os, time\nopen({str(marker)!r}, 'a').write(str(os.getpid()) + '\\n')\ntime.sleep(1.0)"
    config = agent_config(tmp_path, nats_server)
    async with running_agent(config) as agent:
        command = run_stage(agent.agent_id, "command", {"run": [PY, "-c", script]})
        await send(js, command)
        await eventually(lambda: marker.exists())
        await send(js, command, msg_id="redelivery-1")  # past the duplicate window, as NATS would see it
        assert (await finished(js, command.attempt)).outcome == "succeeded"
        await send(js, command, msg_id="redelivery-2")  # after it ended: answered from the local record
        await eventually(lambda: _all_acked(js, agent.agent_id))
    # A restarted agent (same data dir) still knows the attempt.
    async with running_agent(config) as agent:
        await send(js, command, msg_id="redelivery-3")
        await eventually(lambda: _all_acked(js, agent.agent_id))
    assert len(marker.read_text().split()) == 1
    got = kinds(await reports(js, command.attempt))
    # The stored end is re-sent with its own report id, so NATS dedupes it: one of each report.
    assert got == ["AttemptAcceptedReport", "AttemptStartedReport", "AttemptFinishedReport"]


async def _all_acked(js: JetStreamContext, agent_id: str) -> bool:
    info = await js.consumer_info(subjects.STREAM_COMMANDS, subjects.agent_command_consumer(agent_id))
    return info.num_pending == 0 and info.num_ack_pending == 0


CHILDREN = """
import os, signal, subprocess, sys, time
stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
kids = [subprocess.Popen([sys.executable, "-c", stubborn]) for _ in range(2)]
kids.append(subprocess.Popen(["sleep", "600"]))
open(sys.argv[1], "w").write(" ".join(str(p.pid) for p in [*kids]) + " " + str(os.getpid()))
signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(600)
"""


async def test_cancel_kills_the_whole_process_group_within_the_grace_period(
    tmp_path: Path, nats_server: EmbeddedNats, js: JetStreamContext
):
    pids_file = tmp_path / "pids.txt"
    config = agent_config(tmp_path, nats_server, cancel_grace_s=1.0)
    async with running_agent(config) as agent:
        command = run_stage(agent.agent_id, "command", {"run": [PY, "-c", CHILDREN, str(pids_file)]})
        await send(js, command)
        await eventually(lambda: pids_file.exists() and len(pids_file.read_text().split()) == 4)
        pids = [int(p) for p in pids_file.read_text().split()]
        assert all(psutil.pid_exists(p) for p in pids)
        started = asyncio.get_running_loop().time()
        await send(js, cancel(command))
        end = await finished(js, command.attempt)
        elapsed = asyncio.get_running_loop().time() - started
        assert end.outcome == "cancelled" and end.reason.startswith("cancelled by user")
        assert elapsed < config.cancel_grace_s + 4.0
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert alive == [], f"processes survived the cancel: {alive}"
        assert agent.running == {}


async def test_cancel_before_run_leaves_a_tombstone(tmp_path: Path, nats_server: EmbeddedNats, js: JetStreamContext):
    async with running_agent(agent_config(tmp_path, nats_server)) as agent:
        command = run_stage(agent.agent_id, "noop", {"sleep_ms": 10})
        await send(js, cancel(command))
        end = await finished(js, command.attempt)
        assert end.outcome == "cancelled"
        await send(js, command)
        await eventually(lambda: _all_acked(js, agent.agent_id))
        assert kinds(await reports(js, command.attempt)) == ["AttemptFinishedReport"]


async def test_poison_command_is_terminated_and_the_agent_goes_on(
    tmp_path: Path, nats_server: EmbeddedNats, js: JetStreamContext
):
    async with running_agent(agent_config(tmp_path, nats_server)) as agent:
        await js.publish(subjects.command_subject(agent.agent_id, "run_stage"), b'{"type": "cmd.nonsense"}')
        command = run_stage(agent.agent_id, "noop")
        await send(js, command)
        assert (await finished(js, command.attempt)).outcome == "succeeded"
        await eventually(lambda: _all_acked(js, agent.agent_id))


async def test_unknown_kind_module_fails_with_a_clear_error(
    tmp_path: Path, nats_server: EmbeddedNats, js: JetStreamContext, monkeypatch
):
    from verlyard_agent import stages

    monkeypatch.setitem(stages.MODULES, "export", "verlyard_agent.stages.no_such_module")
    async with running_agent(agent_config(tmp_path, nats_server)) as agent:
        command = run_stage(agent.agent_id, "export")
        await send(js, command)
        end = await finished(js, command.attempt)
        assert end.outcome == "failed" and end.failure_class == "infra"
        assert "not available on this agent" in end.reason
        started = [r for r in await reports(js, command.attempt) if isinstance(r, AttemptStartedReport)]
        assert len(started) == 1
