"""Service layer: one SSH host as an agent. It is the local agent (`verlyard_agent.agent.Agent`: journal,
registration, heartbeats, its command consumer, attempt records, cancel, drain) with one difference:
a stage's child starts on the host (`child.RemoteSpawner`) instead of here. The agent id is
`ssh-<host>`; its GPUs and labels are the host's last probe and its labels.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from verlyard_agent.agent import Agent, AgentConfig
from verlyard_agent.ssh.child import RemoteSpawner
from verlyard_agent.ssh.link import HostLink, LinkDown
from verlyard_agent.ssh.paths import PathMap
from verlyard_shared.events import GpuInfo
from verlyard_shared.hosts import remote
from verlyard_shared.hosts.remote import RemoteError
from verlyard_shared.nats_topology import NatsTls
from verlyard_shared.reports import GpuStatus

REMOTE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def agent_id_for(host: str) -> str:
    return f"ssh-{host}"


class ProbedGpus:
    """The host's GPUs as its last probe found them (a GpuProbe: no live NVML over SSH)."""

    def __init__(self, gpus: Sequence[GpuInfo]) -> None:
        self._gpus = tuple(gpus)

    def inventory(self) -> tuple[GpuInfo, ...]:
        return self._gpus

    def status(self) -> tuple[GpuStatus, ...]:
        return ()

    def processes(self, indices: Sequence[int]) -> dict[int, tuple[int, ...]]:
        return {}


def gpus_from_probe(probe: Mapping[str, Any] | None) -> list[GpuInfo]:
    out: list[GpuInfo] = []
    for gpu in (probe or {}).get("gpus") or []:
        if isinstance(gpu, Mapping) and isinstance(gpu.get("index"), int):
            out.append(
                GpuInfo(
                    index=int(gpu["index"]),
                    name=str(gpu.get("name") or ""),
                    uuid=str(gpu.get("uuid") or ""),
                    memory_total_mb=int(gpu.get("memory_total_mb") or 0),
                )
            )
    return out


def launcher_dir() -> str:
    return str(resources.files("verlyard_agent").joinpath("launchers"))


@dataclass(frozen=True, kw_only=True)
class SshHostConfig:
    name: str
    root: str
    """The host's verlyard folder (remote.check_root'ed)."""
    trainer_python: str
    gpus: tuple[GpuInfo, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict[str, str])
    lease_s: float = 30.0


class SshAgent(Agent):
    def __init__(self, config: AgentConfig, host: SshHostConfig, link: HostLink) -> None:
        super().__init__(config, probe=ProbedGpus(host.gpus))
        self.host = host
        self.link = link
        self._host_down = False
        self.spawner = RemoteSpawner(
            link,
            paths=PathMap(local_root=str(config.data_dir), remote_root=host.root),
            shipped_prefixes=[launcher_dir(), str(config.datasets_dir)],
            lease_s=host.lease_s,
        )

    def _open_local(self) -> None:
        super()._open_local()
        assert self._services is not None
        self._services.spawner = self.spawner

    async def _send_heartbeat(self) -> None:
        """Heartbeats vouch for the host, not for this process: none while the host has been unreachable for
        longer than the lease, so the scheduler declares the agent lost and places nothing on it; when the
        host answers again the agent registers again (hello) and beats on."""
        if not await self._host_answers():
            if not self._host_down:
                self._host_down = True
                self._log.warning("ssh_host_unreachable", down_s=round(self.link.down_for(), 1))
            return
        if self._host_down:
            self._host_down = False
            self._log.info("ssh_host_reachable_again")
            self._spawn(self._send_hello())
        await super()._send_heartbeat()

    async def _host_answers(self) -> bool:
        last = self.link.last_ok
        if last is not None and time.monotonic() - last < max(self.config.heartbeat_s, 1.0):
            return True  # an attempt's polling just used the connection
        try:
            await self.link.run(remote.command(["true"]), timeout_s=max(2.0, min(10.0, self.config.heartbeat_s * 2)))
            return True
        except LinkDown:
            return self.link.down_for() <= self.host.lease_s

    async def _recover(self) -> None:
        """Before the local agent reports them lost (ADR 0008, decision 4): stop what is left of those
        attempts on the host, so a run nobody follows any more does not hold its GPUs."""
        assert self.store is not None
        for record in self.store.unfinished():
            files = remote.run_files(self.host.root, "runs", record.attempt)
            try:
                await self.link.run(remote.signal_group(files, "KILL"), timeout_s=20.0)
                self._log.warning("remote_leftovers_stopped", attempt=record.attempt, run=files.folder)
            except (LinkDown, RemoteError) as exc:
                self._log.error("remote_leftovers_not_stopped", attempt=record.attempt, error=str(exc))
        await super()._recover()

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            await self.link.close()


def ssh_agent_config(
    host: SshHostConfig,
    *,
    home: Path,
    nats_url: str,
    nats_user: str | None = None,
    nats_password: str | None = None,
    nats_creds: str | None = None,
    nats_tls: NatsTls | None = None,
    heartbeat_s: float = 5.0,
    cancel_grace_s: float = 10.0,
    slots: int = 2,
) -> AgentConfig:
    """The local agent's configuration for a host: its mirror folder `<home>/ssh/<host>`, its Python."""
    agent_id = agent_id_for(host.name)
    return AgentConfig(
        agent_id=agent_id,
        data_dir=home / "ssh" / host.name,
        datasets_dir=home / "ssh-datasets",
        nats_url=nats_url,
        nats_user=nats_user,
        nats_password=nats_password,
        nats_creds=nats_creds,
        nats_tls=nats_tls,
        slots=slots,
        labels={**host.labels, "verlyard/ssh-host": host.name},
        heartbeat_s=heartbeat_s,
        cancel_grace_s=cancel_grace_s,
        trainer_python=host.trainer_python,
        # What a remote child may inherit: the host's own login environment supplies the rest.
        host_env={"PATH": REMOTE_PATH},
    )
