"""Adapter: what the telemetry, agent, dataset and /metrics routes share beyond the database (built by the
composition root; every part optional so tests can build the app without NATS)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

from litestar.di import NamedDependency

from verlyard_api.adapters.dataset_store import DatasetStore
from verlyard_api.adapters.nats_heartbeats import LiveAgents
from verlyard_api.adapters.pg_telemetry_listen import KeyedWakeup
from verlyard_api.promtext import OpsMetrics
from verlyard_shared.hosts.ssh import SshClient
from verlyard_shared.hosts.vault import KeyRing

MAX_DATASET_BYTES: Final = 2 * 1024**3
"""Default upload limit (VERLYARD_MAX_DATASET_BYTES): 413 past it."""


@dataclass
class Services:
    telemetry: KeyedWakeup = field(default_factory=KeyedWakeup)
    """Woken per pipeline when its metric points or log lines commit (persisters in-process, NOTIFY otherwise)."""
    live_agents: LiveAgents = field(default_factory=LiveAgents)
    datasets: DatasetStore | None = None
    """None: this API has no dataset folder configured (uploads answer 503)."""
    max_dataset_bytes: int = MAX_DATASET_BYTES
    ops: OpsMetrics = field(default_factory=OpsMetrics)
    relay_lag: Callable[[], Any] | None = None
    """The relay's `lag` figures (a RelayLag), when this process runs the relay."""
    key_ring: KeyRing | None = None
    """VERLYARD_SECRET_KEY parsed: seals and opens SSH host credentials (None: adding hosts answers 409)."""
    ssh: SshClient = field(default_factory=SshClient)
    """How the hosts routes reach a host (add, probe)."""

    def committed(self, pipeline_ids: set[str]) -> None:
        """The persisters' in-process wake-up (NOTIFY reaches the other API processes)."""
        for pipeline_id in pipeline_ids:
            self.telemetry.notify(pipeline_id)


Svc: TypeAlias = NamedDependency[Services]
"""The handlers' `svc` dependency."""
