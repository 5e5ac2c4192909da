"""Test fixtures: throwaway nats-servers (JetStream, sync_interval always, auth on) started only when a test asks.

- `nats_server` (session): one EmbeddedNats on a free port in a temp dir, killed at the end.
- `nats_server_factory` (function): `make() -> EmbeddedNats`, a started private server for tests that
  kill, pause or restart NATS; every one is killed after the test.
- `nats_url` (function): `nats://user:password@127.0.0.1:<port>` of `nats_server`, after wiping every
  stream and re-creating the verlyard topology, so each test starts clean. For subprocesses, pass
  `nats_server.url` (no credentials) with `nats_server.user` / `nats_server.password` instead.
- `nc` (function): a connected nats-py client (`connect_nats`) on `nats_url`, closed after the test.
- `js` (function): `nc.jetstream()`; every stream and consumer of `verlyard_shared.topology` exists.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from verlyard_shared.embedded.nats import EmbeddedNats
from verlyard_shared.embedded.ports import free_port
from verlyard_shared.nats_topology import connect_nats, ensure_topology

_started: list[EmbeddedNats] = []
_names = itertools.count(1)


def _kill_all() -> None:
    """Last resort (an interrupted session): never leave a nats-server behind."""
    for server in _started:
        with contextlib.suppress(Exception):
            server.kill()


atexit.register(_kill_all)


def _new_server(root: Path) -> EmbeddedNats:
    server = EmbeddedNats(
        root / f"nats-{next(_names)}",
        free_port(),
        user="verlyard",
        password="test_" + secrets.token_hex(16),
        # Small limits: a test never needs more, and a runaway test fails fast.
        max_memory_store="256MB",
        max_file_store="4GB",
    )
    _started.append(server)
    server.start()
    return server


@pytest.fixture(scope="session")
def nats_server() -> Iterator[EmbeddedNats]:
    root = Path(tempfile.mkdtemp(prefix="verlyard-nats-"))
    server = _new_server(root)
    try:
        yield server
    finally:
        server.kill()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def nats_server_factory(tmp_path: Path) -> Iterator[Callable[[], EmbeddedNats]]:
    mine: list[EmbeddedNats] = []

    def make() -> EmbeddedNats:
        server = _new_server(tmp_path)
        mine.append(server)
        return server

    try:
        yield make
    finally:
        for server in mine:
            server.kill()


async def _reset(server: EmbeddedNats) -> None:
    # A test may have paused or stopped the shared server: bring it back first.
    server.resume()
    if not server.is_running():
        server.start()
    nc = await connect_nats(server.url, name="pytest-reset", user=server.user, password=server.password)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            await js.delete_stream(info.config.name or "")
        await ensure_topology(js)
    finally:
        await nc.close()


@pytest.fixture
async def nats_url(nats_server: EmbeddedNats) -> str:
    await _reset(nats_server)
    return nats_server.authed_url


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    client = await connect_nats(nats_url, name="pytest")
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def js(nc: NATS) -> JetStreamContext:
    return nc.jetstream()
