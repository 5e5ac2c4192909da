"""Adapter: apply the SQL migrations shipped in `verlyard_shared/store/migrations/` in name order.

Each file runs once, in its own transaction, and is recorded in `schema_migrations` with its sha256.
An applied file whose checksum changed is an error (add a new file instead of editing an old one).
Concurrent migrators (several services starting at once) are serialised by a session advisory lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

import asyncpg
from asyncpg.pool import PoolConnectionProxy

MIGRATION_NAME = re.compile(r"^\d{4}_[a-z0-9_]+\.sql$")
"""File names: a 4-digit sequence, an underscore, a lower-case description (`0001_events.sql`)."""

ADVISORY_LOCK_KEY = 0x7665726C79617264 & 0x7FFFFFFFFFFFFFFF
"""pg_advisory_lock key held while migrating ("verlyard" in ASCII)."""


class MigrationError(RuntimeError):
    """The database and the shipped migrations disagree; the message says which file and what to do."""


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str
    checksum: str
    """sha256 hex digest of the file's bytes."""


def load_migrations(source: Traversable | Path | None = None) -> list[Migration]:
    """The migrations in `source` (default: the package data), sorted by name."""
    folder: Traversable | Path = source if source is not None else files("verlyard_shared.store") / "migrations"
    found: list[Migration] = []
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        if not MIGRATION_NAME.match(entry.name):
            raise MigrationError(f"migration file {entry.name!r} does not match {MIGRATION_NAME.pattern}")
        raw = entry.read_bytes()
        found.append(Migration(name=entry.name, sql=raw.decode("utf-8"), checksum=hashlib.sha256(raw).hexdigest()))
    found.sort(key=lambda m: m.name)
    if not found:
        raise MigrationError(f"no migrations found in {folder}")
    return found


_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name        text        PRIMARY KEY,
    checksum    text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


async def migrate(
    conn_or_pool: asyncpg.Connection | asyncpg.Pool, *, source: Traversable | Path | None = None
) -> list[str]:
    """Apply the pending migrations; return the names applied now (empty when the schema is current)."""
    migrations = load_migrations(source)
    if isinstance(conn_or_pool, asyncpg.Pool):
        async with conn_or_pool.acquire() as conn:
            return await _migrate(conn, migrations)
    return await _migrate(conn_or_pool, migrations)


async def _migrate(conn: asyncpg.Connection | PoolConnectionProxy, migrations: list[Migration]) -> list[str]:
    await conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)
    try:
        await conn.execute(_CREATE_TABLE)
        rows = await conn.fetch("SELECT name, checksum FROM schema_migrations")
        applied = {row["name"]: row["checksum"] for row in rows}
        done: list[str] = []
        for migration in migrations:
            recorded = applied.get(migration.name)
            if recorded is not None:
                if recorded != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.name} was applied with sha256 {recorded} but the file now has "
                        f"{migration.checksum}: never edit an applied migration, add a new file instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (name, checksum) VALUES ($1, $2)", migration.name, migration.checksum
                )
            done.append(migration.name)
        return done
    finally:
        # A dead connection has already released its session lock; keep the original error visible.
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)
