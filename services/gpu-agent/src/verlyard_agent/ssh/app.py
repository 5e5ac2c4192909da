"""Entrypoint: `verlyard ssh-runner` — the control-plane process that drives every registered SSH host.

It reads the hosts (and their sealed credentials) from Postgres, opens them with VERLYARD_SECRET_KEY
(refusing to start without it when hosts exist), and runs one `SshAgent` per host (agent id `ssh-<host>`),
each registering, heartbeating and taking its commands over NATS like a local agent. Every
`RESCAN_S` it looks for added or removed hosts: a new host starts, a removed one drains and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import structlog

from verlyard_agent.ssh.agent import SshAgent, SshHostConfig, gpus_from_probe, ssh_agent_config
from verlyard_agent.ssh.link import HostLink
from verlyard_shared.hosts import pg as hosts_pg
from verlyard_shared.hosts import ssh
from verlyard_shared.hosts.remote import ROOT_DIR, RemoteError, check_root
from verlyard_shared.hosts.vault import KeyRing, VaultError, aad_for
from verlyard_shared.logging import configure_logging
from verlyard_shared.nats_topology import nats_tls
from verlyard_shared.runtime import retry_until, stop_on_signals
from verlyard_shared.settings import Settings

log = structlog.get_logger("verlyard.ssh.runner")

RESCAN_S: Final = 15.0


def host_config(row: hosts_pg.HostRow, *, lease_s: float) -> SshHostConfig:
    """What the runner needs of a host row (the root: recorded, else `~/.verlyard` once probed)."""
    if row.root is None:
        raise RemoteError(f"host {row.name} has no verlyard folder yet: probe it (`verlyard hosts probe {row.name}`)")
    # `~/.verlyard` as the probe found it (a leading dot is not an allowed segment of a configured folder).
    root = row.root if posixpath.basename(row.root) == ROOT_DIR and posixpath.isabs(row.root) else check_root(row.root)
    return SshHostConfig(
        name=row.name,
        root=root,
        trainer_python=row.trainer_python,
        gpus=tuple(gpus_from_probe(row.last_probe)),
        labels=dict(row.labels),
        lease_s=lease_s,
    )


class SshRunner:
    def __init__(self, settings: Settings, ring: KeyRing | None) -> None:
        self._settings = settings
        self._ring = ring
        self._agents: dict[str, tuple[SshAgent, asyncio.Task[None]]] = {}

    def _start(self, row: hosts_pg.HostRow) -> None:
        s = self._settings
        if self._ring is None:
            return
        try:
            host = host_config(row, lease_s=s.lease_s)
            credential = self._ring.open(row.sealed, aad=aad_for(row.name))
        except (RemoteError, VaultError) as exc:
            log.error("ssh_host_not_started", host=row.name, detail=str(exc))
            return
        target = ssh.Target(name=row.name, address=row.address, port=row.port, user=row.user, host_key=row.host_key)
        config = ssh_agent_config(
            host,
            home=Path(s.home),
            nats_url=s.nats_url or "",
            nats_user=s.nats_user,
            nats_password=s.nats_password,
            nats_creds=s.nats_creds,
            nats_tls=nats_tls(s),
            heartbeat_s=s.heartbeat_s,
            cancel_grace_s=s.agent_cancel_grace_s,
            slots=s.agent_slots,
        )
        agent = SshAgent(config, host, HostLink(target, credential))
        task = asyncio.create_task(agent.run(), name=f"ssh-{row.name}")
        self._agents[row.name] = (agent, task)
        log.info("ssh_host_started", host=row.name, agent=agent.agent_id, gpus=len(host.gpus), root=host.root)

    def sync(self, rows: Mapping[str, hosts_pg.HostRow]) -> None:
        for name, (agent, task) in list(self._agents.items()):
            if task.done():
                self._agents.pop(name)
                if not task.cancelled() and task.exception() is not None:
                    log.error("ssh_host_agent_crashed", host=name, error=repr(task.exception()))
            elif name not in rows:
                log.info("ssh_host_removed", host=name)
                agent.request_stop()
        for name, row in rows.items():
            if name not in self._agents:
                self._start(row)

    async def stop(self) -> None:
        for agent, _ in self._agents.values():
            agent.request_stop()
        tasks = [task for _, task in self._agents.values()]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=60)


async def serve(settings: Settings) -> None:
    from verlyard_shared.store.migrate import migrate
    from verlyard_shared.store.postgres import connect_pool

    if settings.database_url is None or settings.nats_url is None:
        raise SystemExit("verlyard ssh-runner: VERLYARD_DATABASE_URL and VERLYARD_NATS_URL must be set")
    stop = asyncio.Event()
    stop_on_signals(stop)
    database_url = settings.database_url
    pool = await retry_until("postgres", lambda: connect_pool(database_url), stop)
    if pool is None:
        return
    runner: SshRunner | None = None
    try:
        await migrate(pool)
        try:
            ring = KeyRing.parse(settings.secret_key) if settings.secret_key else None
            await hosts_pg.check_vault(pool, ring)
        except VaultError as exc:
            raise SystemExit(f"verlyard ssh-runner: {exc}") from None
        runner = SshRunner(settings, ring)
        log.info("ssh_runner_ready", key_ids=list(ring.ids) if ring else [], rescan_s=RESCAN_S)
        while not stop.is_set():
            try:
                rows = {row.name: row for row in await hosts_pg.list_hosts(pool)}
            except Exception as exc:  # Postgres away: keep the running hosts, look again later
                log.warning("ssh_hosts_unreadable", error=type(exc).__name__)
            else:
                runner.sync(rows)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=RESCAN_S)
    finally:
        if runner is not None:
            await runner.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pool.close(), timeout=10)


def main(settings: Settings) -> int:
    configure_logging("ssh-runner", fmt=settings.log_format, level=settings.log_level)
    asyncio.run(serve(settings))
    return 0
