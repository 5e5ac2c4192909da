"""Test fixtures: a throwaway Postgres for integration and e2e tests, started only when a test asks.

- `pg_server` (session): one EmbeddedPostgres on a free port in a temp dir, stopped and removed at the end.
- `pg_url` (function): a fresh, empty database `test_<n>` on it, dropped after the test.
- `pg_pool` (function): an asyncpg pool on `pg_url` with the migrations applied.
- `pg_store` (function): a PostgresEventStore on `pg_pool`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from verlyard_shared.embedded.ports import free_port
from verlyard_shared.embedded.postgres import EmbeddedPostgres
from verlyard_shared.store.migrate import migrate
from verlyard_shared.store.postgres import PostgresEventStore, connect_pool

_databases = itertools.count(1)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[EmbeddedPostgres]:
    # Under /tmp (not pytest's 0700 tmp root) so the unprivileged server user can reach it when we are root.
    root = Path(tempfile.mkdtemp(prefix="verlyard-pg-"))
    root.chmod(0o755)
    server = EmbeddedPostgres(root / "data", port=free_port())
    try:
        server.init()
        server.start()
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop(timeout=10)
        if server.is_running():
            server.kill()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(server.socket_dir, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: EmbeddedPostgres) -> Iterator[str]:
    name = f"test_{next(_databases)}"
    url = pg_server.create_database(name)
    try:
        yield url
    finally:
        # A test may have stopped or killed the server: bring it back for the next test, then drop.
        if not pg_server.is_running():
            pg_server.start()
        pg_server.drop_database(name)


@pytest.fixture
async def pg_pool(pg_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await connect_pool(pg_url, min_size=1, max_size=20)
    try:
        await migrate(pool)
        yield pool
    finally:
        try:
            await asyncio.wait_for(pool.close(), 10)
        except Exception:  # a test may have stopped the server or leaked a connection: close hard
            pool.terminate()


@pytest.fixture
async def pg_store(pg_pool: asyncpg.Pool) -> PostgresEventStore:
    return PostgresEventStore(pg_pool)
