"""Integration: the Postgres event store passes the EventStore contract, plus what only Postgres can show."""

from __future__ import annotations

import asyncio
from importlib.resources import files
from pathlib import Path

import asyncpg
import pytest

from verlyard_shared.embedded.ports import free_port
from verlyard_shared.embedded.postgres import EmbeddedPostgres
from verlyard_shared.store.migrate import MigrationError, load_migrations, migrate
from verlyard_shared.store.port import NO_STREAM, EventStore, StoreUnavailable
from verlyard_shared.store.postgres import NOTIFY_CHANNEL, PostgresEventStore, connect_pool
from verlyard_shared.testing.store_contract import META, StoreContract, events


class TestPostgresEventStore(StoreContract):
    @pytest.fixture
    async def store(self, pg_store: PostgresEventStore) -> EventStore:
        return pg_store


async def test_events_are_append_only_in_the_database(pg_pool: asyncpg.Pool, pg_store: PostgresEventStore) -> None:
    await pg_store.append("s-1", NO_STREAM, events(2), META)
    async with pg_pool.acquire() as conn:
        for statement in ("UPDATE events SET type = 'x'", "DELETE FROM events", "TRUNCATE events"):
            with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
                await conn.execute(statement)
    assert len(await pg_store.read_all()) == 2


async def test_position_cannot_be_chosen_by_the_writer(pg_pool: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.GeneratedAlwaysError):
        await pg_pool.execute(
            "INSERT INTO events (position, event_id, stream_id, version, type, data, actor, correlation_id)"
            " VALUES (1, 'e', 's', 1, 't', '{}', 'a', 'c')"
        )


async def test_data_column_holds_the_tagged_event(pg_pool: asyncpg.Pool, pg_store: PostgresEventStore) -> None:
    await pg_store.append("s-1", NO_STREAM, events(1), META)
    row = await pg_pool.fetchrow("SELECT type, data->>'type' AS tag, schema_version FROM events")
    assert row is not None
    assert (row["type"], row["tag"], row["schema_version"]) == ("stage.pending", "stage.pending", 1)


async def test_commit_notifies_the_last_position(pg_url: str, pg_store: PostgresEventStore) -> None:
    received: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(pg_url)
    try:
        await listener.add_listener(NOTIFY_CHANNEL, lambda *args: received.put_nowait(args[3]))
        result = await pg_store.append("s-1", NO_STREAM, events(3), META)
        assert await asyncio.wait_for(received.get(), 5) == str(result.last_position)
    finally:
        await listener.close()


async def test_migrations_are_package_data_and_idempotent(pg_pool: asyncpg.Pool) -> None:
    names = [entry.name for entry in (files("verlyard_shared.store") / "migrations").iterdir()]
    assert "0001_events.sql" in names
    assert await migrate(pg_pool) == []  # the fixture applied them already
    applied = await pg_pool.fetch("SELECT name, checksum FROM schema_migrations ORDER BY name")
    assert [(r["name"], r["checksum"]) for r in applied] == [(m.name, m.checksum) for m in load_migrations()]


async def test_concurrent_migrators_apply_each_file_once(pg_url: str) -> None:
    connections = [await asyncpg.connect(pg_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(conn) for conn in connections))
    finally:
        for conn in connections:
            await conn.close()
    assert sorted(len(r) for r in results) == [0, 0, 0, len(load_migrations())]


async def test_an_edited_applied_migration_is_refused(pg_url: str, tmp_path: Path) -> None:
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE first (id int);\n")
    conn = await asyncpg.connect(pg_url)
    try:
        assert await migrate(conn, source=tmp_path) == ["0001_first.sql"]
        (tmp_path / "0002_second.sql").write_text("CREATE TABLE second (id int);\n")
        assert await migrate(conn, source=tmp_path) == ["0002_second.sql"]
        (tmp_path / "0001_first.sql").write_text("CREATE TABLE first (id bigint);\n")
        with pytest.raises(MigrationError, match=r"0001_first\.sql was applied with sha256"):
            await migrate(conn, source=tmp_path)
    finally:
        await conn.close()


async def test_a_failing_migration_applies_nothing_of_itself(pg_url: str, tmp_path: Path) -> None:
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE ok (id int);\n")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE half (id int);\nSELECT * FROM missing_table;\n")
    conn = await asyncpg.connect(pg_url)
    try:
        with pytest.raises(asyncpg.UndefinedTableError):
            await migrate(conn, source=tmp_path)
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == 1
        assert await conn.fetchval("SELECT to_regclass('half')") is None
    finally:
        await conn.close()


async def test_unreachable_postgres_is_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable):
        await connect_pool(f"postgresql://postgres:x@127.0.0.1:{free_port()}/postgres", connect_timeout=2)


async def test_a_stopped_server_is_store_unavailable_then_recovers(
    pg_server: EmbeddedPostgres, pg_store: PostgresEventStore
) -> None:
    before = await pg_store.append("s-1", NO_STREAM, events(1), META)
    await asyncio.to_thread(pg_server.stop_immediate)
    try:
        with pytest.raises(StoreUnavailable):
            await pg_store.append("s-1", 1, events(1), META)
        with pytest.raises(StoreUnavailable):
            await pg_store.read_all()
    finally:
        await asyncio.to_thread(pg_server.start)
    # Acknowledged before the crash, still there after recovery; the pool reconnects by itself.
    (envelope,) = await pg_store.read_all()
    assert envelope.position == before.first_position
    after = await pg_store.append("s-1", 1, events(1), META)
    assert after.first_version == 2
