"""Testing: a fake GPU agent for the scheduler's integration tests. It speaks the real NATS protocol
(its own durable command consumer, hello/heartbeat/accepted/started/finished reports encoded with the
codec, `Nats-Msg-Id` = report id) but runs nothing: a stage "runs" for `sleep_ms` (its `with:` block)
or `run_s`, then succeeds, or fails when told to. It can pause like a SIGSTOP'd process (`pause()`:
no heartbeats, no commands, no progress; `resume()` carries on, stale reports included) or die like a
SIGKILL'd one (`kill()`). The real agent has its own tests; this one exists to test the scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from verlyard_shared import codec, subjects
from verlyard_shared.commands import CancelAttempt, DrainAgent, RunStage
from verlyard_shared.events import GpuInfo
from verlyard_shared.ids import new_id
from verlyard_shared.nats_topology import connect_nats, consumer_config
from verlyard_shared.reports import (
    AgentHeartbeat,
    AgentHello,
    AttemptAcceptedReport,
    AttemptFinishedReport,
    AttemptStartedReport,
    Report,
)
from verlyard_shared.topology import agent_command_consumer


def _kind(report: Report) -> str:
    tag = type(report).__struct_config__.tag
    assert isinstance(tag, str)
    return tag.removeprefix("rpt.")


class FakeAgent:
    def __init__(
        self,
        url: str,
        agent_id: str,
        *,
        slots: int = 4,
        gpus: Sequence[GpuInfo] = (),
        labels: dict[str, str] | None = None,
        heartbeat_s: float = 0.2,
        run_s: float = 0.05,
    ) -> None:
        self.url = url
        self.id = agent_id
        self.slots = slots
        self.gpus = tuple(gpus)
        self.labels = labels or {}
        self.heartbeat_s = heartbeat_s
        self.run_s = run_s
        self.fail: dict[str, list[str]] = {}
        """stage -> failure classes for its next attempts, used up in order (then it succeeds)."""
        self.hang: set[str] = set()
        """Stages whose attempts never finish on their own (until cancelled)."""
        self.runs: list[RunStage] = []
        """Every distinct attempt this agent was told to run."""
        self.cancels: list[CancelAttempt] = []
        self.drained = False
        self.finished: dict[str, str] = {}
        """attempt -> outcome reported."""
        self._attempts: dict[str, asyncio.Task[None]] = {}
        self._awake = asyncio.Event()
        self._awake.set()
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # ---- life ----------------------------------------------------------------------------------------

    async def start(self) -> FakeAgent:
        self._nc = await connect_nats(self.url, name=f"fake-agent-{self.id}")
        self._js = self._nc.jetstream()
        definition = agent_command_consumer(self.id)
        await self._js.add_consumer(definition.stream, consumer_config(definition))
        sub = await self._js.pull_subscribe_bind(durable=definition.durable, stream=definition.stream)
        await self.report(
            AgentHello(
                report_id=new_id(),
                agent=self.id,
                sent_at=datetime.now(UTC),
                hostname=f"host-{self.id}",
                gpus=self.gpus,
                cpu_slots=self.slots,
                labels=self.labels,
                version="fake",
            )
        )
        self._tasks = [asyncio.create_task(self._heartbeats()), asyncio.create_task(self._commands(sub))]
        return self

    async def stop(self) -> None:
        """Stop without reporting anything more (the attempts are simply gone: like SIGKILL)."""
        tasks = [*self._tasks, *self._attempts.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
            for task in tasks:
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: a failed attempt task is not an error of the test
        self._tasks.clear()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None

    kill = stop

    def pause(self) -> None:
        """Like SIGSTOP: no heartbeats, no commands, no progress, no reports."""
        self._awake.clear()

    def resume(self) -> None:
        self._awake.set()

    @property
    def running(self) -> list[str]:
        return [a for a, t in self._attempts.items() if not t.done()]

    # ---- wire ----------------------------------------------------------------------------------------

    async def report(self, report: Report) -> None:
        assert self._js is not None
        await self._js.publish(
            subjects.report_subject(self.id, _kind(report)),
            codec.encode(report),
            headers={"Nats-Msg-Id": report.report_id},
        )

    def _base(self, cmd: RunStage | CancelAttempt) -> dict[str, Any]:
        return {
            "report_id": new_id(),
            "agent": self.id,
            "sent_at": datetime.now(UTC),
            "pipeline_id": cmd.pipeline_id,
            "stage": cmd.stage,
            "attempt": cmd.attempt,
        }

    async def _heartbeats(self) -> None:
        while True:
            await self._awake.wait()
            beat = AgentHeartbeat(
                report_id=new_id(),
                agent=self.id,
                sent_at=datetime.now(UTC),
                running_attempts=tuple(self.running),
                draining=self.drained,
            )
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await self.report(beat)
            await asyncio.sleep(self.heartbeat_s)

    async def _commands(self, sub: JetStreamContext.PullSubscription) -> None:
        while True:
            await self._awake.wait()
            try:
                msgs = await sub.fetch(20, timeout=0.3)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for msg in msgs:
                await self._awake.wait()
                await self._handle(msg)

    async def _handle(self, msg: Msg) -> None:
        command = codec.decode_command(msg.data)
        match command:
            case RunStage():
                if command.attempt not in self._attempts:
                    self.runs.append(command)
                    self._attempts[command.attempt] = asyncio.create_task(self._run(command))
                # Accepted idempotently by attempt: a re-sent command gets the acceptance again.
                await self.report(AttemptAcceptedReport(**self._base(command)))
            case CancelAttempt():
                self.cancels.append(command)
                task = self._attempts.get(command.attempt)
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.wait({task})  # never swallows a cancellation of this handler
                    self.finished[command.attempt] = "cancelled"
                    await self.report(
                        AttemptFinishedReport(**self._base(command), outcome="cancelled", reason=command.reason)
                    )
            case DrainAgent():
                self.drained = True
        await msg.ack()

    async def _run(self, cmd: RunStage) -> None:
        await asyncio.sleep(0)  # let the acceptance go first
        await self._awake.wait()
        await self.report(AttemptStartedReport(**self._base(cmd), pid=4242))
        seconds = float(cmd.spec.params.get("sleep_ms", self.run_s * 1000)) / 1000
        if cmd.stage in self.hang:
            seconds = 3600.0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            await asyncio.sleep(min(left, 0.05))
            if not self._awake.is_set():
                paused = loop.time()
                await self._awake.wait()
                deadline += loop.time() - paused
        failures = self.fail.get(cmd.stage)
        if failures:
            cls = failures.pop(0)
            self.finished[cmd.attempt] = "failed"
            await self.report(
                AttemptFinishedReport(
                    **self._base(cmd), outcome="failed", failure_class=cls, exit_code=1, reason=f"told to fail ({cls})"
                )
            )
            return
        self.finished[cmd.attempt] = "succeeded"
        await self.report(
            AttemptFinishedReport(
                **self._base(cmd), outcome="succeeded", exit_code=0, outputs={"by": self.id, "stage": cmd.stage}
            )
        )
