"""End-to-end: `verlyard up` as a new user runs it. It comes up, /healthz answers, every service has
its pid file, Ctrl-C leaves no process behind, and a second `up` finds the same data."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from verlyard_shared.embedded.ports import free_port
from verlyard_shared.envelope import Metadata, NewEvent
from verlyard_shared.events import HostRemoved
from verlyard_shared.ids import new_id
from verlyard_shared.store.port import ANY
from verlyard_shared.store.postgres import PostgresEventStore, connect_pool

SERVICES = ("api", "scheduler", "agent")


@pytest.fixture
def home() -> Iterator[Path]:
    # Outside pytest's 0700 tmp root: the embedded Postgres runs as an unprivileged user when we are root.
    path = Path(tempfile.mkdtemp(prefix="verlyard-up-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERLYARD_")}
    return env


def _start(home: Path, port: int) -> subprocess.Popen[bytes]:
    log = (home / "up-console.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "verlyard_shared.cli", "up", "--home", str(home), "--port", str(port)],
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_ready(process: subprocess.Popen[bytes], home: Path, port: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"verlyard up exited {process.returncode}:\n{_console(home)}")
        try:
            health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            token_file = home / "admin-token"
            if not token_file.exists():  # the API writes the first admin token on its first start
                raise httpx.TransportError("no admin token yet")
            assert token_file.stat().st_mode & 0o777 == 0o600
            headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
            ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2, headers=headers)
            pids_written = all((home / "run" / f"{s}.pid").exists() for s in SERVICES)
            if health.status_code == 200 and ready.status_code == 200 and pids_written:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"verlyard up did not become ready in {timeout_s} s:\n{_console(home)}")


def _console(home: Path) -> str:
    parts = []
    for path in [home / "up-console.log", *sorted((home / "logs").glob("*.log"))]:
        if path.exists():
            parts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
    return "\n".join(parts)


def _stack_processes(home: Path) -> list[psutil.Process]:
    """Every live process whose command line mentions this home (services, nats-server, postgres)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if str(home) in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _service_pids(home: Path) -> dict[str, int]:
    return {s: int((home / "run" / f"{s}.pid").read_text()) for s in SERVICES}


def _stop(process: subprocess.Popen[bytes], home: Path) -> None:
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    try:
        code = process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"verlyard up did not stop on Ctrl-C:\n{_console(home)}") from None
    assert code == 0, _console(home)


def _database_url(home: Path) -> str:
    state = json.loads((home / "stack.json").read_text())
    password = (home / "postgres.password").read_text().strip()
    return f"postgresql://postgres:{password}@127.0.0.1:{state['postgres_port']}/postgres"


async def _append_marker(url: str) -> str:
    pool = await connect_pool(url, min_size=1, max_size=1)
    try:
        event_id = new_id()
        await PostgresEventStore(pool).append(
            "host-e2e-marker",
            ANY,
            [NewEvent(event_id=event_id, event=HostRemoved(name="e2e-marker"))],
            Metadata(actor="test:e2e", correlation_id=event_id),
        )
        return event_id
    finally:
        await pool.close()


async def _read_marker(url: str) -> list[str]:
    pool = await connect_pool(url, min_size=1, max_size=1)
    try:
        return [e.event_id for e in await PostgresEventStore(pool).read_stream("host-e2e-marker")]
    finally:
        await pool.close()


@pytest.mark.timeout(400)
def test_up_serves_stops_cleanly_and_keeps_its_data(home: Path) -> None:
    port = free_port()
    first = _start(home, port)
    try:
        _wait_ready(first, home, port)
        pids = _service_pids(home)
        assert all(psutil.pid_exists(pid) for pid in pids.values())
        assert len(set(pids.values())) == 3, "each service is its own OS process"
        assert not httpx.get(f"http://127.0.0.1:{port}/healthz").is_error
        marker = asyncio.run(_append_marker(_database_url(home)))
    finally:
        _stop(first, home)

    deadline = time.monotonic() + 15
    while _stack_processes(home) and time.monotonic() < deadline:
        time.sleep(0.2)
    leftovers = [(p.pid, p.name()) for p in _stack_processes(home)]
    assert leftovers == [], f"processes left behind after Ctrl-C: {leftovers}"
    assert not any((home / "run" / f"{s}.pid").exists() for s in SERVICES)

    second = _start(home, port)
    try:
        _wait_ready(second, home, port)
        assert asyncio.run(_read_marker(_database_url(home))) == [marker]
    finally:
        _stop(second, home)
