"""Adapter: live agent heartbeats (GPU utilisation, what the agent says it runs), kept in memory.

Heartbeats are not events (the scheduler folds them into leases, not into the log), and VY_REPORTS is a
work queue owned by the scheduler's consumer, so the API listens with a plain core-NATS subscription on
`vy.rpt.*.heartbeat` (every JetStream publish is also a core message) and keeps the latest per agent.
Nothing durable: after an API restart the utilisation shows again with each agent's next heartbeat.
"""

from __future__ import annotations

import contextlib
from typing import Final

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from verlyard_api.agents import newer
from verlyard_shared import subjects
from verlyard_shared.codec import DecodeError, ValidationError, decode_report
from verlyard_shared.reports import AgentHeartbeat

log = structlog.get_logger("verlyard.api.heartbeats")

HEARTBEATS: Final = f"{subjects.PREFIX}.rpt.*.heartbeat"


class LiveAgents:
    def __init__(self) -> None:
        self.heartbeats: dict[str, AgentHeartbeat] = {}
        self._sub: Subscription | None = None

    def seen(self, heartbeat: AgentHeartbeat) -> None:
        if newer(self.heartbeats.get(heartbeat.agent), heartbeat):
            self.heartbeats[heartbeat.agent] = heartbeat

    async def _on_msg(self, msg: Msg) -> None:
        try:
            report = decode_report(msg.data)
        except (DecodeError, ValidationError) as exc:
            log.debug("heartbeat_ignored", subject=msg.subject, error=type(exc).__name__)
            return
        if isinstance(report, AgentHeartbeat):
            self.seen(report)

    async def start(self, nc: NATS) -> None:
        self._sub = await nc.subscribe(HEARTBEATS, cb=self._on_msg)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
