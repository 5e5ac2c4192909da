"""Adapter: run each verlyard service as its own OS process, restart it when it crashes, log restarts."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import structlog

log = structlog.get_logger("verlyard.supervisor")

_PR_SET_PDEATHSIG = 1
MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 60.0


def _die_with_parent() -> None:
    """Children get SIGTERM if the supervisor itself dies (even by kill -9): nothing is left behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class ServiceSpec:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    log_path: Path


@dataclass
class _Running:
    spec: ServiceSpec
    process: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    next_start_at: float = 0.0
    backoff_s: float = 1.0
    history: list[int] = field(default_factory=list)


class Supervisor:
    """Starts services, restarts crashed ones with backoff, keeps `run/<service>.pid` files true."""

    def __init__(self, run_dir: Path, services: Sequence[ServiceSpec]) -> None:
        self.run_dir = run_dir
        self._services = [_Running(spec=s) for s in services]

    def pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def start_all(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for running in self._services:
            self._start(running)

    def _start(self, running: _Running) -> None:
        spec = running.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        if running.log_file is None:
            running.log_file = spec.log_path.open("ab")
        running.process = subprocess.Popen(
            list(spec.argv),
            env=dict(spec.env),
            stdin=subprocess.DEVNULL,
            stdout=running.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops services in order.
            preexec_fn=_die_with_parent,
        )
        running.started_at = time.monotonic()
        self.pid_file(spec.name).write_text(f"{running.process.pid}\n")
        log.info("service_started", service=spec.name, pid=running.process.pid, log=str(spec.log_path))

    def poll(self) -> None:
        """Restart any service that exited; call this periodically."""
        now = time.monotonic()
        for running in self._services:
            process = running.process
            if process is None:
                if now >= running.next_start_at:
                    running.restarts += 1
                    log.warning("service_restarted", service=running.spec.name, restarts=running.restarts)
                    self._start(running)
                continue
            code = process.poll()
            if code is None:
                if now - running.started_at > STABLE_AFTER_S:
                    running.backoff_s = 1.0
                continue
            running.history.append(code)
            log.error(
                "service_exited",
                service=running.spec.name,
                exit_code=code,
                restart_in_s=running.backoff_s,
                log=str(running.spec.log_path),
            )
            running.process = None
            running.next_start_at = now + running.backoff_s
            running.backoff_s = min(running.backoff_s * 2, MAX_BACKOFF_S)

    def pids(self) -> dict[str, int]:
        return {r.spec.name: r.process.pid for r in self._services if r.process is not None}

    def restarts(self) -> dict[str, int]:
        return {r.spec.name: r.restarts for r in self._services}

    def stop_all(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every service (in reverse start order), wait, then SIGKILL what is left."""
        for running in reversed(self._services):
            if running.process is not None and running.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(running.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for running in reversed(self._services):
            process = running.process
            if process is None:
                continue
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("service_killed", service=running.spec.name, pid=process.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            log.info("service_stopped", service=running.spec.name, exit_code=process.returncode)
        for running in self._services:
            self.pid_file(running.spec.name).unlink(missing_ok=True)
            if running.log_file is not None:
                running.log_file.close()
                running.log_file = None
