"""Adapter: the agent's own durable pull consumer on `vy.cmd.<agent>.>` (stream VY_COMMANDS).

Decodes once, at the edge: an undecodable message is poison (term + log: NATS then emits the
MSG_TERMINATED advisory); a handler that raises is tried again after 0.5, 1, 2 and 4 s while the
message is held (in_progress), `max_deliver` tries in all counting earlier deliveries; then the
command is poison (reliability T15): it goes to `on_poison` (the agent fails the attempt with class
`poison` and the error, so the scheduler fails the stage at once) and is terminated, instead of
going silent until the scheduler's accept deadline re-places it to fail the same way again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import structlog
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from verlyard_shared import codec, subjects
from verlyard_shared.commands import AnyCommand
from verlyard_shared.nats_fetch import fetch_ready
from verlyard_shared.nats_topology import consumer_config, ensure_topology
from verlyard_shared.topology import agent_command_consumer

log = structlog.get_logger("verlyard.agent.consumer")

Verdict = Literal["ack", "term"]
Handler = Callable[[AnyCommand], Awaitable[Verdict]]
PoisonHandler = Callable[[AnyCommand, BaseException, int], Awaitable[None]]
# Short enough that all `max_deliver` (5) tries of a failing RunStage fit in ~7.5 s, well inside the
# scheduler's accept deadline (the lease, 30 s by default): the attempt then fails as `poison` instead
# of being declared lost and re-placed (which would poison the next attempt the same way).
NAK_DELAYS_S = (0.5, 1.0, 2.0, 4.0)


async def ensure_command_consumer(js: JetStreamContext, agent_id: str) -> None:
    """Create (or update in place) this agent's durable. Idempotent.

    Only the agent's own consumer: streams belong to the control plane (which may run them with 3
    replicas; re-declaring them from here with defaults would fight it). A NATS without streams
    (an agent started before any other service) gets the whole declared topology once, when this
    agent's user may do that (a restricted agent user may only create its own durable, through the
    filtered create subject: docs/adr/0015; then it waits for the control plane).
    """
    definition = agent_command_consumer(agent_id)
    try:
        await js.add_consumer(definition.stream, consumer_config(definition))
    except NotFoundError:  # no VY_COMMANDS stream yet
        await ensure_topology(js, agents=[agent_id])


class CommandConsumer:
    def __init__(
        self,
        js: JetStreamContext,
        agent_id: str,
        handler: Handler,
        *,
        batch: int = 10,
        on_poison: PoisonHandler | None = None,
    ) -> None:
        self.js = js
        self.agent_id = agent_id
        self.handler = handler
        self.batch = batch
        self.on_poison = on_poison
        self.max_deliver = agent_command_consumer(agent_id).max_deliver
        self._retrying: set[asyncio.Task[None]] = set()
        self.durable = subjects.agent_command_consumer(agent_id)
        self._log = log.bind(agent=agent_id, consumer=self.durable)

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self.js.pull_subscribe_bind(durable=self.durable, stream=subjects.STREAM_COMMANDS)
        failing_since: float | None = None
        try:
            while not stop.is_set():
                try:
                    messages = await fetch_ready(sub, self.batch, 1.0)
                except (NatsTimeoutError, TimeoutError):  # nothing to fetch (nats-py raises either)
                    continue
                except Exception as exc:  # disconnected, consumer gone, server restarting
                    if failing_since is None:
                        failing_since = time.monotonic()
                        self._log.warning("command_fetch_failed", error=type(exc).__name__, detail=str(exc))
                    await self._recover(stop)
                    continue
                if failing_since is not None:
                    self._log.info("command_fetch_resumed", after_s=round(time.monotonic() - failing_since, 2))
                    failing_since = None
                for msg in messages:
                    await self._handle(msg)
        finally:
            for task in list(self._retrying):
                task.cancel()  # unacked: JetStream redelivers after the ack deadline, the count goes on
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection may already be gone at shutdown
                self._log.debug("command_unsubscribe_failed", error=type(exc).__name__)

    async def _recover(self, stop: asyncio.Event) -> None:
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        except TimeoutError:
            pass
        try:  # a NATS that lost its state (a fresh server) needs the durable again
            await asyncio.wait_for(ensure_command_consumer(self.js, self.agent_id), timeout=5.0)
        except Exception as exc:
            self._log.debug("command_consumer_ensure_failed", error=type(exc).__name__)

    async def _handle(self, msg: Msg) -> None:
        try:
            command = codec.decode_command(msg.data)
        except (codec.DecodeError, codec.ValidationError) as exc:
            self._log.error("command_poison", subject=msg.subject, error=str(exc), size=len(msg.data))
            await self._settle(msg.term(), "term")
            return
        bound = self._log.bind(command=type(command).__name__, command_id=command.command_id)
        try:
            verdict = await self.handler(command)
        except Exception as exc:
            # Retried here, not by a nak: a nak's delayed redelivery can land on a pull request that
            # already expired client-side, and then waits out the ack deadline (10 s, 20 s ...), far
            # past the scheduler's accept deadline. The message is held with in_progress meanwhile;
            # if the agent dies, JetStream redelivers it and the count goes on from `num_delivered`.
            task = asyncio.get_running_loop().create_task(self._retry(msg, command, exc, bound), name="command-retry")
            self._retrying.add(task)
            task.add_done_callback(self._retrying.discard)
            return
        await self._settle(msg.ack() if verdict == "ack" else msg.term(), verdict)

    async def _retry(self, msg: Msg, command: AnyCommand, exc: Exception, bound: Any) -> None:
        """Handle again after 0.5, 1, 2, 4 s; after `max_deliver` tries in all the command is poison."""
        tries = msg.metadata.num_delivered if msg.metadata is not None else 1
        while tries < self.max_deliver:
            delay = NAK_DELAYS_S[min(tries, len(NAK_DELAYS_S)) - 1]
            bound.warning(
                "command_failed", tries=tries, retry_in_s=delay, error=type(exc).__name__, detail=str(exc)[:300]
            )
            await asyncio.sleep(delay)
            with contextlib.suppress(Exception):  # keeps the message ours; lost with the connection is fine
                await msg.in_progress()
            tries += 1
            try:
                verdict = await self.handler(command)
            except Exception as again:
                exc = again
                continue
            await self._settle(msg.ack() if verdict == "ack" else msg.term(), verdict)
            return
        bound.error("command_poison", tries=tries, error=type(exc).__name__, detail=str(exc)[:300])
        if self.on_poison is not None:
            try:
                await self.on_poison(command, exc, tries)
            except Exception as poison_exc:  # cannot even record it: NATS's MSG_TERMINATED advisory remains
                bound.exception("command_poison_report_failed", error=type(poison_exc).__name__)
        await self._settle(msg.term(), "term")

    async def _settle(self, action: Awaitable[None], what: str) -> None:
        try:
            await action
        except Exception as exc:  # lost with the connection: redelivered later, handled idempotently
            self._log.warning("command_settle_failed", action=what, error=type(exc).__name__)
