"""Adapter: send commands to agents on `vy.cmd.<agent>.<kind>` with `Nats-Msg-Id` = command id.

Called only after the decision behind a command committed. Command ids are deterministic (the attempt
id for RunStage, `cancel-<attempt>`, `drain-<agent>-<version>`), so a re-send from the reconciliation
loop is dropped by JetStream's duplicate window; on top of that a command sent less than
`resend_after_s` ago is not sent again. A failed publish forgets the command, so the next
reconciliation sends it again: a lost message costs latency, never correctness.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import structlog
from nats.js import JetStreamContext
from nats.js.api import PubAck

from verlyard_shared import codec
from verlyard_shared.commands import AnyCommand
from verlyard_shared.nats_topology import consumer_config
from verlyard_shared.subjects import command_subject
from verlyard_shared.topology import agent_command_consumer

log = structlog.get_logger("verlyard.scheduler.commands")

MSG_ID_HEADER = "Nats-Msg-Id"


def command_kind(command: AnyCommand) -> str:
    """The subject's kind token: the command's tag without `cmd.` (`run_stage`, `cancel_attempt`, `drain`)."""
    tag = type(command).__struct_config__.tag
    assert isinstance(tag, str)
    return tag.removeprefix("cmd.")


class CommandSender:
    def __init__(self, js: JetStreamContext, *, resend_after_s: float = 3.0, ack_timeout_s: float = 10.0) -> None:
        self._js = js
        self._resend_after_s = resend_after_s
        self._ack_timeout_s = ack_timeout_s
        self._sent: dict[str, float] = {}
        self._acks: set[asyncio.Task[None]] = set()
        self._consumers: set[str] = set()
        self.published = 0
        self.first_sent_at: float | None = None
        """time.monotonic() of the first publish (restart benchmarks: "first command within 2 s")."""

    async def send(self, commands: Iterable[AnyCommand]) -> int:
        """Publish the commands not sent recently; returns how many were published."""
        now = time.monotonic()
        batch: list[tuple[AnyCommand, asyncio.Future[PubAck]]] = []
        for command in commands:
            last = self._sent.get(command.command_id)
            if last is not None and now - last < self._resend_after_s:
                continue
            self._sent[command.command_id] = now
            if self.first_sent_at is None:
                self.first_sent_at = time.monotonic()
            future = await self._js.publish_async(
                command_subject(command.agent, command_kind(command)),
                codec.encode(command),
                headers={MSG_ID_HEADER: command.command_id},
            )
            batch.append((command, future))
        if batch:
            self.published += len(batch)
            task = asyncio.create_task(self._settle(batch))
            self._acks.add(task)
            task.add_done_callback(self._acks.discard)
        return len(batch)

    async def _settle(self, batch: list[tuple[AnyCommand, asyncio.Future[PubAck]]]) -> None:
        futures = [future for _, future in batch]
        _, pending = await asyncio.wait(futures, timeout=self._ack_timeout_s)
        for future in pending:
            future.cancel()
        for command, future in batch:
            error = TimeoutError("no ack") if future.cancelled() else future.exception()
            if error is not None:
                self._sent.pop(command.command_id, None)  # the next reconciliation sends it again
                log.warning(
                    "command_publish_failed",
                    command=command.command_id,
                    agent=command.agent,
                    error=type(error).__name__,
                )

    def forget(self, older_than_s: float) -> None:
        """Drop send marks older than `older_than_s` (the marks only damp re-sends)."""
        cutoff = time.monotonic() - older_than_s
        for command_id in [c for c, t in self._sent.items() if t < cutoff]:
            del self._sent[command_id]

    async def ensure_agent(self, agent: str) -> None:
        """The agent's durable command consumer exists (idempotent; agents may lack the right to create it)."""
        if agent in self._consumers:
            return
        definition = agent_command_consumer(agent)
        await self._js.add_consumer(definition.stream, consumer_config(definition))
        self._consumers.add(agent)

    async def close(self) -> None:
        tasks = list(self._acks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
