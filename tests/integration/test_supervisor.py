"""Integration: the supervisor restarts a crashed service, logs it, and leaves no process behind."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from verlyard_shared.embedded.supervisor import ServiceSpec, Supervisor


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met before the deadline")


def _spec(tmp_path: Path, name: str, code: str) -> ServiceSpec:
    return ServiceSpec(
        name=name, argv=[sys.executable, "-c", code], env=dict(os.environ), log_path=tmp_path / f"{name}.log"
    )


def test_crashed_service_is_restarted_and_pid_file_follows(tmp_path: Path) -> None:
    marker = tmp_path / "starts"
    crash_once = (
        "import pathlib, sys, time\n"
        f"p = pathlib.Path({str(marker)!r}); n = int(p.read_text()) if p.exists() else 0\n"
        "p.write_text(str(n + 1))\n"
        "sys.exit(3) if n == 0 else time.sleep(60)\n"
    )
    supervisor = Supervisor(tmp_path / "run", [_spec(tmp_path, "flaky", crash_once)])
    supervisor.start_all()
    try:
        first_pid = int((tmp_path / "run" / "flaky.pid").read_text())

        def restarted() -> bool:
            supervisor.poll()
            return supervisor.restarts()["flaky"] == 1 and "flaky" in supervisor.pids()

        _wait_for(restarted)
        second_pid = int((tmp_path / "run" / "flaky.pid").read_text())
        assert second_pid != first_pid
        assert psutil.pid_exists(second_pid)
        _wait_for(lambda: marker.read_text() == "2")
    finally:
        supervisor.stop_all(timeout_s=5)
    assert not (tmp_path / "run" / "flaky.pid").exists()
    assert not psutil.pid_exists(second_pid) or psutil.Process(second_pid).status() == psutil.STATUS_ZOMBIE


def test_stop_all_kills_a_service_that_ignores_sigterm(tmp_path: Path) -> None:
    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)\n"
    supervisor = Supervisor(tmp_path / "run", [_spec(tmp_path, "stubborn", stubborn)])
    supervisor.start_all()
    pid = supervisor.pids()["stubborn"]
    time.sleep(0.3)  # let the child install its handler
    supervisor.stop_all(timeout_s=1)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
