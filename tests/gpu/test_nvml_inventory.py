"""GPU: the agent's NVML probe reads a real GPU's inventory, live status and compute processes."""

from __future__ import annotations

import subprocess

import pytest

from verlyard_agent.inventory import NvmlProbe

pytestmark = pytest.mark.gpu


def test_inventory_matches_nvidia_smi() -> None:
    gpus = NvmlProbe().inventory()
    smi = (
        subprocess.run(
            ["nvidia-smi", "--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()
    )
    assert len(gpus) == len(smi)
    for gpu, line in zip(gpus, smi, strict=True):
        index, uuid, memory_mib = (part.strip() for part in line.split(","))
        assert gpu.index == int(index)
        assert gpu.uuid == uuid
        assert abs(gpu.memory_total_mb - int(memory_mib)) <= 1
        assert gpu.name


def test_status_reports_every_gpu_with_sane_values() -> None:
    probe = NvmlProbe()
    statuses = probe.status()
    assert [s.index for s in statuses] == [g.index for g in probe.inventory()]
    for status in statuses:
        assert 0.0 <= status.utilization_pct <= 100.0
        assert status.memory_used_mb >= 0
    assert set(probe.processes([s.index for s in statuses])) == {s.index for s in statuses}
