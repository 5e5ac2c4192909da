"""Integration: the embedded Postgres controller (password auth, loopback, fsync, crash and restart)."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from verlyard_shared.embedded.ports import free_port
from verlyard_shared.embedded.postgres import SYSTEM_USER, EmbeddedPostgres
from verlyard_shared.store.migrate import migrate
from verlyard_shared.store.port import NO_STREAM
from verlyard_shared.store.postgres import PostgresEventStore, connect_pool
from verlyard_shared.testing.store_contract import META, events


@pytest.fixture(scope="module")
def own_server() -> Iterator[EmbeddedPostgres]:
    """A server of this module's own: these tests stop and kill it."""
    root = Path(tempfile.mkdtemp(prefix="verlyard-pg-"))
    root.chmod(0o755)
    server = EmbeddedPostgres(root / "data", port=free_port())
    try:
        server.init()
        server.start()
        yield server
    finally:
        if server.is_running():
            server.stop_immediate()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(server.socket_dir, ignore_errors=True)


async def test_password_is_required_over_tcp(own_server: EmbeddedPostgres) -> None:
    conn = await asyncpg.connect(own_server.url)
    try:
        assert await conn.fetchval("SHOW fsync") == "on"
        assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
        assert await conn.fetchval("SHOW password_encryption") == "scram-sha-256"
    finally:
        await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(f"postgresql://postgres:wrong@127.0.0.1:{own_server.port}/postgres")


def test_files_and_ownership(own_server: EmbeddedPostgres) -> None:
    assert stat.S_IMODE(own_server.password_file.stat().st_mode) == 0o600
    assert len(str(own_server.socket_dir / f".s.PGSQL.{own_server.port}")) < 100
    if os.geteuid() == 0:
        import pwd

        assert pwd.getpwuid(own_server.data_dir.stat().st_uid).pw_name == SYSTEM_USER


def test_init_is_idempotent(own_server: EmbeddedPostgres) -> None:
    password = own_server.password
    own_server.init()
    assert own_server.password == password
    assert own_server.is_running()


def test_create_database(own_server: EmbeddedPostgres) -> None:
    url = own_server.create_database("made_here")
    assert url.endswith("/made_here")
    assert own_server.create_database("made_here", exist_ok=True) == url
    own_server.drop_database("made_here")
    with pytest.raises(ValueError, match="must match"):
        own_server.create_database('x"; DROP DATABASE postgres; --')


@pytest.mark.parametrize("crash", ["stop_immediate", "kill"])
async def test_acknowledged_appends_survive_a_crash(own_server: EmbeddedPostgres, crash: str) -> None:
    url = own_server.create_database(f"crash_{crash}")
    pool = await connect_pool(url)
    try:
        await migrate(pool)
        result = await PostgresEventStore(pool).append("s-1", NO_STREAM, events(3), META)
    finally:
        await pool.close()

    getattr(own_server, crash)()
    assert not own_server.is_running()
    own_server.start()  # runs crash recovery
    assert own_server.is_running()

    pool = await connect_pool(url)
    try:
        store = PostgresEventStore(pool)
        assert [e.position for e in await store.read_all()] == list(
            range(result.first_position, result.last_position + 1)
        )
    finally:
        await pool.close()


def test_stop_and_start_again(own_server: EmbeddedPostgres) -> None:
    own_server.stop()
    assert not own_server.is_running()
    own_server.stop()  # stopping a stopped server is a no-op
    own_server.start()
    own_server.start()  # so is starting a running one
    assert own_server.is_running()
