"""Entrypoint: the GPU agent's composition root (`verlyard agent`). Speaks only NATS, never the database.

Settings come from `VERLYARD_*` (settings.py) and the flags `--id`, `--slots`, `--label`,
`--data-dir`. SIGTERM/SIGINT drain (finish running attempts, take no new work, then exit); a second
one stops the attempts. Exit codes: 0 after a clean stop, 2 for a configuration error, 3 when
another agent already runs with the same data dir.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from verlyard_agent.agent import Agent, AgentBusy, AgentConfig
from verlyard_agent.layout import default_data_dir
from verlyard_shared import subjects
from verlyard_shared.logging import configure_logging
from verlyard_shared.nats_topology import nats_tls
from verlyard_shared.settings import Settings, SettingsError, parse_labels

log = structlog.get_logger("verlyard.agent")


def default_agent_id() -> str:
    """The host name, reduced to characters that are safe in a NATS subject token."""
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return name[:64] or "agent"


def build_config(
    settings: Settings,
    *,
    agent_id: str | None = None,
    slots: int | None = None,
    labels: Sequence[str] = (),
    data_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> AgentConfig:
    """The agent's configuration from settings and flags; SettingsError names what is wrong."""
    chosen = agent_id or settings.agent_id or default_agent_id()
    try:
        subjects.token(chosen)
    except ValueError:
        raise SettingsError(f"agent id {chosen!r} may hold only letters, digits, '_' and '-'") from None
    if settings.nats_url is None:
        raise SettingsError("VERLYARD_NATS_URL is not set (agents speak only NATS)")
    if slots is not None and slots < 0:
        raise SettingsError(f"--slots must be >= 0, got {slots}")
    merged = {**settings.agent_labels, **parse_labels(",".join(labels), name="--label")}
    return AgentConfig(
        agent_id=chosen,
        data_dir=(data_dir.expanduser().resolve() if data_dir is not None else default_data_dir(settings.home, chosen)),
        datasets_dir=settings.home / "datasets",
        nats_url=settings.nats_url,
        nats_user=settings.nats_user,
        nats_password=settings.nats_password,
        nats_creds=settings.nats_creds,
        nats_tls=nats_tls(settings),
        slots=slots if slots is not None else settings.agent_slots,
        labels=merged,
        heartbeat_s=settings.heartbeat_s,
        cancel_grace_s=settings.agent_cancel_grace_s,
        drain_timeout_s=settings.agent_drain_timeout_s,
        trainer_python=settings.trainer_python,
        host_env=dict(os.environ if env is None else env),
    )


async def serve(config: AgentConfig) -> None:
    agent = Agent(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.request_stop)
    try:
        await agent.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(
    settings: Settings,
    *,
    agent_id: str | None = None,
    slots: int | None = None,
    labels: Sequence[str] = (),
    data_dir: Path | None = None,
) -> int:
    configure_logging("agent", fmt=settings.log_format, level=settings.log_level)
    try:
        config = build_config(settings, agent_id=agent_id, slots=slots, labels=labels, data_dir=data_dir)
    except SettingsError as exc:
        print(f"verlyard agent: error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config))
    except AgentBusy as exc:
        print(f"verlyard agent: error: {exc}", file=sys.stderr)
        return 3
    return 0
