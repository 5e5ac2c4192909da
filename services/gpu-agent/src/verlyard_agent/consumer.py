"""Adapter: the agent's own durable pull consumer on `vy.cmd.<agent>.>` (stream VY_COMMANDS).

Decodes once, at the edge: an undecodable message is poison (term + log: NATS then emits the
MSG_TERMINATED advisory); a handler that raises is nak'ed with a delay, so a transient failure is
retried a bounded number of times (`max_deliver`) before it surfaces (reliability T15).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import structlog
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from verlyard_shared import codec, subjects
from verlyard_shared.commands import AnyCommand
from verlyard_shared.nats_topology import consumer_config, ensure_topology
from verlyard_shared.topology import agent_command_consumer

log = structlog.get_logger("verlyard.agent.consumer")

Verdict = Literal["ack", "term"]
Handler = Callable[[AnyCommand], Awaitable[Verdict]]
NAK_DELAYS_S = (1.0, 2.0, 5.0, 10.0)


async def ensure_command_consumer(js: JetStreamContext, agent_id: str) -> None:
    """Create (or update in place) this agent's durable. Idempotent.

    Only the agent's own consumer: streams belong to the control plane (which may run them with 3
    replicas; re-declaring them from here with defaults would fight it). A NATS without streams
    (an agent started before any other service) gets the whole declared topology once.
    """
    definition = agent_command_consumer(agent_id)
    try:
        await js.stream_info(definition.stream)
    except NotFoundError:
        await ensure_topology(js, agents=[agent_id])
        return
    await js.add_consumer(definition.stream, consumer_config(definition))


class CommandConsumer:
    def __init__(self, js: JetStreamContext, agent_id: str, handler: Handler, *, batch: int = 10) -> None:
        self.js = js
        self.agent_id = agent_id
        self.handler = handler
        self.batch = batch
        self.durable = subjects.agent_command_consumer(agent_id)
        self._log = log.bind(agent=agent_id, consumer=self.durable)

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self.js.pull_subscribe_bind(durable=self.durable, stream=subjects.STREAM_COMMANDS)
        failing_since: float | None = None
        try:
            while not stop.is_set():
                try:
                    messages = await sub.fetch(self.batch, timeout=1.0)
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
            delivered = msg.metadata.num_delivered if msg.metadata is not None else 1
            delay = NAK_DELAYS_S[min(delivered, len(NAK_DELAYS_S)) - 1]
            bound.exception("command_failed", delivered=delivered, retry_in_s=delay, error=type(exc).__name__)
            await self._settle(msg.nak(delay=delay), "nak")
            return
        await self._settle(msg.ack() if verdict == "ack" else msg.term(), verdict)

    async def _settle(self, action: Awaitable[None], what: str) -> None:
        try:
            await action
        except Exception as exc:  # lost with the connection: redelivered later, handled idempotently
            self._log.warning("command_settle_failed", action=what, error=type(exc).__name__)
