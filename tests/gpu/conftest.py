"""GPU tier: every test here needs an NVIDIA GPU seen through NVML and is skipped without one."""

from __future__ import annotations

import pytest

from verlyard_agent.inventory import NvmlProbe


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    probe = NvmlProbe()
    if probe.inventory():
        return
    reason = probe.unavailable_reason or "NVML reports no GPU on this host"
    for item in items:
        if "tests/gpu/" in str(item.fspath):
            item.add_marker(pytest.mark.skip(reason=f"needs an NVIDIA GPU: {reason}"))
