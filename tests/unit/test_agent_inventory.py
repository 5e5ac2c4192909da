"""Unit: GPU inventory through NVML (a fake pynvml module), and a host without NVML."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from verlyard_agent.inventory import NvmlProbe


class FakeNvmlError(Exception):
    pass


class FakeNvml:
    NVMLError = FakeNvmlError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, count: int = 2, fail_init: bool = False) -> None:
        self.count = count
        self.fail_init = fail_init

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise FakeNvmlError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-{h}"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(total=80 * 1024**3, used=(h + 1) * 1024**3)

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=50 + h)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        if h == 1:
            raise FakeNvmlError("not supported")
        return 60

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[Any]:
        return [SimpleNamespace(pid=1234)] if h == 0 else []


def test_inventory_and_status_of_each_gpu():
    probe = NvmlProbe(FakeNvml())
    gpus = probe.inventory()
    assert [(g.index, g.name, g.uuid, g.memory_total_mb) for g in gpus] == [
        (0, "NVIDIA H100 80GB HBM3", "GPU-0", 81920),
        (1, "NVIDIA H100 80GB HBM3", "GPU-1", 81920),
    ]
    status = probe.status()
    assert [(s.utilization_pct, s.memory_used_mb, s.temperature_c) for s in status] == [
        (50.0, 1024, 60.0),
        (51.0, 2048, None),
    ]
    assert probe.processes([0, 1]) == {0: (1234,), 1: ()}


def test_no_nvml_means_no_gpus():
    probe = NvmlProbe(FakeNvml(fail_init=True))
    assert probe.inventory() == () and probe.status() == () and probe.processes([0]) == {}
    assert probe.unavailable_reason is not None and "Not Found" in probe.unavailable_reason


def test_this_host_without_a_driver_reports_no_gpus_or_its_real_ones():
    probe = NvmlProbe()
    gpus = probe.inventory()
    assert (probe.unavailable_reason is None) == bool(gpus) or gpus == ()
