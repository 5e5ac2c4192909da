"""Adapter: the host's GPUs through NVML (`pynvml` from nvidia-ml-py) and the hello/heartbeat reports.

A host without GPUs, without the NVIDIA driver or without libnvidia-ml reports no GPUs and offers
CPU slots only. NVML calls can block when a GPU misbehaves, so the agent calls them in a thread.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Sequence
from datetime import datetime
from types import ModuleType
from typing import Any, Protocol

import structlog

from verlyard_agent import __version__
from verlyard_shared.events import GpuInfo
from verlyard_shared.ids import new_id
from verlyard_shared.reports import AgentHeartbeat, AgentHello, GpuStatus

log = structlog.get_logger("verlyard.agent.inventory")


class GpuProbe(Protocol):
    def inventory(self) -> tuple[GpuInfo, ...]: ...

    def status(self) -> tuple[GpuStatus, ...]: ...

    def processes(self, indices: Sequence[int]) -> dict[int, tuple[int, ...]]:
        """Pids with a compute context on each of these GPUs."""
        ...


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlProbe:
    """GPUs through NVML; `nvml` is the pynvml module (a fake in tests). Never raises: no NVML, no GPUs."""

    def __init__(self, nvml: ModuleType | Any | None = None) -> None:
        if nvml is None:
            import pynvml

            nvml = pynvml
        self._nvml: Any = nvml
        self._lock = threading.Lock()
        self._ready = False
        self.unavailable_reason: str | None = None
        try:
            self._nvml.nvmlInit()
            self._ready = True
        except self._nvml.NVMLError as exc:
            self.unavailable_reason = f"NVML unavailable: {exc}"
        except OSError as exc:  # a broken libnvidia-ml
            self.unavailable_reason = f"NVML unavailable: {exc}"

    def _count(self) -> int:
        if not self._ready:
            return 0
        try:
            return int(self._nvml.nvmlDeviceGetCount())
        except self._nvml.NVMLError as exc:
            log.warning("nvml_error", call="nvmlDeviceGetCount", error=str(exc))
            return 0

    def inventory(self) -> tuple[GpuInfo, ...]:
        nv = self._nvml
        gpus: list[GpuInfo] = []
        with self._lock:
            for index in range(self._count()):
                try:
                    handle = nv.nvmlDeviceGetHandleByIndex(index)
                    memory = nv.nvmlDeviceGetMemoryInfo(handle)
                    gpus.append(
                        GpuInfo(
                            index=index,
                            name=_text(nv.nvmlDeviceGetName(handle)),
                            uuid=_text(nv.nvmlDeviceGetUUID(handle)),
                            memory_total_mb=int(memory.total) // (1024 * 1024),
                        )
                    )
                except nv.NVMLError as exc:
                    log.warning("nvml_error", call="inventory", gpu=index, error=str(exc))
        return tuple(gpus)

    def status(self) -> tuple[GpuStatus, ...]:
        nv = self._nvml
        out: list[GpuStatus] = []
        with self._lock:
            for index in range(self._count()):
                try:
                    handle = nv.nvmlDeviceGetHandleByIndex(index)
                    memory = nv.nvmlDeviceGetMemoryInfo(handle)
                    util = nv.nvmlDeviceGetUtilizationRates(handle)
                    try:
                        temperature: float | None = float(nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))
                    except nv.NVMLError:
                        temperature = None
                    out.append(
                        GpuStatus(
                            index=index,
                            utilization_pct=float(util.gpu),
                            memory_used_mb=int(memory.used) // (1024 * 1024),
                            temperature_c=temperature,
                        )
                    )
                except nv.NVMLError as exc:
                    log.warning("nvml_error", call="status", gpu=index, error=str(exc))
        return tuple(out)

    def processes(self, indices: Sequence[int]) -> dict[int, tuple[int, ...]]:
        nv = self._nvml
        out: dict[int, tuple[int, ...]] = {}
        if not self._ready:
            return out
        with self._lock:
            for index in indices:
                try:
                    handle = nv.nvmlDeviceGetHandleByIndex(index)
                    procs = nv.nvmlDeviceGetComputeRunningProcesses(handle)
                    out[index] = tuple(int(p.pid) for p in procs)
                except nv.NVMLError as exc:
                    log.warning("nvml_error", call="processes", gpu=index, error=str(exc))
        return out


def hostname() -> str:
    return socket.gethostname()


def hello_report(
    *, agent: str, now: datetime, gpus: tuple[GpuInfo, ...], cpu_slots: int, labels: dict[str, str]
) -> AgentHello:
    return AgentHello(
        report_id=new_id(),
        agent=agent,
        sent_at=now,
        hostname=hostname(),
        gpus=gpus,
        cpu_slots=cpu_slots,
        labels=labels,
        version=__version__,
    )


def heartbeat_report(
    *, agent: str, now: datetime, running: Sequence[str], gpus: tuple[GpuStatus, ...], draining: bool
) -> AgentHeartbeat:
    return AgentHeartbeat(
        report_id=new_id(), agent=agent, sent_at=now, running_attempts=tuple(running), gpus=gpus, draining=draining
    )
