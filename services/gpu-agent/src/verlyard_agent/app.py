"""Entrypoint: the GPU agent (composition root). Speaks only NATS, never the database.

Foundation scope: it registers (hello report) and heartbeats on its own report subjects. Running
stages, NVML inventory, drain and the local journal arrive with the agent issue (#4).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Sequence
from datetime import UTC, datetime

import structlog

from verlyard_agent import __version__
from verlyard_shared import codec, subjects
from verlyard_shared.ids import new_id
from verlyard_shared.logging import configure_logging
from verlyard_shared.reports import AgentHeartbeat, AgentHello
from verlyard_shared.runtime import retry_until, stop_on_signals
from verlyard_shared.settings import Settings, parse_labels

log = structlog.get_logger("verlyard.agent")


def default_agent_id() -> str:
    """The host name, reduced to characters that are safe in a NATS subject token."""
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return name[:64] or "agent"


async def serve(settings: Settings, agent_id: str, slots: int, labels: dict[str, str]) -> None:
    from verlyard_shared.nats_topology import connect_nats

    stop = asyncio.Event()
    stop_on_signals(stop)
    if settings.nats_url is None:
        raise SystemExit("verlyard agent: VERLYARD_NATS_URL must be set")
    nats_url = settings.nats_url
    nc = await retry_until(
        "nats",
        lambda: connect_nats(
            nats_url,
            name=f"verlyard-agent-{agent_id}",
            user=settings.nats_user,
            password=settings.nats_password,
            creds=settings.nats_creds,
        ),
        stop,
    )
    if nc is None:
        return
    js = nc.jetstream()
    bound = log.bind(agent=agent_id)
    try:
        hello = AgentHello(
            report_id=new_id(),
            agent=agent_id,
            sent_at=datetime.now(UTC),
            hostname=socket.gethostname(),
            cpu_slots=slots,
            labels=labels,
            version=__version__,
        )
        await js.publish(
            subjects.report_subject(agent_id, "hello"), codec.encode(hello), headers={"Nats-Msg-Id": hello.report_id}
        )
        bound.info("agent_registered", slots=slots, labels=labels)
        while not stop.is_set():
            beat = AgentHeartbeat(report_id=new_id(), agent=agent_id, sent_at=datetime.now(UTC))
            with contextlib.suppress(Exception):  # a missed heartbeat is retried next period
                await js.publish(
                    subjects.report_subject(agent_id, "heartbeat"),
                    codec.encode(beat),
                    headers={"Nats-Msg-Id": beat.report_id},
                    timeout=settings.heartbeat_s,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=settings.heartbeat_s)
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
        bound.info("agent_stopped")


def main(
    settings: Settings, *, agent_id: str | None = None, slots: int | None = None, labels: Sequence[str] = ()
) -> int:
    configure_logging("agent", fmt=settings.log_format, level=settings.log_level)
    chosen = agent_id or settings.agent_id or default_agent_id()
    subjects.token(chosen)
    merged = {**settings.agent_labels, **parse_labels(",".join(labels), name="--label")}
    asyncio.run(serve(settings, chosen, slots if slots is not None else settings.agent_slots, merged))
    return 0
